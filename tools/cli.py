"""`triton-disagg`: serve a model with Triton Inference Server and its OpenAI frontend, and the tools around it.

    serve       Triton (llm, router, kv_transfer, prefill and decode workers) plus the OpenAI API
    frontend    the OpenAI API alone, in front of a running Triton server
    make-model  write the tiny default checkpoint
    profile     measure prefill and decode on the engine; the profile the SLO planner reads
    plan        grow and shrink a running server's pools (load or SLO policy)
    bench       measure deployments through the OpenAI API with AIPerf

Every flag can also be set through an environment variable, named in --help
(TRITON_DISAGG_<FLAG>); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from python_backends.serving.settings import DEFAULT_MODEL_PATH
from tools.frontend_process import FrontendProcess, add_frontend_flags, frontend_config
from tools.launcher import DEFAULT_RUN_DIR, ServerConfig, ServerError, TritonServer

ENV_PREFIX = "TRITON_DISAGG_"


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ServerError, ValueError) as e:
        print(f"triton-disagg: error: {e}", file=sys.stderr)
        return 1


def serve(args: argparse.Namespace) -> int:
    server = TritonServer(server_config(args))
    frontend = None
    if args.frontend_port:
        frontend = FrontendProcess(frontend_config(args, server.grpc_url), server.run_dir / "frontend.log")
    # SIGTERM (docker stop, kill) stops the server the way Ctrl-C does. SIGINT is set too:
    # a shell without job control starts background commands with it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_keyboard_interrupt)
    try:
        server.start()
        print(f"starting tritonserver (pid {server.pid}); log: {server.log_path}", flush=True)
        server.wait_ready(args.ready_timeout_s)
        if frontend is not None:
            frontend.start()
            frontend.wait_ready(args.ready_timeout_s)
        _print_endpoints(server, frontend)
        return _wait_for_exit(server, frontend)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        if frontend is not None:
            frontend.stop()
        server.stop()


def _wait_for_exit(server: TritonServer, frontend: FrontendProcess | None) -> int:
    """Block until the server or the frontend exits on its own; say which, and return a failing code."""
    while True:
        if not server.is_running():
            code = server.wait()
            print(f"tritonserver exited with code {code}; last lines of {server.log_path}:\n{server.log_tail()}")
            return code or 1
        if frontend is not None and (code := frontend.poll()) is not None:
            print(f"the frontend exited with code {code}; last lines of {frontend.log_path}:\n{frontend.log_tail()}")
            return code or 1
        time.sleep(0.5)


def serve_frontend(args: argparse.Namespace) -> int:
    from frontend.server import run

    config = frontend_config(
        args,
        args.triton_url,
        model_path=Path(args.model_path) if args.model_path else None,
        max_model_len=args.max_model_len,
    )
    run(config)
    return 0


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig that `serve`'s flags describe (the default model is created when missing)."""
    model_path = args.model or _default_model()
    return ServerConfig(
        model_path=Path(model_path),
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
        tritonserver=Path(args.tritonserver) if args.tritonserver else None,
        model_control_key=args.model_control_key,
    )


def make_model(args: argparse.Namespace) -> int:
    from python_backends.checkpoint import make_model as write_checkpoint

    print(write_checkpoint(Path(args.path), args.variant))
    return 0


def profile(args: argparse.Namespace) -> int:
    from tools.profiler import ProfileSettings, print_summary, run_profile, write_outputs

    settings = ProfileSettings(
        model_path=str(args.model or _default_model()),
        device=args.device,
        device_kind=args.device_kind,
        prefill_token_budgets=args.prefill_token_budgets,
        prefill_input_tokens=args.prefill_input_tokens,
        ttft_input_tokens=args.ttft_input_tokens,
        ttft_batch_sizes=args.ttft_batch_sizes,
        decode_concurrency=args.decode_concurrency,
        decode_context_tokens=args.decode_context_tokens,
        decode_steps=args.decode_steps,
        repeats=args.repeats,
        saturation=args.saturation,
    )
    result = run_profile(settings)
    output = Path(args.output)
    plot_path = Path(args.plot) if args.plot else output.with_suffix(".png")
    write_outputs(result, output, plot_path)
    print_summary(result)
    print(f"wrote {output} and {plot_path}; serve with it: triton-disagg serve --profile {output}")
    return 0


def prefill_budget_from_profile(path: str | Path) -> int:
    """The saturating prefill token budget of a profile file; ValueError if it has none."""
    from planner.profile import PerformanceProfile

    budget = PerformanceProfile.load(path).prefill.saturating_batch_tokens
    if budget is None:
        raise ValueError(f"profile {str(path)!r} has no saturating_batch_tokens; re-run `triton-disagg profile`")
    return budget


def _default_model() -> Path:
    if not (DEFAULT_MODEL_PATH / "config.json").is_file():
        from python_backends.checkpoint import make_model as write_checkpoint

        print(f"creating the default model in {DEFAULT_MODEL_PATH}", flush=True)
        write_checkpoint(DEFAULT_MODEL_PATH)
    return DEFAULT_MODEL_PATH


