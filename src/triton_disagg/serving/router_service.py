"""The `router` model: KV-aware choice of prefill and decode workers for each request.

One instance holds the router state: a prefix index fed by every worker's KV
events (ZeroMQ), the load it routed, and the live worker set from the
repository index of its own server and of every worker server that announced
itself (`add_server`; see `serving.worker_servers`): workers that load or
unload join or leave, and the state of the others survives. A route names
each chosen worker's server (empty: this one), which `llm` and the decode
worker call over gRPC. `llm` asks it three things per request: where to go
(`route`), that the first token arrived (`first_token`), and that it ended
(`complete`), and, when a worker failed under a request, `worker_failed`.
The planner's connector removes a worker with `drain` (no new requests),
`inflight` (requests routed to it that have not completed) and, when the
removal is called off, `undrain`. `status` answers how many decode workers
are routable now (the frontend's readiness).

A worker is routable when it is live (READY in the index), not draining,
and healthy (see `router.health`: not reported failed, not silent on its
KV event stream). With none routable, `route` answers `unavailable_reason`
instead of a worker: a server-side condition, which `llm` waits out for a
bounded time before it answers the client UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import requests
import triton_python_backend_utils as pb_utils

from triton_disagg.errors import InvalidRequest, ServiceUnavailable
from triton_disagg.serving.live_workers import (
    RepositoryWatcher,
    kv_event_endpoints,
    split_workers,
    worker_loads,
)
from triton_disagg.serving.model_calls import ModelCalls, text_array
from triton_disagg.serving.protocol import parse_routing_mode
from triton_disagg.serving.triton_io import bytes_tensor, error_response, read_inputs
from triton_disagg.serving.worker_servers import ServerAddress, WorkerLocations, describe_worker
from triton_disagg.router.config import RouterConfig, RoutingMode
from triton_disagg.router.events import WorkerId
from triton_disagg.router.health import WorkerHealth
from triton_disagg.router.hashing import hash_request_tokens
from triton_disagg.router.selection import KvRouter, NoWorkerAvailable, RouteRequest
from triton_disagg.router.subscriber import KVEventSubscriber, StreamStatus

logger = logging.getLogger(__name__)

ROUTER_MODEL = "router"
ROUTER_INPUT_NAMES = ("action", "request_id", "input_ids", "routing_mode", "worker_name", "server")
ROUTE_OUTPUT_NAMES = (
    "decode_worker", "prefill_worker", "prefill_pool_saturated", "overlap_blocks", "unavailable_reason", "unavailable_detail",
    "decode_worker_url", "prefill_worker_url",
)  # fmt: skip


@dataclass(slots=True, frozen=True)
class Route:
    decode_worker: str
    prefill_worker: str | None  # None: no prefill worker is live, or all are busy
    prefill_pool_saturated: bool
    overlap_blocks: int  # prompt blocks the decode worker holds, as far as the router knows
    #: gRPC endpoint ("host:port") of the decode worker's server; "": the router's own server.
    decode_url: str = ""
    #: The same for the prefill worker.
    prefill_url: str = ""


class RouterService:
    def __init__(
        self,
        config: RouterConfig,
        http_url: str,
        kv_events_dir: str,
        metrics_url: str = "",
        repository_headers: dict[str, str] | None = None,
    ) -> None:
        """`metrics_url`: the server's metrics page, whose worker load reports refresh the router's view;
        `repository_headers`: sent with the repository-index polls (the key of a restricted API)."""
        self.config = config
        self._metrics_url = metrics_url
        self._headers = repository_headers or {}
        self._session = requests.Session()
        self._session.headers.update(self._headers)
        self.router = KvRouter(config)
        self._kv_events_dir = kv_events_dir
        self._subscriber = KVEventSubscriber(self.router.index)
        self._lock = self._subscriber.lock
        self._prefill: list[WorkerId] = []
        self._decode: list[WorkerId] = []
        self._draining: set[WorkerId] = set()  # live, but sent no new requests (about to be unloaded)
        self.health = WorkerHealth()
        self._locations = WorkerLocations()
        self._locations.add_server(None, time.monotonic())
        #: Each live worker's server (None: this one), and the remote ones whose KV events are followed.
        self._worker_servers: dict[WorkerId, ServerAddress | None] = {}
        self._followed: dict[WorkerId, ServerAddress] = {}
        self._watchers: dict[ServerAddress | None, RepositoryWatcher] = {}
        self._watcher = self._watch(None, http_url)

    def route(self, request_id: str, prompt_token_ids: list[int], mode: RoutingMode | None) -> Route:
        """Choose workers and count the request on them.

        Raises ServiceUnavailable when no decode worker can take it: none live ("no_workers"), all
        draining ("all_workers_draining"), all failed or silent ("all_workers_unhealthy"), or all
        over a busy threshold ("all_workers_busy").
        """
        if not self._decode:
            self._refresh_quietly()  # a worker loaded since the last poll is found at once
        request = RouteRequest(
            request_id, tuple(hash_request_tokens(prompt_token_ids, self.config.block_size)), len(prompt_token_ids), mode
        )
        now = time.monotonic()
        with self._lock:
            prefill = self._routable(self._prefill)
            decode = self._routable(self._decode)
            if not decode:
                raise self._why_no_decode_worker()
            prefill_choice = None
            if prefill:
                try:
                    prefill_choice = self.router.select(request, now, prefill)
                except NoWorkerAvailable:
                    pass  # every prefill worker is busy: decode workers prefill locally
            try:
                decode_choice = self.router.select(request, now, decode)
            except NoWorkerAvailable as exc:
                raise ServiceUnavailable(exc.reason, f"no decode worker can take the request: {exc}") from None
            self.router.record(request, prefill_choice or decode_choice, decode_choice, now)
            return Route(
                decode_worker=decode_choice.worker_id,
                prefill_worker=None if prefill_choice is None else prefill_choice.worker_id,
                prefill_pool_saturated=bool(prefill) and prefill_choice is None,
                overlap_blocks=decode_choice.overlap_blocks,
                decode_url=self._url_of(decode_choice.worker_id),
                prefill_url="" if prefill_choice is None else self._url_of(prefill_choice.worker_id),
            )

    def _url_of(self, worker_id: WorkerId) -> str:
        """The gRPC endpoint of the worker's server; "" for this server. Call with the lock held."""
        address = self._worker_servers.get(worker_id)
        return "" if address is None else address.grpc_url

    def add_server(self, address: ServerAddress) -> None:
        """Follow the workers of the server at `address` (it announced itself). Idempotent."""
        with self._lock:
            if not self._locations.add_server(address, time.monotonic()):
                return
        logger.info("following the workers of the Triton server at %s", address.http_url)
        self._watch(address, address.http_url)

    def _watch(self, address: ServerAddress | None, http_url: str) -> RepositoryWatcher:
        watcher = RepositoryWatcher(
            http_url,
            lambda names: self._on_poll(address, names),
            headers=self._headers,
            on_failure=lambda _: self._on_poll(address, None),
        )
        self._watchers[address] = watcher
        watcher.start()
        return watcher

    def worker_failed(self, worker_name: str) -> None:
        """A request saw `worker_name` fail (its stub died, or it went away mid-stream): route around it
        until it is reloaded (see `router.health`). Unknown workers are ignored: they route nowhere."""
        worker_id = WorkerId(worker_name)
        with self._lock:
            if worker_id in self._prefill or worker_id in self._decode:
                self.health.mark_failed(worker_id, self._stream_status(worker_id))
                logger.warning("worker %s failed under a request; routing around it until it is reloaded", worker_name)

    def num_routable_decode_workers(self) -> int:
        """Decode workers a request sent now could be routed to."""
        if not self._decode:
            self._refresh_quietly()
        with self._lock:
            return len(self._routable(self._decode))

    def _routable(self, worker_ids: list[WorkerId]) -> list[WorkerId]:
        """Live workers that are neither draining nor unhealthy. Call with the lock held."""
        return self.health.routable((w for w in worker_ids if w not in self._draining), self._stream_status)

    def _stream_status(self, worker_id: WorkerId) -> StreamStatus | None:
        try:
            return self._subscriber.streams.status(worker_id)
        except KeyError:  # not followed yet (added on the subscriber's thread within a poll interval)
            return None

    def _why_no_decode_worker(self) -> ServiceUnavailable:
        if not self._decode:
            unreachable = self._locations.unreachable_servers()
            if unreachable:
                urls = ", ".join(address.grpc_url for address in unreachable)
                return ServiceUnavailable(
                    "no_workers", f"no decode worker is loaded; the Triton servers at {urls} do not answer (their workers left)"
                )
            return ServiceUnavailable("no_workers", "no decode worker is loaded yet; retry once one is")
        if all(w in self._draining for w in self._decode):
            return ServiceUnavailable("all_workers_draining", f"all {len(self._decode)} decode workers are being unloaded")
        return ServiceUnavailable(
            "all_workers_unhealthy", f"none of the {len(self._decode)} decode workers is answering; retry once one is reloaded"
        )

    def _refresh_quietly(self) -> None:
        try:
            self._watcher.refresh()
        except Exception as exc:  # noqa: BLE001 - the last view stands; the caller decides with it
            logger.debug("repository index refresh failed: %s", exc)

    def drain(self, worker_name: str) -> None:
        """Send `worker_name` no new requests; it leaves the set when it is unloaded.

        Requests routed to it before this returns are counted by `num_inflight`.
        """
        with self._lock:
            if worker_name not in self._prefill and worker_name not in self._decode:
                raise InvalidRequest(f"worker_name {worker_name!r} is not a live prefill or decode worker")
            self._draining.add(WorkerId(worker_name))

    def undrain(self, worker_name: str) -> None:
        """Send `worker_name` new requests again (a removal called off). Idempotent."""
        with self._lock:
            self._draining.discard(WorkerId(worker_name))

    def num_inflight(self, worker_name: str) -> int:
        """Requests routed to `worker_name`, as prefill or decode worker, whose `complete` has not come.

        A request counts from its route decision, so one still queued in Triton
        on its way to the worker counts too. Raises InvalidRequest for a worker
        the router does not know (not loaded, or unloaded already).
        """
        with self._lock:
            try:
                return self.router.num_requests_on(WorkerId(worker_name))
            except KeyError:
                raise InvalidRequest(f"worker_name {worker_name!r} is not a worker the router knows") from None

    def on_first_token(self, request_id: str) -> None:
        with self._lock:
            self.router.on_first_token(request_id)

    def on_complete(self, request_id: str) -> None:
        with self._lock:
            self.router.on_complete(request_id)

    def execute(self, request) -> "pb_utils.InferenceResponse":
        try:
            inputs = read_inputs(request, ROUTER_INPUT_NAMES)
            action = bytes(inputs["action"].reshape(-1)[0]).decode()
            if action == "add_server":
                if inputs["server"] is None:
                    raise InvalidRequest("action add_server needs server")
                self.add_server(ServerAddress.decode(bytes(inputs["server"].reshape(-1)[0]).decode()))
                return pb_utils.InferenceResponse(output_tensors=[])
            if action == "status":
                num_routable = np.array([self.num_routable_decode_workers()], dtype=np.int32)
                return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("num_routable_decode", num_routable)])
            if action in ("drain", "undrain", "inflight", "worker_failed"):
                if inputs["worker_name"] is None:
                    raise InvalidRequest(f"action {action} needs worker_name")
                worker_name = bytes(inputs["worker_name"].reshape(-1)[0]).decode()
                if action in ("undrain", "worker_failed"):
                    (self.undrain if action == "undrain" else self.worker_failed)(worker_name)
                    return pb_utils.InferenceResponse(output_tensors=[])
                if action == "drain":
                    self.drain(worker_name)
                num_inflight = np.array([self.num_inflight(worker_name)], dtype=np.int32)
                return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("num_inflight", num_inflight)])
            if inputs["request_id"] is None:
                raise InvalidRequest(f"action {action} needs request_id")
            request_id = bytes(inputs["request_id"].reshape(-1)[0]).decode()
            if action == "first_token":
                self.on_first_token(request_id)
                return pb_utils.InferenceResponse(output_tensors=[])
            if action == "complete":
                self.on_complete(request_id)
                return pb_utils.InferenceResponse(output_tensors=[])
            if action != "route":
                raise InvalidRequest(
                    "action must be route, first_token, complete, drain, undrain, inflight, worker_failed, "
                    f"status or add_server, got {action!r}"
                )
            mode = inputs["routing_mode"]
            mode = None if mode is None else parse_routing_mode(bytes(mode.reshape(-1)[0]).decode())
            if inputs["input_ids"] is None or inputs["input_ids"].size == 0:
                raise InvalidRequest("action route needs input_ids with at least one token id")
            try:
                route = self.route(request_id, inputs["input_ids"].reshape(-1).tolist(), mode)
            except ServiceUnavailable as exc:
                route, unavailable = Route("", None, False, 0), exc
            else:
                unavailable = None
            return pb_utils.InferenceResponse(
                output_tensors=[
                    bytes_tensor("decode_worker", route.decode_worker),
                    bytes_tensor("prefill_worker", route.prefill_worker or ""),
                    bytes_tensor("decode_worker_url", route.decode_url),
                    bytes_tensor("prefill_worker_url", route.prefill_url),
                    pb_utils.Tensor("prefill_pool_saturated", np.array([route.prefill_pool_saturated], dtype=np.bool_)),
                    pb_utils.Tensor("overlap_blocks", np.array([route.overlap_blocks], dtype=np.int32)),
                    bytes_tensor("unavailable_reason", "" if unavailable is None else unavailable.reason),
                    bytes_tensor("unavailable_detail", "" if unavailable is None else unavailable.detail),
                ]
            )
        except Exception as exc:  # noqa: BLE001 - the caller gets the error; the router keeps serving
            return error_response(exc)

    def shutdown(self) -> None:
        for watcher in list(self._watchers.values()):
            watcher.stop()
        self._subscriber.close()

    def _on_poll(self, address: ServerAddress | None, model_names: list[str] | None) -> None:
        """On a server's watcher thread, after each poll (None: it failed): follow workers that loaded,
        unloaded or whose server went away, and take in the server's load reports."""
        loads = {}
        metrics_url = self._metrics_url if address is None else address.metrics_url
        if model_names is not None and metrics_url:
            try:
                loads = worker_loads(self._session.get(metrics_url, timeout=5).text)
            except requests.RequestException as exc:
                logger.warning("could not read worker loads from %s: %s", metrics_url, exc)
        with self._lock:
            now = time.monotonic()
            self._locations.on_poll(address, model_names, now)
            forgotten = self._locations.expire(now)
            located = self._locations.workers()
            prefill, decode = split_workers(list(located))
            added, removed = self.router.sync_workers([WorkerId(n) for n in prefill + decode])
            for worker_id in removed:
                self.health.forget(worker_id)
            self._prefill, self._decode = [WorkerId(n) for n in prefill], [WorkerId(n) for n in decode]
            self._draining &= set(self._prefill) | set(self._decode)  # an unloaded worker comes back undrained
            self._worker_servers = {WorkerId(n): located[n] for n in prefill + decode}
            for worker_id in self.router.worker_ids:
                if worker_id in loads:
                    self.router.refresh_metrics(worker_id, loads[worker_id])
            # A remote worker's stream is followed once it said where it is (below), again if its server changed.
            moved = [w for w, a in self._followed.items() if self._worker_servers.get(w, a) != a]
            for worker_id in removed + moved:
                self._followed.pop(worker_id, None)
            unfollowed = [
                w for w in self._prefill + self._decode
                if address is not None and self._worker_servers[w] == address and w not in self._followed
            ]  # fmt: skip
        for server in forgotten:
            self._watchers.pop(server).stop()
        for worker_id in removed + moved:
            self._subscriber.remove_worker(worker_id)
        for worker_id in added:
            if self._worker_servers.get(worker_id) is None and self._kv_events_dir:
                self._subscriber.add_worker(worker_id, *kv_event_endpoints(self._kv_events_dir, worker_id))
        for worker_id in unfollowed:
            self._follow_remote(worker_id, address)

    def _follow_remote(self, worker_id: WorkerId, address: ServerAddress) -> None:
        """Ask a worker on another server where its KV events are, and follow them; retried next poll on failure."""
        try:
            info = describe_worker(self._session, address, worker_id)
        except Exception as exc:  # noqa: BLE001 - still loading, or gone: the next poll tries again
            logger.info("worker %s on %s did not say where its KV events are yet: %s", worker_id, address.http_url, exc)
            return
        with self._lock:
            if self._worker_servers.get(worker_id) != address:
                return  # left meanwhile
            self._followed[worker_id] = address
        logger.info("following the KV events of %s at %s", worker_id, info.events_endpoint)
        self._subscriber.add_worker(worker_id, info.events_endpoint, info.dump_endpoint)


