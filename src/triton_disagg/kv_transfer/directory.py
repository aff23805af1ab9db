"""The KV directory: which NIXL agents exist, their metadata, and their pool layouts.

Workers register when their engine starts and unregister when unloaded;
decode workers look peers up lazily and cache what they find. The `kv_transfer`
Triton model serves one `KVDirectory`; this module has no Triton imports.
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
        if not metadata:
            raise ValueError(f"agent {layout.agent_name!r} registered without NIXL metadata")
        with self._lock:
            self._entries[layout.agent_name] = DirectoryEntry(layout, metadata)

    def unregister(self, agent_name: str) -> bool:
        with self._lock:
            return self._entries.pop(agent_name, None) is not None

    def lookup(self, agent_name: str) -> DirectoryEntry | None:
        with self._lock:
            return self._entries.get(agent_name)

    def agent_names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)
