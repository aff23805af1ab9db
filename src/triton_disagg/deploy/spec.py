"""The deployment spec: one YAML file that says what to serve, where, and how big.

A spec names the Triton servers (address and ports), the frontend, and one or
more models side by side, each with its router settings, its planner and its
worker pools (role, replicas, parallelism, resources, placement, KV). The same
file runs on one machine (`triton-disagg serve --deployment FILE`) and renders
to Kubernetes manifests (`triton-disagg deploy render FILE --out DIR`).

The models here validate each field and the references between them;
`triton_disagg.deploy.load` reads a file and reports every problem with the
path of its field. Defaults run on a laptop CPU.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

#: A DNS-1035 label: what Kubernetes accepts as the name of a Service (the strictest of the names used).
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: The longest name a StatefulSet's pods can carry their controller-revision-hash label with.
MAX_WORKLOAD_NAME_CHARS = 52
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|[KMGTPE]i?)?$")
_ANY_ADDRESS = ("0.0.0.0", "::")


def _quantity(value: object) -> object:
    """A Kubernetes quantity ("500m", "2", "16Gi"); YAML numbers are accepted and kept as text."""
    if isinstance(value, bool):
        raise ValueError("must be a quantity such as 2, 500m or 16Gi")
    if isinstance(value, (int, float)):
        value = f"{value:g}"
    if not isinstance(value, str) or not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a quantity such as 2, 500m or 16Gi")
    return value


Quantity = Annotated[str, BeforeValidator(_quantity)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSpec(_Spec):
    """One Triton server process: where it listens."""

    #: What pools and the frontend call it by.
    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=40)] = "main"
    #: Address the server listens on and is reached at (0.0.0.0: every interface, reached at localhost).
    address: str = "0.0.0.0"
    http_port: Port = 8000
    grpc_port: Port = 8001
    metrics_port: Port = 8002

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.http_port, self.grpc_port, self.metrics_port)

    @property
    def connect_host(self) -> str:
        """The host a client on this machine dials."""
        return "localhost" if self.address in _ANY_ADDRESS else self.address

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServerSpec:
        if len(set(self.ports)) != 3:
            raise ValueError("http_port, grpc_port and metrics_port must differ")
        return self


class Resources(_Spec):
    """What one replica of a pool (one worker) asks for."""

    #: GPUs (nvidia.com/gpu) of one replica, over all its nodes; 0 runs on CPU.
    gpus: Annotated[int, Field(ge=0)] = 0
    #: CPU cores (a Kubernetes quantity: 2, 500m); None asks for none in particular.
    cpu: Quantity | None = None
    #: Memory (a Kubernetes quantity: 16Gi); None asks for none in particular.
    memory: Quantity | None = None


class Replicas(_Spec):
    """How many workers a pool has: at start, and the planner's bounds."""

    min: Annotated[int, Field(ge=0)] = 1
    #: None: the larger of min and initial.
    max: Annotated[int, Field(ge=1)] | None = None
    #: Workers at start; None: min.
    initial: Annotated[int, Field(ge=0)] | None = None

    @property
    def num_initial(self) -> int:
        return self.min if self.initial is None else self.initial

    @property
    def num_max(self) -> int:
        return max(self.min, self.num_initial) if self.max is None else self.max

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.initial is not None and self.initial < self.min:
            raise ValueError(f"initial ({self.initial}) must be >= min ({self.min})")
        if self.max is not None and self.max < max(self.min, self.num_initial):
            raise ValueError(f"max ({self.max}) must be >= min ({self.min}) and initial ({self.num_initial})")
        return self


class Parallelism(_Spec):
    """How one worker's engine is split over devices."""

    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    #: Expert parallelism of a mixture-of-experts model: expert slots split over this many ranks
    #: (`serve --ep-size`); with tensor parallelism too, over the tensor-parallel ranks.
    expert_parallel_size: Annotated[int, Field(ge=1)] = 1
    #: Nodes one worker spans (tensor parallelism across nodes; on Kubernetes a LeaderWorkerSet group).
    nodes_per_replica: Annotated[int, Field(ge=1)] = 1

    @property
    def num_ranks(self) -> int:
        """Engine ranks (one device each) of one worker."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    @model_validator(mode="after")
    def _divisible(self) -> Parallelism:
        small, large = sorted((self.tensor_parallel_size, self.expert_parallel_size))
        if large % small:
            raise ValueError(
                f"expert_parallel_size ({self.expert_parallel_size}) and tensor_parallel_size "
                f"({self.tensor_parallel_size}) must divide one another"
            )
        if self.num_ranks % self.nodes_per_replica:
            raise ValueError(
                f"nodes_per_replica ({self.nodes_per_replica}) must divide the worker's ranks "
                f"({self.num_ranks}): every node holds the same number of ranks"
            )
        return self


class Placement(_Spec):
    """Where a pool's workers may run."""

    #: Node labels a worker's node must carry (Kubernetes nodeSelector).
    node_selector: dict[str, str] = Field(default_factory=dict)
    #: One named host (node) the workers run on.
    host: str | None = None


