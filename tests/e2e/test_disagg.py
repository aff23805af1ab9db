"""Disaggregated serving on a real Triton server: remote prefill over NIXL, local prefill, fallbacks."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from triton_disagg.kv_transfer.handle import KVHandle
from triton_disagg.model_control import ModelControl

pytestmark = pytest.mark.e2e

SHARED_PREFIX = "The quick brown fox jumps over the lazy dog. " * 3  # 135 bytes = 135 tokens


def decisions(client, reason: str) -> int:
    """Prompts the decode worker placed for `reason` so far."""
    return sum(client.metric("triton_disagg_prefill_decisions_total", missing_ok=True, reason=reason).values())


def pulls(client, outcome: str) -> int:
    return sum(client.metric("triton_disagg_kv_pulls_total", outcome=outcome).values())


def greedy(client, prompt: str, max_tokens: int = 24) -> str:
    body = {"text_input": prompt, "max_tokens": max_tokens, "ignore_eos": True, "exclude_input_in_output": True}
    return client.generate(**body)["text_output"]


def wait_until_all_blocks_free(client, timeout_s: float = 15.0) -> dict[str, int]:
    total = client.total_blocks()
    deadline = time.monotonic() + timeout_s
    while (free := client.free_blocks()) != total and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def test_concurrent_remote_prefills_equal_aggregated_output(disagg, client):
    prompts = [SHARED_PREFIX + suffix for suffix in ("one", "two two", "three three three")]
    prompts += ["An unrelated prompt that is long enough to be prefilled remotely, surely. " * 2]
    expected = [greedy(client, p) for p in prompts]  # the aggregated server
    before = decisions(disagg, "remote")
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        outputs = list(pool.map(lambda p: greedy(disagg, p), prompts))
    assert outputs == expected
    assert decisions(disagg, "remote") - before == len(prompts)
    assert pulls(disagg, "done") >= len(prompts)


def test_remote_prefill_pulls_only_what_decode_lacks(disagg, client):
    prompt = SHARED_PREFIX + "and then a long enough tail that the uncached part still goes remote."
    greedy(disagg, SHARED_PREFIX + "warm")  # decode now caches the shared prefix
    reused = sum(disagg.metric("triton_disagg_kv_blocks_reused_locally_total").values())
    assert greedy(disagg, prompt) == greedy(client, prompt)
    # The 135-token shared prefix holds 8 full 16-token blocks that decode did not pull again.
    assert sum(disagg.metric("triton_disagg_kv_blocks_reused_locally_total").values()) - reused == 8


def test_short_prompt_is_prefilled_locally(disagg, client):
    before = decisions(disagg, "local_short_prompt")
    assert greedy(disagg, "short one") == greedy(client, "short one")
    assert decisions(disagg, "local_short_prompt") == before + 1


def prefill_directly(client, prompt_ids: list[int]) -> tuple[int, bytes]:
    """Call prefill_0 itself: its first token and KV handle."""
    inputs = {"input_ids": np.array(prompt_ids, dtype=np.int32)}
    (result,) = [r for r in client.grpc_stream(inputs, model="prefill_0") if r.as_numpy("output_ids") is not None]
    return int(result.as_numpy("output_ids")[0]), result.as_numpy("kv_handle").tobytes()


def decode_directly(client, prompt_ids: list[int], kv_handle: bytes, first_token: int, max_tokens: int = 24):
    inputs = {
        "input_ids": np.array(prompt_ids, dtype=np.int32),
        "max_tokens": np.array([max_tokens], dtype=np.int32),
        "ignore_eos": np.array([True]),
        "kv_handle": np.frombuffer(kv_handle, dtype=np.uint8),
        "first_token": np.array([first_token], dtype=np.int32),
    }
    return client.grpc_stream(inputs, model="decode_0")


def token_ids(results) -> list[int]:
    """Every token of a worker's stream (a response may carry several: its sender merges what queued)."""
    return [
        int(t)
        for r in results
        if isinstance(r, grpcclient.InferResult) and (ids := r.as_numpy("output_ids")) is not None
        for t in ids
    ]


PROMPT_IDS = [256] + list(b"A prompt handed from prefill to decode by hand, with its KV handle.")


