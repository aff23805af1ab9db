"""`triton-disagg bench` end to end, in a short setting: AIPerf against the frontend of a real server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from triton_disagg.frontend.config import FrontendConfig
from triton_disagg.launch.frontend import FrontendProcess
from triton_disagg.launch.server import free_ports


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    (port,) = free_ports(1)
    config = FrontendConfig(triton_url=server.grpc_url, host="127.0.0.1", port=port)
    with FrontendProcess(config, tmp_path_factory.mktemp("frontend") / "frontend.log") as running:
        yield running


def test_bench_smoke(frontend, model_path, tmp_path):
    # A Mooncake-format trace: two prefix families (ids 0-1 and 5-6), 16-token blocks after scaling by 32.
    trace = tmp_path / "trace.jsonl"
    records = [
        {"timestamp": 0, "input_length": 1024, "output_length": 128, "hash_ids": [0, 1]},
        {"timestamp": 200, "input_length": 1500, "output_length": 64, "hash_ids": [5, 6, 7]},
        {"timestamp": 400, "input_length": 1536, "output_length": 96, "hash_ids": [0, 1, 2]},
        {"timestamp": 600, "input_length": 1200, "output_length": 32, "hash_ids": [5, 6, 8]},
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "bench"
    command = [
        sys.executable, "-m", "triton_disagg.cli.main", "bench",
        "--url", frontend.url, "--tokenizer", str(model_path),
        "--concurrency", "1,2", "--requests-per-point", "4",
        "--request-rate", "8", "--rate-requests", "4",
        "--trace", str(trace), "--trace-requests", "4",
        "--input-tokens", "32", "--output-tokens", "8",
        "--output-dir", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[3/3] running/trace done" in run.stdout  # progress is shown

    report = json.loads((out / "bench.json").read_text())
    rows = [(r["scenario"], r["concurrency"], r["num_requests"], r["num_errors"]) for r in report["results"]]
    assert rows == [("sweep", 1, 4, 0), ("sweep", 2, 4, 0), ("rate", None, 4, 0), ("trace", None, 4, 0)]
    for result in report["results"]:
        # ITL is measured where AIPerf reads the stream: a client starved of CPU reads several events at
        # once and times them alike, so on a loaded machine its median may be 0.
        assert result["ttft_p50_ms"] > 0 and result["itl_p50_ms"] >= 0 and result["output_token_throughput_per_s"] > 0
    assert report["trace"]["block_tokens"] == 16
    assert (out / "bench.png").stat().st_size > 10_000
