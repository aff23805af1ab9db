"""`serve --deployment FILE`: what a deployment spec asks of this machine, as launcher settings.

`local_deployment` maps a spec onto the launcher: a `ServerConfig` (ports,
pools, router, KV) for the entry server and one for each worker server, the
frontend's `FrontendConfig`, and the arguments of the planner to run next to
them. Each model is served in one Triton server or across several (each
server's workers in it, every server on its own address or ports); models
side by side each have servers of their own (a Triton server holds one
model's `llm`, router, KV directory and workers), and one frontend routes by
the request's `model` to each model's entry server. A spec that needs more
(tensor parallelism, pools of one server whose KV settings or expert
parallelism differ, a planner across servers) is refused with
`NotSupportedYet` naming the field. Resources and placement
only matter on Kubernetes (`triton-disagg deploy render`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from triton_disagg.deploy.kubernetes import planner_policy_args
from triton_disagg.deploy.spec import DeploymentSpec, ModelSpec, PoolSpec, Role, ServerSpec
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
class ModelDeployment:
    """One model of a deployment: its entry server, its worker servers and its planner."""

    name: str
    #: The model's entry server (its llm, router and KV directory; may run workers too).
    server: ServerConfig
    #: `triton-disagg plan` arguments; None when the model's planner is off.
    planner_args: tuple[str, ...] | None
    #: Servers running only workers of this model's router, in spec order.
    worker_servers: tuple[ServerConfig, ...] = ()


@dataclass(slots=True, frozen=True)
class LocalDeployment:
    """What `serve --deployment` starts: each model's servers and planner, and one frontend for them all.

    For `--component MODEL/POOL`: one worker server, and `announce_to`, the entry server it joins.
    """

    models: tuple[ModelDeployment, ...]
    #: None when the spec's frontend port is 0.
    frontend: FrontendConfig | None
    #: HTTP endpoint of the entry server whose router the (only) worker server announces itself to.
    announce_to: str | None = None

    @property
    def server(self) -> ServerConfig:
        """The first model's entry server."""
        return self.models[0].server

    @property
    def worker_servers(self) -> tuple[ServerConfig, ...]:
        return self.models[0].worker_servers

    @property
    def planner_args(self) -> tuple[str, ...] | None:
        return self.models[0].planner_args


def check_runs_on_one_machine(spec: DeploymentSpec, component: str | None = None) -> None:
    """Raise NotSupportedYet (naming the field) unless `serve --deployment` can run `spec` here; writes nothing."""
    if component is not None:  # a pod's part: the one-machine rules below do not apply
        _component_parts(spec, component)
        return
    if spec.models[0].server is not None and spec.model_server(spec.models[0]) is not spec.entry_server:
        raise ValueError("models[0].server: the first model's entry server is the frontend's (frontend.server); leave it unset")
    owners: dict[str, str] = {}  # server name -> the model whose pipeline it runs
    for m, model in enumerate(spec.models):
        where = f"models[{m}]"
        for p, pool in enumerate(model.pools):
            _refuse_tensor_parallelism(m, p, pool)
        places = [(f"{where}.server", spec.model_server(model))]
        places += [(f"{where}.pools[{p}].server", spec.pool_server(pool)) for p, pool in enumerate(model.pools)]
        for field, server in places:
            owner = owners.setdefault(server.name, model.name)
            if owner != model.name:
                raise ValueError(
                    f"{field}: server {server.name!r} already runs model {owner!r}; models side by side need servers "
                    "of their own (set the model's server and its pools' servers)"
                )
    for i, server in enumerate(spec.servers):
        if server.name not in owners:
            raise ValueError(f"servers[{i}]: no model or pool runs in server {server.name!r}; give it a pool or remove it")
    planner_ports: dict[int, str] = {}
    for m, model in enumerate(spec.models):
        where = f"models[{m}]"
        servers = _model_servers(spec, model)
        for server in servers:
            _shared_settings(spec, m, server)
        if model.planner.policy == "off":
            continue
        if model.planner.connector == "kubernetes":
            raise ValueError(f"{where}.planner.connector: kubernetes scales StatefulSets; on one machine use triton or auto")
        if len(servers) > 1:
            raise NotSupportedYet(
                f"{where}.planner: a planner of pools in several Triton servers is not supported yet on one machine; "
                "set policy: off, or declare one server"
            )
        other = planner_ports.setdefault(model.planner.metrics_port, model.name)
        if other != model.name:
            raise ValueError(f"{where}.planner.metrics_port: {model.planner.metrics_port} is also model {other!r}'s planner's")


def _refuse_tensor_parallelism(m: int, p: int, pool: PoolSpec) -> None:
    """NotSupportedYet naming the field when pool `p` of model `m` asks for tensor parallelism."""
    for field in ("nodes_per_replica", "tensor_parallel_size"):
        if getattr(pool.parallelism, field) > 1:
            raise NotSupportedYet(
                f"models[{m}].pools[{p}].parallelism.{field}: the engine has no tensor parallelism yet; {field} > 1 is not supported"
            )


