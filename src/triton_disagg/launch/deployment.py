"""`serve --deployment FILE`: what a deployment spec asks of this machine, as launcher settings.

`local_deployment` maps a spec onto the launcher: one `ServerConfig` (ports,
pools, router, KV), the frontend's `FrontendConfig`, and the arguments of the
planner to run next to them. It serves a spec of one Triton server and one
model; a spec that needs more (several servers or models, tensor parallelism,
pools whose KV settings or expert parallelism differ) is refused with
`NotSupportedYet` naming the field. Resources and placement only matter on
Kubernetes (`triton-disagg deploy render`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from triton_disagg.deploy.kubernetes import planner_policy_args
from triton_disagg.deploy.spec import DeploymentSpec, ModelSpec, Role
from triton_disagg.frontend.config import FrontendConfig
from triton_disagg.launch.server import DEFAULT_RUN_DIR, ServerConfig

#: KV settings of a pool -> the ServerConfig field they set (every worker of the server shares them).
KV_FIELDS = {
    "num_blocks": "num_blocks",
    "kv_host_blocks": "kv_host_blocks",
    "kv_disk_path": "kv_disk_path",
    "kv_disk_blocks": "kv_disk_blocks",
}


class NotSupportedYet(ValueError):
    """The spec is valid, but `serve` cannot run it on one machine yet; the message names the field."""


@dataclass(slots=True, frozen=True)
class LocalDeployment:
    """What `serve --deployment` starts: one server, its frontend, and a planner."""

    server: ServerConfig
    #: None when the spec's frontend port is 0.
    frontend: FrontendConfig | None
    #: `triton-disagg plan` arguments; None when the model's planner is off.
    planner_args: tuple[str, ...] | None


def check_runs_on_one_machine(spec: DeploymentSpec, component: str | None = None) -> None:
    """Raise NotSupportedYet (naming the field) unless `serve --deployment` can run `spec` here; writes nothing."""
    if component is not None:
        known = ["entry", *(f"{m.name}/{p.pool_name}" for m in spec.models for p in m.pools)]
        if component not in known:
            raise ValueError(f"--component {component!r} is not a part of this deployment; use one of {', '.join(known)}")
        raise NotSupportedYet(
            f"--component {component}: running one part of a deployment whose parts run in separate Triton servers "
            "(the Kubernetes pods) is not supported yet; serve the whole spec on one machine without --component"
        )
    if len(spec.servers) > 1:
        raise NotSupportedYet(
            f"servers: {len(spec.servers)} Triton servers; serving across several servers is not supported yet "
            "(declare one server)"
        )
    if len(spec.models) > 1:
        raise NotSupportedYet(f"models: {len(spec.models)} models side by side are not supported yet on one machine (declare one)")
    model = spec.models[0]
    for p, pool in enumerate(model.pools):
        at = f"models[0].pools[{p}].parallelism"
        for field in ("nodes_per_replica", "tensor_parallel_size"):
            if getattr(pool.parallelism, field) > 1:
                raise NotSupportedYet(f"{at}.{field}: the engine has no tensor parallelism yet; {field} > 1 is not supported")
    _shared_settings(model)
    if model.planner.policy != "off" and model.planner.connector == "kubernetes":
        raise ValueError(
            "models[0].planner.connector: kubernetes scales StatefulSets; on one machine use triton or auto"
        )


def _shared_settings(model: ModelSpec) -> dict[str, object]:
    """The KV settings and expert parallelism every pool shares (one ServerConfig holds them), by
    ServerConfig field; NotSupportedYet when pools differ."""
    shared: dict[str, object] = {}
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    for p, pool in enumerate(model.pools):
        ep_size = pool.parallelism.expert_parallel_size
        if shared.setdefault("ep_size", ep_size) != ep_size:
            raise NotSupportedYet(
                f"models[0].pools[{p}].parallelism.expert_parallel_size: pools with different expert "
                "parallelism in one server are not supported yet"
            )
        for field, target in KV_FIELDS.items():
            value = getattr(pool.kv, field)
            at = f"models[0].pools[{p}].kv.{field}"
            if target in shared and shared[target] != value:
                raise NotSupportedYet(f"{at}: pools with different KV settings in one server are not supported yet")
            shared[target] = value
            if value is not None and target not in server_fields:
                flag = "--" + target.replace("_", "-")
                raise NotSupportedYet(f"{at}: this build's server has no {flag}; the KV tier is not supported yet")
    return shared


def local_deployment(
    spec: DeploymentSpec,
    *,
    model_path: Path,
    run_dir: Path = DEFAULT_RUN_DIR,
    api_keys: tuple[str, ...] = (),
    **server_overrides,
) -> LocalDeployment:
    """The launcher settings of a one-server, one-model spec (`model_path` already resolved: spec, flag or default).

    `server_overrides` set ServerConfig fields the spec does not describe (tritonserver, model_control_key).
    Raises NotSupportedYet or ValueError as check_runs_on_one_machine.
    """
    check_runs_on_one_machine(spec)
    model = spec.models[0]
    server = spec.servers[0]
    prefill = model.pools_of(Role.PREFILL)
    (decode,) = model.pools_of(Role.DECODE, Role.AGGREGATED)
    optional = {field: value for field, value in _shared_settings(model).items() if value is not None}
    if decode.max_num_batched_tokens is not None:
        optional["max_num_batched_tokens"] = decode.max_num_batched_tokens
    config = ServerConfig(
        model_path=Path(model_path),
        run_dir=Path(run_dir),
        host=server.address,
        http_port=server.http_port,
        grpc_port=server.grpc_port,
        metrics_port=server.metrics_port,
        block_size=model.block_size,
        prefill_max_num_batched_tokens=prefill[0].max_num_batched_tokens if prefill else None,
        max_model_len=model.max_model_len,
        llm_instances=model.llm_instances,
        prefill_workers=prefill[0].replicas.num_initial if prefill else 0,
        decode_workers=decode.replicas.num_initial,
        min_remote_prefill_tokens=model.router.min_remote_prefill_tokens,
        routing_mode=model.router.mode,
        prefill_busy_tokens=model.router.prefill_busy_tokens,
        kv_hold_timeout_s=model.router.kv_hold_timeout_s,
        kv_pull_timeout_s=model.router.kv_pull_timeout_s,
        **optional,
        **server_overrides,
    )
    frontend = None
    if spec.frontend.port:
        frontend = FrontendConfig(
            triton_url=f"{server.connect_host}:{server.grpc_port}",
            host=spec.frontend.host,
            port=spec.frontend.port,
            served_model_name=model.name,
            max_body_bytes=spec.frontend.max_body_bytes,
            api_keys=api_keys,
        )
    return LocalDeployment(config, frontend, _planner_args(model, config))


def _planner_args(model: ModelSpec, server: ServerConfig) -> tuple[str, ...] | None:
    if model.planner.policy == "off":
        return None
    return (
        "plan",
        "--connector", "triton",
        "--http-url", server.http_url,
        "--metrics-url", server.metrics_url,
        "--model-repository", str(Path(server.run_dir) / "model_repository"),
        *planner_policy_args(model),
    )  # fmt: skip


def add_deployment_flags(flag) -> None:
    """`serve`'s flags for a deployment spec (flag: launch.flags.EnvFlags)."""
    flag(
        "--deployment",
        metavar="FILE",
        default=None,
        help="serve a deployment spec (YAML; see docker/examples/): it sets ports, pools, router, KV and planner, "
        "and other serve flags but --model, --run-dir, --tritonserver, --ready-timeout-s, --model-control-key "
        "and --api-keys are ignored",
    )
    flag(
        "--component",
        default=None,
        help="with --deployment: the part of the deployment this process runs, `entry` or MODEL/POOL "
        "(Kubernetes pods; not supported yet)",
    )
    flag("--worker-id", type=int, default=None, help="with --component MODEL/POOL: this worker's id (the pod's ordinal)")