class RouterClient:
    """`llm`'s side: calls the `router` model."""

    def __init__(self, calls: ModelCalls) -> None:
        self._calls = calls

    def route(self, request_id: str, prompt_token_ids: list[int], routing_mode: str | None) -> Route:
        """The router's choice. Raises ServiceUnavailable (with the router's reason) when none can take it."""
        inputs = {"action": text_array("route"), "request_id": text_array(request_id), "input_ids": np.array(prompt_token_ids, dtype=np.int32)}
        if routing_mode:
            inputs["routing_mode"] = text_array(routing_mode)
        response = self._call(inputs, list(ROUTE_OUTPUT_NAMES))
        output = {name: response.output(name).reshape(-1)[0] for name in ROUTE_OUTPUT_NAMES}
        if output["unavailable_reason"]:
            raise ServiceUnavailable(output["unavailable_reason"].decode(), output["unavailable_detail"].decode())
        return Route(
            decode_worker=output["decode_worker"].decode(),
            prefill_worker=output["prefill_worker"].decode() or None,
            prefill_pool_saturated=bool(output["prefill_pool_saturated"]),
            overlap_blocks=int(output["overlap_blocks"]),
            decode_url=output["decode_worker_url"].decode(),
            prefill_url=output["prefill_worker_url"].decode(),
        )

    def first_token(self, request_id: str) -> None:
        """Tell the router the request has its first token; does not wait (over gRPC) for its answer."""
        self._calls.notify(ROUTER_MODEL, {"action": text_array("first_token"), "request_id": text_array(request_id)})

    def complete(self, request_id: str) -> None:
        """Tell the router the request ended; does not wait (over gRPC). Either may come first: the
        router ignores a first token after the end."""
        self._calls.notify(ROUTER_MODEL, {"action": text_array("complete"), "request_id": text_array(request_id)})

    def worker_failed(self, worker_name: str) -> None:
        self._call({"action": text_array("worker_failed"), "worker_name": text_array(worker_name)}, [])

    def _call(self, inputs, output_names):
        response = self._calls.call(ROUTER_MODEL, inputs, output_names)
        if response.has_error:
            if response.error_code == "INVALID_ARG":
                raise InvalidRequest(response.error_message)
            raise RuntimeError(f"router: {response.error_message}")
        return response

