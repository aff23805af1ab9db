"""`triton-disagg`: serve a model with Triton Inference Server and its OpenAI frontend, and the tools around it.

    serve       Triton (llm, router, kv_transfer, prefill and decode workers) plus the OpenAI API
    frontend    the OpenAI API alone, in front of a running Triton server
    make-model  write the tiny default checkpoint
    profile     measure prefill and decode on the engine; the profile the SLO planner reads
    plan        grow and shrink a running server's pools (load or SLO policy)
    deploy      check a deployment spec, or render it to Kubernetes manifests
    bench       measure deployments through the OpenAI API with AIPerf
    bench perf  the performance targets (paged attention, served overhead, relay, prefix reuse, KV transfer)
    expert-load the expert loads and placements of a running server's MoE workers (JSON)

Every flag can also be set through an environment variable, named in --help
(TRITON_DISAGG_<FLAG>); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from triton_disagg.launch.deployment import add_deployment_flags
from triton_disagg.launch.flags import EnvFlags, add_serve_flags, default_model, int_list, server_config
from triton_disagg.launch.frontend import FrontendProcess, add_frontend_flags, frontend_config
from triton_disagg.launch.planner import PlannerProcess
from triton_disagg.launch.server import ServerConfig, ServerError, TritonServer
from triton_disagg.launch.server_group import ServerGroup, announce
from triton_disagg.launch.supervisor import StubSupervisor
from triton_disagg.serving.settings import DEFAULT_MODEL_PATH


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ServerError, ValueError) as e:
        print(f"triton-disagg: error: {e}", file=sys.stderr)
        return 1


def serve(args: argparse.Namespace) -> int:
    if (args.component or args.worker_id is not None) and not args.deployment:
        raise ValueError("--component and --worker-id name a part of a deployment: pass --deployment FILE too")
    if args.deployment:
        from triton_disagg.cli.deploy import deployment_for_serve

        local = deployment_for_serve(args)
        if local.announce_to is not None:
            return _serve_worker_component(local.models[0].server, local.announce_to, args.ready_timeout_s)
        groups = [ServerGroup(model.server, model.worker_servers) for model in local.models]
        server = groups[0].entry
        frontend = None if local.frontend is None else FrontendProcess(local.frontend, server.run_dir / "frontend.log")
        # Each model's planner (None: off), next to its entry server.
        planner_of = [
            None if model.planner_args is None
            else PlannerProcess(model.planner_args, group.entry.run_dir / "planner.log", model.server.model_control_key)
            for model, group in zip(local.models, groups)
        ]  # fmt: skip
    else:
        groups = [ServerGroup(server_config(args))]
        server = groups[0].entry
        frontend = None
        if args.frontend_port:
            frontend = FrontendProcess(frontend_config(args, server.grpc_url), server.run_dir / "frontend.log")
        planner_of = [None]
    planners = [planner for planner in planner_of if planner is not None]
    _stop_on_signals()
    try:
        for group in groups:
            group.start()
            for started in group.servers:
                print(f"starting tritonserver (pid {started.pid}); log: {started.log_path}", flush=True)
        for group in groups:
            group.wait_ready(args.ready_timeout_s)
        if frontend is not None:
            frontend.start()
            frontend.wait_ready(args.ready_timeout_s)
        for planner in planners:
            planner.start()
            planner.wait_ready(args.ready_timeout_s)
        for i, (group, planner) in enumerate(zip(groups, planner_of)):  # the first block has the frontend and commands to try
            _print_endpoints(group, frontend if i == 0 else None, planner, try_it=i == 0)
        print("Ctrl-C stops the server.", flush=True)
        return _wait_for_exit([s for group in groups for s in group.servers], frontend, planners)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        for planner in planners:
            planner.stop()
        if frontend is not None:
            frontend.stop()
        for group in groups:
            group.stop()


#: Seconds between a worker pod's announcements to its entry server (which may have restarted).
ANNOUNCE_INTERVAL_S = 10.0


def _serve_worker_component(config: ServerConfig, entry_http_url: str, ready_timeout_s: float) -> int:
    """`serve --deployment FILE --component MODEL/POOL`: one worker server that joins its model's entry server.

    It announces itself to the entry's router once ready, retrying until the entry answers, and again every
    ANNOUNCE_INTERVAL_S (idempotent), so an entry server that restarted finds it again.
    """
    _stop_on_signals()
    server = TritonServer(config)
    try:
        server.start()
        print(f"starting tritonserver (pid {server.pid}); log: {server.log_path}", flush=True)
        server.wait_ready(ready_timeout_s)
        deadline_s = time.monotonic() + ready_timeout_s
        while True:
            try:
                announce(entry_http_url, config, server.model_control_headers)
                break
            except (requests.RequestException, ServerError) as exc:
                if time.monotonic() > deadline_s:
                    raise ServerError(f"the entry server at {entry_http_url} did not take this worker server: {exc}") from None
                time.sleep(1.0)
        print(
            f"ready: {', '.join(server.worker_names)} of model {config.model_path}, joined the entry server at "
            f"{entry_http_url}\n  gRPC     {server.grpc_url}\nCtrl-C stops the server.",
            flush=True,
        )
        next_announce_s = time.monotonic() + ANNOUNCE_INTERVAL_S

        def announce_again() -> None:
            nonlocal next_announce_s
            if time.monotonic() < next_announce_s:
                return
            next_announce_s = time.monotonic() + ANNOUNCE_INTERVAL_S
            try:
                announce(entry_http_url, config, server.model_control_headers)
            except (requests.RequestException, ServerError) as exc:
                print(f"could not announce this worker server to {entry_http_url}: {exc}", flush=True)

        return _wait_for_exit([server], None, [], every_check=announce_again)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        server.stop()


def _stop_on_signals() -> None:
    # SIGTERM (docker stop, kill) stops the server the way Ctrl-C does. SIGINT is set too:
    # a shell without job control starts background commands with it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_keyboard_interrupt)


def _wait_for_exit(
    servers: list[TritonServer],
    frontend: FrontendProcess | None,
    planners: list[PlannerProcess],
    every_check: Callable[[], None] | None = None,
) -> int:
    """Block until a server, the frontend or a planner exits on its own; say which, and return a failing code.

    Meanwhile, a model whose Python stub died is loaded again (see launch.supervisor), and `every_check`
    runs with each check (twice a second).
    """
    supervisors = [StubSupervisor(s.http_url, s.run_dir, s.model_control_headers) for s in servers]
    while True:
        for supervisor in supervisors:
            try:
                for model in supervisor.check():
                    print(f"a Python stub of {model} died; loaded {model} again", flush=True)
            except Exception as exc:  # noqa: BLE001 - the server may be stopping; its exit is noticed below
                print(f"could not check the server's models: {exc}", flush=True)
        if (server := next((s for s in servers if not s.is_running()), None)) is not None:
            code = server.wait()
            print(f"tritonserver exited with code {code}; last lines of {server.log_path}:\n{server.log_tail()}")
            return code or 1
        if frontend is not None and (code := frontend.poll()) is not None:
            print(f"the frontend exited with code {code}; last lines of {frontend.log_path}:\n{frontend.log_tail()}")
            return code or 1
        for planner in planners:
            if (code := planner.poll()) is not None:
                print(f"the planner exited with code {code}; last lines of {planner.log_path}:\n{planner.log_tail()}")
                return code or 1
        if every_check is not None:
            every_check()
        time.sleep(0.5)


def serve_frontend(args: argparse.Namespace) -> int:
    from triton_disagg.frontend.server import run

    config = frontend_config(
        args,
        args.triton_url,
        model_path=Path(args.model_path) if args.model_path else None,
        max_model_len=args.max_model_len,
    )
    run(config)
    return 0


def make_model(args: argparse.Namespace) -> int:
    from triton_disagg.checkpoint import make_model as write_checkpoint

    print(write_checkpoint(Path(args.path), args.variant))
    return 0


def profile(args: argparse.Namespace) -> int:
    from triton_disagg.tools.profiler import ProfileSettings, print_summary, run_profile, write_outputs

    settings = ProfileSettings(
        model_path=str(args.model or default_model()),
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


def _print_endpoints(
    group: ServerGroup, frontend: FrontendProcess | None, planner: PlannerProcess | None, try_it: bool = True
) -> None:
    """What one model's servers serve (with its planner), and with `try_it` commands to try."""
    server = group.entry
    lines = [f"ready: model {server.config.model_path}", f"  workers  {', '.join(group.worker_names)}"]
    for worker_server in group.worker_servers:
        lines.append(f"  worker server {worker_server.grpc_url}: {', '.join(worker_server.worker_names)}")
    if frontend is not None:
        lines.append(f"  OpenAI   {frontend.url}/v1  (log: {frontend.log_path})")
    if planner is not None:
        lines.append(f"  planner  {planner.metrics_url}  (log: {planner.log_path})")
    lines += [f"  HTTP     {server.http_url}", f"  gRPC     {server.grpc_url}", f"  metrics  {server.metrics_url}"]
    if not try_it:
        print("\n".join(lines), flush=True)
        return
    lines.append("try:")
    auth = " -H 'Authorization: Bearer <key>'" if frontend is not None and frontend.config.api_keys else ""
    if frontend is not None:
        lines += [
            f"  curl -N {frontend.url}/v1/completions{auth} -H 'Content-Type: application/json' \\",
            f"    -d '{{\"model\": \"{frontend.config.served_model_name or server.config.model_path.resolve().name}\", \"prompt\": \"Hello\", \"max_tokens\": 16, \"stream\": true}}'",
        ]
    lines += [
        f"  curl -N {server.http_url}/v2/models/llm/generate_stream \\",
        """    -d '{"text_input": "Hello", "max_tokens": 16, "stream": true}'""",
    ]
    print("\n".join(lines), flush=True)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triton-disagg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve_parser = commands.add_parser("serve", help="start Triton with the llm, prefill and decode models")
    serve_parser.set_defaults(run=serve)
    flag = EnvFlags(serve_parser)
    add_serve_flags(flag)
    add_frontend_flags(flag, port_help="port of the OpenAI API started next to Triton (0: do not start it)")
    add_deployment_flags(flag)

    frontend_parser = commands.add_parser("frontend", help="serve the OpenAI API in front of a running Triton server")
    frontend_parser.set_defaults(run=serve_frontend)
    flag = EnvFlags(frontend_parser)
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
    flag = EnvFlags(profile_parser)
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

    from triton_disagg.cli.plan import add_plan_flags, plan

    plan_parser = commands.add_parser(
        "plan", help="grow and shrink a running server's prefill and decode pools (load or SLO policy)"
    )
    plan_parser.set_defaults(run=plan)
    add_plan_flags(EnvFlags(plan_parser))

    from triton_disagg.cli.deploy import add_deploy_parser

    add_deploy_parser(commands)

    from triton_disagg.cli.expert_load import add_expert_load_flags, expert_load

    expert_load_parser = commands.add_parser(
        "expert-load", help="the expert loads and placements of a running server's MoE workers, as JSON"
    )
    expert_load_parser.set_defaults(run=expert_load)
    add_expert_load_flags(EnvFlags(expert_load_parser))

    from triton_disagg.tools.bench import add_bench_flags, bench

    # No abbreviated flags: `bench perf --out` would otherwise read as an abbreviation of bench's own.
    bench_parser = commands.add_parser(
        "bench", help="measure deployments through the OpenAI API with AIPerf (sweep, rate, trace replay)", allow_abbrev=False
    )
    bench_parser.set_defaults(run=bench)
    add_bench_flags(EnvFlags(bench_parser), int_list)
    # `bench perf` is a sub-command of its own; plain `bench ...` keeps running AIPerf.
    bench_commands = bench_parser.add_subparsers(required=False, metavar="{perf}")
    perf_parser = bench_commands.add_parser(
        "perf", help="measure the performance targets side by side in one run; write DIR/bench_perf.json"
    )
    perf_parser.set_defaults(run=bench_perf)
    from triton_disagg.tools.bench_perf import add_perf_flags

    add_perf_flags(EnvFlags(perf_parser))
    return parser


def bench_perf(args: argparse.Namespace) -> int:
    from triton_disagg.tools.bench_perf import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
