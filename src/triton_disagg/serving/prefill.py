"""The `prefill_<k>` models: compute a prompt's KV, sample its first token, hold the KV for a decode worker."""

from __future__ import annotations

import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_disagg.engine.params import RequestOutput
from triton_disagg.kv_transfer.handle import KVHandle
from triton_disagg.serving.protocol import (
    PREFILL_INPUT_NAMES,
    ExpertLoadRequest,
    HoldCheck,
    WorkerDescribe,
    parse_prefill_request,
)
from triton_disagg.serving.triton_io import error_response, read_inputs
from triton_disagg.serving.worker import FINAL, EngineService, ResponseStream


class PrefillService(EngineService):
    """Answers each prompt with one response: the first token and a `kv_handle` (UINT8).

    The handle is empty when the first token ended the request (EOS or a
    stop token): there is nothing left to decode, so nothing is held.
    """

    def submit(self, request) -> None:
        self.ensure_registered()
        sender = request.get_response_sender()
        try:
            parsed = parse_prefill_request(read_inputs(request, PREFILL_INPUT_NAMES))
            if isinstance(parsed, HoldCheck):
                found = self.engine.handoff.owns(parsed.hold_id)  # a read for a validity check; may race expiry
                response = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("hold_found", np.array([found], dtype=np.bool_))]
                )
                sender.send(response, flags=FINAL)
                return
            if isinstance(parsed, ExpertLoadRequest):
                self.send_expert_load(sender)
                return
            if isinstance(parsed, WorkerDescribe):
                self.send_info(sender)
                return
            request_id = request.request_id() or uuid.uuid4().hex
            stream = _PrefillStream(self, sender, request_id)
            self.engine_thread.submit(
                request_id, parsed.prompt_token_ids, parsed.params, stream.on_output, stream.on_error, hold_kv=True
            )
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as an error response
            sender.send(error_response(exc), flags=FINAL)


class _PrefillStream(ResponseStream):
    def extra_tensors(self, output: RequestOutput) -> list:
        if not output.finished:
            return []
        encoded = b""
        if output.held_block_ids:
            encoded = KVHandle(
                agent_name=self._service.agent_name,
                hold_id=self._request_id,
                block_ids=output.held_block_ids,
                block_hashes=output.held_block_hashes,
                num_tokens=output.num_prompt_tokens,
                block_size=self._service.engine.block_size,
            ).encode()
        return [pb_utils.Tensor("kv_handle", np.frombuffer(encoded, dtype=np.uint8).copy())]
