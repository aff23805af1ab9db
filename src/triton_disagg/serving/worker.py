"""What every engine worker model shares: the engine thread, its NIXL agent, metrics, responses."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid
from pathlib import Path

import triton_python_backend_utils as pb_utils

from triton_disagg.engine.async_engine import EngineThread
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import InvalidRequest, RequestOutput
from triton_disagg.serving.coalescing_sender import CoalescingSender
from triton_disagg.serving.kv_directory import DirectoryClient
from triton_disagg.serving.model_calls import calls_to
from triton_disagg.serving.live_workers import kv_event_endpoints
from triton_disagg.serving.metrics import WorkerMetrics
from triton_disagg.serving.moe_metrics import MoeMetrics
from triton_disagg.serving.settings import WorkerNetwork
from triton_disagg.serving.tier_metrics import TierMetrics
from triton_disagg.serving.triton_io import CancelCheck, bytes_tensor, error_response, int32_tensor
from triton_disagg.serving.worker_servers import WorkerInfo
from triton_disagg.router.config import PublisherConfig
from triton_disagg.router.events import WorkerId
from triton_disagg.router.publisher import KVEventPublisher

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

logger = logging.getLogger(__name__)

#: Seconds between two attempts to register with the KV directory of the entry server.
REGISTER_RETRY_S = 1.0


class EngineService:
    """One engine on its own thread, with a NIXL agent registered in the KV directory.

    The agent's name is the model name plus a random suffix, so a reloaded
    worker (new pool, new addresses) is a new peer, never a stale one.
    """

    def __init__(self, config: EngineConfig, model_name: str, network: WorkerNetwork = WorkerNetwork(), use_nixl: bool = True) -> None:
        """`network`: how the worker calls other models (its server's gRPC endpoint), where its KV events
        are published (none when it names no place) and where the KV directory is (see `WorkerNetwork`).

        A disk tier (`config.kv_disk_path`) gets a folder per worker under it, named for the model.
        """
        self.model_name = model_name
        self.network = network
        if config.kv_disk_path:
            config.kv_disk_path = str(Path(config.kv_disk_path) / model_name)
        self.agent_name = f"{model_name}-{uuid.uuid4().hex[:8]}"
        factory = None
        if use_nixl:
            from triton_disagg.kv_transfer.nixl_connector import NixlConnector

            factory = lambda pool: NixlConnector(self.agent_name, pool, model_name)  # noqa: E731
        self.engine = LLMEngine(config, kv_connector_factory=factory)
        self.metrics = WorkerMetrics(model_name, self.engine)
        self.tier_metrics = TierMetrics(model_name, self.engine)
        self.moe_metrics = MoeMetrics(model_name, self.engine.eplb) if self.engine.eplb is not None else None
        self.calls = calls_to(network.grpc_url)
        self.directory = DirectoryClient(calls_to(network.directory_url) if network.directory_url else self.calls)
        self.publisher = None
        # Where other servers reach this one (its gRPC endpoint's host): what `describe` tells for an
        # event socket bound on every address.
        self._advertised_host = network.grpc_url.rpartition(":")[0]
        if network.kv_events_host:
            # Ports chosen at bind: the router asks the worker where they are (`describe`).
            any_port = f"tcp://{network.kv_events_host}:*"
            self.publisher = KVEventPublisher(WorkerId(model_name), PublisherConfig(any_port, any_port))
        elif network.kv_events_dir:
            events_endpoint, dump_endpoint = kv_event_endpoints(network.kv_events_dir, model_name)
            self.publisher = KVEventPublisher(WorkerId(model_name), PublisherConfig(events_endpoint, dump_endpoint))
        #: Sends every request's responses off the engine thread (see `ResponseStream`).
        self.responses = CoalescingSender(
            f"responses-{model_name}",
            lambda stream, payload, is_final: stream.send(payload),
            _merge_outputs,
            lambda stream, error: stream.on_send_failed(error),
        )
        self._engine_thread = EngineThread(self.engine, name=f"engine-{model_name}", after_step=self._after_step)
        self._engine_thread.start()
        self._is_registered = not use_nixl
        self._register_lock = threading.Lock()
        self._stop_registering = threading.Event()
        if use_nixl and network.directory_url:
            # The entry server's directory is reached over gRPC, which is safe before the first request:
            # register now, so a decode worker finds this one before it ever served.
            threading.Thread(target=self._register_until_done, name=f"register-{model_name}", daemon=True).start()

    def _register_until_done(self) -> None:
        while not self._is_registered and not self._stop_registering.is_set():
            self.ensure_registered()
            self._stop_registering.wait(REGISTER_RETRY_S)

    def ensure_registered(self) -> None:
        """Publish this worker's agent in the KV directory, once, from `execute`.

        Not from `initialize`: a BLS call made before the model finished loading
        crashes the Python backend. The first request of a prefill worker comes
        from a decode worker, which looks the agent up only after this response.
        """
        if self._is_registered:
            return
        with self._register_lock:
            if self._is_registered:
                return
            connector = self.engine.kv_connector
            layout = dataclasses.replace(connector.layout, server_url=self.network.server_url)
            try:
                self.directory.register(layout, connector.metadata)
                self._is_registered = True
            except Exception:  # noqa: BLE001 - the directory may not be loaded yet: retried with the next request
                logger.warning("could not register %s in the KV directory; will retry", self.agent_name, exc_info=True)

    def _after_step(self) -> None:
        """On the engine thread: publish the step's KV events and metrics."""
        events = self.engine.drain_kv_events()
        if self.publisher is not None:
            self.publisher.publish(events)
        self.metrics.refresh()
        self.tier_metrics.refresh()
        if self.moe_metrics is not None:
            self.moe_metrics.refresh(force=not self.engine.has_unfinished_requests())

    @property
    def engine_thread(self) -> EngineThread:
        return self._engine_thread

    def send_info(self, sender) -> None:
        """Answer a `describe` request: where this worker's KV events are published (`worker_info`, JSON)."""
        if self.publisher is None:
            raise InvalidRequest(f"{self.model_name} publishes no KV events")
        events, dump = (_reachable(e, self._advertised_host) for e in (self.publisher.events_endpoint, self.publisher.dump_endpoint))
        info = WorkerInfo(events, dump, self.agent_name)
        sender.send(pb_utils.InferenceResponse(output_tensors=[bytes_tensor("worker_info", info.encode())]), flags=FINAL)

    def send_expert_load(self, sender) -> None:
        """Answer a `dump_expert_load` request: the latest expert-load snapshot as JSON (`expert_load`)."""
        if self.moe_metrics is None:
            raise InvalidRequest(f"{self.model_name} serves a dense model: it has no expert load to dump")
        text = json.dumps(self.moe_metrics.dump())
        sender.send(pb_utils.InferenceResponse(output_tensors=[bytes_tensor("expert_load", text)]), flags=FINAL)

    def abort(self, request_id: str) -> None:
        """Abort an in-flight request; its final (ABORT) response follows from the engine thread."""
        self._engine_thread.abort(request_id)

    def shutdown(self) -> None:
        """Abort what is in flight (each request gets its final response) and join the engine thread.

        The directory entry stays (BLS from `finalize` is not safe either): it names
        this incarnation only, and a handle naming it fails its hold check.
        """
        self._stop_registering.set()
        self._engine_thread.stop()
        self.responses.close()
        self.engine.shutdown()
        if self.publisher is not None:
            self.publisher.close()


class ResponseStream:
    """Sends one request's engine outputs as responses.

    The engine thread only queues them (`on_output`, `on_error`): a decoupled
    send is a synchronous round trip to the Triton server, and made on the
    engine thread it would lengthen every step. The worker's sender thread
    (`EngineService.responses`) sends them, merging a request's outputs that
    queued while it was busy into one response of several tokens.

    A client that cancels (or a parent request that goes away) aborts the
    request, which frees its blocks; the final ABORT response still goes out.
    """

    def __init__(self, service: "EngineService", sender, request_id: str) -> None:
        self._service = service
        self._sender = sender
        self._request_id = request_id
        self._is_aborting = False
        self._is_cancelled = CancelCheck(sender)

    def on_output(self, output: RequestOutput) -> None:
        """On the engine thread: queue the output."""
        if output.finished:
            self._service.metrics.count_request(output.num_prompt_tokens, output.num_cached_tokens)
        self._service.responses.push(self, output, output.finished)

    def on_error(self, error: Exception) -> None:
        """On the engine thread: queue the request's error response (its last)."""
        self._service.responses.push(self, error, True)

    def send(self, payload: RequestOutput | Exception) -> None:
        """On the sender thread: send an output (or an error) as one response."""
        if isinstance(payload, Exception):
            self._sender.send(error_response(payload), flags=FINAL)
            return
        output = payload
        if not output.finished and (self._is_aborting or self._is_cancelled()):
            if not self._is_aborting:
                self._is_aborting = True
                self._service.abort(self._request_id)
            return
        tensors = [
            int32_tensor("output_ids", output.new_token_ids),
            int32_tensor("num_input_tokens", output.num_prompt_tokens),
            int32_tensor("num_cached_tokens", output.num_cached_tokens),
        ]
        if output.finished:
            tensors.append(bytes_tensor("finish_reason", output.finish_reason.value))
        tensors.extend(self.extra_tensors(output))
        self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if output.finished else 0)

    def on_send_failed(self, error: Exception) -> None:
        """On the sender thread: a send failed (the client is gone). Abort the request; the sender
        drops its later outputs."""
        logger.warning("could not send a response of %s (%s); aborting it", self._request_id, error)
        self._service.abort(self._request_id)

    def extra_tensors(self, output: RequestOutput) -> list:
        return []


def _merge_outputs(earlier: RequestOutput | Exception, later: RequestOutput | Exception) -> RequestOutput | Exception:
    """One output for two a request queued in a row: their tokens, the later one's state (an error wins)."""
    if isinstance(later, Exception):
        return later
    return dataclasses.replace(later, new_token_ids=earlier.new_token_ids + later.new_token_ids)


def _reachable(endpoint: str, advertised_host: str) -> str:
    """A bound ZeroMQ endpoint as others dial it: a socket bound on every address is reached at `advertised_host`."""
    if advertised_host and endpoint.startswith(("tcp://0.0.0.0:", "tcp://*:")):
        return f"tcp://{advertised_host}:{endpoint.rpartition(':')[2]}"
    return endpoint
