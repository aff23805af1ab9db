"""`triton-disagg deploy`: check a deployment spec, or render it to Kubernetes manifests; and `serve --deployment`."""

from __future__ import annotations

import argparse
from pathlib import Path

from triton_disagg.deploy.kubernetes import render_manifests
from triton_disagg.deploy.render import write_manifests
from triton_disagg.deploy.load import SpecError, load_spec
from triton_disagg.deploy.spec import DeploymentSpec
from triton_disagg.launch.deployment import LocalDeployment, check_runs_on_one_machine, component_deployment, local_deployment
from triton_disagg.launch.flags import EnvFlags, boolean


def add_deploy_parser(commands) -> None:
    """Add `deploy check FILE` and `deploy render FILE --out DIR` to the CLI's subcommands."""
    parser = commands.add_parser("deploy", help="check a deployment spec, or render it to Kubernetes manifests")
    actions = parser.add_subparsers(required=True, metavar="ACTION")
    check_parser = actions.add_parser("check", help="validate a spec; exits 1 naming every bad field")
    check_parser.add_argument("file", metavar="FILE", help="deployment spec (YAML)")
    check_parser.set_defaults(run=check)
    render_parser = actions.add_parser("render", help="write the Kubernetes manifests of a spec")
    render_parser.add_argument("file", metavar="FILE", help="deployment spec (YAML)")
    flag = EnvFlags(render_parser)
    flag("--out", metavar="DIR", default=None, help="directory for the manifests (created; required)")
    flag(
        "--single-file",
        type=boolean,
        nargs="?",
        const=True,
        default=False,
        help="one multi-document manifests.yaml instead of one file per kind",
    )
    render_parser.set_defaults(run=render)


def check(args: argparse.Namespace) -> int:
    """Print what a valid spec describes and where it runs; a bad spec raises SpecError (exit 1)."""
    spec = load_spec(args.file)
    print(f"{args.file}: valid deployment spec {spec.name!r}")
    print(_summary(spec))
    try:
        check_runs_on_one_machine(spec)
        print(f"  one machine: runs with `triton-disagg serve --deployment {args.file}`")
    except ValueError as reason:
        print(f"  one machine: not yet: {reason}")
    try:
        print(f"  Kubernetes:  {len(render_manifests(spec))} manifests (`triton-disagg deploy render {args.file} --out DIR`)")
    except SpecError as reason:
        print(f"  Kubernetes:  cannot render: {reason}")
    return 0


def render(args: argparse.Namespace) -> int:
    if not args.out:
        raise ValueError("deploy render needs --out DIR (or TRITON_DISAGG_OUT)")
    spec = load_spec(args.file)
    for path in write_manifests(spec, Path(args.out), single_file=args.single_file):
        print(path)
    return 0


def deployment_for_serve(args: argparse.Namespace) -> LocalDeployment:
    """What `serve --deployment FILE [--component PART]` starts; the first model is --model, else the spec's,
    else the default one.

    Raises SpecError for a bad spec, NotSupportedYet (a ValueError) for one `serve` cannot run here.
    """
    spec = load_spec(args.deployment)
    check_runs_on_one_machine(spec, args.component)
    if args.model:
        model_path = Path(args.model)
    elif spec.models[0].path:
        model_path = Path(spec.models[0].path)
    else:
        from triton_disagg.launch.flags import default_model

        model_path = default_model()
    common = {
        "model_path": model_path,
        "run_dir": Path(args.run_dir),
        "api_keys": tuple(key.strip() for key in args.api_keys.split(",") if key.strip()),
        "tritonserver": Path(args.tritonserver) if args.tritonserver else None,
        "model_control_key": args.model_control_key,
    }
    if args.component is not None:
        return component_deployment(
            spec, args.component, worker_id=args.worker_id, entry_host=args.entry_host, advertise_host=args.advertise_host, **common
        )
    return local_deployment(spec, **common)


def _summary(spec: DeploymentSpec) -> str:
    lines = []
    for server in spec.servers:
        lines.append(
            f"  server {server.name}: {server.address} http {server.http_port}, grpc {server.grpc_port}, "
            f"metrics {server.metrics_port}"
        )
    frontend = f"port {spec.frontend.port}" if spec.frontend.port else "off"
    lines.append(f"  frontend: {frontend}, entry server {spec.entry_server.name}")
    for model in spec.models:
        planner = model.planner.policy if model.planner.policy == "off" else f"{model.planner.policy} ({model.planner.connector})"
        lines.append(f"  model {model.name}: {model.path or 'the default model'}; router {model.router.mode}, planner {planner}")
        for pool in model.pools:
            replicas = pool.replicas
            parallel = pool.parallelism
            lines.append(
                f"    pool {pool.pool_name} ({pool.role.value}) on server {spec.pool_server(pool).name}: "
                f"{replicas.num_initial} workers ({replicas.min}..{replicas.num_max}), "
                f"TP {parallel.tensor_parallel_size}, EP {parallel.expert_parallel_size}, "
                f"{parallel.nodes_per_replica} node(s), {pool.resources.gpus} GPU(s) each"
            )
    return "\n".join(lines)