def _model_servers(spec: DeploymentSpec, model: ModelSpec) -> list[ServerSpec]:
    """The servers of `model` in spec order: its entry server and those of its pools."""
    names = {spec.model_server(model).name, *(spec.pool_server(pool).name for pool in model.pools)}
    return [server for server in spec.servers if server.name in names]


def _pools_in(spec: DeploymentSpec, model: ModelSpec, server: ServerSpec) -> list[tuple[int, PoolSpec]]:
    """The pools (with their index) whose workers run in `server`."""
    return [(p, pool) for p, pool in enumerate(model.pools) if spec.pool_server(pool) is server]


def _shared_settings(spec: DeploymentSpec, m: int, server: ServerSpec, pools: list[PoolSpec] | None = None) -> dict[str, object]:
    """The KV settings and expert parallelism every pool of model `m` in `server` (or of `pools`) shares (one
    ServerConfig holds them), by ServerConfig field; NotSupportedYet when pools differ."""
    model = spec.models[m]
    shared: dict[str, object] = {}
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    chosen = _pools_in(spec, model, server) if pools is None else [(model.pools.index(pool), pool) for pool in pools]
    for p, pool in chosen:
        ep_size = pool.parallelism.expert_parallel_size
        if shared.setdefault("ep_size", ep_size) != ep_size:
            raise NotSupportedYet(
                f"models[{m}].pools[{p}].parallelism.expert_parallel_size: pools with different expert "
                "parallelism in one server are not supported yet"
            )
        for field, target in KV_FIELDS.items():
            value = getattr(pool.kv, field)
            at = f"models[{m}].pools[{p}].kv.{field}"
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
    """The launcher settings of a spec; `model_path` is the first model's (already resolved: spec, flag or
    default), every other model's is its spec's `path`, else the default model.

    With one server, its run directory is `run_dir`; with several, each server's is `run_dir/<name>`.
    `server_overrides` set ServerConfig fields the spec does not describe (tritonserver, model_control_key).
    Raises NotSupportedYet or ValueError as check_runs_on_one_machine.
    """
    check_runs_on_one_machine(spec)
    models = []
    for m, model in enumerate(spec.models):
        path = Path(model_path) if m == 0 else _model_path(model)
        models.append(_model_deployment(spec, m, path, Path(run_dir), server_overrides))
    frontend = local_frontend(spec, models, api_keys)
    return LocalDeployment(tuple(models), frontend)


def local_frontend(spec: DeploymentSpec, models: list[ModelDeployment], api_keys: tuple[str, ...]) -> FrontendConfig | None:
    """The frontend of `models` (the first one's entry server, then the others by name); None when its port is 0."""
    if not spec.frontend.port:
        return None
    return FrontendConfig(
        triton_url=models[0].server.grpc_url,
        host=spec.frontend.host,
        port=spec.frontend.port,
        served_model_name=models[0].name,
        max_body_bytes=spec.frontend.max_body_bytes,
        api_keys=api_keys,
        more_models=tuple((d.name, d.server.grpc_url) for d in models[1:]),
    )


def _component_parts(spec: DeploymentSpec, component: str) -> tuple[int, int] | None:
    """(model index, pool index) of `component` "MODEL/POOL"; None for "entry". ValueError for another."""
    if component == "entry":
        return None
    for m, model in enumerate(spec.models):
        for p, pool in enumerate(model.pools):
            if component == f"{model.name}/{pool.pool_name}":
                _refuse_tensor_parallelism(m, p, pool)
                return m, p
    known = ["entry", *(f"{m.name}/{p.pool_name}" for m in spec.models for p in m.pools)]
    raise ValueError(f"--component {component!r} is not a part of this deployment; use one of {', '.join(known)}")


def component_deployment(
    spec: DeploymentSpec,
    component: str,
    *,
    model_path: Path,
    worker_id: int | None = None,
    entry_host: str | None = None,
    advertise_host: str | None = None,
    run_dir: Path = DEFAULT_RUN_DIR,
    api_keys: tuple[str, ...] = (),
    **server_overrides,
) -> LocalDeployment:
    """One part of a spec, as a Kubernetes pod runs it (`serve --deployment FILE --component PART`).

    `entry`: every model's entry server (its `llm`, router and KV directory; no workers: each pool runs in
    pods of its own) and the frontend. `MODEL/POOL`: one Triton server running worker `worker_id` of that
    pool (`decode_<id>`, ...), which joins its model's entry server at `entry_host` (its Service) and is
    reached at `advertise_host` (the pod's address) when it listens on every address. Planners run on
    their own (`triton-disagg plan`).
    """
    parts = _component_parts(spec, component)
    if parts is None:
        models = []
        for m, model in enumerate(spec.models):
            server = spec.model_server(model)
            config = _server_config(
                spec, m, server, Path(model_path) if m == 0 else _model_path(model), Path(run_dir) / server.name,
                pools=[], entry=None, has_worker_servers=True, overrides=server_overrides,
            )
            models.append(ModelDeployment(model.name, config, None))
        return LocalDeployment(tuple(models), local_frontend(spec, models, api_keys))
    m, p = parts
    model, pool = spec.models[m], spec.models[m].pools[p]
    if worker_id is None or worker_id < 0:
        raise ValueError(f"--component {component} runs one worker: pass --worker-id N (N >= 0, the pod's ordinal)")
    entry = spec.model_server(model)
    entry_host = entry_host or entry.connect_host
    server = spec.pool_server(pool)
    config = _server_config(
        spec, m, server, Path(model_path) if m == 0 else _model_path(model), Path(run_dir),
        pools=[pool], entry=f"{entry_host}:{entry.grpc_port}", has_worker_servers=True, overrides=server_overrides,
        worker_id=worker_id, advertise_host=advertise_host,
    )  # fmt: skip
    return LocalDeployment((ModelDeployment(model.name, config, None),), None, announce_to=f"http://{entry_host}:{entry.http_port}")


