"""KV pulls over NIXL: register the pool once, READ peers' blocks, notify them to release.

One `NixlConnector` per worker engine. Its NIXL agent is named after the
worker, registers the whole KV pool (host memory on CPU, GPU memory on CUDA)
in one piece, and publishes `metadata` plus `layout` to the KV directory so
peers can address its blocks. Every method except `add_peer_threadsafe` runs
on the engine thread.
"""

from __future__ import annotations

import logging
import threading

import torch

from triton_disagg.kv_transfer.handle import InvalidKVHandle, KVHandle, TransferState
from triton_disagg.kv_transfer.layout import PoolLayout, merge_runs

logger = logging.getLogger(__name__)

RELEASE_PREFIX = b"release:"


class NixlConnector:
    """A worker's NIXL agent and its view of peer pools."""

    def __init__(
        self, agent_name: str, kv_pool: torch.Tensor, model_name: str = "", backends: tuple[str, ...] = ("UCX",)
    ):
        from nixl._api import nixl_agent, nixl_agent_config

        self.agent_name = agent_name
        self.layout = PoolLayout.of_pool(agent_name, kv_pool, model_name)
        # No progress thread: it busy-polls a whole core even when idle. The engine thread
        # drives progress instead, by polling transfers and notifications while any are pending.
        self._agent = nixl_agent(agent_name, nixl_agent_config(enable_prog_thread=False, backends=list(backends)))
        self._agent.register_memory(
            [(self.layout.base_addr, self.layout.num_blocks * self.layout.block_bytes, self.layout.device_id, "")],
            self.layout.mem_type,
        )
        self.metadata: bytes = self._agent.get_agent_metadata()
        self._peers: dict[str, PoolLayout] = {}
        self._incoming: list[tuple[PoolLayout, bytes]] = []
        self._lock = threading.Lock()

    # -- peers ----------------------------------------------------------------------

    def knows_peer(self, agent_name: str) -> bool:
        with self._lock:
            return agent_name in self._peers or any(layout.agent_name == agent_name for layout, _ in self._incoming)

    def add_peer_threadsafe(self, layout: PoolLayout, metadata: bytes) -> None:
        """Queue a peer from the directory; it is added on the engine thread before the next pull."""
        if not self.layout.is_compatible(layout):
            raise InvalidKVHandle(
                f"worker {layout.agent_name}'s KV layout {layout.block_shape}/{layout.dtype} does not match "
                f"this worker's {self.layout.block_shape}/{self.layout.dtype}; serve the same model and block size"
            )
        with self._lock:
            self._incoming.append((layout, metadata))

    def _apply_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for layout, metadata in incoming:
            # Agent names are per incarnation, so a known name is a duplicate lookup. Re-adding it
            # would drop the connection under the transfers in flight.
            if layout.agent_name not in self._peers:
                self._agent.add_remote_agent(metadata)
                self._peers[layout.agent_name] = layout

    def forget_peer(self, agent_name: str) -> None:
        if self._peers.pop(agent_name, None) is not None:
            self._agent.remove_remote_agent(agent_name)

    # -- KVConnector ---------------------------------------------------------------------

    def start_pull(self, handle: KVHandle, local_block_ids: list[int], remote_block_ids: list[int]) -> object:
        self._apply_incoming()
        peer = self._peers.get(handle.agent_name)
        if peer is None:
            raise InvalidKVHandle(f"kv_handle names agent {handle.agent_name!r}, which is not in the KV directory")
        if any(not 0 <= block_id < peer.num_blocks for block_id in remote_block_ids):
            raise InvalidKVHandle(f"kv_handle names blocks outside {handle.agent_name}'s pool of {peer.num_blocks}")
        local, remote = [], []
        for local_start, remote_start, num_blocks in merge_runs(local_block_ids, remote_block_ids):
            local.append((self.layout.block_addr(local_start), num_blocks * self.layout.block_bytes, self.layout.device_id))
            remote.append((peer.block_addr(remote_start), num_blocks * peer.block_bytes, peer.device_id))
        transfer = self._agent.initialize_xfer(
            "READ",
            self._agent.get_xfer_descs(local, self.layout.mem_type),
            self._agent.get_xfer_descs(remote, peer.mem_type),
            handle.agent_name,
            RELEASE_PREFIX + handle.hold_id.encode(),
        )
        if self._agent.transfer(transfer) == "ERR":
            self._agent.release_xfer_handle(transfer)
            raise RuntimeError(f"NIXL refused to post the READ from {handle.agent_name}")
        return transfer

    def poll(self, transfer: object) -> TransferState:
        try:
            state = self._agent.check_xfer_state(transfer)
        except Exception:  # noqa: BLE001 - a transfer NIXL no longer knows has failed
            logger.warning("NIXL lost track of a KV transfer", exc_info=True)
            return TransferState.FAILED
        return {"DONE": TransferState.DONE, "PROC": TransferState.PENDING}.get(state, TransferState.FAILED)

    def finish(self, transfer: object | None, handle: KVHandle) -> None:
        done = False
        if transfer is not None:
            # A READ that completed carried the release notification already.
            done = self.poll(transfer) == TransferState.DONE
            try:
                self._agent.release_xfer_handle(transfer)
            except Exception:  # noqa: BLE001 - the hold expires on its own
                logger.warning("could not release a NIXL transfer handle from %s", handle.agent_name, exc_info=True)
        if not done and handle.agent_name in self._peers:
            try:
                self._agent.send_notif(handle.agent_name, RELEASE_PREFIX + handle.hold_id.encode())
            except Exception:  # noqa: BLE001 - the prefill worker may be gone; its hold expires
                logger.info("could not notify %s to release %s", handle.agent_name, handle.hold_id)

    def cancel(self, transfer: object) -> bool:
        try:
            self._agent.release_xfer_handle(transfer)
        except Exception:  # noqa: BLE001 - still in flight: the caller keeps waiting
            return False
        return True

    def released_holds(self) -> list[str]:
        released = []
        for messages in self._agent.get_new_notifs().values():
            for message in messages:
                if message.startswith(RELEASE_PREFIX):
                    released.append(message[len(RELEASE_PREFIX) :].decode(errors="replace"))
        return released
