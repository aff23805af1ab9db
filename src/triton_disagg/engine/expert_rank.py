"""An expert-parallel rank other than 0: holds its expert slots and serves rank 0's commands.

Started by `ExpertParallelGroup.start` as `python -m triton_disagg.engine.expert_rank`;
not meant to be run by hand. Reads its settings, then commands, from stdin (see
`expert_parallel.HEADER`); answers on stdout in JSON lines. Exits when stdin
closes, so it never outlives rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from triton_disagg.engine.config import ModelConfig
from triton_disagg.engine.expert_parallel import (
    HEADER,
    OP_FORWARD,
    OP_MOVE,
    OP_REPORT,
    OP_SHUTDOWN,
    ExpertComm,
    move_slot_weights,
    serve_layer,
    slots_report,
)
from triton_disagg.engine.loader import load_expert_weights
from triton_disagg.engine.moe import ExpertSlots

_replies = sys.stdout


def _read_exactly(stream, num_bytes: int) -> bytes | None:
    """`num_bytes` from `stream`, or None at end of stream (rank 0 is gone)."""
    data = b""
    while len(data) < num_bytes:
        chunk = stream.read(num_bytes - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_command(stream) -> tuple[int, int, int, bytes] | None:
    header = _read_exactly(stream, HEADER.size)
    if header is None:
        return None
    op, layer, num_tokens, payload_bytes = HEADER.unpack(header)
    payload = _read_exactly(stream, payload_bytes) if payload_bytes else b""
    return None if payload is None else (op, layer, num_tokens, payload)


def _reply(message: dict) -> None:
    _replies.write(json.dumps(message) + "\n")
    _replies.flush()


def _load_slots(init: dict, device: torch.device, dtype: torch.dtype) -> list[ExpertSlots]:
    """This rank's slots of every layer, read from the checkpoint."""
    rank, placement = init["rank"], init["placement"]
    slots_per_rank = len(placement[0]) // init["world_size"]
    first = rank * slots_per_rank
    rows = [row[first : first + slots_per_rank] for row in placement]
    weights = load_expert_weights(init["model_path"], {layer: set(row) for layer, row in enumerate(rows)}, device, dtype)
    return [ExpertSlots.stack([weights[(layer, e)] for e in row], first_slot=first) for layer, row in enumerate(rows)]


def main() -> int:
    global _replies
    # Replies get the real stdout; anything a library prints goes to stderr instead of into them.
    _replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    command = _read_command(stdin)
    if command is None:
        return 0
    init = json.loads(command[3])
    try:
        torch.set_num_threads(init["num_threads"])
        device, dtype = torch.device(init["device"]), getattr(torch, init["dtype"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        config = ModelConfig.from_pretrained(init["model_path"])
        layers = _load_slots(init, device, dtype)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        traceback.print_exc()
        _reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _reply({"ready": True, "pid": os.getpid()})
    comm = ExpertComm(init["store_path"], init["rank"], init["world_size"], device, init["timeout_s"])
    placement = init["placement"]
    slots_per_rank = len(placement[0]) // init["world_size"]
    with torch.inference_mode():
        while (command := _read_command(stdin)) is not None:
            op, layer, num_tokens, payload = command
            if op == OP_FORWARD:
                serve_layer(comm, layers[layer], num_tokens, config.hidden_size, config.num_experts_per_tok)
            elif op == OP_MOVE:
                new_row = torch.frombuffer(bytearray(payload), dtype=torch.int64).tolist()
                move_slot_weights(comm, layers[layer], placement[layer], new_row, slots_per_rank)
                placement[layer] = new_row
            elif op == OP_REPORT:
                report = slots_report(init["rank"], layers)
                _reply({"compute_s": report.compute_s, "slot_tokens": report.slot_tokens})
            elif op == OP_SHUTDOWN:
                break
            else:
                raise RuntimeError(f"unknown command {op}")
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
