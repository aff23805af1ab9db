"""Model parameters (the `parameters` of a config.pbtxt) to typed settings."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from triton_disagg.engine.config import EngineConfig

#: How long a request waits for a routable decode worker, unless the `route_wait_s` parameter says otherwise.
DEFAULT_ROUTE_WAIT_S = 10.0
#: Times a request may move to another decode worker, unless the `migration_limit` parameter says otherwise.
DEFAULT_MIGRATION_LIMIT = 3

#: The checkpoint served when a model's `model_path` parameter is empty.
DEFAULT_MODEL_PATH = Path.home() / ".cache" / "triton-disagg" / "models" / "tiny-llama"


@dataclass(slots=True, frozen=True)
class LLMSettings:
    """What the `llm` entry model needs to know."""

    #: Checkpoint directory; only its tokenizer.json and config.json are read.
    model_path: Path
    #: Longest prompt + output, in tokens.
    max_model_len: int
    #: How long a request waits for a routable decode worker before it is answered UNAVAILABLE.
    route_wait_s: float = DEFAULT_ROUTE_WAIT_S
    #: Times a request may move to another decode worker when its worker fails (0: never).
    migration_limit: int = DEFAULT_MIGRATION_LIMIT
    #: Largest max_tokens a request may ask for (None: only the context window limits it).
    max_tokens_limit: int | None = None
    #: This server's gRPC endpoint ("host:port") that calls to the router and the workers go through;
    #: empty: BLS.
    grpc_url: str = ""

    @property
    def tokenizer_path(self) -> Path:
        return self.model_path / "tokenizer.json"


@dataclass(slots=True, frozen=True)
class WorkerNetwork:
    """How a worker reaches the other models, and where it publishes its KV events.

    A worker of the entry server (the one running the router and the KV directory) publishes on
    ipc sockets in `kv_events_dir` and calls the directory in its own server; a worker of another
    server publishes over TCP on `kv_events_host` and calls the directory at `directory_url`,
    registering there with its own server's `grpc_url`.
    """

    #: This server's gRPC endpoint ("host:port"), for calls to other models (""; BLS; see `serving.model_calls`).
    grpc_url: str = ""
    #: Folder of the KV events' ipc sockets; "" with kv_events_host, or to publish none.
    kv_events_dir: str = ""
    #: Address to publish KV events on over TCP (this server's address, as the router reaches it).
    kv_events_host: str = ""
    #: gRPC endpoint ("host:port") of the entry server, in a worker server; "": this server is the entry.
    directory_url: str = ""

    @property
    def server_url(self) -> str:
        """What the worker registers in the KV directory as its server: "" in the entry server."""
        return self.grpc_url if self.directory_url else ""


def worker_network(parameters: Mapping[str, str]) -> WorkerNetwork:
    """A worker model's `grpc_url`, `kv_events_dir`, `kv_events_host` and `directory_url` parameters."""
    return WorkerNetwork(**{name: parameters.get(name, "").strip() for name in WorkerNetwork.__dataclass_fields__})


