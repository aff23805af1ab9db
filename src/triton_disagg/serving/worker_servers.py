"""Where a deployment's workers run: the Triton servers the router follows, and each worker's server.

The entry server (the one running `llm`, the router and the KV directory) may
hold workers itself, and other servers hold the rest: a pool per server on one
machine, a server per worker pod on Kubernetes. A worker server announces
itself to the entry's router (`add_server`); the router then polls its
repository index and metrics page like its own, and learns from each worker
where its KV events are published (`describe_worker`). `WorkerLocations` is
the pure part: polls in, the live workers and their servers out. A server that
stops answering loses its workers after `unreachable_after_s`, and is
forgotten after `forget_after_s` (it announces itself again when it returns).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import requests

from triton_disagg.errors import InvalidRequest

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ServerAddress:
    """Where one Triton server is reached from the other servers."""

    host: str
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> "ServerAddress":
        """Raises InvalidRequest naming what is wrong with `text` (JSON with host and the three ports)."""
        try:
            fields = json.loads(text)
            address = cls(
                host=str(fields["host"]),
                http_port=int(fields["http_port"]),
                grpc_port=int(fields["grpc_port"]),
                metrics_port=int(fields["metrics_port"]),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(
                f"server must be JSON with host, http_port, grpc_port and metrics_port, got {text!r} ({exc})"
            ) from None
        if not address.host or not all(0 < port < 65536 for port in (address.http_port, address.grpc_port, address.metrics_port)):
            raise InvalidRequest(f"server {text!r} needs a host and ports in 1..65535")
        return address


@dataclass(slots=True)
class _Server:
    last_answer_s: float
    names: list[str] = field(default_factory=list)
    is_reachable: bool = True


class WorkerLocations:
    """The live workers of the servers the router follows, and each one's server. Pure; not thread-safe.

    The entry server itself is `None` (its workers are reached through BLS); other servers by address.
    """

    def __init__(self, unreachable_after_s: float = 3.0, forget_after_s: float = 60.0) -> None:
        self.unreachable_after_s = unreachable_after_s
        self.forget_after_s = forget_after_s
        self._servers: dict[ServerAddress | None, _Server] = {}

    def add_server(self, address: ServerAddress | None, now_s: float) -> bool:
        """Follow `address` (None: the entry server). Returns whether it is new; a known one is left as it is."""
        if address in self._servers:
            return False
        self._servers[address] = _Server(last_answer_s=now_s)
        return True

    @property
    def servers(self) -> list[ServerAddress | None]:
        return list(self._servers)

    def on_poll(self, address: ServerAddress | None, names: list[str] | None, now_s: float) -> None:
        """A poll of `address` listed `names` READY, or failed (None). Unknown servers are ignored."""
        server = self._servers.get(address)
        if server is None:
            return
        if names is not None:
            server.names, server.last_answer_s, server.is_reachable = list(names), now_s, True
        elif address is not None and server.is_reachable and now_s - server.last_answer_s >= self.unreachable_after_s:
            # The entry server's own failed poll keeps its last view: it is stopping or starting.
            logger.warning("server %s did not answer for %.1f s; its workers leave", address.http_url, now_s - server.last_answer_s)
            server.is_reachable = False
            server.names = []

    def expire(self, now_s: float) -> list[ServerAddress]:
        """Forget the servers silent for `forget_after_s`; returns them."""
        gone = [
            address
            for address, server in self._servers.items()
            if address is not None and now_s - server.last_answer_s >= self.forget_after_s
        ]
        for address in gone:
            del self._servers[address]
        return gone

    def unreachable_servers(self) -> list[ServerAddress]:
        """The servers followed whose workers left because they stopped answering."""
        return [address for address, server in self._servers.items() if address is not None and not server.is_reachable]

    def workers(self) -> dict[str, ServerAddress | None]:
        """Every live model name and its server. A name listed by two servers stays on the entry server,
        else on the one that answered last (a worker moved between servers)."""
        located: dict[str, ServerAddress | None] = {}
        order = sorted(self._servers.items(), key=lambda item: (item[0] is None, item[1].last_answer_s))
        for address, server in order:
            for name in server.names:
                located[name] = address
        return located


@dataclass(slots=True, frozen=True)
class WorkerInfo:
    """What a worker says about itself (`describe: true`): where its KV events are published."""

    events_endpoint: str
    dump_endpoint: str
    agent_name: str = ""

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> "WorkerInfo":
        fields = json.loads(text)
        return cls(fields["events_endpoint"], fields["dump_endpoint"], fields.get("agent_name", ""))


def describe_worker(session: requests.Session, address: ServerAddress, model: str, timeout_s: float = 5.0) -> WorkerInfo:
    """Ask worker `model` on the server at `address` where its KV events are. Raises on any failure."""
    response = session.post(f"{address.http_url}/v2/models/{model}/generate", json={"describe": True}, timeout=timeout_s)
    response.raise_for_status()
    return WorkerInfo.decode(response.json()["worker_info"])
