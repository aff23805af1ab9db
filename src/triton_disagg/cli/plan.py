"""`triton-disagg plan`: grow and shrink a running server's prefill and decode pools.

Every setting is checked before anything is touched: a bad setting, a device
inventory that cannot hold the minimum pools or the workers already running,
missing profile data for the SLO policy, or an unreachable server stops the
planner at startup with a message naming the fix. After that, a fault during
a tick is logged and that tick changes nothing (see src/triton_disagg/planner/process.py).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from triton_disagg.planner.config import PlannerConfig, PlannerPolicy, PredictorKind
from triton_disagg.planner.connectors import POOLS, DryRunConnector, TritonConnector
from triton_disagg.planner.core import Planner
from triton_disagg.planner.inventory import DeviceInventory, parse_inventory
from triton_disagg.planner.process import PlannerLoop, PlannerMetrics
from triton_disagg.planner.profile import PerformanceProfile
from triton_disagg.launch.flags import boolean
from triton_disagg.launch.server import DEFAULT_RUN_DIR

logger = logging.getLogger("triton_disagg.planner")


class PlannerStartupError(RuntimeError):
    """The server the planner is to manage cannot be reached or does not match the settings."""


@dataclass(slots=True, frozen=True)
class PlanSettings:
    """Which server the planner manages, on which devices, and where it reports."""

    #: The server's HTTP endpoint (model control, the router's drain action).
    http_url: str = "http://localhost:8000"
    #: The server's Prometheus page.
    metrics_url: str = "http://localhost:8002/metrics"
    #: The served model repository on this node; new workers are copied from its templates.
    model_repository: Path = DEFAULT_RUN_DIR / "model_repository"
    #: Device slots workers are placed on: `gpu:0,gpu:1`, or `cpu:4` for four CPU slots.
    inventory: str = "cpu:8"
    #: Profile file of the SLO policy (written by `triton-disagg profile`).
    profile_path: Path | None = None
    #: Only log and count decisions; load and unload nothing.
    is_dry_run: bool = False
    #: `NAME=VALUE` header sent with model-control calls, for a server started with
    #: `--http-restricted-api=model-repository:NAME=VALUE`.
    api_key_header: str | None = None
    #: Port of the planner's own metrics (0: any free port).
    metrics_port: int = 9091
    #: Longest wait for a drained worker's requests to finish before giving up its unload.
    drain_timeout_s: float = 120.0
    #: How pools change size: `triton` (model control in one server) or `kubernetes` (scale subresource).
    connector: str = "triton"
    #: Kubernetes: the namespace of the pools' workloads.
    namespace: str = "default"
    #: Kubernetes: the API server URL used as is (e.g. `kubectl proxy`); None: in-cluster, else kubeconfig.
    kube_api_url: str | None = None
    #: Kubernetes: each pool's workload, `statefulset/NAME` or `leaderworkerset/NAME` (None: no such pool).
    prefill_workload: str | None = None
    decode_workload: str | None = None
    #: Kubernetes: a worker's metrics page, with {name}, {ordinal}, {workload} and {namespace}.
    worker_metrics_url: str = "http://{workload}-{ordinal}.{workload}.{namespace}.svc:8002/metrics"

    @property
    def headers(self) -> dict[str, str]:
        if not self.api_key_header:
            return {}
        name, sep, value = self.api_key_header.partition("=")
        if not sep or not name.strip():
            raise ValueError(
                f"api_key_header {self.api_key_header!r} must be NAME=VALUE, as in the server's "
                "--http-restricted-api=model-repository:NAME=VALUE"
            )
        return {name.strip(): value}


def build_planner_loop(
    settings: PlanSettings, config: PlannerConfig, fetch_metrics: Callable[[], str] | None = None
) -> PlannerLoop:
    """Check everything, then connect; returns a loop that has changed nothing yet.

    Raises ValueError for a bad setting and PlannerStartupError for a server that
    cannot be reached or does not match the inventory.
    """
    headers = settings.headers
    if settings.connector == "kubernetes":
        return _kubernetes_planner_loop(settings, config, headers, fetch_metrics)
    if settings.connector != "triton":
        raise ValueError(f"connector must be triton or kubernetes, got {settings.connector!r}")
    inventory = DeviceInventory(parse_inventory(settings.inventory))
    for pool in POOLS:
        if getattr(config, f"devices_per_{pool}_worker") != 1:
            raise ValueError(
                f"devices_per_{pool}_worker must be 1 with a device inventory (one slot per worker); "
                f"list one slot per worker's device group instead"
            )
    min_devices = config.devices_for(config.min_prefill_workers, config.min_decode_workers)
    if inventory.num_slots < min_devices:
        raise ValueError(
            f"the device inventory ({settings.inventory}) has {inventory.num_slots} slot(s) but the minimum pools "
            f"need {min_devices}; add slots or lower min_prefill_workers/min_decode_workers"
        )
    if config.device_budget > inventory.num_slots:
        logger.info("device budget %d cut to the inventory's %d slots", config.device_budget, inventory.num_slots)
        config = dataclasses.replace(config, device_budget=inventory.num_slots)
    profile = PerformanceProfile.load(settings.profile_path) if settings.profile_path else None
    planner = Planner(config, profile)
    if not settings.is_dry_run and not Path(settings.model_repository).is_dir():
        raise ValueError(
            f"model_repository {settings.model_repository} is not a directory; pass the served server's "
            "model repository (<run dir>/model_repository)"
        )

    fetch = fetch_metrics or _metrics_fetcher(settings.metrics_url)
    try:
        fetch()
    except Exception as error:  # noqa: BLE001 - reported as a startup error naming the endpoint
        raise PlannerStartupError(
            f"metrics endpoint {settings.metrics_url} is unreachable ({error}); start the server or fix --metrics-url"
        ) from error
    try:
        connector = _connector(settings, headers, inventory)
    except ValueError:  # the inventory does not describe the server: a setting to fix
        raise
    except Exception as error:  # noqa: BLE001 - as above
        raise PlannerStartupError(
            f"server {settings.http_url} did not answer model-control calls ({error}); start it, fix --http-url, "
            "or pass --api-key-header for a restricted model-repository API"
        ) from error
    logger.info("device inventory: %s", inventory.describe())
    return PlannerLoop(planner, connector, fetch, PlannerMetrics(), inventory)


def _kubernetes_planner_loop(
    settings: PlanSettings, config: PlannerConfig, headers: dict[str, str], fetch_metrics: Callable[[], str] | None
) -> PlannerLoop:
    """The planner of pools that are Kubernetes workloads: the scheduler places workers, so no device inventory."""
    from triton_disagg.planner.kubernetes import KubernetesConnector, Workload, api_client

    workloads = {
        pool: Workload.parse(text)
        for pool, text in (("prefill", settings.prefill_workload), ("decode", settings.decode_workload))
        if text
    }
    if "decode" not in workloads:
        raise ValueError("the kubernetes connector needs --decode-workload statefulset/NAME (or leaderworkerset/NAME)")
    planner = Planner(config, PerformanceProfile.load(settings.profile_path) if settings.profile_path else None)
    fetch = fetch_metrics or _metrics_fetcher(settings.metrics_url)
    try:
        fetch()
        connector = KubernetesConnector(
            workloads,
            settings.namespace,
            settings.http_url,
            settings.worker_metrics_url,
            client=api_client(settings.kube_api_url),
            headers=headers,
            drain_timeout_s=settings.drain_timeout_s,
        )
        sizes = {pool: len(connector.workers(pool)) for pool in POOLS}
    except Exception as error:  # noqa: BLE001 - reported as a startup error naming what to fix
        raise PlannerStartupError(
            f"the entry server's metrics ({settings.metrics_url}) or the Kubernetes API did not answer ({error}); "
            "check --metrics-url, --kube-api-url, --namespace and the workloads"
        ) from error
    if settings.is_dry_run:
        return PlannerLoop(planner, DryRunConnector(sizes=sizes), fetch, PlannerMetrics())
    return PlannerLoop(planner, connector, fetch, PlannerMetrics())


def _connector(settings: PlanSettings, headers: dict[str, str], inventory: DeviceInventory):
    if not settings.is_dry_run:
        return TritonConnector(
            settings.http_url,
            settings.metrics_url,
            settings.model_repository,
            headers=headers,
            drain_timeout_s=settings.drain_timeout_s,
            inventory=inventory,
        )
    from triton_disagg.model_control import ModelControl

    control = ModelControl(settings.http_url, headers)
    try:
        names = control.ready_models()
    finally:
        control.close()
    sizes = {pool: sum(1 for n in names if n.startswith(f"{pool}_") and n.rsplit("_", 1)[1].isdigit()) for pool in POOLS}
    return DryRunConnector(sizes=sizes, inventory=inventory)


def _metrics_fetcher(url: str) -> Callable[[], str]:
    session = requests.Session()

    def fetch() -> str:
        response = session.get(url, timeout=5)
        response.raise_for_status()
        return response.text

    return fetch


# -- command line -------------------------------------------------------------------------

_CONFIG_DEFAULTS = PlannerConfig()
#: (flag, PlannerConfig field, type, help); defaults come from PlannerConfig.
_CONFIG_FLAGS = (
    ("--ttft-ms", "ttft_ms", float, "time-to-first-token target (slo policy)"),
    ("--itl-ms", "itl_ms", float, "inter-token latency target (slo policy)"),
    ("--interval-s", "adjustment_interval_s", float, "seconds between two decisions"),
    ("--min-prefill-workers", "min_prefill_workers", int, "fewest prefill workers"),
    ("--max-prefill-workers", "max_prefill_workers", int, "most prefill workers"),
    ("--min-decode-workers", "min_decode_workers", int, "fewest decode workers"),
    ("--max-decode-workers", "max_decode_workers", int, "most decode workers"),
    ("--device-budget", "device_budget", int, "devices all workers may hold (cut to the inventory's slots)"),
    ("--devices-per-prefill-worker", "devices_per_prefill_worker", int, "devices one prefill worker holds (kubernetes)"),
    ("--devices-per-decode-worker", "devices_per_decode_worker", int, "devices one decode worker holds (kubernetes)"),
    ("--device-kind", "device_kind", str, "device kind of the workers; must match the profile's"),
    ("--scale-up-cooldown-s", "scale_up_cooldown_s", float, "seconds after a change before a pool grows again"),
    ("--scale-down-cooldown-s", "scale_down_cooldown_s", float, "seconds after a change before a pool shrinks"),
    ("--grace-period-s", "grace_period_s", float, "seconds a new worker is not judged by its metrics"),
    ("--worker-startup-s", "worker_startup_s", float,
     "seconds from a worker's load call until it serves; the slo policy plans this plus one interval ahead"),
    ("--scale-down-window-s", "scale_down_window_s", float,
     "a pool shrinks only to the largest size asked within this many seconds"),
    ("--prefill-tokens-high", "prefill_tokens_high", int, "load policy: prefill tokens per worker to grow above"),
    ("--prefill-tokens-low", "prefill_tokens_low", int, "load policy: prefill tokens per worker to shrink below"),
    ("--kv-usage-high", "kv_usage_high", float, "load policy: decode KV usage (0-1) to grow above"),
    ("--kv-usage-low", "kv_usage_low", float, "load policy: decode KV usage (0-1) to shrink below"),
    ("--capacity-headroom", "capacity_headroom", float, "slo policy: spare capacity planned for (0.2: 20%%)"),
    ("--prefill-spare-workers", "prefill_spare_workers", int,
     "slo policy: prefill workers beyond the load's need where the headroom adds fewer"),
    ("--quantile-window", "quantile_window", int, "quantile predictor: intervals it looks back over"),
    ("--quantile", "quantile", float, "quantile predictor: the quantile (0-1] of those intervals; 1 is their maximum"),
    ("--min-requests-per-interval", "min_requests_per_interval", int, "requests an interval needs to be learnt from"),
    ("--latency-correction", "latency_correction", "bool", "slo policy: correct the profile by measured TTFT/ITL"),
)


def add_plan_flags(flag) -> None:
    """Declare the `plan` flags through `flag(name, type=, default=, help=, ...)` (launch.flags.EnvFlags)."""
    defaults = PlanSettings()
    flag("--http-url", default=defaults.http_url, help="the server's HTTP endpoint")
    flag("--metrics-url", default=defaults.metrics_url, help="the server's metrics page")
    flag(
        "--model-repository",
        metavar="DIR",
        default=str(defaults.model_repository),
        help="the served model repository on this node (the run directory's model_repository)",
    )
    flag("--inventory", default=defaults.inventory, help="device slots for workers: gpu:0,gpu:1 or cpu:<count>")
    flag("--policy", choices=[p.value for p in PlannerPolicy], default="load", help="load, or slo (needs --profile)")
    flag(
        "--predictor",
        choices=[p.value for p in PredictorKind],
        default=_CONFIG_DEFAULTS.predictor.value,
        help="slo policy's load predictor",
    )
    flag("--profile", metavar="FILE", default=None, help="profile file for the slo policy (triton-disagg profile)")
    for name, field, kind, text in _CONFIG_FLAGS:
        if kind == "bool":
            flag(name, type=boolean, nargs="?", const=True, default=getattr(_CONFIG_DEFAULTS, field), help=text)
        else:
            flag(name, type=kind, default=getattr(_CONFIG_DEFAULTS, field), help=text)
    flag("--dry-run", type=boolean, nargs="?", const=True, default=False, help="log decisions, change nothing")
    flag("--api-key-header", metavar="NAME=VALUE", default=None, help="header for a restricted model-repository API")
    flag("--planner-port", type=int, default=defaults.metrics_port, help="port of the planner's own metrics (0: any)")
    flag("--drain-timeout-s", type=float, default=defaults.drain_timeout_s, help="longest wait for a worker to drain")
    flag(
        "--connector",
        choices=["triton", "kubernetes"],
        default=defaults.connector,
        help="triton: load and unload workers in one server; kubernetes: scale the pools' StatefulSets",
    )
    flag("--namespace", default=defaults.namespace, help="kubernetes: namespace of the pools' workloads")
    flag("--kube-api-url", default=None, help="kubernetes: API server URL used as is (default: in-cluster, else kubeconfig)")
    flag("--prefill-workload", default=None, help="kubernetes: statefulset/NAME or leaderworkerset/NAME of the prefill pool")
    flag("--decode-workload", default=None, help="kubernetes: statefulset/NAME or leaderworkerset/NAME of the decode pool")
    flag(
        "--worker-metrics-url",
        default=defaults.worker_metrics_url,
        help="kubernetes: a worker's metrics page; {name}, {ordinal}, {workload} and {namespace} are filled in",
    )


def planner_config(args) -> PlannerConfig:
    """The PlannerConfig the `plan` flags (or their environment variables) ask for; ValueError on a bad one."""
    return PlannerConfig(
        policy=args.policy,
        predictor=args.predictor,
        **{field: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, field, _, _ in _CONFIG_FLAGS},
    )


def plan(args) -> int:
    """Run the planner until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = planner_config(args)
    settings = PlanSettings(
        http_url=args.http_url,
        metrics_url=args.metrics_url,
        model_repository=Path(args.model_repository),
        inventory=args.inventory,
        profile_path=Path(args.profile) if args.profile else None,
        is_dry_run=args.dry_run,
        api_key_header=args.api_key_header,
        metrics_port=args.planner_port,
        drain_timeout_s=args.drain_timeout_s,
        connector=args.connector,
        namespace=args.namespace,
        kube_api_url=args.kube_api_url,
        prefill_workload=args.prefill_workload,
        decode_workload=args.decode_workload,
        worker_metrics_url=args.worker_metrics_url,
    )
    try:
        loop = build_planner_loop(settings, config)
    except PlannerStartupError as error:
        print(f"triton-disagg: error: {error}", file=sys.stderr, flush=True)
        return 1
    port = loop.metrics.serve(settings.metrics_port)
    target = settings.http_url if settings.connector == "triton" else f"Kubernetes namespace {settings.namespace}"
    mode = "dry run: decisions are only logged" if settings.is_dry_run else f"managing {target}"
    print(
        f"planner ({config.policy.value} policy, every {config.adjustment_interval_s:g} s): {mode}; "
        f"metrics on :{port}/metrics",
        flush=True,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        loop.run(stop)
    finally:
        loop.metrics.close()
    return 0
