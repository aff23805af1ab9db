"""Command-line flags of the launch commands, each also read from an environment variable.

`serve`'s flags describe a `ServerConfig`; `add_serve_flags` declares them and
`server_config` reads them back, so the CLI and the benchmark that starts
servers from flag strings parse them the same way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from triton_disagg.launch.server import DEFAULT_RUN_DIR, ServerConfig
from triton_disagg.serving.settings import DEFAULT_MODEL_PATH

ENV_PREFIX = "TRITON_DISAGG_"


class EnvFlags:
    """Adds flags to a parser whose default comes from TRITON_DISAGG_<FLAG> when that is set."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._parser = parser

    def __call__(self, flag: str, *, type=str, default=None, help: str, **kwargs) -> None:
        env_name = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        raw = os.environ.get(env_name)
        if raw is not None:
            try:
                default = type(raw)
            except ValueError:
                raise SystemExit(f"triton-disagg: error: {env_name}={raw!r} is not a valid {type.__name__}") from None
        shown = "" if default is None or "default:" in help else f", default: {default}"
        self._parser.add_argument(flag, type=type, default=default, help=f"{help} [env {env_name}{shown}]", **kwargs)


def boolean(raw: str) -> bool:
    """A boolean flag value: true/false, 1/0, yes/no, on/off (for `nargs="?", const=True` switches)."""
    lowered = str(raw).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw!r} is not a boolean; use true or false")


def int_list(raw: str) -> tuple[int, ...]:
    """A comma-separated list of integers ("16,32,64"), for grid flags."""
    return tuple(int(part) for part in raw.split(",") if part.strip())