class KvSettings(_Spec):
    """A worker's KV cache: its device pool and the tiers behind it.

    Maps to `serve`'s --num-blocks, --kv-host-blocks, --kv-disk-path and --kv-disk-blocks.
    """

    #: KV blocks of the worker's device pool; None sizes it from the engine's memory budget.
    num_blocks: Annotated[int, Field(ge=1)] | None = None
    #: Blocks of the host-memory tier behind the device pool; None: no host tier.
    kv_host_blocks: Annotated[int, Field(ge=1)] | None = None
    #: Directory of the disk tier; None: no disk tier.
    kv_disk_path: str | None = None
    #: Blocks of the disk tier.
    kv_disk_blocks: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _disk_tier_whole(self) -> KvSettings:
        if (self.kv_disk_path is None) != (self.kv_disk_blocks is None):
            raise ValueError("kv_disk_path and kv_disk_blocks go together: set both or neither")
        return self


class Role(str, enum.Enum):
    """What a pool's workers do."""

    #: Compute a prompt's KV and first token; decode workers pull the KV.
    PREFILL = "prefill"
    #: Generate tokens; prefill a short prompt locally.
    DECODE = "decode"
    #: Prefill and decode in one worker (decode workers with no prefill pool).
    AGGREGATED = "aggregated"

    @property
    def template(self) -> str:
        """The worker template this role loads (`prefill` or `decode`)."""
        return "prefill" if self is Role.PREFILL else "decode"


class PoolSpec(_Spec):
    """Workers of one role for one model, all alike."""

    #: Part of the workers' Kubernetes names; None: the role (`prefill`, `decode`, `aggregated`).
    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=20)] | None = None
    role: Role
    #: The Triton server the workers run in (a name under `servers`); None: the first server.
    server: str | None = None
    replicas: Replicas = Replicas()
    parallelism: Parallelism = Parallelism()
    resources: Resources = Resources()
    placement: Placement = Placement()
    kv: KvSettings = KvSettings()
    #: Token budget of one engine step; None: the engine's default (512).
    max_num_batched_tokens: Annotated[int, Field(ge=1)] | None = None

    @property
    def pool_name(self) -> str:
        return self.name or self.role.value

    @model_validator(mode="after")
    def _consistent(self) -> PoolSpec:
        if self.role is not Role.PREFILL and self.replicas.min < 1:
            raise ValueError(f"replicas.min must be >= 1 for a {self.role.value} pool: requests need a worker to decode")
        parallel = self.parallelism
        if self.resources.gpus == 0 and parallel.tensor_parallel_size > 1:
            raise ValueError("parallelism.tensor_parallel_size > 1 needs GPUs: set resources.gpus")
        if self.resources.gpus and self.resources.gpus != parallel.num_ranks:
            raise ValueError(
                f"resources.gpus ({self.resources.gpus}) must equal the worker's ranks, the larger of "
                f"parallelism.tensor_parallel_size and expert_parallel_size ({parallel.num_ranks}): one engine rank per GPU"
            )
        return self


class RouterSettings(_Spec):
    """How one model's router picks workers and when a prompt is prefilled remotely."""

    mode: Annotated[str, Field(pattern=r"^(kv|approx|round_robin|random)$")] = "kv"
    #: Uncached prompt tokens from which a decode worker has a prefill worker prefill (0: always).
    min_remote_prefill_tokens: Annotated[int, Field(ge=0)] = 512
    #: Prompt tokens queued on a prefill worker above which it is busy; None: never.
    prefill_busy_tokens: Annotated[int, Field(ge=1)] | None = None
    kv_hold_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    kv_pull_timeout_s: Annotated[float, Field(gt=0)] = 30.0


