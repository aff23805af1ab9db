"""The dry-run connector: what a planner would load and unload; when the Triton connector sees a worker idle."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from triton_disagg.planner.connectors import DryRunConnector, TritonConnector, is_worker_idle


def test_dry_run_records_loads_and_unloads_in_order():
    connector = DryRunConnector()
    assert connector.add_worker("decode") == "decode_1"
    assert connector.add_worker("prefill") == "prefill_0"
    assert connector.remove_worker("decode") == "decode_1"
    assert connector.remove_worker("prefill") == "prefill_0"
    assert connector.remove_worker("prefill") is None
    assert connector.log == [("load", "decode_1"), ("load", "prefill_0"), ("unload", "decode_1"), ("unload", "prefill_0")]
    assert connector.workers("decode") == ["decode_0"]


def test_unknown_pool_is_named():
    with pytest.raises(ValueError, match="pool must be one of prefill, decode, got 'encode'"):
        DryRunConnector().add_worker("encode")


def metrics_page(name: str = "decode_1", running: int = 0, waiting: int = 0, held: int = 0, skip: str = "") -> str:
    """A Triton metrics page with decode_0 busy and `name` reporting the given gauges (`skip`: a gauge left out)."""
    lines = [
        "# HELP triton_disagg_running_requests Requests in the worker's running batch",
        "# TYPE triton_disagg_running_requests gauge",
        'triton_disagg_running_requests{model="decode_0",version="1"} 3',
        'triton_disagg_waiting_requests{model="decode_0",version="1"} 2',
        'triton_disagg_kv_held_blocks{model="decode_0",version="1"} 0',
        'nv_inference_count{model="router",version="1"} 17',
    ]
    for gauge, value in (("running_requests", running), ("waiting_requests", waiting), ("kv_held_blocks", held)):
        if gauge != skip:
            lines.append(f'triton_disagg_{gauge}{{model="{name}",version="1"}} {value}')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "page, is_idle",
    [
        (metrics_page(), True),
        (metrics_page(running=1), False),
        (metrics_page(waiting=1), False),
        (metrics_page(held=4), False),
        (metrics_page(skip="kv_held_blocks"), False),  # unknown is not idle
        (metrics_page(name="decode_10"), False),  # decode_1's series are all missing
        ("", False),
    ],
)
def test_a_worker_is_idle_only_when_every_gauge_is_present_and_zero(page, is_idle):
    assert is_worker_idle(page, "decode_1") is is_idle


@pytest.fixture
def metrics_server() -> Iterator[dict]:
    """A local HTTP server answering GET with `state["status"]` and `state["body"]`."""
    state = {"status": 200, "body": ""}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = state["body"].encode()
            self.send_response(state["status"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_connector_reads_the_metrics_page_and_refuses_an_error_page(metrics_server, tmp_path):
    connector = TritonConnector("http://127.0.0.1:9", metrics_server["url"], tmp_path)
    metrics_server["body"] = metrics_page()
    assert connector._busy("decode_1") is False
    assert connector._busy("decode_0") is True
    metrics_server["body"] = metrics_page(skip="waiting_requests")
    assert connector._busy("decode_1") is True
    metrics_server["status"], metrics_server["body"] = 503, metrics_page()  # the status decides, not the body
    with pytest.raises(requests.HTTPError, match="503"):
        connector._busy("decode_1")