def _print_endpoints(server: TritonServer, frontend: FrontendProcess | None) -> None:
    lines = [f"ready: model {server.config.model_path}", f"  workers  {', '.join(server.worker_names)}"]
    if frontend is not None:
        lines.append(f"  OpenAI   {frontend.url}/v1  (log: {frontend.log_path})")
    lines += [f"  HTTP     {server.http_url}", f"  gRPC     {server.grpc_url}", f"  metrics  {server.metrics_url}", "try:"]
    auth = " -H 'Authorization: Bearer <key>'" if frontend is not None and frontend.config.api_keys else ""
    if frontend is not None:
        lines += [
            f"  curl -N {frontend.url}/v1/completions{auth} -H 'Content-Type: application/json' \\",
            f"    -d '{{\"model\": \"{frontend.config.served_model_name or server.config.model_path.resolve().name}\", \"prompt\": \"Hello\", \"max_tokens\": 16, \"stream\": true}}'",
        ]
    lines += [
        f"  curl -N {server.http_url}/v2/models/llm/generate_stream \\",
        """    -d '{"text_input": "Hello", "max_tokens": 16, "stream": true}'""",
        "Ctrl-C stops the server.",
    ]
    print("\n".join(lines), flush=True)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def int_list(raw: str) -> tuple[int, ...]:
    """A comma-separated list of integers ("16,32,64"), for grid flags."""
    return tuple(int(part) for part in raw.split(",") if part.strip())


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triton-disagg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve_parser = commands.add_parser("serve", help="start Triton with the llm, prefill and decode models")
    serve_parser.set_defaults(run=serve)
    flag = _EnvFlags(serve_parser)
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
    add_frontend_flags(flag, port_help="port of the OpenAI API started next to Triton (0: do not start it)")

    frontend_parser = commands.add_parser("frontend", help="serve the OpenAI API in front of a running Triton server")
    frontend_parser.set_defaults(run=serve_frontend)
    flag = _EnvFlags(frontend_parser)
    flag("--triton-url", default="localhost:8001", help="Triton's gRPC endpoint")
    add_frontend_flags(flag)
    flag("--model-path", metavar="PATH", default=None, help="checkpoint for the tokenizer and chat template (default: the llm model's)")
    flag("--max-model-len", type=int, default=None, help="context window (default: the llm model's)")

    model_parser = commands.add_parser(
        "make-model", help="write the tiny default checkpoint (random weights, byte-level tokenizer)"
    )
    model_parser.set_defaults(run=make_model)
    model_parser.add_argument("path", metavar="PATH", help="directory to write the checkpoint to")
    model_parser.add_argument(
        "--variant", choices=["dense", "moe"], default="dense", help="architecture (default: dense)"
    )

    profile_parser = commands.add_parser(
        "profile", help="measure prefill and decode latency on the engine; write the planner's profile file"
    )
    profile_parser.set_defaults(run=profile)
    flag = _EnvFlags(profile_parser)
    flag("--model", metavar="PATH", default=None, help=f"checkpoint directory (default: {DEFAULT_MODEL_PATH})")
    flag("--device", default="auto", help="engine device: auto, cpu, cuda, cuda:N")
    flag("--device-kind", default=None, help="device kind written to the profile (default: detected)")
    flag(
        "--prefill-token-budgets",
        type=int_list,
        default="16,32,64,128,256,512,1024,2048",
        help="per-step token budgets of the prefill throughput sweep, comma-separated",
    )
    flag("--prefill-input-tokens", type=int, default=512, help="prompt length of the prefill throughput sweep")
    flag("--ttft-input-tokens", type=int_list, default="64,256,1024,2048", help="prompt lengths of the TTFT grid")
    flag("--ttft-batch-sizes", type=int_list, default="1,2,4,8", help="prompts submitted together, TTFT grid")
    flag("--decode-concurrency", type=int_list, default="1,2,4,8,16,32,64", help="requests decoding together, ITL grid")
    flag("--decode-context-tokens", type=int_list, default="128,512,1024,2048", help="context lengths of the ITL grid")
    flag("--decode-steps", type=int, default=16, help="decode steps timed per ITL point")
    flag("--repeats", type=int, default=5, help="rounds of every sweep (each point keeps its fastest run)")
    flag("--saturation", type=float, default=0.95, help="fraction of peak prefill throughput that counts as saturated")
    flag("--output", metavar="PATH", default="results/profile/profile.json", help="profile JSON to write")
    flag("--plot", metavar="PATH", default=None, help="PNG of the curves (default: the output path with .png)")

    from tools.plan import add_plan_flags, plan

    plan_parser = commands.add_parser(
        "plan", help="grow and shrink a running server's prefill and decode pools (load or SLO policy)"
    )
    plan_parser.set_defaults(run=plan)
    add_plan_flags(_EnvFlags(plan_parser))

    from tools.bench import add_bench_flags, bench

    bench_parser = commands.add_parser(
        "bench", help="measure deployments through the OpenAI API with AIPerf (sweep, rate, trace replay)"
    )
    bench_parser.set_defaults(run=bench)
    add_bench_flags(_EnvFlags(bench_parser), int_list)
    return parser


class _EnvFlags:
    """Adds flags whose default comes from TRITON_DISAGG_<FLAG> when that is set."""

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


if __name__ == "__main__":
    sys.exit(main())