class PlannerSettings(_Spec):
    """One model's planner: policy, connector and targets. Pool bounds come from each pool's replicas."""

    #: off, load (react to queues and KV usage) or slo (profile-driven, needs `profile`).
    policy: Annotated[str, Field(pattern=r"^(off|load|slo)$")] = "off"
    #: How pools change size: triton (model control in one server), kubernetes (scale subresource),
    #: auto (triton on one machine, kubernetes when rendered for Kubernetes).
    connector: Annotated[str, Field(pattern=r"^(auto|triton|kubernetes)$")] = "auto"
    #: Profile file of the slo policy (`triton-disagg profile`).
    profile: str | None = None
    interval_s: Annotated[float, Field(gt=0)] = 30.0
    ttft_ms: Annotated[float, Field(gt=0)] = 2000.0
    itl_ms: Annotated[float, Field(gt=0)] = 50.0
    #: Devices all of this model's workers may hold; None: the sum of the pools' maxima.
    device_budget: Annotated[int, Field(ge=1)] | None = None
    #: Port of the planner's own metrics page.
    metrics_port: Port = 9091

    @model_validator(mode="after")
    def _profile_for_slo(self) -> PlannerSettings:
        if self.policy == "slo" and not self.profile:
            raise ValueError("policy slo needs profile: a file written by `triton-disagg profile`")
        return self


class ModelSpec(_Spec):
    """One model served side by side with the others: its own pools, router state and planner."""

    #: The name clients send as `model` (listed by /v1/models).
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^\S+$")]
    #: Hugging Face checkpoint directory; None: the tiny default model (created when missing).
    path: str | None = None
    #: Context window; None: the model's max_position_embeddings.
    max_model_len: Annotated[int, Field(ge=2)] | None = None
    #: Tokens per KV block, shared by the model's workers and its router.
    block_size: Annotated[int, Field(ge=1)] = 16
    #: Instances of the `llm` entry model.
    llm_instances: Annotated[int, Field(ge=1)] = 2
    #: The server running this model's `llm`, router and KV directory (a name under `servers`); None: the
    #: frontend's. Models side by side each need their own: a Triton server holds one model's pipeline.
    server: str | None = None
    router: RouterSettings = RouterSettings()
    planner: PlannerSettings = PlannerSettings()
    pools: Annotated[list[PoolSpec], Field(min_length=1)]

    @property
    def slug(self) -> str:
        """The name in Kubernetes resource names: lower case, other characters as '-'."""
        return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", self.name.lower())).strip("-")

    def pools_of(self, *roles: Role) -> list[PoolSpec]:
        return [pool for pool in self.pools if pool.role in roles]


class FrontendSpec(_Spec):
    """The OpenAI-compatible frontend, next to the entry server (the one running `llm` and the router)."""

    #: The entry server (a name under `servers`); None: the first server.
    server: str | None = None
    host: str = "0.0.0.0"
    #: Port of the OpenAI API; 0 leaves the frontend out.
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    #: Kubernetes Secret whose key `api-keys` holds comma-separated bearer keys. Keys never go in the spec:
    #: on one machine they come from --api-keys or TRITON_DISAGG_API_KEYS.
    api_keys_secret: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")] | None = None
    #: What the entry server and frontend ask for on Kubernetes.
    resources: Resources = Resources(cpu="2", memory="4Gi")


class KubernetesSettings(_Spec):
    """What only the rendered Kubernetes manifests use."""

    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] = "default"
    image: str = "triton-disagg:latest"
    image_pull_policy: Annotated[str, Field(pattern=r"^(Always|IfNotPresent|Never)$")] = "IfNotPresent"
    #: Type of the frontend's Service.
    service_type: Annotated[str, Field(pattern=r"^(ClusterIP|NodePort|LoadBalancer)$")] = "ClusterIP"
    #: PersistentVolumeClaim holding the checkpoints, mounted read-only at `models_mount_path`.
    models_claim: str | None = None
    models_mount_path: str = "/models"
    #: Seconds a pod has to stop (the launcher stops Triton, which waits for requests in flight).
    termination_grace_period_s: Annotated[int, Field(ge=1)] = 60