def model_parameters(model_config: Mapping) -> dict[str, str]:
    """The string parameters of a Triton model config (as passed to `initialize`)."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def resolve_model_path(parameters: Mapping[str, str]) -> Path:
    """The `model_path` parameter, or the default model; raises ValueError if it is not a checkpoint."""
    path = Path(parameters.get("model_path") or DEFAULT_MODEL_PATH).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model_path {path!s} has no config.json; set the model_path parameter to a Hugging Face checkpoint "
            "directory, or create the default model with `triton-disagg make-model`"
        )
    return path


def llm_settings(parameters: Mapping[str, str]) -> LLMSettings:
    """Settings of the `llm` model from its parameters. Raises ValueError naming a bad parameter."""
    model_path = resolve_model_path(parameters)
    if not (model_path / "tokenizer.json").is_file():
        raise ValueError(f"model_path {model_path!s} has no tokenizer.json; the llm model needs one")
    max_model_len = _optional_int(parameters, "max_model_len")
    if max_model_len is None:
        max_model_len = json.loads((model_path / "config.json").read_text()).get("max_position_embeddings", 2048)
    route_wait_s = _optional_float(parameters, "route_wait_s", minimum=0.0)
    migration_limit = _optional_int(parameters, "migration_limit", minimum=0)
    return LLMSettings(
        model_path=model_path,
        max_model_len=max_model_len,
        route_wait_s=DEFAULT_ROUTE_WAIT_S if route_wait_s is None else route_wait_s,
        migration_limit=DEFAULT_MIGRATION_LIMIT if migration_limit is None else migration_limit,
        max_tokens_limit=_optional_int(parameters, "max_tokens_limit"),
        grpc_url=grpc_url(parameters),
    )


def engine_config(parameters: Mapping[str, str]) -> "EngineConfig":
    """The engine configuration of a `worker` model from its parameters. Raises ValueError naming a bad one."""
    # Imported here: it pulls in torch, which the llm model has no use for.
    from triton_disagg.engine.config import EngineConfig

    config = EngineConfig(model_path=str(resolve_model_path(parameters)))
    for name in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs", "max_model_len"):
        value = _optional_int(parameters, name)
        if value is not None:
            setattr(config, name, value)
    for name in ("kv_hold_timeout_s", "kv_pull_timeout_s", "eplb_threshold"):
        value = _optional_float(parameters, name)
        if value is not None:
            setattr(config, name, value)
    for name in ("kv_host_blocks", "kv_host_bytes", "kv_disk_blocks", "kv_disk_bytes"):
        value = _optional_count(parameters, name)
        if value is not None:
            setattr(config, name, value)
    min_uses = _optional_int(parameters, "kv_disk_min_uses")
    if min_uses is not None:
        config.kv_disk_min_uses = min_uses
    config.kv_disk_path = parameters.get("kv_disk_path", "").strip()
    config.kv_tier_transport = parameters.get("kv_tier_transport", "").strip() or config.kv_tier_transport
    for name in ("ep_size", "eplb_window"):
        value = _optional_int(parameters, name)
        if value is not None:
            setattr(config, name, value)
    for name in ("eplb_redundant_experts", "eplb_interval"):
        value = _optional_count(parameters, name)
        if value is not None:
            setattr(config, name, value)
    config.validate()
    return config


def min_remote_prefill_tokens(parameters: Mapping[str, str], default: int = 512) -> int:
    """A decode worker's threshold for remote prefill (0: always, when a prefill worker is offered)."""
    value = _optional_count(parameters, "min_remote_prefill_tokens")
    return default if value is None else value


def _optional_float(parameters: Mapping[str, str], name: str, minimum: float | None = None) -> float | None:
    """The parameter as a number: > 0, or >= `minimum` when given. None when empty."""
    raw = parameters.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"parameter {name} must be a number, got {raw!r}") from None
    if minimum is None and not value > 0:
        raise ValueError(f"parameter {name} must be > 0, got {value}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"parameter {name} must be >= {minimum:g}, got {value}")
    return value


def _optional_int(parameters: Mapping[str, str], name: str, minimum: int = 1) -> int | None:
    raw = parameters.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"parameter {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"parameter {name} must be >= {minimum}, got {value}")
    return value


def _optional_count(parameters: Mapping[str, str], name: str) -> int | None:
    """An integer >= 0 (0 meaning none or off); None when the parameter is empty."""
    raw = parameters.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"parameter {name} must be an integer >= 0, got {raw!r}")
    return int(raw)


def grpc_url(parameters: Mapping[str, str]) -> str:
    """This server's gRPC endpoint ("host:port") from a model's `grpc_url` parameter; "" (BLS) when unset.

    Calls between the models go through it (see `serving.model_calls` for why not BLS).
    """
    return parameters.get("grpc_url", "").strip()
