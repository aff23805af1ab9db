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
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2


@dataclass(slots=True, frozen=True)
class Placement:
    """Where a worker's engine runs: a GPU index, or the CPU (`gpu=None`)."""

    gpu: int | None = None


def worker_config(template_dir: Path, name: str, placement: Placement = Placement(), parameters: dict[str, str] | None = None) -> str:
    """The template's config.pbtxt as Triton's JSON config, renamed, placed, and with parameters set."""
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
    return json.dumps(json_format.MessageToDict(config))


class ModelControl:
    """A model-control client for one server (HTTP). `headers` carry e.g. a restricted-API key."""

    def __init__(self, http_url: str, headers: dict[str, str] | None = None):
        import tritonclient.http as httpclient

        self._client = httpclient.InferenceServerClient(http_url.removeprefix("http://"), network_timeout=300.0)
        self._headers = headers or {}

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
        target = repository / name
        if not target.exists():
            shutil.copytree(repository / template, target, ignore=shutil.ignore_patterns("__pycache__"))
        config = worker_config(repository / template, name, placement, parameters)
        self._client.load_model(name, headers=self._headers, config=config)

    def unload(self, name: str) -> None:
        self._client.unload_model(name, headers=self._headers)

    def ready_models(self) -> list[str]:
        return [m["name"] for m in self._client.get_model_repository_index(headers=self._headers) if m.get("state") == "READY"]

    def close(self) -> None:
        self._client.close()
