"""Fault injection for tests and the soak run: kill a worker for real.

Each instance of a Triton Python model runs in its own
`triton_python_backend_stub` process, whose command line names the model's
`model.py` inside the server's run directory. `kill_worker` sends it SIGKILL,
which is what a crashed worker looks like to the server: no finalize, no
goodbye, the requests in flight left hanging.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from triton_disagg.launch.supervisor import stubs


def worker_stub_pids(run_dir: Path, model_name: str) -> list[int]:
    """Pids of the Python backend stubs serving `model_name` for the server whose run directory is `run_dir`."""
    return sorted(pid for pid, model in stubs(run_dir).items() if model == model_name)


def kill_worker(run_dir: Path, model_name: str) -> list[int]:
    """SIGKILL every stub of `model_name` of that server; returns their pids. Raises LookupError if none runs."""
    pids = worker_stub_pids(run_dir, model_name)
    if not pids:
        raise LookupError(f"no Python backend stub of {model_name} runs for the server in {run_dir}")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids
