"""Every KV block comes back: finished, stopped and abandoned requests alike."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.e2e

#: About 20 s of decoding here, against the 5 s the test waits: only an abort frees these blocks in time.
LONG_MAX_TOKENS = 3000


def wait_for_free_blocks(client, expected: dict[str, int], timeout_s: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while (free := client.free_blocks()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def disconnect_http_stream_after_first_event(client) -> None:
    url = f"{client.server.http_url}/v2/models/llm/generate_stream"
    body = {"text_input": "walk away " * 8, "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True, "stream": True}
    with requests.post(url, json=body, stream=True, timeout=60) as response:
        next(line for line in response.iter_lines() if line.startswith(b"data: "))


def cancel_grpc_stream_after_first_response(client) -> None:
    inputs = {
        "text_input": np.array([b"cancel me " * 8], dtype=np.object_),
        "max_tokens": np.array([LONG_MAX_TOKENS], dtype=np.int32),
        "ignore_eos": np.array([True]),
        "stream": np.array([True]),
    }
    client.grpc_stream(inputs, cancel_after=1)


def test_free_blocks_return_after_a_mixed_batch(client):
    # Idle, every block is free; an earlier test's aborted request may still be on its way out.
    initial = client.total_blocks()
    assert wait_for_free_blocks(client, initial) == initial
    shared_prefix = "shared prefix " * 10
    greedy = client.generate(text_input=shared_prefix, max_tokens=8, exclude_input_in_output=True, ignore_eos=True)
    stop_word = greedy["text_output"][4:6]
    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = [
            pool.submit(disconnect_http_stream_after_first_event, client),
            pool.submit(cancel_grpc_stream_after_first_response, client),
            *(pool.submit(client.generate_stream, text_input=f"{shared_prefix}{i}", max_tokens=12) for i in range(4)),
            pool.submit(client.generate, text_input="short", max_tokens=6),
        ]
        stopped = client.generate(
            text_input=shared_prefix, max_tokens=LONG_MAX_TOKENS, ignore_eos=True, stop_words=[stop_word]
        )
        for job in jobs:
            job.result()
    assert stopped["finish_reason"] == "stop"
    assert wait_for_free_blocks(client, initial, timeout_s=5.0) == initial
