"""Typed settings of the router and of the KV event stream.

Every field can come from a string mapping (a Triton model's `parameters`,
or environment variables): `RouterConfig.from_mapping(params)` reads the
field names as keys, and `from_env()` reads `TRITON_DISAGG_ROUTER_<FIELD>`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from triton_disagg.router.index import DEFAULT_MAX_BLOCKS_PER_WORKER


class RoutingMode(str, enum.Enum):
    """How the router picks a worker."""

    #: Prefix overlap from the workers' KV events, plus load.
    KV = "kv"
    #: No events: overlap is guessed from the router's own past decisions, which expire.
    APPROX = "approx"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(slots=True, frozen=True)
class RouterConfig:
    """Worker selection. Defaults run on a laptop and are the ones tuned by `triton_disagg.tools.replay_trace`."""

    #: Default routing mode; a request may override it.
    mode: RoutingMode = RoutingMode.KV
    #: Tokens per KV block; must equal the engine's block size or no hash matches.
    block_size: int = 16
    #: Weight of the prefill blocks a worker would still compute, against its active decode blocks.
    #: 3 keeps multi-turn sessions on their worker yet balances load (`triton_disagg.tools.replay_trace` on the
    #: Mooncake synthetic trace, 8 workers: 91-93% of the hit ceiling, max/mean load 1.08-1.21).
    overlap_weight: float = 3.0
    #: What a prompt block a worker holds in host memory is worth against one on its device (0..1):
    #: bringing it back costs a copy instead of a recompute. 0.9 is a GPU's PCIe copy against its
    #: prefill (about 20x faster for a 7B model); on a CPU engine the copy is cheaper still.
    host_hit_weight: float = 0.9
    #: The same for a block on the worker's disk (a read and a checksum, then the host copy).
    disk_hit_weight: float = 0.7
    #: 0 picks the lowest cost (ties: lower load, then random); > 0 samples a softmax of normalised costs.
    temperature: float = 0.0
    #: Busy threshold: skip a worker whose active decode blocks exceed this fraction of its
    #: KV capacity (known from its metrics). None disables it.
    max_decode_block_usage: float | None = None
    #: Busy threshold: skip a worker with more prompt tokens waiting for prefill. None disables it.
    max_queued_prefill_tokens: int | None = None
    #: Time constant, in seconds, of the "blocks sent recently" that breaks ties between equally loaded workers.
    load_decay_s: float = 60.0
    #: Approx mode: seconds a routed request's blocks are assumed cached on its worker.
    approx_ttl_s: float = 120.0
    #: Index entries kept per worker (least recently stored dropped first); bounds memory.
    max_blocks_per_worker: int = DEFAULT_MAX_BLOCKS_PER_WORKER
    #: Seed of tie-breaking and sampling; None seeds from the OS.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 (the engine's KV block size), got {self.block_size}")
        if self.overlap_weight < 0:
            raise ValueError(f"overlap_weight must be >= 0, got {self.overlap_weight}")
        for name in ("host_hit_weight", "disk_hit_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1] (1: as good as a device hit), got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 picks the cheapest worker), got {self.temperature}")
        if self.max_decode_block_usage is not None and not 0 < self.max_decode_block_usage <= 1:
            raise ValueError(
                f"max_decode_block_usage must be in (0, 1] or unset, got {self.max_decode_block_usage}"
            )
        if self.max_queued_prefill_tokens is not None and self.max_queued_prefill_tokens < 0:
            raise ValueError(f"max_queued_prefill_tokens must be >= 0 or unset, got {self.max_queued_prefill_tokens}")
        if self.load_decay_s <= 0:
            raise ValueError(f"load_decay_s must be > 0, got {self.load_decay_s}")
        if self.approx_ttl_s <= 0:
            raise ValueError(f"approx_ttl_s must be > 0, got {self.approx_ttl_s}")
        if self.max_blocks_per_worker < 1:
            raise ValueError(f"max_blocks_per_worker must be >= 1, got {self.max_blocks_per_worker}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> RouterConfig:
        """Settings from strings keyed by field name; empty strings and unknown keys are ignored."""
        return _from_mapping(cls, values)

    @classmethod
    def from_env(cls, prefix: str = "TRITON_DISAGG_ROUTER_") -> RouterConfig:
        """Settings from `<prefix><FIELD>` environment variables."""
        return _from_env(cls, prefix)


@dataclass(slots=True, frozen=True)
class SubscriberConfig:
    """The router's side of the KV event stream."""

    #: Seconds to wait for a dump before asking again.
    dump_timeout_s: float = 2.0
    #: Unanswered dump requests after which the worker's blocks are dropped from the index
    #: (it keeps being asked, and comes back when it answers).
    max_dump_attempts: int = 3
    #: Seconds without a batch or heartbeat after which a worker's blocks are dropped
    #: and a resync is requested. Several publisher heartbeat intervals.
    silence_timeout_s: float = 10.0
    #: Batches buffered per worker while its dump is awaited; older ones are dropped beyond it.
    max_buffered_batches: int = 4096
    #: Seconds between timer checks of the subscriber thread.
    poll_interval_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("dump_timeout_s", "silence_timeout_s", "poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_dump_attempts < 1:
            raise ValueError(f"max_dump_attempts must be >= 1, got {self.max_dump_attempts}")
        if self.max_buffered_batches < 1:
            raise ValueError(f"max_buffered_batches must be >= 1, got {self.max_buffered_batches}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> SubscriberConfig:
        return _from_mapping(cls, values)


@dataclass(slots=True, frozen=True)
class PublisherConfig:
    """A worker's side of the KV event stream."""

    #: ZeroMQ endpoint the PUB socket binds, e.g. "tcp://*:5557" or "ipc:///tmp/kv-prefill_0".
    events_endpoint: str
    #: ZeroMQ endpoint the dump REP socket binds.
    dump_endpoint: str
    #: Seconds between heartbeats (an empty batch repeating the last seq).
    heartbeat_interval_s: float = 1.0
    #: Send each stored block's token ids (the router needs only hashes).
    include_token_ids: bool = False
    #: ZeroMQ send high-water mark of the PUB socket, in messages; beyond it batches are
    #: dropped and routers resynchronise.
    send_hwm: int = 100_000

    def __post_init__(self) -> None:
        if not self.events_endpoint or not self.dump_endpoint:
            raise ValueError("events_endpoint and dump_endpoint must be ZeroMQ endpoints such as tcp://*:5557")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.send_hwm < 1:
            raise ValueError(f"send_hwm must be >= 1, got {self.send_hwm}")


_Config = TypeVar("_Config")


def _from_mapping(cls: type[_Config], values: Mapping[str, str]) -> _Config:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        text = values.get(f.name)
        if text is None or text.strip() == "":
            continue
        kwargs[f.name] = _parse(f.name, str(f.type), text.strip())
    return cls(**kwargs)


def _from_env(cls: type[_Config], prefix: str) -> _Config:
    values = {f.name: os.environ.get(prefix + f.name.upper()) for f in fields(cls)}  # type: ignore[arg-type]
    return _from_mapping(cls, {name: value for name, value in values.items() if value is not None})


def _parse(name: str, type_name: str, text: str) -> Any:
    """One field from its string; raises ValueError naming the field."""
    if text.lower() in ("none", "null") and "None" in type_name:
        return None
    try:
        if "RoutingMode" in type_name:
            return RoutingMode(text.lower())
        if type_name.startswith("bool"):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if type_name.startswith("int"):
            return int(text)
        if type_name.startswith("float"):
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"setting {name}={text!r} is not a valid {type_name}") from None
