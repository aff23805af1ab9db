"""The llm model's request metrics on Triton's metrics endpoint."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def llm_metric(client, name: str, **labels: str) -> int:
    return client.metric(name, missing_ok=True, **labels).get("llm", 0)


def test_latency_histograms_and_request_counters(client):
    before = {
        "ttft": llm_metric(client, "triton_disagg_time_to_first_token_seconds_count"),
        "itl": llm_metric(client, "triton_disagg_inter_token_latency_seconds_count"),
        "length": llm_metric(client, "triton_disagg_llm_requests_total", outcome="length"),
        "invalid": llm_metric(client, "triton_disagg_llm_requests_total", outcome="invalid"),
        "input": llm_metric(client, "triton_disagg_llm_input_tokens_total"),
        "output": llm_metric(client, "triton_disagg_llm_output_tokens_total"),
    }
    num_input_tokens = 0
    for prompt in ("metrics one", "metrics two two", "metrics three three three"):
        result = client.generate(text_input=prompt, max_tokens=5, ignore_eos=True, return_num_input_tokens=True)
        num_input_tokens += result["num_input_tokens"]
    assert client.post_generate(text_input="", max_tokens=5).status_code == 400
    # Each request: 5 tokens in 5 engine steps, so one first token and 4 gaps.
    assert llm_metric(client, "triton_disagg_time_to_first_token_seconds_count") - before["ttft"] == 3
    assert llm_metric(client, "triton_disagg_inter_token_latency_seconds_count") - before["itl"] == 12
    assert llm_metric(client, "triton_disagg_llm_requests_total", outcome="length") - before["length"] == 3
    assert llm_metric(client, "triton_disagg_llm_requests_total", outcome="invalid") - before["invalid"] == 1
    assert llm_metric(client, "triton_disagg_llm_input_tokens_total") - before["input"] == num_input_tokens
    assert llm_metric(client, "triton_disagg_llm_output_tokens_total") - before["output"] == 15
