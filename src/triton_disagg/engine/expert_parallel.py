"""Expert parallelism over real processes: rank 0 is the engine, ranks 1..N-1 hold the other experts.

Rank 0 (the engine's process: a Triton worker model, a test, a benchmark)
starts the other ranks as child processes (`python -m
triton_disagg.engine.expert_rank`) and keeps a pipe to each one's stdin and
stdout:

- commands go down the pipe as a fixed header (op, layer, tokens, payload
  bytes) plus a payload; a rank blocks reading it, so an idle rank costs
  nothing, and it exits when the pipe closes: when rank 0 shuts it down, or
  when rank 0's process dies, however it dies (no orphans);
- replies (readiness, load reports) come back as JSON lines; stderr lines are
  forwarded to rank 0's stderr, the last ones kept for error messages;
- tensors go over a `torch.distributed` process group: gloo on the CPU,
  bound to 127.0.0.1, NCCL on CUDA (rank r on GPU `base + r`). The rendezvous
  is a FileStore in a private temporary directory, so no port is opened
  beyond gloo's own loopback sockets.

Per MoE layer and step, rank 0 sends FORWARD, broadcasts the step's hidden
states with their slots and routing weights, runs its own slots while the
others run theirs, and reduces the partial outputs (`ExpertParallelGroup.combine`).
A weight move (`move_layer`) sends each moved expert from a rank that holds it to
the rank that needs it; every rank derives the same moves from the old and new
placement.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from triton_disagg.engine.eplb import ExpertPlacement, plan_weight_moves
from triton_disagg.engine.moe import ExpertParallelMoe, ExpertSlots

#: Commands rank 0 sends down each rank's pipe (INIT first, once, with the rank's settings as JSON).
OP_INIT, OP_FORWARD, OP_MOVE, OP_REPORT, OP_SHUTDOWN = 0, 1, 2, 3, 4
#: op, layer, num_tokens, payload bytes.
HEADER = struct.Struct("<iiqq")
#: How long one collective may wait for the other ranks before the group counts as broken.
COLLECTIVE_TIMEOUT_S = 300.0


class ExpertComm:
    """The tensor plane of one rank over gloo (CPU) or NCCL (CUDA): broadcast and reduce for tokens,
    point-to-point for weight moves."""

    def __init__(self, store_path: str, rank: int, world_size: int, device: torch.device, timeout_s: float):
        store = torch.distributed.FileStore(store_path, world_size)
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            options = torch.distributed.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._group = torch.distributed.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            options = torch.distributed.ProcessGroupGloo._Options()
            options._devices = [torch.distributed.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            options._timeout = timeout
            self._group = torch.distributed.ProcessGroupGloo(store, rank, world_size, options)
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        """Overwrite `tensor` on every rank but `root` with root's (in place; same shape everywhere)."""
        options = torch.distributed.BroadcastOptions()
        options.rootRank = root
        self._group.broadcast([tensor], options).wait()

    def reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over ranks into rank 0's `tensor` (the others' are left undefined)."""
        options = torch.distributed.ReduceOptions()
        options.rootRank = 0
        options.reduceOp = torch.distributed.ReduceOp.SUM
        self._group.reduce([tensor], options).wait()

    def barrier(self) -> None:
        self._group.barrier().wait()

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send `tensor` to rank `dst` (gloo: returns once sent; NCCL: once queued on the stream)."""
        self._group.send([tensor], dst, 0).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        """Fill `tensor` (its size must match what `src` sends) from rank `src`."""
        self._group.recv([tensor], src, 0).wait()

    def close(self) -> None:
        shutdown = getattr(self._group, "shutdown", None)
        if shutdown is not None and self._group.name() == "nccl":
            shutdown()


