"""The engine's side of disaggregation: pulling a prompt's KV from a prefill worker.

The engine calls a `KVConnector` only from its own thread: it starts a pull
into blocks it allocated, polls it every step, and finishes it (which also
tells the prefill worker to release its hold). The NIXL implementation lives
in `triton_disagg.kv_transfer.nixl_connector`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from triton_disagg.kv_transfer.handle import KVHandle, TransferState

__all__ = ["TransferState", "RemoteKV", "KVConnector"]


@dataclass(slots=True, frozen=True)
class RemoteKV:
    """A prompt prefilled elsewhere: where its KV is, and the token the prefill sampled."""

    handle: KVHandle
    first_token_id: int


class KVConnector(Protocol):
    def start_pull(self, handle: KVHandle, local_block_ids: list[int], remote_block_ids: list[int]) -> object:
        """Start reading `remote_block_ids` of the handle's pool into `local_block_ids` (same length).

        Returns an opaque transfer. Raises (any exception) when the pull cannot
        start: unknown agent, incompatible layout, out-of-range blocks, transport error.
        """

    def poll(self, transfer: object) -> TransferState:
        """Non-blocking progress check."""

    def finish(self, transfer: object | None, handle: KVHandle) -> None:
        """Release the transfer's resources and tell the prefill worker it may free the hold.

        `transfer` is None when no pull was started (nothing was missing, or it
        failed to start). Never raises: the hold also expires on its own.
        """

    def cancel(self, transfer: object) -> bool:
        """Abort a pending pull. True when the local blocks can no longer be written."""

    def released_holds(self) -> list[str]:
        """Hold ids whose release notifications arrived since the last call (prefill side)."""