def test_client_handle_path_and_a_failed_pull_give_the_same_tokens(disagg):
    first, handle = prefill_directly(disagg, PROMPT_IDS)
    pulled = token_ids(decode_directly(disagg, PROMPT_IDS, handle, first))
    assert len(pulled) == 23  # max_tokens 24; the first token came from prefill
    # Blocks outside the prefill pool: the pull cannot start, so decode prefills the prompt itself.
    first, handle = prefill_directly(disagg, PROMPT_IDS)
    fallbacks = pulls(disagg, "fallback")
    real = KVHandle.decode(handle)
    out_of_pool = dataclasses.replace(real, block_ids=tuple(10_000 + i for i in range(len(real.block_ids))))
    assert token_ids(decode_directly(disagg, PROMPT_IDS, out_of_pool.encode(), first)) == pulled
    assert pulls(disagg, "fallback") == fallbacks + 1


def bad_handles(client) -> list[tuple[str, bytes, str]]:
    first, handle = prefill_directly(client, PROMPT_IDS)
    real = KVHandle.decode(handle)
    other_prompt = [256] + list(b"Some other prompt entirely, with other blocks and other hashes.")
    _, other = prefill_directly(client, other_prompt)
    consumed_first, consumed = prefill_directly(client, PROMPT_IDS)
    token_ids(decode_directly(client, PROMPT_IDS, consumed, consumed_first))  # pulled: the hold is released
    deadline = time.monotonic() + 5
    while sum(client.metric("triton_disagg_kv_held_blocks").values()) > 2 * len(real.block_ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [
        ("garbage", b"\x00\x01not msgpack", "not a valid handle encoding"),
        ("other prompt", other, "block hashes differ"),
        ("unknown agent", dataclasses.replace(real, agent_name="prefill_9-deadbeef").encode(), "not in the KV directory"),
        ("stale", consumed, "is stale"),
    ]


def test_bad_handles_get_clear_errors_and_the_server_keeps_serving(disagg):
    for name, handle, message in bad_handles(disagg):
        (result,) = decode_directly(disagg, PROMPT_IDS, handle, 65)
        assert isinstance(result, Exception), name
        assert message in str(result), (name, str(result))
    assert greedy(disagg, "still serving") == greedy(disagg, "still serving")


def test_unloading_the_prefill_worker_mid_traffic_loses_no_request(disagg, client):
    prompts = [f"{SHARED_PREFIX} variation {i}" for i in range(12)]
    expected = [greedy(client, p) for p in prompts]
    control = ModelControl(disagg.server.http_url)
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [pool.submit(greedy, disagg, p) for p in prompts]
        time.sleep(0.3)
        control.unload("prefill_0")
        outputs = [job.result() for job in jobs]
        assert outputs == expected
    # Once the router's view of the repository has caught up (it polls every second),
    # no prefill worker is offered and decode prefills everything itself.
    time.sleep(1.5)
    assert greedy(disagg, prompts[0]) == expected[0]
    assert decisions(disagg, "local_no_prefill_worker") >= 1
    control.load_worker(Path(disagg.server.run_dir) / "model_repository", "prefill", "prefill_0")
    control.close()
    assert greedy(disagg, prompts[1]) == expected[1]


def test_hundreds_of_requests_with_cancellations_leave_every_block_free(disagg):
    prompts = [SHARED_PREFIX[: 40 + 7 * (i % 13)] + str(i) for i in range(200)]

    def run(i: int) -> None:
        if i % 10 == 3:  # cancel a streamed request after its first response
            inputs = {
                "text_input": np.array([prompts[i].encode()], dtype=np.object_),
                "max_tokens": np.array([200], dtype=np.int32),
                "ignore_eos": np.array([True]),
                "stream": np.array([True]),
            }
            disagg.grpc_stream(inputs, cancel_after=1)
        else:
            disagg.generate(text_input=prompts[i], max_tokens=4 + i % 9)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(run, range(len(prompts))))
    assert decisions(disagg, "remote") > 0 and decisions(disagg, "local_short_prompt") > 0
    free = wait_until_all_blocks_free(disagg)
    assert free == disagg.total_blocks()
