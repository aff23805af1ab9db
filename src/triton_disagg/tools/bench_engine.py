"""Engine benchmark: prefill and decode throughput, and what serving through Triton adds.

    python -m triton_disagg.tools.bench_engine [--model PATH] [--device auto] [--out results/bench_engine]

Three measurements, all in one run so ratios compare like with like on a
shared machine:

1. prefill tokens/s against the tokens in one step (one prompt per step);
2. decode tokens/s against the number of sequences decoding together;
3. time to first token and inter-token latency of one streamed request,
   engine alone (EngineThread, in process) against the same request through
   a real Triton server (HTTP `generate_stream` on the `llm` model).

Prints a table and writes `<out>.json` and `<out>.png`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from triton_disagg.checkpoint import make_model
from triton_disagg.engine.async_engine import EngineThread
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import SamplingParams
from triton_disagg.tools.report import write_report


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _prompt(num_tokens: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_tokens,), generator=generator).tolist()


def _sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def bench_prefill(model_path: str, device: str, batch_tokens: list[int], repeats: int) -> list[dict]:
    """Tokens/s of a step that prefills exactly `n` prompt tokens (no prefix-cache hits)."""
    rows = []
    for n in batch_tokens:
        engine = LLMEngine(
            EngineConfig(model_path=model_path, device=device, max_num_batched_tokens=n, max_model_len=n + 8,
                         enable_prefix_caching=False, num_blocks=-(-(n + 8) // 16) + 1)
        )
        times = []
        for rep in range(repeats + 1):  # the first run warms up
            engine.add_request(f"p{rep}", _prompt(n, rep), SamplingParams(max_tokens=1))
            _sync(engine)
            start = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            _sync(engine)
            if rep:
                times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        rows.append({"batch_tokens": n, "step_ms": step_s * 1e3, "tokens_per_s": n / step_s})
        progress(f"prefill {n:>5} tokens/step: {n / step_s:10.0f} tok/s")
    return rows


def bench_decode(model_path: str, device: str, batch_sizes: list[int], context: int, steps: int) -> list[dict]:
    """Tokens/s of decode steps with `b` sequences of `context` tokens each."""
    rows = []
    for b in batch_sizes:
        engine = LLMEngine(
            EngineConfig(model_path=model_path, device=device, max_num_seqs=b,
                         max_num_batched_tokens=max(512, context * b), num_blocks=b * (-(-(context + steps + 8) // 16)) + 1)
        )
        params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"d{i}", _prompt(context, i), params)
        engine.step()  # all prompts in one step
        for _ in range(2):  # warm-up decodes
            engine.step()
        _sync(engine)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(engine)
        elapsed = time.perf_counter() - start
        rows.append({"batch_size": b, "step_ms": elapsed / steps * 1e3, "tokens_per_s": b * steps / elapsed})
        progress(f"decode batch {b:>3}: {b * steps / elapsed:10.0f} tok/s ({elapsed / steps * 1e3:.1f} ms/step)")
    return rows


def _latencies(token_times: list[float], start: float) -> tuple[float, float]:
    ttft_ms = (token_times[0] - start) * 1e3
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return ttft_ms, statistics.mean(gaps) * 1e3 if gaps else 0.0


def _engine_alone(model_path: str, device: str, prompt: list[int], max_tokens: int, repeats: int) -> list[tuple[float, float]]:
    thread = EngineThread(LLMEngine(EngineConfig(model_path=model_path, device=device, enable_prefix_caching=False)))
    thread.start()
    results = []
    try:
        for rep in range(repeats + 1):
            times: list[float] = []
            done = threading.Event()

            def on_output(output, times=times, done=done):
                times.extend([time.perf_counter()] * len(output.new_token_ids))
                if output.finished:
                    done.set()

            start = time.perf_counter()
            thread.submit(f"e{rep}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), on_output, print)
            done.wait()
            if rep:
                results.append(_latencies(times, start))
    finally:
        thread.stop()
    return results


def _through_triton(http_url: str, text: str, max_tokens: int, repeats: int) -> list[tuple[float, float]]:
    import requests

    results = []
    body = {"text_input": text, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with requests.Session() as session:
        for rep in range(repeats + 1):
            times: list[float] = []
            start = time.perf_counter()
            with session.post(f"{http_url}/v2/models/llm/generate_stream", json=body, stream=True, timeout=120) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise RuntimeError(event["error"])
                        if event.get("text_output"):
                            times.append(time.perf_counter())
            if rep:
                results.append(_latencies(times, start))
    return results


def bench_served(model_path: str, device: str, prompt_tokens: int, max_tokens: int, repeats: int) -> dict:
    """One streamed request at a time: engine alone against through Triton, medians and ratios."""
    from tokenizers import Tokenizer

    from triton_disagg.launch.server import ServerConfig, TritonServer

    text = "".join(chr(ord("a") + i % 26) for i in range(prompt_tokens - 1))  # byte-level: one token a char + <s>
    prompt = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json")).encode(text).ids
    progress(f"served overhead: engine alone, {repeats} requests of {len(prompt)} -> {max_tokens} tokens")
    alone = _engine_alone(model_path, device, prompt, max_tokens, repeats)
    with tempfile.TemporaryDirectory() as run_dir:
        config = ServerConfig(model_path=Path(model_path), run_dir=Path(run_dir), http_port=18100, grpc_port=18101, metrics_port=18102)
        progress("served overhead: starting Triton")
        with TritonServer(config) as server:
            progress(f"served overhead: through Triton ({server.http_url})")
            served = _through_triton(server.http_url, text, max_tokens, repeats)
    summary = {}
    for name, runs in (("engine", alone), ("triton", served)):
        summary[f"{name}_ttft_ms"] = statistics.median(r[0] for r in runs)
        summary[f"{name}_itl_ms"] = statistics.median(r[1] for r in runs)
    summary["ttft_ratio"] = summary["triton_ttft_ms"] / summary["engine_ttft_ms"]
    summary["itl_ratio"] = summary["triton_itl_ms"] / summary["engine_itl_ms"]
    summary.update(prompt_tokens=len(prompt), max_tokens=max_tokens, repeats=repeats)
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "served" in results else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    prefill, decode = results["prefill"], results["decode"]
    axes[0].plot([r["batch_tokens"] for r in prefill], [r["tokens_per_s"] for r in prefill], marker="o")
    axes[0].set(xscale="log", xlabel="prefill tokens per step", ylabel="tokens/s", title="Prefill throughput")
    axes[1].plot([r["batch_size"] for r in decode], [r["tokens_per_s"] for r in decode], marker="o")
    axes[1].set(xscale="log", xlabel="sequences decoding", ylabel="tokens/s", title="Decode throughput")
    if "served" in results:
        served = results["served"]
        labels = ["TTFT", "ITL"]
        x = range(len(labels))
        axes[2].bar([i - 0.2 for i in x], [served["engine_ttft_ms"], served["engine_itl_ms"]], 0.4, label="engine alone")
        axes[2].bar([i + 0.2 for i in x], [served["triton_ttft_ms"], served["triton_itl_ms"]], 0.4, label="through Triton")
        axes[2].set(xticks=list(x), xticklabels=labels, ylabel="ms", title="Serving overhead (one request)")
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['model']} on {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(results: dict) -> None:
    print("\nprefill: tokens/step  step ms   tokens/s")
    for r in results["prefill"]:
        print(f"         {r['batch_tokens']:>11}  {r['step_ms']:7.1f}  {r['tokens_per_s']:9.0f}")
    print("decode:  batch size  step ms   tokens/s")
    for r in results["decode"]:
        print(f"         {r['batch_size']:>10}  {r['step_ms']:7.1f}  {r['tokens_per_s']:9.0f}")
    if "served" in results:
        s = results["served"]
        print("served:            engine alone  through Triton  ratio")
        print(f"         TTFT ms   {s['engine_ttft_ms']:12.1f}  {s['triton_ttft_ms']:14.1f}  {s['ttft_ratio']:5.2f}")
        print(f"         ITL ms    {s['engine_itl_ms']:12.2f}  {s['triton_itl_ms']:14.2f}  {s['itl_ratio']:5.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Engine prefill/decode throughput and Triton serving overhead.")
    parser.add_argument("--model", help="checkpoint directory (default: a fresh default model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("results/bench_engine"), help="output path without extension")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--decode-context", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--served-prompt-tokens", type=int, default=128)
    parser.add_argument("--served-max-tokens", type=int, default=64)
    parser.add_argument("--skip-served", action="store_true", help="skip the Triton comparison (no server needed)")
    args = parser.parse_args(argv)

    model_path = args.model or str(make_model(Path(tempfile.mkdtemp()) / "tiny-llama"))
    torch.set_num_threads(torch.get_num_threads())
    device = str(EngineConfig(model_path=model_path, device=args.device).resolve_device())
    results: dict = {"model": Path(model_path).name, "device": device, "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        results["device_name"] = torch.cuda.get_device_name()
    results["prefill"] = bench_prefill(model_path, device, args.prefill_tokens, args.repeats)
    results["decode"] = bench_decode(model_path, device, args.decode_batch, args.decode_context, args.decode_steps)
    if not args.skip_served:
        results["served"] = bench_served(model_path, device, args.served_prompt_tokens, args.served_max_tokens, args.repeats)
    write_report(results, args.out, plot, print_table)


if __name__ == "__main__":
    main()