def add_serve_flags(flag: EnvFlags) -> None:
    """Declare the flags of one Triton server (everything `server_config` reads)."""
    flag(
        "--model",
        metavar="PATH",
        default=None,
        help=f"Hugging Face checkpoint directory (default: {DEFAULT_MODEL_PATH}, created when missing)",
    )
    flag("--http-port", type=int, default=8000, help="HTTP port (KServe v2 + generate)")
    flag("--grpc-port", type=int, default=8001, help="gRPC port")
    flag("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    flag("--block-size", type=int, default=16, help="tokens per KV block")
    flag(
        "--num-blocks",
        type=int,
        default=None,
        help="KV blocks per worker (default: sized from the engine's KV memory budget)",
    )
    flag("--max-num-batched-tokens", type=int, default=512, help="token budget of one engine step")
    flag(
        "--profile",
        metavar="PATH",
        default=None,
        help="profile from `triton-disagg profile`: prefill workers step with its saturating token budget",
    )
    flag(
        "--max-model-len", type=int, default=None, help="context window (default: the model's max_position_embeddings)"
    )
    flag("--llm-instances", type=int, default=2, help="instances of the llm entry model")
    flag("--prefill-workers", type=int, default=1, help="prefill workers prefill_<k> (0: decode workers prefill)")
    flag("--decode-workers", type=int, default=1, help="decode workers decode_<j>")
    flag(
        "--min-remote-prefill-tokens",
        type=int,
        default=512,
        help="uncached prompt tokens from which a decode worker has a prefill worker prefill (0: always)",
    )
    flag(
        "--routing-mode",
        choices=["kv", "approx", "round_robin", "random"],
        default="kv",
        help="how the router picks workers (a request's routing_mode input overrides it)",
    )
    flag(
        "--prefill-busy-tokens",
        type=int,
        default=None,
        help="prompt tokens queued on a prefill worker above which it is busy (default: never); "
        "with all busy, decode workers prefill locally",
    )
    flag("--kv-hold-timeout-s", type=float, default=30.0, help="how long a prefill worker holds KV for a pull")
    flag("--kv-pull-timeout-s", type=float, default=30.0, help="how long a decode worker waits for a KV pull")
    flag(
        "--kv-host-blocks",
        type=int,
        default=None,
        metavar="N",
        help="host-memory KV tier per worker, in blocks: evicted blocks are kept there and copied back "
        "on a prefix hit (default: 1 GiB worth; 0 turns it off)",
    )
    flag(
        "--kv-disk-path",
        metavar="DIR",
        default=None,
        help="disk KV tier: each worker keeps blocks evicted from host memory in its own folder under DIR "
        "(default: no disk tier)",
    )
    flag(
        "--kv-disk-blocks",
        type=int,
        default=None,
        metavar="N",
        help="disk KV tier per worker, in blocks (default: 16 GiB worth; 0 turns it off)",
    )
    flag(
        "--ep-size",
        type=int,
        default=1,
        help="expert-parallel ranks per worker of an MoE model; ranks 1..N-1 are child processes of the worker",
    )
    flag(
        "--eplb-redundant-experts",
        type=int,
        default=0,
        help="extra expert slots per MoE layer for replicas of hot experts (experts + this must divide by --ep-size)",
    )
    flag("--eplb-interval", type=int, default=0, help="engine steps between expert balance checks (0: never rearrange)")
    flag("--eplb-window", type=int, default=1000, help="engine steps of expert load the balance is judged on")
    flag(
        "--eplb-threshold",
        type=float,
        default=0.8,
        help="rearrange experts when mean balancedness (mean / max rank load) falls below this",
    )
    flag(
        "--route-wait-s",
        type=float,
        default=10.0,
        help="how long a request waits for a routable decode worker before it is answered UNAVAILABLE",
    )
    flag(
        "--migration-limit",
        type=int,
        default=3,
        help="times a request moves to another decode worker when its worker dies or is unloaded (0: never)",
    )
    flag(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens a request may ask for (default: only the context window limits it)",
    )
    flag(
        "--run-dir",
        metavar="DIR",
        default=str(DEFAULT_RUN_DIR),
        help="where the model repository and server log are written",
    )
    flag(
        "--tritonserver",
        metavar="PATH",
        default=None,
        help="tritonserver binary (default: PATH, then the nvidia-pytriton wheel)",
    )
    flag("--ready-timeout-s", type=float, default=300.0, help="seconds to wait for the models to load")
    flag(
        "--model-control-key",
        metavar="KEY",
        default=None,
        help="refuse Triton's model-repository API (index, load, unload) to clients without header "
        "triton-disagg-key: KEY (the planner: --api-key-header triton-disagg-key=KEY)",
    )


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig that `serve`'s flags describe (the default model is created when missing)."""
    return ServerConfig(
        model_path=Path(args.model) if args.model else default_model(),
        run_dir=Path(args.run_dir),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_max_num_batched_tokens=prefill_budget_from_profile(args.profile) if args.profile else None,
        max_model_len=args.max_model_len,
        llm_instances=args.llm_instances,
        prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers,
        min_remote_prefill_tokens=args.min_remote_prefill_tokens,
        routing_mode=args.routing_mode,
        prefill_busy_tokens=args.prefill_busy_tokens,
        kv_hold_timeout_s=args.kv_hold_timeout_s,
        kv_pull_timeout_s=args.kv_pull_timeout_s,
        kv_host_blocks=args.kv_host_blocks,
        kv_disk_path=Path(args.kv_disk_path) if args.kv_disk_path else None,
        kv_disk_blocks=args.kv_disk_blocks,
        ep_size=args.ep_size,
        eplb_redundant_experts=args.eplb_redundant_experts,
        eplb_interval=args.eplb_interval,
        eplb_window=args.eplb_window,
        eplb_threshold=args.eplb_threshold,
        route_wait_s=args.route_wait_s,
        migration_limit=args.migration_limit,
        max_tokens_limit=args.max_tokens_limit,
        tritonserver=Path(args.tritonserver) if args.tritonserver else None,
        model_control_key=args.model_control_key,
    )


def prefill_budget_from_profile(path: str | Path) -> int:
    """The saturating prefill token budget of a profile file; ValueError if it has none."""
    from triton_disagg.planner.profile import PerformanceProfile

    budget = PerformanceProfile.load(path).prefill.saturating_batch_tokens
    if budget is None:
        raise ValueError(f"profile {str(path)!r} has no saturating_batch_tokens; re-run `triton-disagg profile`")
    return budget


def default_model() -> Path:
    """The default checkpoint's directory, written first if it is missing."""
    if not (DEFAULT_MODEL_PATH / "config.json").is_file():
        from triton_disagg.checkpoint import make_model

        print(f"creating the default model in {DEFAULT_MODEL_PATH}", flush=True)
        make_model(DEFAULT_MODEL_PATH)
    return DEFAULT_MODEL_PATH