def _model_path(model: ModelSpec) -> Path:
    if model.path:
        return Path(model.path)
    from triton_disagg.launch.flags import default_model

    return default_model()


def _model_deployment(spec: DeploymentSpec, m: int, model_path: Path, run_dir: Path, server_overrides: dict) -> ModelDeployment:
    model = spec.models[m]
    entry = spec.model_server(model)
    servers = _model_servers(spec, model)
    configs = {
        server.name: _server_config(
            spec, m, server, model_path, run_dir if len(spec.servers) == 1 else run_dir / server.name,
            pools=[pool for _, pool in _pools_in(spec, model, server)],
            entry=None if server is entry else f"{entry.connect_host}:{entry.grpc_port}",
            has_worker_servers=len(servers) > 1, overrides=server_overrides,
        )  # fmt: skip
        for server in servers
    }
    config = configs[entry.name]
    worker_servers = tuple(configs[s.name] for s in servers if s is not entry)
    return ModelDeployment(model.name, config, _planner_args(model, config), worker_servers)


def _server_config(
    spec: DeploymentSpec,
    m: int,
    server: ServerSpec,
    model_path: Path,
    run_dir: Path,
    *,
    pools: list[PoolSpec],
    entry: str | None,
    has_worker_servers: bool,
    overrides: dict,
    worker_id: int | None = None,
    advertise_host: str | None = None,
) -> ServerConfig:
    """The ServerConfig of model `m`'s `pools` in `server` (`entry`: the entry server's gRPC endpoint; None:
    this is the entry server); with `worker_id`, one worker of the one pool, with that id."""
    model = spec.models[m]
    prefill = [pool for pool in pools if pool.role is Role.PREFILL]
    decode = [pool for pool in pools if pool.role is not Role.PREFILL]
    optional = {field: value for field, value in _shared_settings(spec, m, server, pools).items() if value is not None}
    if decode and decode[0].max_num_batched_tokens is not None:
        optional["max_num_batched_tokens"] = decode[0].max_num_batched_tokens
    if worker_id is not None:
        counts = {"prefill_workers": len(prefill), "decode_workers": len(decode)}
        optional |= {"first_prefill_id": worker_id, "first_decode_id": worker_id}
    else:
        counts = {
            "prefill_workers": prefill[0].replicas.num_initial if prefill else 0,
            "decode_workers": decode[0].replicas.num_initial if decode else 0,
        }
    return ServerConfig(
        model_path=model_path,
        run_dir=run_dir,
        host=server.address,
        http_port=server.http_port,
        grpc_port=server.grpc_port,
        metrics_port=server.metrics_port,
        block_size=model.block_size,
        prefill_max_num_batched_tokens=prefill[0].max_num_batched_tokens if prefill else None,
        max_model_len=model.max_model_len,
        llm_instances=model.llm_instances,
        min_remote_prefill_tokens=model.router.min_remote_prefill_tokens,
        routing_mode=model.router.mode,
        prefill_busy_tokens=model.router.prefill_busy_tokens,
        kv_hold_timeout_s=model.router.kv_hold_timeout_s,
        kv_pull_timeout_s=model.router.kv_pull_timeout_s,
        entry_grpc_url=entry,
        has_worker_servers=has_worker_servers,
        advertise_host=advertise_host,
        **counts,
        **optional,
        **overrides,
    )


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
        help="with --deployment: the part of the deployment this process runs, `entry` (every model's entry "
        "server and the frontend) or MODEL/POOL (one worker; see --worker-id), as a Kubernetes pod does",
    )
    flag("--worker-id", type=int, default=None, help="with --component MODEL/POOL: this worker's id (the pod's ordinal)")
    flag(
        "--entry-host",
        default=None,
        help="with --component MODEL/POOL: the host of the model's entry server (its Kubernetes Service; default: "
        "the address the spec gives it)",
    )
    flag(
        "--advertise-host",
        default=None,
        help="with --component MODEL/POOL: the address other servers reach this one at, when the spec's server "
        "listens on every address (the pod's IP)",
    )
