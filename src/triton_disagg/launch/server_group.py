"""The Triton servers of one deployment on this machine: an entry server and the worker servers.

The entry server runs `llm`, the router and the KV directory (and may run
workers); every worker server runs only workers, which register with the KV
directory over gRPC and publish their KV events over TCP. `ServerGroup`
starts them all at once, waits until each is ready, then announces each
worker server to the entry server's router (`add_server`) and waits until
the router routes to every worker. With no worker server it is exactly the
one `TritonServer` of a plain `serve`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import requests

from triton_disagg.launch.server import ServerConfig, ServerError, Startable, TritonServer
from triton_disagg.serving.worker_servers import ServerAddress


class ServerGroup(Startable):
    """An entry server and its worker servers, started and stopped together. Use as a context manager,
    or call `start()`, `wait_ready()` and `stop()`."""

    def __init__(self, entry: ServerConfig, worker_servers: Sequence[ServerConfig] = ()) -> None:
        """Raises ValueError for a config that does not fit the group (as ServerConfig.validate does)."""
        if not entry.is_entry:
            raise ValueError("entry: the first server of a group runs llm, the router and the KV directory (no entry_grpc_url)")
        for config in worker_servers:
            if config.entry_grpc_url != entry.grpc_url:
                raise ValueError(f"entry_grpc_url of the worker server at {config.grpc_url} must be the entry's {entry.grpc_url}")
        self.entry = TritonServer(entry)
        self.worker_servers = [TritonServer(config) for config in worker_servers]

    @property
    def servers(self) -> list[TritonServer]:
        return [self.entry, *self.worker_servers]

    @property
    def worker_names(self) -> list[str]:
        return [name for server in self.servers for name in server.worker_names]

    def start(self) -> None:
        """Spawn every server (the worker servers' workers register with the entry's KV directory once it is up)."""
        for server in self.servers:
            server.start()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Block until every server is ready and the entry's router routes to every worker. Raises ServerError."""
        deadline = time.monotonic() + timeout_s
        self.entry.wait_ready(timeout_s)
        for server in self.worker_servers:
            server.wait_ready(max(deadline - time.monotonic(), 1.0))
            announce(self.entry.http_url, server.config, self.entry.model_control_headers)
        self.entry.wait_for_router(self.worker_names, deadline, timeout_s)
        # Workers of other servers register with the KV directory as they start (over gRPC, retried
        # each second); until then a decode worker could not pull a prefill worker's KV.
        remote = {name for server in self.worker_servers for name in server.worker_names}
        while not remote <= (registered := registered_workers(self.entry)):
            if time.monotonic() > deadline:
                raise ServerError(
                    f"workers {sorted(remote - registered)} did not register with the KV directory at "
                    f"{self.entry.grpc_url} within {timeout_s:.0f} s; see their servers' logs"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the worker servers, then the entry server."""
        for server in reversed(self.servers):
            server.stop()


def server_address(config: ServerConfig) -> ServerAddress:
    """Where the other servers of a deployment reach the server of `config`."""
    return ServerAddress(config.connect_host, config.http_port, config.grpc_port, config.metrics_port)


def announce(entry_http_url: str, worker_server: ServerConfig, headers: dict[str, str] | None = None) -> None:
    """Have the router of the entry server at `entry_http_url` follow the workers of `worker_server`
    (idempotent). Raises ServerError when it refuses, requests' errors when it cannot be reached."""
    body = {
        "inputs": [
            {"name": "action", "shape": [1], "datatype": "BYTES", "data": ["add_server"]},
            {"name": "server", "shape": [1], "datatype": "BYTES", "data": [server_address(worker_server).encode()]},
        ]
    }
    url = f"{entry_http_url}/v2/models/router/infer"
    response = requests.post(url, json=body, headers=headers or {}, timeout=30)
    if response.status_code != 200:
        raise ServerError(f"the router at {entry_http_url} refused the worker server at {worker_server.http_url}: {response.text}")


def registered_workers(entry: TritonServer) -> set[str]:
    """The workers with a NIXL agent in the entry server's KV directory (agents are `<worker>-<suffix>`)."""
    body = {"inputs": [{"name": "action", "shape": [1], "datatype": "BYTES", "data": ["list"]}]}
    response = requests.post(f"{entry.http_url}/v2/models/kv_transfer/infer", json=body, timeout=30)
    if response.status_code != 200:
        raise ServerError(f"the KV directory at {entry.http_url} did not answer: {response.text}")
    outputs = {output["name"]: output["data"] for output in response.json()["outputs"]}
    return {agent.rsplit("-", 1)[0] for agent in outputs["agent_names"]}