class DeploymentSpec(_Spec):
    """A whole deployment: servers, frontend, models and their pools."""

    #: Prefix of every Kubernetes resource name.
    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=30)] = "triton-disagg"
    servers: Annotated[list[ServerSpec], Field(min_length=1)] = Field(default_factory=lambda: [ServerSpec()])
    frontend: FrontendSpec = FrontendSpec()
    models: Annotated[list[ModelSpec], Field(min_length=1)]
    kubernetes: KubernetesSettings = KubernetesSettings()

    def server(self, name: str | None) -> ServerSpec:
        """The server called `name` (None: the first). KeyError when there is none."""
        if name is None:
            return self.servers[0]
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)

    @property
    def entry_server(self) -> ServerSpec:
        return self.server(self.frontend.server)

    def model_server(self, model: ModelSpec) -> ServerSpec:
        """The server running `model`'s `llm`, router and KV directory."""
        return self.server(model.server) if model.server is not None else self.entry_server

    def pool_server(self, pool: PoolSpec) -> ServerSpec:
        return self.server(pool.server)

    def workload_name(self, model: ModelSpec, pool: PoolSpec) -> str:
        """The Kubernetes name of a pool's StatefulSet (or LeaderWorkerSet) and headless Service."""
        return f"{self.name}-{model.slug}-{pool.pool_name}"

    @model_validator(mode="after")
    def _references(self) -> DeploymentSpec:
        problems = _reference_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _reference_problems(spec: DeploymentSpec) -> list[str]:
    """What the fields' own checks cannot see: names that must match or be unique, ports that clash."""
    problems = []
    server_names = [s.name for s in spec.servers]
    for i, name in enumerate(server_names):
        if name in server_names[:i]:
            problems.append(f"servers[{i}].name: {name!r} is used twice")
    known = ", ".join(server_names)
    if spec.frontend.server is not None and spec.frontend.server not in server_names:
        problems.append(f"frontend.server: {spec.frontend.server!r} is not one of the servers ({known})")
    problems += _port_clashes(spec)
    names, slugs = [], []
    for m, model in enumerate(spec.models):
        where = f"models[{m}]"
        if model.name in names:
            problems.append(f"{where}.name: model {model.name!r} is declared twice")
        elif not model.slug or model.slug in slugs:
            problems.append(f"{where}.name: {model.name!r} gives the Kubernetes name {model.slug!r}, empty or taken; rename it")
        names.append(model.name)
        slugs.append(model.slug)
        if model.server is not None and model.server not in server_names:
            problems.append(f"{where}.server: {model.server!r} is not one of the servers ({known})")
        roles = {pool.role for pool in model.pools}
        if Role.AGGREGATED in roles and roles & {Role.PREFILL, Role.DECODE}:
            problems.append(f"{where}.pools: an aggregated pool cannot be combined with prefill or decode pools")
        if Role.PREFILL in roles and Role.DECODE not in roles:
            problems.append(f"{where}.pools: a prefill pool needs a decode pool to hand its KV to")
        pool_names: list[str] = []
        seen_roles: set[Role] = set()
        for p, pool in enumerate(model.pools):
            at = f"{where}.pools[{p}]"
            if pool.role in seen_roles:
                problems.append(f"{at}.role: a model has one {pool.role.value} pool (its workers are named {pool.role.template}_<id>)")
            seen_roles.add(pool.role)
            if pool.pool_name in pool_names:
                problems.append(f"{at}.name: pool {pool.pool_name!r} is declared twice")
            pool_names.append(pool.pool_name)
            if pool.server is not None and pool.server not in server_names:
                problems.append(f"{at}.server: {pool.server!r} is not one of the servers ({known})")
            if len(spec.workload_name(model, pool)) > MAX_WORKLOAD_NAME_CHARS:
                problems.append(
                    f"{at}.name: the Kubernetes name {spec.workload_name(model, pool)!r} is longer than "
                    f"{MAX_WORKLOAD_NAME_CHARS} characters; shorten the deployment, model or pool name"
                )
    return problems


def _port_clashes(spec: DeploymentSpec) -> list[str]:
    """Ports two listeners (servers, the frontend) would both bind on one address."""
    listeners = [(f"servers[{i}]", s.address, port) for i, s in enumerate(spec.servers) for port in s.ports]
    if spec.frontend.port:
        listeners.append(("frontend", spec.frontend.host, spec.frontend.port))
    problems = []
    for i, (where, address, port) in enumerate(listeners):
        for other, other_address, other_port in listeners[:i]:
            overlap = address == other_address or _ANY_ADDRESS[0] in (address, other_address)
            if overlap and port == other_port and where != other:
                problems.append(f"{where}: port {port} on {address} is also taken by {other}")
    return problems
