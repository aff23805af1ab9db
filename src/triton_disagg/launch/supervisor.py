"""Bring back a model whose Python stub died: Triton 2.51 neither restarts the stub nor fails its requests.

Every instance of a Triton Python model runs in a `triton_python_backend_stub`
process. When one dies (killed, or crashed), Triton keeps the model READY
and answers every request given to that instance "Stub process ... is not
healthy" until the model is loaded again. `StubSupervisor.check()` compares
the stubs running for the server's run directory with the instances of the
models Triton lists READY, and loads again every model that lost one (a
worker keeps its placement). The requests that were in flight on the dead
stub are not saved (Triton never releases them); every later one is served.
`serve` calls it twice a second.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from triton_disagg.model_control import ModelControl

logger = logging.getLogger(__name__)


def stubs(run_dir: Path) -> dict[int, str]:
    """The Python backend stubs of the server whose run directory is `run_dir`: pid -> model name."""
    repository = Path(run_dir).resolve() / "model_repository"
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if len(argv) > 1 and argv[0].endswith(b"triton_python_backend_stub"):
            model_py = Path(argv[1].decode(errors="replace"))
            if model_py.parent.parent.parent == repository:
                found[int(entry.name)] = model_py.parent.parent.name
    return found


def models_missing_a_stub(instances: Mapping[str, int], live_stubs: Mapping[int, str]) -> list[str]:
    """The models (of `instances`: model -> instance count) with fewer live stubs than instances, sorted."""
    counts = Counter(live_stubs.values())
    return sorted(model for model, count in instances.items() if counts.get(model, 0) < count)


class StubSupervisor:
    """Loads again the READY models of one server that lost a stub. Not thread-safe; call `check()` from one loop."""

    def __init__(self, http_url: str, run_dir: Path, headers: dict[str, str] | None = None, grace_s: float = 120.0) -> None:
        """`grace_s`: how long after a reload a model is left alone (its new stubs are starting)."""
        self._control = ModelControl(http_url, headers)
        self._run_dir = Path(run_dir)
        self._grace_s = grace_s
        self._instances: dict[str, int] = {}
        self._reloaded_at_s: dict[str, float] = {}

    def check(self) -> list[str]:
        """Load again every READY model that lost a stub; returns their names. Raises when Triton cannot be asked."""
        ready = self._control.ready_models()
        now_s = time.monotonic()
        candidates = [m for m in ready if now_s - self._reloaded_at_s.get(m, -self._grace_s) >= self._grace_s]
        missing = models_missing_a_stub({m: self._instance_count(m) for m in candidates}, stubs(self._run_dir))
        for model in missing:
            logger.warning("a Python stub of %s died; loading %s again", model, model)
            self._reload(model)
            self._reloaded_at_s[model] = time.monotonic()
        return missing

    def close(self) -> None:
        self._control.close()

    def _instance_count(self, model: str) -> int:
        if model not in self._instances:
            groups = self._control.model_config(model).get("instance_group", [])
            self._instances[model] = sum(int(group.get("count", 1)) for group in groups) or 1
        return self._instances[model]

    def _reload(self, model: str) -> None:
        # Triton loads a model again only when its config differs from the one it runs, so the
        # override is the running config (a worker keeps its placement and parameters) with a
        # `reload` parameter that counts the reloads.
        config = self._control.model_config(model)
        parameters = config.setdefault("parameters", {})
        count = int(parameters.get("reload", {}).get("string_value", "0") or 0)
        parameters["reload"] = {"string_value": str(count + 1)}
        self._control.load_model(model, json.dumps(config))
