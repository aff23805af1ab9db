"""Serving-side measurements of `bench perf`: what Triton adds to one request, and the `llm` relay's ceiling.

- Served overhead: one streamed request at a time, the engine alone (its
  thread, in this process) against the same request through a real Triton
  server's `llm` model; TTFT and ITL, alternating the two; medians (the best
  runs are kept too). Not the best: a run whose tokens reached the client in
  one merged response has an ITL near 0 and a long TTFT, and would be picked.
- Relay ceiling: a server whose decode worker is the null worker
  (`null_worker.py`: tokens as fast as it can send them, one per response);
  `streams` concurrent requests streamed from that worker directly, against
  the same through `llm`; aggregate tokens/s of each, alternating rounds.
  Long streams measure the rate the relay sustains; short ones add each
  request's start (tokenizing, routing, opening the worker's stream).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from triton_disagg.engine.async_engine import EngineThread
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import SamplingParams
from triton_disagg.launch.server import MODEL_TEMPLATES, ServerConfig, TritonServer, free_ports
from triton_disagg.tools.stream_client import StreamResult, stream_many

#: The `model.py` of a null decode worker (see `null_worker.py`; imported only inside Triton).
NULL_WORKER_MODEL_FILE = '''"""A decode worker with no engine, for benchmarks; see triton_disagg.tools.null_worker."""

from triton_disagg.tools.null_worker import TritonPythonModel  # noqa: F401
'''


def _itl_ms(times_s: list[float]) -> float:
    gaps = [b - a for a, b in zip(times_s, times_s[1:])]
    return statistics.mean(gaps) * 1e3 if gaps else 0.0


def _engine_request(thread: EngineThread, request_id: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(TTFT ms, ITL ms) of one request on the engine thread."""
    times: list[float] = []
    done = threading.Event()

    def on_output(output):
        times.extend([time.perf_counter()] * len(output.new_token_ids))
        if output.finished:
            done.set()

    start = time.perf_counter()
    thread.submit(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), on_output, lambda e: done.set())
    if not done.wait(300) or len(times) != max_tokens:
        raise RuntimeError(f"engine request {request_id} ended with {len(times)} of {max_tokens} tokens")
    return (times[0] - start) * 1e3, _itl_ms(times)


def _token_times(result: StreamResult) -> list[float]:
    """Arrival time of each token of a stream asked for `return_num_output_tokens`: a response carrying
    several tokens counts each of them at its arrival."""
    times, num_seen = [], 0
    for arrived_s, event in zip(result.event_times_s, result.events):
        num_tokens = int(event.get("num_output_tokens", num_seen))
        times += [arrived_s] * (num_tokens - num_seen)
        num_seen = num_tokens
    return times


def _served_request(http_url: str, text: str, max_tokens: int) -> tuple[float, float]:
    body = {
        "text_input": text, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
        "exclude_input_in_output": True, "return_num_output_tokens": True,
    }  # fmt: skip
    (result,) = stream_many(f"{http_url}/v2/models/llm/generate_stream", [body], 1, keep_events=True)
    times = _token_times(result)
    if len(times) != max_tokens:
        raise RuntimeError(f"a served request streamed {len(times)} of {max_tokens} tokens")
    return (times[0] - result.start_s) * 1e3, _itl_ms(times)


def bench_served_overhead(model_path: str, prompt_tokens: int, max_tokens: int, repeats: int, progress) -> dict:
    """Engine alone against through Triton, one streamed request at a time, alternating. Medians, and best."""
    from tokenizers import Tokenizer

    text = "".join(chr(ord("a") + i % 26) for i in range(prompt_tokens - 1))  # byte-level: one token a char, + <s>
    prompt = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json")).encode(text).ids
    engine = LLMEngine(EngineConfig(model_path=model_path, enable_prefix_caching=False))
    thread = EngineThread(engine)
    thread.start()
    http_port, grpc_port, metrics_port = free_ports(3)
    alone, served = [], []
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            config = ServerConfig(
                model_path=Path(model_path), run_dir=Path(run_dir), http_port=http_port, grpc_port=grpc_port,
                metrics_port=metrics_port, prefill_workers=0, exit_timeout_s=2,
            )  # fmt: skip
            progress("served overhead: starting Triton")
            with TritonServer(config) as server:
                # The prefix cache is off in the engine alone; distinct prompts keep it cold through Triton too.
                for rep in range(repeats + 1):  # the first round warms up
                    head = f"{rep:04d}"
                    cold_text = head + text[len(head) :]
                    served_run = _served_request(server.http_url, cold_text, max_tokens)
                    alone_run = _engine_request(thread, f"alone-{rep}", prompt, max_tokens)
                    if rep:
                        served.append(served_run)
                        alone.append(alone_run)
                        progress(
                            f"served overhead [{rep}/{repeats}]: TTFT {alone_run[0]:.1f} / {served_run[0]:.1f} ms, "
                            f"ITL {alone_run[1]:.2f} / {served_run[1]:.2f} ms (engine / Triton)"
                        )
    finally:
        thread.stop()
    summary = {
        "engine_ttft_ms": statistics.median(r[0] for r in alone),
        "triton_ttft_ms": statistics.median(r[0] for r in served),
        "engine_itl_ms": statistics.median(r[1] for r in alone),
        "triton_itl_ms": statistics.median(r[1] for r in served),
        "best": {
            "engine_ttft_ms": min(r[0] for r in alone),
            "triton_ttft_ms": min(r[0] for r in served),
            "engine_itl_ms": min(r[1] for r in alone),
            "triton_itl_ms": min(r[1] for r in served),
        },
        "runs": {"engine": alone, "triton": served},
    }
    summary["ttft_delta_ms"] = summary["triton_ttft_ms"] - summary["engine_ttft_ms"]
    summary["itl_ratio"] = summary["triton_itl_ms"] / summary["engine_itl_ms"]
    summary.update(prompt_tokens=len(prompt), max_tokens=max_tokens, repeats=repeats)
    return summary


