"""Start a Triton Inference Server on this project's model repository.

`TritonServer` finds a `tritonserver` binary (on PATH, else the one inside the
`nvidia-pytriton` wheel), prepares a Python-backend directory, renders the
model repository for one model checkpoint into a run directory, starts the
server and waits until the models are ready. The CLI, the end-to-end tests
and the benchmarks all start servers through it.

The workers are loaded with the other models at start (`--load-model`), not
through model control afterwards: Triton opens its endpoints only once every
model it was told to load is ready, so its `/v2/health/ready` never answers
200 while no worker could serve a request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from triton_disagg.model_control import RouterRefused, router_action, write_worker
from triton_disagg.serving.live_workers import MODEL_CONTROL_KEY_ENV, MODEL_CONTROL_KEY_HEADER, model_control_headers
from triton_disagg.serving.settings import DEFAULT_MODEL_PATH

#: The directory holding the `triton_disagg` package (src/ in a checkout, site-packages when installed).
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
MODEL_TEMPLATES = PACKAGE_PARENT / "triton_disagg" / "model_repository"
DEFAULT_RUN_DIR = Path.home() / ".cache" / "triton-disagg" / "run"

#: The models every server loads at start, besides its workers (`prefill_<k>`, `decode_<j>`).
MODELS = ("kv_transfer", "router", "llm")


class ServerError(RuntimeError):
    """The server could not be found, started, or did not become ready."""


@dataclass(slots=True)
class ServerConfig:
    """One Triton server serving one model checkpoint. Defaults run on a laptop CPU."""

    #: Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json).
    model_path: Path = DEFAULT_MODEL_PATH
    #: Where the rendered model repository, backend directory and server log go.
    run_dir: Path = DEFAULT_RUN_DIR
    #: Address the HTTP, gRPC and metrics endpoints listen on (0.0.0.0: every interface, reached at localhost).
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    #: Tokens per KV block of each worker engine.
    block_size: int = 16
    #: KV blocks per worker engine; None sizes the pool from the engine's memory budget.
    num_blocks: int | None = None
    #: Token budget of one engine step.
    max_num_batched_tokens: int = 512
    #: Token budget of a prefill worker's step (a profile's saturating batch); None: max_num_batched_tokens.
    prefill_max_num_batched_tokens: int | None = None
    #: Context window; None takes the model's max_position_embeddings.
    max_model_len: int | None = None
    #: Instances of the `llm` entry model (each relays its requests' streams on its own threads).
    llm_instances: int = 2
    #: Prefill workers `prefill_<k>` loaded at start (0: every prompt is prefilled by its decode worker).
    prefill_workers: int = 1
    #: Decode workers `decode_<j>` loaded at start.
    decode_workers: int = 1
    #: Ids of this server's first prefill and decode workers: a worker's name is unique over every
    #: server of a deployment (`prefill_<first_prefill_id>`, ...).
    first_prefill_id: int = 0
    first_decode_id: int = 0
    #: gRPC endpoint ("host:port") of the entry server (the one running `llm`, the router and the KV
    #: directory) when this server runs only workers for it; None: this is the entry server.
    entry_grpc_url: str | None = None
    #: An entry server whose deployment has worker servers: it may run no worker itself.
    has_worker_servers: bool = False
    #: Shortest uncached prompt part (tokens) a decode worker has prefilled on a prefill worker.
    min_remote_prefill_tokens: int = 512
    #: The router's default mode: kv, approx, round_robin or random.
    routing_mode: str = "kv"
    #: Prompt tokens queued on a prefill worker above which the router counts it busy (None: never);
    #: with every prefill worker busy, decode workers prefill locally.
    prefill_busy_tokens: int | None = None
    #: How long a prefill worker holds a prompt's KV for the decode worker to pull.
    kv_hold_timeout_s: float = 30.0
    #: How long a decode worker waits for a KV pull before prefilling locally.
    kv_pull_timeout_s: float = 30.0
    #: Host-memory KV tier of each worker, in blocks; None sizes it from the engine's 1 GiB default; 0 turns it off.
    kv_host_blocks: int | None = None
    #: Disk KV tier: each worker keeps its blocks in a folder of its own under this one; None: no disk tier.
    kv_disk_path: Path | None = None
    #: Disk KV tier of each worker, in blocks; None sizes it from the engine's 16 GiB default; 0 turns it off.
    kv_disk_blocks: int | None = None
    #: Expert-parallel ranks per worker engine of an MoE model (1: no expert parallelism).
    ep_size: int = 1
    #: Expert slots beyond one per logical expert, for replicas of hot experts.
    eplb_redundant_experts: int = 0
    #: Engine steps between expert balance checks (0: never rearrange experts).
    eplb_interval: int = 0
    #: Steps of expert load the balance is judged on.
    eplb_window: int = 1000
    #: Rearrange experts when the mean balancedness falls below this.
    eplb_threshold: float = 0.8
    #: How long a request waits for a routable decode worker before it is answered UNAVAILABLE.
    route_wait_s: float = 10.0
    #: Times a request may move to another decode worker when its worker dies or is unloaded (0: never).
    migration_limit: int = 3
    #: Largest max_tokens a request may ask for; None: only the context window limits it.
    max_tokens_limit: int | None = None
    #: A tritonserver binary; None searches PATH, then the nvidia-pytriton wheel.
    tritonserver: Path | None = None
    #: Key of the model-repository API (index, load, unload) over HTTP and gRPC; None leaves it open.
    #: Clients send it in the `triton-disagg-key` header (gRPC: `triton-grpc-protocol-triton-disagg-key`).
    model_control_key: str | None = None
    #: Seconds the server waits for in-flight requests and open connections when stopped.
    exit_timeout_s: int = 10
    #: Extra `tritonserver` arguments, appended last.
    extra_args: tuple[str, ...] = ()
    #: Folder of model templates to render (None: the package's own `model_repository`).
    model_templates: Path | None = None
    #: The address other servers reach this one at, when it listens on every address (`host` 0.0.0.0;
    #: a pod's IP on Kubernetes); None: `host`.
    advertise_host: str | None = None

    @property
    def connect_host(self) -> str:
        """The host a client dials: `advertise_host`, else `host` (localhost when that is every address)."""
        if self.advertise_host:
            return self.advertise_host
        return "localhost" if self.host in ("0.0.0.0", "::") else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self.connect_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.connect_host}:{self.metrics_port}/metrics"

    @property
    def grpc_url(self) -> str:
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def is_entry(self) -> bool:
        """Whether this server runs `llm`, the router and the KV directory (else only workers)."""
        return self.entry_grpc_url is None

    @property
    def worker_names(self) -> list[str]:
        """The workers loaded at start, prefill first."""
        return [f"prefill_{self.first_prefill_id + k}" for k in range(self.prefill_workers)] + [
            f"decode_{self.first_decode_id + j}" for j in range(self.decode_workers)
        ]

    def validate(self) -> None:
        if not (Path(self.model_path) / "config.json").is_file():
            raise ValueError(
                f"model_path {self.model_path!s} has no config.json; pass a Hugging Face checkpoint directory "
                "or create one with `triton-disagg make-model PATH`"
            )
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {port}")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ValueError("http_port, grpc_port and metrics_port must differ")
        if self.decode_workers < 0 or (self.decode_workers == 0 and self.is_entry and not self.has_worker_servers):
            raise ValueError(f"decode_workers must be >= 1, got {self.decode_workers}")
        if self.prefill_workers < 0:
            raise ValueError(f"prefill_workers must be >= 0, got {self.prefill_workers}")
        if self.first_prefill_id < 0 or self.first_decode_id < 0:
            raise ValueError("first_prefill_id and first_decode_id must be >= 0")
        if not self.is_entry:
            if self.host in ("0.0.0.0", "::") and not self.advertise_host:
                raise ValueError(
                    f"host: a worker server is reached by the entry server at its own address; set one instead of "
                    f"{self.host}, or the address to advertise (advertise_host)"
                )
            if not re.fullmatch(r"[^\s:/]+:\d+", self.entry_grpc_url or ""):
                raise ValueError(f"entry_grpc_url must be host:port (the entry server's gRPC endpoint), got {self.entry_grpc_url!r}")
            if not self.prefill_workers + self.decode_workers:
                raise ValueError("a worker server needs workers: set prefill_workers or decode_workers")
        if self.llm_instances < 1:
            raise ValueError(f"llm_instances must be >= 1, got {self.llm_instances}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        for name in ("kv_host_blocks", "kv_disk_blocks"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns the tier off), got {getattr(self, name)}")
        if self.kv_disk_path is not None and self.kv_disk_blocks != 0 and self.kv_host_blocks == 0:
            raise ValueError("the disk tier needs the host tier (blocks reach disk through host memory): drop --kv-host-blocks 0")
        if self.route_wait_s < 0:
            raise ValueError(f"route_wait_s must be >= 0, got {self.route_wait_s}")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0 (0 turns migration off), got {self.migration_limit}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.model_control_key is not None and not re.fullmatch(r"[\x21-\x7e]+", self.model_control_key):
            raise ValueError("model_control_key must be non-empty printable ASCII without spaces (it is sent as a header)")


class Startable:
    """Use as a context manager: start(), wait_ready(), and stop() on leaving (or when it never got ready).

    Subclasses define start() (spawn, return at once), wait_ready() (block until
    it serves; raise if it cannot) and stop() (end it, idempotent).
    """

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class ChildProcess(Startable):
    """What a child process we start has in common: a log, and use as a context manager.

    Subclasses define start(), wait_ready() and stop() (see Startable), and set log_path.
    """

    log_path: Path

    def log_tail(self, num_lines: int = 40) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])


@dataclass(slots=True, frozen=True)
class TritonInstallation:
    """A tritonserver binary, its Python backend, and the libraries it needs."""

    binary: Path
    #: Folder holding `libtriton_python.so` and `triton_python_backend_utils.py`.
    python_backend_dir: Path
    #: The Python backend stub built for the running Python version.
    python_stub: Path
    library_dirs: tuple[Path, ...] = ()


def find_tritonserver(binary: Path | None = None) -> TritonInstallation:
    """Locate tritonserver: `binary`, else PATH, else the nvidia-pytriton wheel. Raises ServerError.

    A binary outside the wheel is used with the Python backend installed next to
    it (`<prefix>/backends/python/`, as in Triton's containers).
    """
    candidates = [Path(binary)] if binary else [Path(p) for p in filter(None, [shutil.which("tritonserver")])]
    for candidate in candidates:
        backend = candidate.resolve().parents[1] / "backends" / "python"
        if (backend / "libtriton_python.so").is_file() and (backend / "triton_python_backend_stub").is_file():
            return TritonInstallation(candidate, backend, backend / "triton_python_backend_stub")
    if binary:
        raise ServerError(f"{binary} has no Python backend next to it (expected {backend})")
    wheel = _pytriton_wheel_dir()
    if wheel is None:
        raise ServerError(
            "no tritonserver found: none on PATH and the nvidia-pytriton wheel is not installed; "
            "run `pip install nvidia-pytriton` or put tritonserver on PATH"
        )
    server_dir = wheel / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} (looked for {stub})")
    return TritonInstallation(
        binary=server_dir / "bin" / "tritonserver",
        python_backend_dir=server_dir / "backends" / "python",
        python_stub=stub,
        library_dirs=(wheel.parent / "nvidia_pytriton.libs",),
    )


def prepare_backend_directory(installation: TritonInstallation, backend_dir: Path) -> Path:
    """Fill `backend_dir/python/` with the Python backend and the stub; return `backend_dir`."""
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (
        installation.python_backend_dir / "libtriton_python.so",
        installation.python_backend_dir / "triton_python_backend_utils.py",
        installation.python_stub,
    ):
        # Copy then rename: a stub still running from an earlier server keeps its old file.
        staged = python_dir / f".{source.name}.tmp"
        shutil.copy2(source, staged)
        os.replace(staged, python_dir / source.name)
    return backend_dir


def set_parameter(pbtxt: str, key: str, value: str) -> str:
    """Set the string value of `parameters { key: KEY ... }` in a config.pbtxt. Raises ValueError if absent."""
    pattern = re.compile(r'(key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*)"[^"]*"')
    rendered, count = pattern.subn(lambda m: m.group(1) + json.dumps(value, ensure_ascii=False), pbtxt)
    if count != 1:
        raise ValueError(f"config.pbtxt declares parameter {key!r} {count} times; expected exactly once")
    return rendered


def set_instance_count(pbtxt: str, count: int) -> str:
    """Set `count` of the (single) instance_group of a config.pbtxt. Raises ValueError if absent."""
    rendered, num_found = re.subn(r"(instance_group\s*\[\s*\{[^}]*?count:\s*)\d+", rf"\g<1>{count}", pbtxt)
    if num_found != 1:
        raise ValueError("config.pbtxt has no single instance_group with a count")
    return rendered


def render_model_repository(config: ServerConfig, dest: Path, templates: Path = MODEL_TEMPLATES) -> Path:
    """Copy the model templates into `dest` with their parameters filled from `config`; return `dest`."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(templates, dest, ignore=shutil.ignore_patterns("__pycache__"))
    engine = {
        "model_path": str(Path(config.model_path).resolve()),
        "block_size": str(config.block_size),
        "num_blocks": "" if config.num_blocks is None else str(config.num_blocks),
        "max_num_batched_tokens": str(config.max_num_batched_tokens),
        "max_model_len": "" if config.max_model_len is None else str(config.max_model_len),
        "kv_host_blocks": "" if config.kv_host_blocks is None else str(config.kv_host_blocks),
        "kv_disk_path": "" if config.kv_disk_path is None else str(Path(config.kv_disk_path).expanduser().resolve()),
        "kv_disk_blocks": "" if config.kv_disk_blocks is None else str(config.kv_disk_blocks),
        "ep_size": str(config.ep_size),
        "eplb_redundant_experts": str(config.eplb_redundant_experts),
        "eplb_interval": str(config.eplb_interval),
        "eplb_window": str(config.eplb_window),
        "eplb_threshold": str(config.eplb_threshold),
    }
    kv_events_dir = Path(config.run_dir).resolve() / "kv_events"
    kv_events_dir.mkdir(parents=True, exist_ok=True)
    # The models call one another through this server's gRPC endpoint, not BLS (see serving.model_calls).
    engine["grpc_url"] = config.grpc_url
    if config.is_entry:
        engine["kv_events_dir"] = str(kv_events_dir)
    else:
        # The router of the entry server follows this server's workers' KV events over TCP, and they
        # register with the KV directory there.
        engine["kv_events_host"] = config.host
        engine["directory_url"] = config.entry_grpc_url
    parameters = {
        "prefill": engine
        | {
            "max_num_batched_tokens": str(config.prefill_max_num_batched_tokens or config.max_num_batched_tokens),
            "kv_hold_timeout_s": str(config.kv_hold_timeout_s),
        },
        "decode": engine
        | {
            "min_remote_prefill_tokens": str(config.min_remote_prefill_tokens),
            "kv_pull_timeout_s": str(config.kv_pull_timeout_s),
        },
        "llm": {
            "model_path": engine["model_path"],
            "max_model_len": engine["max_model_len"],
            "route_wait_s": str(config.route_wait_s),
            "migration_limit": str(config.migration_limit),
            "max_tokens_limit": "" if config.max_tokens_limit is None else str(config.max_tokens_limit),
            "grpc_url": engine["grpc_url"],
        },
        "kv_transfer": {"server_host": config.connect_host, "http_port": str(config.http_port)},
        "router": {
            "mode": config.routing_mode,
            "block_size": str(config.block_size),
            "max_queued_prefill_tokens": "" if config.prefill_busy_tokens is None else str(config.prefill_busy_tokens),
            "server_host": config.connect_host,
            "http_port": str(config.http_port),
            "metrics_port": str(config.metrics_port),
            "kv_events_dir": str(kv_events_dir),
        },
    }
    for model, values in parameters.items():
        path = dest / model / "config.pbtxt"
        pbtxt = path.read_text()
        for key, value in values.items():
            pbtxt = set_parameter(pbtxt, key, value)
        if model == "llm":
            pbtxt = set_instance_count(pbtxt, config.llm_instances)
        path.write_text(pbtxt)
    return dest


class TritonServer(ChildProcess):
    """A tritonserver process serving the rendered model repository.

    Use as a context manager, or call `start()`, `wait_ready()` and `stop()`.
    The server runs in its own process group so a Ctrl-C at the terminal
    reaches this process only, which then stops the server in order.
    """

    def __init__(self, config: ServerConfig) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.log_path = self.run_dir / "tritonserver.log"
        self._process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def http_url(self) -> str:
        return self.config.http_url

    @property
    def grpc_url(self) -> str:
        return self.config.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.config.metrics_url

    @property
    def model_control_headers(self) -> dict[str, str]:
        """Headers a client sends to use this server's model-repository API (empty when it is open)."""
        return model_control_headers(self.config.model_control_key)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Prepare the run directory and spawn tritonserver; returns without waiting for readiness."""
        if self._process is not None:
            raise ServerError("server already started")
        installation = find_tritonserver(self.config.tritonserver)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        backend_dir = prepare_backend_directory(installation, self.run_dir / "backends")
        repository = render_model_repository(
            self.config, self.run_dir / "model_repository", self.config.model_templates or MODEL_TEMPLATES
        )
        for name in self.worker_names:
            write_worker(repository, name.rsplit("_", 1)[0], name)
        command = [
            str(installation.binary),
            f"--model-repository={repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in self.model_names),
            f"--backend-directory={backend_dir}",
            f"--http-port={self.config.http_port}",
            f"--grpc-port={self.config.grpc_port}",
            f"--metrics-port={self.config.metrics_port}",
            *_address_args(self.config.host),
            "--allow-metrics=true",
            f"--exit-timeout-secs={self.config.exit_timeout_s}",
            *_restricted_api_args(self.config.model_control_key),
            *self.config.extra_args,
        ]
        self._log_file = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            command,
            env=_server_environment(installation, self.config.model_control_key),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Block until the server and every model report ready, and the router routes to every worker.

        Raises ServerError on exit or timeout.
        """
        if self._process is None:
            raise ServerError("server not started; call start() first")
        deadline = time.monotonic() + timeout_s
        urls = [f"{self.http_url}/v2/health/ready"] + [f"{self.http_url}/v2/models/{m}/ready" for m in self.model_names]
        self._wait_for(urls, deadline, timeout_s)
        if self.config.is_entry:
            self.wait_for_router(self.worker_names, deadline, timeout_s)

    def wait_for_router(self, worker_names: list[str], deadline: float, timeout_s: float) -> None:
        """Wait until this (entry) server's router knows every worker of `worker_names`: it learns them
        from repository polls (every second), so for a moment after loading, requests would be routed
        as if a worker were missing. Raises ServerError at `deadline` (time.monotonic)."""
        unseen = list(worker_names)
        while unseen:
            try:
                router_action(self.http_url, "inflight", unseen[0])
                unseen.pop(0)
                continue
            except RouterRefused:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(
                    f"the router did not see worker {unseen[0]} within {timeout_s:.0f} s; last lines of "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    @property
    def worker_names(self) -> list[str]:
        return self.config.worker_names

    @property
    def model_names(self) -> list[str]:
        """Every model this server loads at start: the entry models (entry server only) and its workers."""
        return [*(MODELS if self.config.is_entry else ()), *self.worker_names]

    def _wait_for(self, urls: list[str], deadline: float, timeout_s: float) -> None:
        while True:
            if self._process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self._process.returncode} before it was ready; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if all(_is_ok(url) for url in urls):
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"tritonserver was not ready after {timeout_s:.0f} s; last lines of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self) -> int | None:
        """Terminate the server and wait for it; kill its process group if it overstays. Returns its exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.config.exit_timeout_s + 20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Python backend stubs are children of the server; leave none behind.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return process.returncode

    def wait(self) -> int:
        """Block until the server exits on its own; return its exit code."""
        if self._process is None:
            raise ServerError("server not started")
        return self._process.wait()



def _pytriton_wheel_dir() -> Path | None:
    for root in [*site.getsitepackages(), site.getusersitepackages()]:
        candidate = Path(root) / "pytriton"
        if (candidate / "tritonserver" / "bin" / "tritonserver").is_file():
            return candidate
    return None


def _address_args(host: str) -> list[str]:
    """tritonserver flags that bind its endpoints to `host` (none for every interface, Triton's default)."""
    if host == "0.0.0.0":
        return []
    return [f"--http-address={host}", f"--grpc-address={host}", f"--metrics-address={host}"]


def _restricted_api_args(key: str | None) -> list[str]:
    """tritonserver flags that refuse the model-repository API to clients without `key`."""
    if key is None:
        return []
    # gRPC clients send the header with Triton's `triton-grpc-protocol-` prefix.
    return [
        f"--http-restricted-api=model-repository:{MODEL_CONTROL_KEY_HEADER}={key}",
        f"--grpc-restricted-protocol=model-repository:{MODEL_CONTROL_KEY_HEADER}={key}",
    ]


def _server_environment(installation: TritonInstallation, model_control_key: str | None = None) -> dict[str, str]:
    """The server's environment: its libraries found, the stub importing this project and its packages,
    and the model-control key for the `router` model's repository-index polls (set or removed)."""
    env = dict(os.environ)
    env.pop(MODEL_CONTROL_KEY_ENV, None)
    if model_control_key is not None:
        env[MODEL_CONTROL_KEY_ENV] = model_control_key
    if installation.library_dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [*map(str, installation.library_dirs), *filter(None, [env.get("LD_LIBRARY_PATH")])]
        )
    # The stub embeds Python and finds its prefix through the `python3` on PATH: put this
    # interpreter's first, or an unactivated virtualenv's packages (numpy, torch) go missing.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
    python_path = [str(PACKAGE_PARENT), *site.getsitepackages()]
    env["PYTHONPATH"] = os.pathsep.join([*python_path, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _is_ok(url: str) -> bool:
    # Connection: close, so no idle connection is left for the server to wait on when it stops.
    try:
        return requests.get(url, timeout=2, headers={"Connection": "close"}).status_code == 200
    except requests.RequestException:
        return False


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on localhost right now (for servers started side by side)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
