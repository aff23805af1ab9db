"""Load and unload worker models through Triton's model-control API.

Workers are copies of a template (`prefill`, `decode`) in the served model
repository, loaded under a new name (`prefill_<k>`, `decode_<j>`) with a
config override that names and places them. The copy on disk makes the
worker part of Triton's repository index, the registry of live workers
(a model loaded from override files alone is not listed there).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2


@dataclass(slots=True, frozen=True)
class Placement:
    """Where a worker's engine runs: a GPU index, or the CPU (`gpu=None`)."""

    gpu: int | None = None


def _worker_config_message(
    template_dir: Path, name: str, placement: Placement, parameters: dict[str, str] | None
) -> "model_config_pb2.ModelConfig":
    config = text_format.Parse((template_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config.name = name
    del config.instance_group[:]
    group = config.instance_group.add(count=1)
    if placement.gpu is None:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    else:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
        group.gpus.append(placement.gpu)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def worker_config(template_dir: Path, name: str, placement: Placement = Placement(), parameters: dict[str, str] | None = None) -> str:
    """The template's config.pbtxt as Triton's JSON config, renamed, placed, and with parameters set."""
    return json.dumps(json_format.MessageToDict(_worker_config_message(template_dir, name, placement, parameters)))


def write_worker(
    repository: Path, template: str, name: str, placement: Placement = Placement(), parameters: dict[str, str] | None = None
) -> Path:
    """Make `repository/name` a copy of `repository/template` whose config.pbtxt names and places it.

    The copy on disk is what Triton's repository index lists and what `--load-model=name` loads at
    start; an existing copy keeps its files and gets the new config. Returns the copy's directory.
    """
    target = repository / name
    if not target.exists():
        shutil.copytree(repository / template, target, ignore=shutil.ignore_patterns("__pycache__"))
    config = _worker_config_message(repository / template, name, placement, parameters)
    (target / "config.pbtxt").write_text(text_format.MessageToString(config))
    return target


class ModelControl:
    """A model-control client for one server (HTTP). `headers` carry e.g. a restricted-API key.

    Usable from several threads: tritonclient's HTTP client runs on gevent and
    must stay on the thread that made it, so each thread gets its own.
    """

    def __init__(self, http_url: str, headers: dict[str, str] | None = None):
        self._url = http_url.removeprefix("http://")
        self._headers = headers or {}
        self._local = threading.local()

    @property
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.http as httpclient

            client = self._local.client = httpclient.InferenceServerClient(self._url, network_timeout=300.0)
        return client

    def load_worker(
        self,
        repository: Path,
        template: str,
        name: str,
        placement: Placement = Placement(),
        parameters: dict[str, str] | None = None,
    ) -> None:
        """Load `name` as a copy of `repository/template`; blocks until loaded.

        Raises on failure; the server keeps serving and the copy stays for a retry.
        """
        write_worker(repository, template, name, placement, parameters)
        config = worker_config(repository / template, name, placement, parameters)
        self._client.load_model(name, headers=self._headers, config=config)

    def model_config(self, name: str) -> dict:
        """The loaded model's configuration, as Triton's JSON."""
        return self._client.get_model_config(name, headers=self._headers)

    def load_model(self, name: str, config: str | None = None) -> None:
        """Load (or load again) `name` from the repository; `config` (JSON) overrides its config.pbtxt."""
        self._client.load_model(name, headers=self._headers, config=config)

    def placement_of(self, name: str) -> Placement:
        """Where the loaded model `name` runs, from its config: the GPU of its first instance group, or the CPU."""
        for group in self.model_config(name).get("instance_group", []):
            if group.get("kind") == "KIND_GPU" and group.get("gpus"):
                return Placement(gpu=int(group["gpus"][0]))
        return Placement()

    def unload(self, name: str, timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
        """Unload `name` and wait until it is gone: UNAVAILABLE or absent in the repository index.

        Triton answers the unload call before the model's instances are
        finalized, so without the wait a model loaded next on the same GPU
        could overlap the one leaving. Raises TimeoutError when `name` is still
        READY, LOADING or UNLOADING after `timeout_s`.
        """
        self._client.unload_model(name, headers=self._headers)
        deadline_s = time.monotonic() + timeout_s
        while (state := self.state_of(name)) not in (None, "UNAVAILABLE"):
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"{name} was still {state} {timeout_s:.0f} s after its unload")
            time.sleep(poll_s)

    def state_of(self, name: str) -> str | None:
        """The state of `name` in the repository index ("READY", "UNLOADING", ...); None when not listed."""
        index = self._client.get_model_repository_index(headers=self._headers)
        return next((m.get("state") for m in index if m["name"] == name), None)

    def ready_models(self) -> list[str]:
        return [m["name"] for m in self._client.get_model_repository_index(headers=self._headers) if m.get("state") == "READY"]

    def close(self) -> None:
        """Close this thread's client."""
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None


class RouterRefused(RuntimeError):
    """The router model answered an action with an error (e.g. a worker it does not know)."""


def router_action(http_url: str, action: str, worker_name: str, headers: dict[str, str] | None = None) -> int:
    """Ask the `router` model to `action` ("drain", "undrain", "inflight") worker `worker_name`.

    Returns the requests routed to the worker that have not completed (0 for
    "undrain", which answers none). Raises RouterRefused when the router refuses.
    """
    body = {
        "inputs": [
            {"name": "action", "shape": [1], "datatype": "BYTES", "data": [action]},
            {"name": "worker_name", "shape": [1], "datatype": "BYTES", "data": [worker_name]},
        ]
    }
    response = requests.post(f"{http_url}/v2/models/router/infer", json=body, headers=headers or {}, timeout=30)
    if response.status_code != 200:
        raise RouterRefused(f"router refused to {action} {worker_name}: {response.text}")
    outputs = {output["name"]: output["data"] for output in response.json().get("outputs", [])}
    return int(outputs["num_inflight"][0]) if "num_inflight" in outputs else 0