def _tokens_per_s(results: list[StreamResult], num_tokens: int) -> float:
    start = min(r.start_s for r in results)
    end = max(r.end_s for r in results)
    return num_tokens / (end - start)


def bench_relay(
    model_path: str, streams: int, max_tokens: int, rounds: int, llm_instances: int, step_ms: float | None, progress
) -> dict:
    """Aggregate tokens/s of `streams` concurrent requests: the null worker directly against through `llm`.

    `step_ms` None: the worker sends one response per token as fast as it can;
    else a step every `step_ms`, sent through the workers' coalescing sender.
    Best round of each (the least disturbed by other load), rounds alternating.
    """
    with tempfile.TemporaryDirectory() as scratch:
        templates = Path(scratch) / "templates"
        shutil.copytree(MODEL_TEMPLATES, templates, ignore=shutil.ignore_patterns("__pycache__"))
        (templates / "decode" / "1" / "model.py").write_text(NULL_WORKER_MODEL_FILE)
        if step_ms is not None:
            with open(templates / "decode" / "config.pbtxt", "a") as pbtxt:
                pbtxt.write(f'parameters: {{ key: "null_step_ms" value: {{ string_value: "{step_ms}" }} }}\n')
        http_port, grpc_port, metrics_port = free_ports(3)
        config = ServerConfig(
            model_path=Path(model_path), run_dir=Path(scratch) / "run", http_port=http_port, grpc_port=grpc_port,
            metrics_port=metrics_port, prefill_workers=0, llm_instances=llm_instances, exit_timeout_s=2,
            model_templates=templates,
        )  # fmt: skip
        mode = "one response per token" if step_ms is None else f"a step every {step_ms} ms, coalescing sender"
        progress(f"relay: starting Triton with a null decode worker ({mode}), {llm_instances} llm instance(s)")
        with TritonServer(config) as server:
            direct_url = f"{server.http_url}/v2/models/decode_0/generate_stream"
            llm_url = f"{server.http_url}/v2/models/llm/generate_stream"
            direct_body = {"input_ids": [1, 2, 3], "max_tokens": max_tokens}
            llm_body = {
                "text_input": "abc", "max_tokens": max_tokens, "stream": True, "exclude_input_in_output": True,
                "return_num_output_tokens": True,
            }  # fmt: skip
            stream_many(direct_url, [direct_body] * 2, 2)  # warm-up
            stream_many(llm_url, [llm_body] * 2, 2)
            direct, relayed = [], []
            for rnd in range(rounds):
                direct.append(_tokens_per_s(stream_many(direct_url, [direct_body] * streams, streams), streams * max_tokens))
                relayed_results = stream_many(llm_url, [llm_body] * streams, streams, keep_events=True)
                _check_text(relayed_results, max_tokens)
                relayed.append(_tokens_per_s(relayed_results, streams * max_tokens))
                progress(f"relay [{rnd + 1}/{rounds}]: {streams} streams, direct {direct[-1]:.0f} tok/s, through llm {relayed[-1]:.0f} tok/s")
    best_direct, best_relayed = max(direct), max(relayed)
    return {
        "streams": streams,
        "max_tokens": max_tokens,
        "llm_instances": llm_instances,
        "worker_step_ms": step_ms,
        "direct_tokens_per_s": best_direct,
        "relayed_tokens_per_s": best_relayed,
        "relay_ratio": best_relayed / best_direct,
        "rounds": {"direct": direct, "relayed": relayed},
    }


def _check_text(results: list[StreamResult], max_tokens: int) -> None:
    for result in results:
        if len(_token_times(result)) != max_tokens:
            raise RuntimeError(f"a relayed stream carried {len(_token_times(result))} tokens, expected {max_tokens}")
