"""The KV directory: which NIXL agents exist, their metadata, and their pool layouts.

Workers register when their engine starts; a worker registering replaces
every entry of an earlier life of the same model (a reloaded or restarted
worker has a new agent). Entries of models no longer loaded are dropped by
`retain_models`, which the `kv_transfer` model calls with the live models it
sees in each server's repository index (its own, and the servers remote
workers registered from). Decode workers look peers up lazily and
cache what they find. This module has no Triton imports.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from triton_disagg.kv_transfer.layout import PoolLayout


@dataclass(slots=True, frozen=True)
class DirectoryEntry:
    layout: PoolLayout
    metadata: bytes  # NIXL agent metadata (opaque)


class KVDirectory:
    """Thread-safe map from agent name to its entry. A re-registration replaces the old entry."""

    def __init__(self) -> None:
        self._entries: dict[str, DirectoryEntry] = {}
        self._lock = threading.Lock()

    def register(self, layout: PoolLayout, metadata: bytes) -> None:
        """Add an agent, replacing any entry of the same agent or of an earlier agent of its model."""
        if not metadata:
            raise ValueError(f"agent {layout.agent_name!r} registered without NIXL metadata")
        with self._lock:
            for name in [n for n, e in self._entries.items() if e.layout.model_name == layout.model_name]:
                del self._entries[name]
            self._entries[layout.agent_name] = DirectoryEntry(layout, metadata)

    def forget_model(self, model_name: str) -> list[str]:
        """Drop every entry of `model_name` (a worker found dead); returns the agent names dropped."""
        with self._lock:
            dropped = [n for n, e in self._entries.items() if e.layout.model_name == model_name]
            for name in dropped:
                del self._entries[name]
            return dropped

    def retain_models(self, live_model_names: set[str], server_url: str | None = None) -> list[str]:
        """Drop the entries of models not in `live_model_names` (unloaded); returns the agent names dropped.

        `server_url`: only entries of that server (`PoolLayout.server_url`; "" the directory's own); None: all.
        """
        with self._lock:
            dropped = [
                n
                for n, e in self._entries.items()
                if e.layout.model_name not in live_model_names and server_url in (None, e.layout.server_url)
            ]
            for name in dropped:
                del self._entries[name]
            return dropped

    def unregister(self, agent_name: str) -> bool:
        with self._lock:
            return self._entries.pop(agent_name, None) is not None

    def lookup(self, agent_name: str) -> DirectoryEntry | None:
        with self._lock:
            return self._entries.get(agent_name)

    def server_urls(self) -> list[str]:
        """The servers of other hosts that entries came from (`PoolLayout.server_url`, sorted)."""
        with self._lock:
            return sorted({e.layout.server_url for e in self._entries.values() if e.layout.server_url})

    def agent_names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)
