"""The OpenAI frontend against a real Triton server, through the official `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import openai
import pytest
import requests
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from triton_disagg.frontend.config import FrontendConfig
from tests.e2e.conftest import Client
from triton_disagg.launch.frontend import FrontendProcess
from triton_disagg.launch.server import free_ports

API_KEY = "test-key"


def _frontend(server, tmp_path_factory, **overrides) -> FrontendProcess:
    (port,) = free_ports(1)
    config = FrontendConfig(triton_url=server.grpc_url, host="127.0.0.1", port=port, **overrides)
    return FrontendProcess(config, tmp_path_factory.mktemp("frontend") / "frontend.log")


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    with _frontend(server, tmp_path_factory, max_body_bytes=64 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_frontend(server, tmp_path_factory):
    with _frontend(server, tmp_path_factory, api_keys=(API_KEY, "other-key")) as running:
        yield running


@pytest.fixture(scope="module")
def oai(frontend) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(model_path) -> str:
    return model_path.resolve().name


@pytest.fixture(scope="module")
def tokenizer(model_path) -> Tokenizer:
    return Tokenizer.from_file(str(model_path / "tokenizer.json"))


PROMPT = "The quick brown fox jumps over the lazy dog, then"


def test_models_lists_the_served_model(oai, model_name):
    assert [m.id for m in oai.models.list().data] == [model_name]
    assert oai.models.retrieve(model_name).id == model_name


def test_completion_matches_triton_and_counts_tokens(oai, client, model_name, tokenizer):
    completion = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    direct = client.generate(text_input=PROMPT, max_tokens=12, exclude_input_in_output=True, ignore_eos=True)
    assert completion.choices[0].text == direct["text_output"]
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == len(tokenizer.encode(PROMPT).ids)
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_streamed_completion_equals_unstreamed(oai, model_name):
    kwargs = dict(model=model_name, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_uses_the_checkpoint_template(oai, model_name, model_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    hf = AutoTokenizer.from_pretrained(str(model_path))
    prompt_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    chat = oai.chat.completions.create(model=model_name, messages=messages, max_completion_tokens=8, temperature=0)
    assert chat.usage.prompt_tokens == len(prompt_ids)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 8 or chat.choices[0].finish_reason == "stop"

    stream = oai.chat.completions.create(
        model=model_name, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    counts = {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert chunks[-1].usage.model_dump(include=counts) == chat.usage.model_dump(include=counts)


def test_seeded_sampling_is_reproducible(oai, model_name):
    def sample(seed: int) -> str:
        kwargs = dict(model=model_name, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return oai.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_stop_sequence_ends_the_text_before_it(oai, model_name):
    kwargs = dict(model=model_name, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    full = oai.completions.create(max_tokens=24, **kwargs).choices[0].text
    stop = full[8:11]
    stopped = oai.completions.create(max_tokens=24, stop=[stop], **kwargs).choices[0]
    assert stopped.text == full[: full.index(stop)]
    assert stopped.finish_reason == "stop"
    chunks = list(oai.completions.create(max_tokens=24, stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == stopped.text


BAD_REQUESTS = [
    ("missing model", {"prompt": "hi"}, 400, "model"),
    ("unknown model", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("n above 1", {"prompt": "hi", "n": 2}, 400, "n"),
    ("wrong type", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("too long for the context", {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("unsupported logprobs", {"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ("wrong stream type", {"prompt": "hi", "stream": "maybe"}, 400, "stream"),
    ("top_k beyond int32", {"prompt": "hi", "top_k": 2**40}, 400, "top_k"),
]


@pytest.mark.parametrize("body,status,param", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error(frontend, model_name, oai, body, status, param):
    body = ({"model": model_name} if "prompt" in body and "model" not in body and param != "model" else {}) | body
    response = requests.post(f"{frontend.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"]
    assert oai.completions.create(model=model_name, prompt="still serving", max_tokens=2).usage.completion_tokens >= 1


def test_malformed_and_oversized_bodies(frontend, model_name):
    response = requests.post(f"{frontend.url}/v1/chat/completions", data=b'{"model": "x", "messages": [', timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    big = {"model": model_name, "prompt": "a" * (65 * 1024)}
    response = requests.post(f"{frontend.url}/v1/completions", json=big, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    chunked = requests.post(f"{frontend.url}/v1/completions", data=iter([json.dumps(big).encode()]), timeout=30)
    assert chunked.status_code == 413


def test_api_keys(keyed_frontend, model_name):
    url = f"{keyed_frontend.url}/v1/models"
    assert requests.get(url, timeout=10).status_code == 401
    wrong = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    keyed = openai.OpenAI(base_url=f"{keyed_frontend.url}/v1", api_key=API_KEY, max_retries=0)
    assert keyed.completions.create(model=model_name, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_frontend.url}/v1", api_key="nope", max_retries=0).models.list()
    # Probes and metrics stay open for load balancers and scrapers.
    assert requests.get(f"{keyed_frontend.url}/health", timeout=10).status_code == 200
    assert requests.get(f"{keyed_frontend.url}/metrics", timeout=10).status_code == 200


def test_triton_control_api_is_not_exposed(frontend):
    for method, path in [("POST", "/v2/repository/models/llm/unload"), ("POST", "/v2/repository/index"), ("GET", "/v2/models/llm")]:
        response = requests.request(method, f"{frontend.url}{path}", timeout=10)
        assert response.status_code == 404, (method, path)


def _wait_for_free_blocks(client: Client, timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        free, total = client.free_blocks(), client.total_blocks()
        if free == total or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


def _frontend_metric(frontend, series: str) -> float:
    """The value of one series (name with labels, as printed) on the frontend's /metrics page; 0 if absent."""
    for line in requests.get(f"{frontend.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


CANCELLED = 'triton_disagg_frontend_request_finish_total{reason="cancelled"}'


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_disconnect_cancels_and_frees_blocks(frontend, client, model_name, stream):
    total = client.total_blocks()
    assert _wait_for_free_blocks(client, 20) == total
    cancelled_in_triton = client.metric("triton_disagg_llm_requests_total", missing_ok=True, outcome="cancelled").get("llm", 0)
    cancelled_in_frontend = _frontend_metric(frontend, CANCELLED)
    # 3000 tokens take tens of seconds on a CPU: only a cancellation frees the blocks within the wait below.
    body = {"model": model_name, "prompt": PROMPT * 8, "max_tokens": 3000, "ignore_eos": True, "stream": stream}
    if stream:
        with requests.post(f"{frontend.url}/v1/completions", json=body, stream=True, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith(b"data: "))
            assert min(client.free_blocks().values()) < max(total.values())  # blocks are in use now
    else:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{frontend.url}/v1/completions", json=body, timeout=(5, 1.0))
    assert _wait_for_free_blocks(client, 8) == total
    assert _frontend_metric(frontend, CANCELLED) == cancelled_in_frontend + 1
    assert _frontend_metric(frontend, 'triton_disagg_frontend_requests_in_flight{endpoint="/v1/completions"}') == 0
    deadline = time.monotonic() + 5  # llm publishes its counters every 0.5 s
    while client.metric("triton_disagg_llm_requests_total", missing_ok=True, outcome="cancelled").get("llm", 0) == cancelled_in_triton:
        assert time.monotonic() < deadline, "the llm model never saw the cancellation"
        time.sleep(0.2)


def test_raw_stream_ends_with_done(frontend, model_name):
    body = {"model": model_name, "prompt": "Hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{frontend.url}/v1/completions", json=body, stream=True, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    assert all(line.startswith(b"data: ") for line in events)
    assert json.loads(events[-2][len(b"data: ") :])["usage"]["completion_tokens"] >= 1


def test_health_and_metrics(frontend, oai, model_name):
    assert requests.get(f"{frontend.url}/live", timeout=10).json() == {"status": "live"}
    assert requests.get(f"{frontend.url}/health", timeout=10).json() == {"status": "ok"}
    names = {
        "ttft": "triton_disagg_frontend_time_to_first_token_seconds_count",
        "itl": "triton_disagg_frontend_inter_token_latency_seconds_count",
        "tokens": "triton_disagg_frontend_completion_tokens_total",
        "ok": 'triton_disagg_frontend_requests_total{endpoint="/v1/completions",status="200"}',
    }
    before = {key: _frontend_metric(frontend, series) for key, series in names.items()}
    oai.completions.create(model=model_name, prompt="count me", max_tokens=4, extra_body={"ignore_eos": True})
    after = {key: _frontend_metric(frontend, series) for key, series in names.items()}
    assert {key: after[key] - before[key] for key in names} == {"ttft": 1, "itl": 3, "tokens": 4, "ok": 1}
    requests.get(f"{frontend.url}/no/such/path/{time.time()}", timeout=10)
    assert "/no/such/path" not in requests.get(f"{frontend.url}/metrics", timeout=10).text  # no series per stray path


def test_triton_unreachable_gets_503(model_path, model_name, tmp_path):
    """A frontend whose Triton is gone: probes say so, requests get an OpenAI 503, and it keeps serving."""
    dead, port = free_ports(2)  # nothing listens on `dead`
    command = [sys.executable, "-m", "triton_disagg.cli.main", "frontend", "--triton-url", f"127.0.0.1:{dead}",
               "--frontend-host", "127.0.0.1", "--frontend-port", str(port), "--model-path", str(model_path)]  # fmt: skip
    with open(tmp_path / "frontend.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/live", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "frontend.log").read_text()
            time.sleep(0.2)
        assert requests.get(f"{url}/health", timeout=10).status_code == 503
        for stream in (False, True):
            body = {"model": model_name, "prompt": "hi", "max_tokens": 2, "stream": stream}
            response = requests.post(f"{url}/v1/completions", json=body, timeout=30)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "server_error" and str(dead) in response.json()["error"]["message"]
        assert requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == model_name
    finally:
        process.terminate()
        process.wait(timeout=20)