def move_slot_weights(comm: ExpertComm, slots: ExpertSlots, old_row: list[int], new_row: list[int], slots_per_rank: int) -> int:
    """Every rank's part of one layer's weight move from `old_row` to `new_row`; returns slots this rank filled.

    All ranks call it with the same rows, so all derive the same moves. What one rank
    sends another goes as one message, and the pairs take turns in one global order
    (lowest pair first): the lowest pair not done always has both ends waiting on
    each other, so blocking sends and receives cannot deadlock. Receivers stage what
    they get and overwrite their slots only at the end, since a source slot may be
    another move's destination.
    """
    rank = comm.rank
    staged: list[tuple[int, torch.Tensor]] = []
    by_pair: dict[tuple[int, int], list] = {}
    for move in plan_weight_moves(old_row, new_row, slots_per_rank):
        pair = (move.src_slot // slots_per_rank, move.dst_slot // slots_per_rank)
        if pair == (rank, rank):
            staged.append((move.dst_slot % slots_per_rank, slots.packed(move.src_slot % slots_per_rank)))
        elif rank in pair:
            by_pair.setdefault(pair, []).append(move)
    numel = slots.packed_numel
    for (src, dst), moves in sorted(by_pair.items()):
        if rank == src:
            comm.send(torch.cat([slots.packed(m.src_slot % slots_per_rank) for m in moves]), dst)
        else:
            buffer = torch.empty(len(moves) * numel, dtype=slots.w1.dtype, device=slots.w1.device)
            comm.recv(buffer, src)
            staged += [(m.dst_slot % slots_per_rank, flat) for m, flat in zip(moves, buffer.split(numel))]
    for local, flat in staged:
        slots.unpack_into(local, flat)
    comm.barrier()  # the move is over when every rank has its weights, not when rank 0 has
    return len(staged)


def serve_layer(comm: ExpertComm, slots: ExpertSlots, num_tokens: int, hidden_size: int, top_k: int) -> None:
    """A rank other than 0: its part of one layer's FORWARD (receive tokens, run its slots, reduce)."""
    dtype, device = slots.w1.dtype, slots.w1.device
    buffer = torch.empty(num_tokens, hidden_size + 2 * top_k, dtype=torch.float32, device=device)
    comm.broadcast(buffer, root=0)
    x = buffer[:, :hidden_size].to(dtype)
    token_slots = buffer[:, hidden_size : hidden_size + top_k].long()
    weights = buffer[:, hidden_size + top_k :].to(dtype)
    comm.reduce(slots(x, token_slots, weights))


@dataclass(slots=True, frozen=True)
class RankReport:
    """What one rank's slots ran since it started: CPU seconds and tokens per local slot, per layer."""

    rank: int
    compute_s: list[float]  # (L,)
    slot_tokens: list[list[int]]  # (L, slots per rank)


def slots_report(rank: int, layers: list[ExpertSlots]) -> RankReport:
    return RankReport(rank, [s.compute_s for s in layers], [s.slot_tokens.tolist() for s in layers])


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the CPU, or the r-th GPU after rank 0's."""
    if device.type != "cuda":
        return device
    base = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", base + rank)


class _RankProcess:
    """Rank 0's handle on one child rank: its command pipe, its replies, the tail of its stderr."""

    def __init__(self, rank: int, init: dict, env: dict[str, str]):
        self.rank = rank
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        self.process = subprocess.Popen(
            [_python_executable(), "-m", "triton_disagg.engine.expert_rank"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._stderr_thread = threading.Thread(target=self._forward_stderr, name=f"ep-rank-{rank}-stderr", daemon=True)
        self._stderr_thread.start()
        self._stdout_buffer = b""
        self.send(OP_INIT, 0, 0, json.dumps(init).encode())

    def send(self, op: int, layer: int, num_tokens: int, payload: bytes = b"") -> None:
        self.process.stdin.write(HEADER.pack(op, layer, num_tokens, len(payload)) + payload)
        self.process.stdin.flush()

    def read_reply(self, deadline_s: float) -> dict:
        """The next JSON line the rank writes. Raises RuntimeError if it exits or `deadline_s` passes."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._stdout_buffer:
            remaining = deadline_s - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"expert-parallel rank {self.rank} did not answer in time{self.describe_tail()}")
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.process.wait(timeout=5)
                    raise RuntimeError(f"expert-parallel rank {self.rank} exited with code {self.process.returncode}{self.describe_tail()}")
                self._stdout_buffer += chunk
        line, self._stdout_buffer = self._stdout_buffer.split(b"\n", 1)
        return json.loads(line)

    def describe_tail(self) -> str:
        self._stderr_thread.join(timeout=0.5 if self.process.poll() is not None else 0)
        return "; its last output:\n" + "\n".join(self._tail) if self._tail else ""

    def _forward_stderr(self) -> None:
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            print(f"[expert-parallel rank {self.rank}] {line}", file=sys.stderr, flush=True)


def _python_executable() -> str:
    """This interpreter; inside Triton's Python backend stub, the `python3` of the environment it runs in."""
    if Path(sys.executable).name.startswith("python") and os.access(sys.executable, os.X_OK):
        return sys.executable
    candidate = Path(sys.prefix) / "bin" / "python3"
    return str(candidate) if candidate.is_file() else (shutil.which("python3") or "python3")


def _stop_ranks(ranks: list[_RankProcess], store_dir: str) -> None:
    """Shut every child rank down (kill what does not exit in 5 s) and remove the rendezvous directory."""
    for rank in ranks:
        try:
            rank.send(OP_SHUTDOWN, 0, 0)
            rank.process.stdin.close()
        except (OSError, ValueError):
            pass
    deadline_s = time.monotonic() + 5.0
    for rank in ranks:
        try:
            rank.process.wait(timeout=max(0.0, deadline_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            rank.process.kill()
            rank.process.wait()
        rank.process.stdout.close()
    shutil.rmtree(store_dir, ignore_errors=True)


class ExpertParallelGroup:
    """Rank 0 of an expert-parallel group of `placement.num_ranks` processes; the `ExpertExchange` of its MoE layers.

    `start` spawns the other ranks and waits until each has loaded its slots;
    `close` shuts them down (it also runs when the group is garbage-collected or the
    interpreter exits). Not thread-safe: call it from the engine thread only.
    """

    def __init__(self, model_path: str, placement: ExpertPlacement, device: torch.device, dtype: torch.dtype):
        self.model_path = model_path
        self.placement = placement
        self.device = device
        self.dtype = dtype
        self.local_slots: list[ExpertSlots] = []
        self._ranks: list[_RankProcess] = []
        self._comm: ExpertComm | None = None
        self._broken: str | None = None
        self._store_dir = tempfile.mkdtemp(prefix="triton-disagg-ep-")
        self._finalizer = weakref.finalize(self, _stop_ranks, self._ranks, self._store_dir)

    @property
    def world_size(self) -> int:
        return self.placement.num_ranks

    @property
    def pids(self) -> list[int]:
        """Process ids of ranks 1..N-1."""
        return [rank.process.pid for rank in self._ranks]

    def start(self, model: nn.Module, startup_timeout_s: float = 300.0) -> None:
        """Spawn ranks 1..N-1, shard `model`'s MoE layers (rank 0 keeps its own slots), join the process group.

        Mutates `model`: each `block_sparse_moe` becomes an `ExpertParallelMoe`.
        Raises RuntimeError naming the rank that failed to start, with its last output.
        """
        spr = self.placement.slots_per_rank
        if self.device.type == "cuda" and torch.cuda.device_count() < rank_device(self.device, self.world_size - 1).index + 1:
            raise ValueError(
                f"ep_size {self.world_size} needs {self.world_size} GPUs from {self.device}; "
                f"this machine has {torch.cuda.device_count()}. Lower ep_size."
            )
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        if self.device.type == "cuda":
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        store_path = os.path.join(self._store_dir, "rendezvous")
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        if self.device.type == "cpu":  # the ranks share this machine's cores: one share each, rank 0 included
            torch.set_num_threads(threads)
        deadline_s = time.monotonic() + startup_timeout_s
        try:
            for rank in range(1, self.world_size):
                init = {
                    "rank": rank,
                    "world_size": self.world_size,
                    "store_path": store_path,
                    "model_path": self.model_path,
                    "device": str(rank_device(self.device, rank)),
                    "dtype": str(self.dtype).removeprefix("torch."),
                    "placement": self.placement.physical_to_logical.tolist(),
                    "num_threads": threads,
                    "timeout_s": COLLECTIVE_TIMEOUT_S,
                }
                self._ranks.append(_RankProcess(rank, init, env))
            for layer, decoder_layer in enumerate(model.model.layers):
                block = decoder_layer.block_sparse_moe
                row = self.placement.physical_to_logical[layer].tolist()
                experts = [block.experts[e] for e in row[:spr]]
                weights = [{"w1": e.w1.weight.data, "w2": e.w2.weight.data, "w3": e.w3.weight.data} for e in experts]
                self.local_slots.append(ExpertSlots.stack(weights, first_slot=0))
            for rank in self._ranks:
                reply = rank.read_reply(deadline_s)
                if reply.get("error"):
                    raise RuntimeError(f"expert-parallel rank {rank.rank} failed to start: {reply['error']}{rank.describe_tail()}")
            self._comm = ExpertComm(store_path, 0, self.world_size, self.device, COLLECTIVE_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        for layer, decoder_layer in enumerate(model.model.layers):
            block = decoder_layer.block_sparse_moe
            decoder_layer.block_sparse_moe = ExpertParallelMoe(
                block.gate, layer, block.top_k, self, self.placement.physical_to_logical[layer]
            )

    def combine(self, layer: int, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """FORWARD on every rank: broadcast the tokens, run rank 0's slots, reduce the partial outputs."""
        self._check_usable()
        try:
            for rank in self._ranks:
                rank.send(OP_FORWARD, layer, x.shape[0])
            buffer = torch.cat([x.float(), slots.float(), weights.float()], dim=1)  # (T, H + 2K)
            self._comm.broadcast(buffer, root=0)
            partial = self.local_slots[layer](x, slots, weights)
            self._comm.reduce(partial)
        except (RuntimeError, OSError) as exc:
            raise self._failure(exc) from exc
        return partial

    def move_layer(self, layer: int, new_row: torch.Tensor, moe: ExpertParallelMoe) -> int:
        """Move layer `layer`'s weights to `new_row` on every rank, then route `moe` by it; blocks until done.

        Returns the number of slots whose expert changed.
        """
        self._check_usable()
        old_row = self.placement.physical_to_logical[layer].tolist()
        row = new_row.tolist()
        try:
            for rank in self._ranks:
                rank.send(OP_MOVE, layer, 0, new_row.to(torch.int64).numpy().tobytes())
            move_slot_weights(self._comm, self.local_slots[layer], old_row, row, self.placement.slots_per_rank)
        except (RuntimeError, OSError) as exc:
            raise self._failure(exc) from exc
        self.placement = self.placement.with_layer(layer, new_row)
        moe.set_placement(new_row)
        return sum(a != b for a, b in zip(old_row, row))

    def reports(self, timeout_s: float = 60.0) -> list[RankReport]:
        """Every rank's cumulative slot load and CPU time, rank 0 first."""
        self._check_usable()
        deadline_s = time.monotonic() + timeout_s
        for rank in self._ranks:
            rank.send(OP_REPORT, 0, 0)
        reports = [slots_report(0, self.local_slots)]
        for rank in self._ranks:
            reply = rank.read_reply(deadline_s)
            reports.append(RankReport(rank.rank, reply["compute_s"], reply["slot_tokens"]))
        return reports

    def close(self) -> None:
        """Stop ranks 1..N-1 and release the process group; idempotent."""
        if self._comm is not None:
            self._comm.close()
            self._comm = None
        self._broken = self._broken or "the expert-parallel group is closed"
        self._finalizer()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(self._broken)

    def _failure(self, exc: BaseException) -> RuntimeError:
        """Mark the group broken; an error naming the rank that died, if one did."""
        for rank in self._ranks:
            code = rank.process.poll()
            if code is not None:
                self._broken = f"expert-parallel rank {rank.rank} exited with code {code}{rank.describe_tail()}"
                break
        else:
            self._broken = f"the expert-parallel exchange failed: {exc}"
        return RuntimeError(self._broken)
