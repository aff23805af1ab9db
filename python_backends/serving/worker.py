"""The `worker` model's request path: Triton requests in, engine outputs out as streamed responses."""

from __future__ import annotations

import uuid

import triton_python_backend_utils as pb_utils

from python_backends.engine.async_engine import EngineThread
from python_backends.engine.config import EngineConfig
from python_backends.engine.llm_engine import LLMEngine
from python_backends.engine.params import RequestOutput
from python_backends.serving.protocol import WORKER_INPUT_NAMES, WorkerAbort, parse_worker_request
from python_backends.serving.triton_io import bytes_tensor, error_response, int32_tensor, read_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class KVBlockGauges:
    """`triton_disagg_kv_free_blocks` / `triton_disagg_kv_blocks` on Triton's metrics endpoint."""

    def __init__(self, labels: dict[str, str], num_blocks: int) -> None:
        # Families and metrics are deleted from the server with their Python objects, so all are kept.
        self._free_family = pb_utils.MetricFamily(
            name="triton_disagg_kv_free_blocks",
            description="KV blocks that no request holds (cached prefix blocks included)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._total_family = pb_utils.MetricFamily(
            name="triton_disagg_kv_blocks",
            description="KV blocks in the worker's pool",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._free = self._free_family.Metric(labels=labels)
        self._total = self._total_family.Metric(labels=labels)
        self._total.set(num_blocks)
        self._last_free = -1

    def update(self, num_free_blocks: int) -> None:
        # Setting a metric is a round trip to the server process: skip it when nothing changed.
        if num_free_blocks != self._last_free:
            self._free.set(num_free_blocks)
            self._last_free = num_free_blocks


class WorkerService:
    """One engine on its own thread; `submit` hands it a request and returns at once."""

    def __init__(self, config: EngineConfig, metric_labels: dict[str, str]) -> None:
        self.engine = LLMEngine(config)
        self._gauges = KVBlockGauges(metric_labels, self.engine.block_manager.num_blocks)
        self._gauges.update(self.engine.block_manager.num_free_blocks)
        self._engine_thread = EngineThread(self.engine)
        self._engine_thread.start()

    def submit(self, request) -> None:
        """Start one request; its responses are sent from the engine thread."""
        sender = request.get_response_sender()
        try:
            parsed = parse_worker_request(read_inputs(request, WORKER_INPUT_NAMES))
            if isinstance(parsed, WorkerAbort):
                self.abort(parsed.request_id)
                sender.send(flags=FINAL)
                return
            request_id = request.request_id() or uuid.uuid4().hex
            stream = _ResponseStream(self, sender, request_id)
            self._engine_thread.submit(
                request_id, parsed.prompt_token_ids, parsed.params, stream.on_output, stream.on_error
            )
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller as an error response
            sender.send(error_response(e), flags=FINAL)

    def shutdown(self) -> None:
        """Abort what is in flight (each request gets its final response) and join the engine thread."""
        self._engine_thread.stop()

    def abort(self, request_id: str) -> None:
        """Abort an in-flight request; its final (ABORT) response follows from the engine thread."""
        self._engine_thread.abort(request_id)

    def refresh_metrics(self) -> None:
        """Publish the pool's free-block count. Call on the engine thread."""
        self._gauges.update(self.engine.block_manager.num_free_blocks)


class _ResponseStream:
    """Sends one request's engine outputs as responses. Its callbacks run on the engine thread."""

    def __init__(self, service: WorkerService, sender, request_id: str) -> None:
        self._service = service
        self._sender = sender
        self._request_id = request_id
        self._is_aborting = False

    def on_output(self, output: RequestOutput) -> None:
        self._service.refresh_metrics()
        if not output.finished and not self._is_aborting and self._sender.is_cancelled():
            self._is_aborting = True
            self._service.abort(self._request_id)
        if self._is_aborting and not output.finished:
            return
        tensors = [
            int32_tensor("output_ids", output.new_token_ids),
            int32_tensor("num_input_tokens", output.num_prompt_tokens),
            int32_tensor("num_cached_tokens", output.num_cached_tokens),
        ]
        if output.finished:
            tensors.append(bytes_tensor("finish_reason", output.finish_reason.value))
        # A failed send raises into EngineThread, which aborts the request.
        self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if output.finished else 0)

    def on_error(self, error: Exception) -> None:
        self._service.refresh_metrics()
        self._sender.send(error_response(error), flags=FINAL)
