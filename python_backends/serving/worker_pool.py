"""Which prefill and decode workers are live, and which ones a request should use.

Triton's repository index is the registry of live workers: `prefill_<k>` and
`decode_<j>` models in state READY. `WorkerPool` is the pure part (choice by
requests in flight); `RepositoryWatcher` refreshes it from the index.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

import requests

logger = logging.getLogger(__name__)

PREFILL_NAME = re.compile(r"^prefill_\d+$")
DECODE_NAME = re.compile(r"^decode_\d+$")


@dataclass(slots=True, frozen=True)
class WorkerChoice:
    decode_worker: str
    prefill_worker: str | None  # None: no prefill worker is live
    prefill_pool_saturated: bool  # every prefill worker already has its limit in flight


class WorkerPool:
    """Least-loaded choice over live workers, by requests this process has in flight on each.

    `max_prefills_in_flight` per prefill worker marks the prefill pool
    saturated, which makes decode workers prefill locally. Thread-safe.
    """

    def __init__(self, max_prefills_in_flight: int = 4) -> None:
        self.max_prefills_in_flight = max_prefills_in_flight
        self._decode: dict[str, int] = {}
        self._prefill: dict[str, int] = {}
        self._turn = 0
        self._lock = threading.Lock()

    def set_live(self, model_names: list[str]) -> None:
        """Replace the live worker set; in-flight counts of workers that stay are kept."""
        with self._lock:
            self._decode = {n: self._decode.get(n, 0) for n in model_names if DECODE_NAME.match(n)}
            self._prefill = {n: self._prefill.get(n, 0) for n in model_names if PREFILL_NAME.match(n)}

    @property
    def decode_workers(self) -> list[str]:
        with self._lock:
            return sorted(self._decode)

    @property
    def prefill_workers(self) -> list[str]:
        with self._lock:
            return sorted(self._prefill)

    def choose(self) -> WorkerChoice:
        """Pick workers for a request and count it in flight on both. Raises LookupError with no decode worker."""
        with self._lock:
            if not self._decode:
                raise LookupError("no decode worker is ready; load one (decode_<n>) or wait for the planner")
            self._turn += 1
            decode = self._least_loaded(self._decode)
            self._decode[decode] += 1
            prefill, saturated = None, False
            if self._prefill:
                prefill = self._least_loaded(self._prefill)
                saturated = self._prefill[prefill] >= self.max_prefills_in_flight
                if saturated:
                    prefill = None
                else:
                    self._prefill[prefill] += 1
            return WorkerChoice(decode, prefill, saturated)

    def prefill_done(self, choice: WorkerChoice) -> None:
        """The prompt is prefilled (first token seen, or the request ended)."""
        self._release(self._prefill, choice.prefill_worker)

    def request_done(self, choice: WorkerChoice) -> None:
        self._release(self._decode, choice.decode_worker)

    def _release(self, counts: dict[str, int], name: str | None) -> None:
        with self._lock:
            if name in counts and counts[name] > 0:
                counts[name] -= 1

    def _least_loaded(self, counts: dict[str, int]) -> str:
        names = sorted(counts)
        # Ties rotate, so an idle pool spreads requests instead of piling on the first name.
        return min(names, key=lambda n: (counts[n], (names.index(n) - self._turn) % len(names)))


class RepositoryWatcher:
    """Polls `POST /v2/repository/index` of the local server and updates a `WorkerPool`."""

    def __init__(self, pool: WorkerPool, http_url: str, interval_s: float = 1.0) -> None:
        self.pool = pool
        self._url = f"{http_url}/v2/repository/index"
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._session = requests.Session()
        self._thread = threading.Thread(target=self._run, name="repository-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def refresh(self) -> None:
        response = self._session.post(self._url, json={"ready": True}, timeout=5)
        response.raise_for_status()
        self.pool.set_live([m["name"] for m in response.json() if m.get("state") == "READY"])

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the server may be starting or stopping; keep the last view
                logger.debug("repository index poll failed: %s", exc)
            self._stop.wait(self._interval_s)
