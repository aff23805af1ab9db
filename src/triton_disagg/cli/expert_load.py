"""`triton-disagg expert-load`: a running server's MoE expert loads and placements, as JSON.

Asks each worker (`dump_expert_load: true` through Triton's generate
endpoint) for its snapshot: tokens per layer and logical expert over the
balancer's window and in total, the physical slots' experts, balancedness per
layer, and the rearrangements so far. With `--plan-ep-size`, it also plans
offline: the placement the EPLB planner would choose for each worker's window
at that expert parallelism and `--plan-redundant-experts`, and its balancedness.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import requests

from triton_disagg.launch.flags import EnvFlags
from triton_disagg.launch.server import ServerError
from triton_disagg.model_control import ModelControl
from triton_disagg.serving.live_workers import model_control_headers, split_workers


def add_expert_load_flags(flag: EnvFlags) -> None:
    flag("--url", default="http://localhost:8000", help="the server's HTTP endpoint")
    flag("--worker", default=None, help="comma-separated workers to ask (default: every loaded prefill_<k> and decode_<j>)")
    flag("--output", metavar="PATH", default=None, help="write the JSON here instead of stdout")
    flag("--model-control-key", metavar="KEY", default=None, help="key of a restricted repository API (to list workers)")
    flag("--plan-ep-size", type=int, default=0, help="also plan a placement for this many expert-parallel ranks (0: no plan)")
    flag("--plan-redundant-experts", type=int, default=0, help="redundant expert slots of that plan")


def fetch_expert_load(http_url: str, worker: str, timeout_s: float = 30.0) -> dict:
    """One worker's expert-load snapshot. Raises ServerError when it cannot give one (a dense model, no such worker)."""
    response = requests.post(
        f"{http_url}/v2/models/{worker}/generate",
        json={"dump_expert_load": True},
        headers={"Connection": "close"},
        timeout=timeout_s,
    )
    if response.status_code != 200:
        raise ServerError(f"{worker} gave no expert load ({response.status_code}): {response.text}")
    return json.loads(response.json()["expert_load"])


def plan_placement(snapshot: dict, ep_size: int, num_redundant_experts: int) -> dict:
    """The planner's placement for a snapshot's window, and the balancedness it would reach there."""
    import torch

    from triton_disagg.engine.eplb import rebalance_experts

    load = torch.tensor(snapshot["window_load"], dtype=torch.float64)
    placement = rebalance_experts(load, snapshot["num_experts"] + num_redundant_experts, ep_size)
    balancedness = placement.balancedness(load)
    return {
        "ep_size": ep_size,
        "num_redundant_experts": num_redundant_experts,
        "physical_to_logical": placement.physical_to_logical.tolist(),
        "balancedness": balancedness.tolist(),
        "mean_balancedness": float(balancedness.mean()),
    }


def expert_load(args: argparse.Namespace) -> int:
    url = args.url if "://" in args.url else f"http://{args.url}"
    if args.worker:
        workers = [name.strip() for name in args.worker.split(",") if name.strip()]
    else:
        control = ModelControl(url, model_control_headers(args.model_control_key))
        try:
            prefill, decode = split_workers(control.ready_models())
        except Exception as exc:  # noqa: BLE001 - any failure to list is the same error to the user
            raise ServerError(f"cannot list the workers of {url}: {exc}") from None
        finally:
            control.close()
        workers = prefill + decode
    snapshots = {worker: fetch_expert_load(url, worker) for worker in workers}
    if args.plan_ep_size:
        for snapshot in snapshots.values():
            snapshot["plan"] = plan_placement(snapshot, args.plan_ep_size, args.plan_redundant_experts)
    text = json.dumps({"workers": snapshots}, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote the expert load of {', '.join(workers)} to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
