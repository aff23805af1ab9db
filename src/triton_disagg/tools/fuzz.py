"""Fuzz the request surfaces: Triton's HTTP generate, Triton's gRPC stream, and the OpenAI routes.

    python -m triton_disagg.tools.fuzz [--examples 300] [--output results/fuzz.json]

Property-based (hypothesis): bodies mix well-formed fields with wrong
types, out-of-range values, unknown fields, oversized lists and bytes that
are not JSON. Every input must get a 2xx or a clear 4xx, never a 5xx and
never a hang, and the server must keep serving. Each surface is tallied:
inputs tried, 2xx, 4xx, 5xx, hangs.

One 5xx is not ours to fix and is counted apart (`triton_parser_5xx`):
Triton 2.51's HTTP generate endpoint parses the JSON body against the
model's declared input types before the model sees it, and answers a value
of the wrong JSON type (`"max_tokens": "ten"`) or malformed JSON with 500.
Any input type rejects some JSON type, so no declaration avoids it; the
OpenAI frontend, which parses bodies itself, answers those with 400.

Without a server argument it starts a server and a frontend of its own.
`fuzz_triton_http`, `fuzz_triton_grpc` and `fuzz_openai` are what the test
suite runs, with fewer examples.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triton_disagg.serving.protocol import LLM_INPUT_NAMES

#: Seconds an answer may take before the input counts as a hang (valid requests ask for few tokens).
HANG_AFTER_S = 60.0
#: Triton's own JSON parsing of generate bodies, before the model: a 500 we cannot change.
TRITON_PARSER_ERROR = re.compile(r"Unable to parse|failed to parse the request JSON|attempt to access JSON|was not found in the JSON")
#: How an INTERNAL error from our models reads: "<ExceptionName>: message".
INTERNAL_ERROR = re.compile(r"^[A-Z]\w*(Error|Exception): ")
CLOSE = {"Connection": "close"}


@dataclass(slots=True)
class Tally:
    """What one surface answered."""

    tried: int = 0
    ok_2xx: int = 0
    client_4xx: int = 0
    server_5xx: int = 0
    triton_parser_5xx: int = 0
    hangs: int = 0
    #: The first few 5xx and hangs: (input, answer).
    examples: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, sent: object = None, answer: str = "") -> None:
        self.tried += 1
        setattr(self, kind, getattr(self, kind) + 1)
        if kind in ("server_5xx", "hangs") and len(self.examples) < 10:
            self.examples.append((repr(sent)[:300], answer[:300]))


def _settings(num_examples: int):
    return settings(
        max_examples=num_examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )


# -- strategies ------------------------------------------------------------------------------

_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
_PROMPTS = st.text(min_size=0, max_size=40) | st.sampled_from(["Hello", "x" * 5000, "\u00e9\u4e2d\U0001f600", "\x00"])
_MAX_TOKENS = st.integers(-3, 24) | st.sampled_from([0, 4096, 2**31 - 1, 2**31, 2**40])

#: Well-formed values per `llm` input, to mix with `_ANY_JSON`.
_LLM_FIELDS = {
    "text_input": _PROMPTS,
    "max_tokens": _MAX_TOKENS,
    "stream": st.booleans(),
    "temperature": st.floats(-1, 3, allow_nan=False),
    "top_k": st.integers(-2, 50),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "seed": st.integers(-1, 2**64),
    "stop_words": st.lists(st.text(max_size=4), max_size=3),
    "ignore_eos": st.booleans(),
    "exclude_input_in_output": st.booleans(),
    "return_num_input_tokens": st.booleans(),
    "return_num_output_tokens": st.booleans(),
    "routing_mode": st.sampled_from(["kv", "approx", "round_robin", "random", "", "fastest"]),
    "add_special_tokens": st.booleans(),
}


@st.composite
def triton_generate_bodies(draw) -> dict:
    """A JSON body for POST /v2/models/llm/generate: mostly well-typed, sometimes not."""
    names = draw(st.lists(st.sampled_from(sorted(_LLM_FIELDS)), unique=True, max_size=6))
    if draw(st.booleans()):
        names.append("text_input")
    body = {}
    for name in names:
        body[name] = draw(_ANY_JSON if draw(st.integers(0, 5)) == 0 else _LLM_FIELDS[name])
    if draw(st.integers(0, 6)) == 0:
        body[draw(st.text(min_size=1, max_size=10))] = draw(_ANY_JSON)
    return body


_DTYPES = {"INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_, "BYTES": np.object_}
_DECLARED = {
    "text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32", "top_k": "INT32",
    "top_p": "FP32", "seed": "UINT64", "stop_words": "BYTES", "ignore_eos": "BOOL", "exclude_input_in_output": "BOOL",
    "return_num_input_tokens": "BOOL", "return_num_output_tokens": "BOOL", "routing_mode": "BYTES", "add_special_tokens": "BOOL",
}  # fmt: skip


@st.composite
def grpc_inputs(draw) -> dict[str, np.ndarray]:
    """Tensors for the `llm` model over gRPC: declared or wrong dtypes, odd shapes, raw bytes."""
    names = draw(st.lists(st.sampled_from(list(LLM_INPUT_NAMES) + ["max_token", "bogus"]), unique=True, max_size=6))
    if draw(st.booleans()):
        names = ["text_input", *[n for n in names if n != "text_input"]]
    tensors = {}
    for name in names:
        dtype = _DECLARED.get(name, "INT32") if draw(st.integers(0, 4)) else draw(st.sampled_from(sorted(_DTYPES)))
        size = draw(st.sampled_from([1, 1, 1, 0, 2]))
        if dtype == "BYTES":
            values = draw(st.lists(st.binary(max_size=30) | st.text(max_size=20).map(str.encode), min_size=size, max_size=size))
            tensors[name] = np.array(values, dtype=np.object_).reshape(size)
        elif dtype == "BOOL":
            tensors[name] = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), dtype=np.bool_)
        elif dtype == "FP32":
            tensors[name] = np.array(draw(st.lists(st.floats(-10, 10, width=32), min_size=size, max_size=size)), dtype=np.float32)
        else:
            info = np.iinfo(_DTYPES[dtype])
            low, high = max(int(info.min), -5), min(int(info.max), 24) if name == "max_tokens" else int(info.max)
            tensors[name] = np.array(draw(st.lists(st.integers(low, high), min_size=size, max_size=size)), dtype=_DTYPES[dtype])
    return tensors


_OPENAI_COMMON = {
    "max_tokens": _MAX_TOKENS,
    "temperature": st.floats(-1, 3, allow_nan=False),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "top_k": st.integers(-2, 50),
    "seed": st.integers(-1, 2**64),
    "stop": st.none() | st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=18),
    "n": st.integers(0, 3),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.floats(-1, 1, allow_nan=False),
    "logit_bias": st.none() | st.dictionaries(st.text(max_size=3), st.floats(-1, 1), max_size=2),
    "logprobs": st.none() | st.booleans() | st.integers(0, 3),
    "user": st.text(max_size=8),
}
_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]), "content": _PROMPTS | _ANY_JSON}),
    max_size=4,
)


@st.composite
def openai_requests(draw, model_name: str) -> tuple[str, bytes]:
    """(path, body bytes) for /v1/completions or /v1/chat/completions: mostly JSON objects, sometimes not."""
    is_chat = draw(st.booleans())
    path = "/v1/chat/completions" if is_chat else "/v1/completions"
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return path, draw(st.binary(max_size=60))
    if kind == 1:
        return path, json.dumps(draw(_ANY_JSON)).encode()
    body: dict = {"model": model_name if draw(st.integers(0, 9)) else draw(st.text(max_size=10))}
    if is_chat:
        body["messages"] = draw(_MESSAGES)
    else:
        body["prompt"] = draw(_PROMPTS | st.lists(_PROMPTS, max_size=2) | st.lists(st.integers(0, 300), max_size=4))
    for name in draw(st.lists(st.sampled_from(sorted(_OPENAI_COMMON)), unique=True, max_size=5)):
        body[name] = draw(_ANY_JSON if draw(st.integers(0, 5)) == 0 else _OPENAI_COMMON[name])
    return path, json.dumps(body).encode()


# -- the fuzzers -------------------------------------------------------------------------------


def _classify_http(response: requests.Response, body_text: str) -> str:
    status = response.status_code
    if status < 300:
        # A stream answers 200 first; an error inside it is judged by its text.
        if '"error"' in body_text and INTERNAL_ERROR.search(_error_text(body_text)):
            return "server_5xx"
        return "ok_2xx"
    if status < 500:
        return "client_4xx"
    if TRITON_PARSER_ERROR.search(body_text):
        return "triton_parser_5xx"
    return "server_5xx"


def _error_text(body_text: str) -> str:
    match = re.search(r'"error":\s*"((?:[^"\\]|\\.)*)"', body_text)
    return match.group(1) if match else ""


def _post(url: str, body: bytes, tally: Tally, sent: object, headers: dict[str, str] | None = None) -> None:
    try:
        with requests.post(url, data=body, headers=CLOSE | (headers or {}), stream=True, timeout=HANG_AFTER_S) as response:
            text = response.content.decode(errors="replace")
    except requests.Timeout:
        tally.add("hangs", sent, "no answer")
        return
    except requests.ConnectionError as exc:
        tally.add("server_5xx", sent, f"connection failed: {exc}")
        return
    kind = _classify_http(response, text)
    if kind == "client_4xx" and response.status_code == 400 and INTERNAL_ERROR.search(_error_text(text)):
        kind = "server_5xx"  # Triton's generate answers our INTERNAL errors with 400: judge by the text
    tally.add(kind, sent, f"{response.status_code} {text}")


def fuzz_triton_http(http_url: str, num_examples: int) -> Tally:
    """POST generate and generate_stream bodies to the `llm` model; tally the answers."""
    tally = Tally()

    @_settings(num_examples)
    @given(triton_generate_bodies(), st.booleans())
    def check(body: dict, streamed: bool) -> None:
        endpoint = "generate_stream" if streamed else "generate"
        _post(f"{http_url}/v2/models/llm/{endpoint}", json.dumps(body).encode(), tally, body)

    check()
    return tally


def fuzz_triton_grpc(grpc_url: str, num_examples: int) -> Tally:
    """Send tensors to the `llm` model over a gRPC stream; an error is a 4xx unless it reads as INTERNAL."""
    tally = Tally()

    @_settings(num_examples)
    @given(grpc_inputs())
    def check(inputs: dict[str, np.ndarray]) -> None:
        received: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(grpc_url)
        try:
            client.start_stream(callback=lambda result, error: received.put(error or result))
            tensors = []
            for name, array in inputs.items():
                dtype = next(k for k, v in _DTYPES.items() if np.dtype(v) == array.dtype)
                tensors.append(grpcclient.InferInput(name, list(array.shape), dtype))
                tensors[-1].set_data_from_numpy(array)
            client.async_stream_infer("llm", tensors, enable_empty_final_response=True)
            while True:
                item = received.get(timeout=HANG_AFTER_S)
                if not isinstance(item, grpcclient.InferResult):
                    message = str(item.message() if hasattr(item, "message") else item)
                    tally.add("server_5xx" if INTERNAL_ERROR.search(message) else "client_4xx", inputs, message)
                    return
                if item.get_response().parameters["triton_final_response"].bool_param:
                    tally.add("ok_2xx")
                    return
        except queue.Empty:
            tally.add("hangs", inputs, "no final response")
        except Exception as exc:  # noqa: BLE001 - the client refused to send it (e.g. a size 0 tensor): a 4xx
            tally.add("client_4xx", inputs, f"{type(exc).__name__}: {exc}")
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()

    check()
    return tally


def fuzz_openai(base_url: str, model_name: str, num_examples: int, api_key: str | None = None) -> Tally:
    """POST completion and chat bodies to the OpenAI frontend; tally the answers."""
    tally = Tally()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})

    @_settings(num_examples)
    @given(openai_requests(model_name))
    def check(request: tuple[str, bytes]) -> None:
        path, body = request
        _post(f"{base_url}{path}", body, tally, body, headers)

    check()
    return tally


def still_serves(http_url: str) -> bool:
    body = {"text_input": "still there?", "max_tokens": 2}
    response = requests.post(f"{http_url}/v2/models/llm/generate", json=body, headers=CLOSE, timeout=60)
    return response.status_code == 200 and response.json().get("finish_reason") == "length"


def print_table(tallies: dict[str, Tally]) -> None:
    print(f"{'surface':<12}{'tried':>8}{'2xx':>8}{'4xx':>8}{'5xx':>8}{'triton 5xx':>12}{'hangs':>8}")
    for name, t in tallies.items():
        print(f"{name:<12}{t.tried:>8}{t.ok_2xx:>8}{t.client_4xx:>8}{t.server_5xx:>8}{t.triton_parser_5xx:>12}{t.hangs:>8}")
        for sent, answer in t.examples:
            print(f"  {sent} -> {answer}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="inputs per surface")
    parser.add_argument("--output", default="results/fuzz.json", help="JSON report to write")
    args = parser.parse_args(argv)

    from triton_disagg.frontend.config import FrontendConfig
    from triton_disagg.launch.flags import default_model
    from triton_disagg.launch.frontend import FrontendProcess
    from triton_disagg.launch.server import ServerConfig, TritonServer, free_ports

    http_port, grpc_port, metrics_port, frontend_port = free_ports(4)
    model_path = default_model()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as run_dir:
        config = ServerConfig(
            model_path=model_path, run_dir=Path(run_dir), http_port=http_port, grpc_port=grpc_port,
            metrics_port=metrics_port, num_blocks=512, prefill_workers=1, decode_workers=1, exit_timeout_s=2,
        )  # fmt: skip
        print("[fuzz] starting a server and a frontend", file=sys.stderr, flush=True)
        with TritonServer(config) as server:
            frontend_config = FrontendConfig(triton_url=server.grpc_url, host="127.0.0.1", port=frontend_port, max_body_bytes=64 * 1024)
            with FrontendProcess(frontend_config, Path(run_dir) / "frontend.log") as frontend:
                tallies = {}
                for name, run in (
                    ("triton-http", lambda: fuzz_triton_http(server.http_url, args.examples)),
                    ("triton-grpc", lambda: fuzz_triton_grpc(server.grpc_url, args.examples)),
                    ("openai", lambda: fuzz_openai(frontend.url, model_path.resolve().name, args.examples)),
                ):
                    print(f"[fuzz] {name}: {args.examples} inputs", file=sys.stderr, flush=True)
                    tallies[name] = run()
                serving = still_serves(server.http_url)
    print_table(tallies)
    print(f"server still serving: {serving}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"examples_per_surface": args.examples, "still_serving": serving} | {k: asdict(v) for k, v in tallies.items()}, indent=2))
    print(f"wrote {output}")
    is_clean = serving and all(t.server_5xx == 0 and t.hangs == 0 for t in tallies.values())
    return 0 if is_clean else 1


if __name__ == "__main__":
    sys.exit(main())
