"""Which prefill and decode workers are live, where their KV events are, what load they report.

Triton's repository index is the registry of live workers. `split_workers`,
`kv_event_endpoints` and `worker_loads` are pure; `RepositoryWatcher` polls
one server's index and hands the READY model names to a callback, with the
model-control key when the server restricts its repository API.
No torch here: the `llm` and `router` models import this module.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import requests

from triton_disagg.router.selection import WorkerMetrics

logger = logging.getLogger(__name__)

PREFILL_NAME = re.compile(r"^prefill_\d+$")
DECODE_NAME = re.compile(r"^decode_\d+$")

#: Header carrying the model-control key of a server started with one (`serve --model-control-key`).
MODEL_CONTROL_KEY_HEADER = "triton-disagg-key"
#: Environment variable through which the server's Python models get that key. An environment
#: variable, not a model parameter: parameters can be read by anyone through the model-config API.
MODEL_CONTROL_KEY_ENV = "TRITON_DISAGG_MODEL_CONTROL_KEY"


def model_control_headers(key: str | None) -> dict[str, str]:
    """HTTP headers that open a repository API restricted by `key` (none without a key)."""
    return {MODEL_CONTROL_KEY_HEADER: key} if key else {}


def split_workers(model_names: list[str]) -> tuple[list[str], list[str]]:
    """(prefill workers, decode workers) among `model_names`, sorted; templates and other models ignored."""
    names = sorted(model_names)
    return [n for n in names if PREFILL_NAME.match(n)], [n for n in names if DECODE_NAME.match(n)]


def kv_event_endpoints(kv_events_dir: str, model_name: str) -> tuple[str, str]:
    """ZeroMQ endpoints of a worker's KV events (PUB) and dumps (REP), derived from its name.

    Routers on the same node find a worker's stream from its model name alone.
    """
    return f"ipc://{kv_events_dir}/{model_name}.events", f"ipc://{kv_events_dir}/{model_name}.dump"


_SERIES = re.compile(r'^(triton_disagg_\w+)\{[^}]*model="([^"]+)"[^}]*\} (\S+)$', re.MULTILINE)


def worker_loads(prometheus_text: str) -> dict[str, WorkerMetrics]:
    """Each worker's own load report from the server's metrics page.

    Active decode blocks are the blocks its requests hold (pool minus free);
    queued prefill tokens are the prompt tokens waiting in its queue.
    """
    values: dict[str, dict[str, float]] = {}
    for name, model, value in _SERIES.findall(prometheus_text):
        values.setdefault(model, {})[name] = float(value)
    loads = {}
    for model, series in values.items():
        if "triton_disagg_kv_blocks" in series and "triton_disagg_kv_free_blocks" in series:
            capacity = int(series["triton_disagg_kv_blocks"])
            loads[model] = WorkerMetrics(
                active_decode_blocks=capacity - int(series["triton_disagg_kv_free_blocks"]),
                queued_prefill_tokens=int(series.get("triton_disagg_waiting_prompt_tokens", 0)),
                capacity_blocks=capacity,
            )
    return loads


class RepositoryWatcher:
    """Polls `POST /v2/repository/index` every `interval_s` and calls `on_live(ready_model_names)` on its thread.

    `headers` go with every poll (the model-control key of a restricted repository API).
    """

    def __init__(
        self,
        http_url: str,
        on_live: Callable[[list[str]], None],
        interval_s: float = 1.0,
        headers: dict[str, str] | None = None,
        on_failure: Callable[[Exception], None] | None = None,
    ) -> None:
        """`on_failure(error)` is called for a poll that failed (the view is otherwise kept)."""
        self._url = f"{http_url}/v2/repository/index"
        self._on_live = on_live
        self._on_failure = on_failure
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._session = requests.Session()
        self._session.headers.update(headers or {})
        self._thread = threading.Thread(target=self._run, name="repository-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def refresh(self) -> None:
        """Poll once now (raises on a failed request)."""
        response = self._session.post(self._url, json={"ready": True}, timeout=5)
        response.raise_for_status()
        self._on_live([m["name"] for m in response.json() if m.get("state") == "READY"])

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the server may be starting or stopping; keep the last view
                logger.debug("repository index poll of %s failed: %s", self._url, exc)
                if self._on_failure is not None:
                    self._on_failure(exc)
            self._stop.wait(self._interval_s)
