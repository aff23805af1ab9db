"""Simulated prefill and decode pools, served as the profile says, stepped every `STEP_S`.

A prefill worker takes waiting prompts FIFO in batches of up to
`PREFILL_BATCH_TOKENS` tokens and returns them all after the batch's
profiled TTFT. A decode worker advances each running request by
dt / ITL(concurrency, mean context) tokens a step, from its first token when
a slot is free then, and times its last token within the step. It runs at
most as many requests as the profile's largest concurrency (an engine's
`max_num_seqs`: the profile says nothing of ITL beyond it), and only as many
as its KV holds; a request waits for a decode slot when no worker has one. A
worker added costs its device from the load call and serves after
`startup_s`; a removed worker stops taking work and costs until it has
drained and `unload_s` more. Under a device budget, a worker is loaded only
once a device is free: one being drained or unloaded still holds its own.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.observations import IntervalObservation
from triton_disagg.planner.profile import PerformanceProfile

#: Prompt tokens a simulated prefill worker batches together.
PREFILL_BATCH_TOKENS = 16384
#: KV tokens one simulated decode worker holds.
DECODE_KV_TOKENS = 2_000_000
STEP_S = 0.05


@dataclass(slots=True)
class Request:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    first_token_s: float | None = None
    finish_s: float | None = None
    generated: float = 0.0
    decoded_until_s: float | None = None  # the simulated time up to which `generated` is accounted
    queued_at_step_s: float | None = None  # the step its prefill returned in

    @property
    def itl_ms(self) -> float:
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) * 1000.0 / (self.output_tokens - 1)


@dataclass(slots=True)
class Worker:
    loaded_at_s: float
    ready_at_s: float
    is_draining: bool = False
    released_at_s: float | None = None
    busy_until_s: float = 0.0
    batch: list[Request] = field(default_factory=list)  # prefill: the batch in flight
    running: list[Request] = field(default_factory=list)  # decode: requests decoding

    def is_idle(self) -> bool:
        return not self.batch and not self.running


class Cluster:
    """Prefill and decode pools served by the profile, stepped by `STEP_S`."""

    def __init__(self, profile: PerformanceProfile, config: PlannerConfig, startup_s: float,
                 num_prefill: int, num_decode: int, unload_s: float = 0.0, device_budget: int | None = None) -> None:
        self.profile, self.config, self.startup_s, self.unload_s = profile, config, startup_s, unload_s
        self.device_budget = device_budget
        self.max_running_per_decode_worker = int(profile.decode.concurrency[-1])
        self.prefill = [Worker(0.0, 0.0) for _ in range(num_prefill)]
        self.decode = [Worker(0.0, 0.0) for _ in range(num_decode)]
        self.prefill_queue: deque[Request] = deque()
        self.decode_queue: deque[Request] = deque()
        self.retired: list[Worker] = []
        #: Requests whose first token came since the caller last emptied this list.
        self.first_tokens: list[Request] = []

    def live(self, pool: list[Worker]) -> list[Worker]:
        return [w for w in pool if not w.is_draining]

    def resize(self, pool: list[Worker], target: int, now_s: float) -> None:
        live = self.live(pool)
        for _ in range(target - len(live)):
            # Loaded at once if a device is free, else when one is (see `step`).
            pool.append(Worker(math.inf, math.inf))
        # Drain the least useful first: not yet loaded or ready, then idle, then least loaded.
        victims = sorted(live, key=lambda w: (w.ready_at_s <= now_s, not w.is_idle(), len(w.running)))
        for worker in victims[: max(0, len(live) - target)]:
            if worker.loaded_at_s == math.inf:
                pool.remove(worker)  # a load still waiting for a device is called off
            else:
                worker.is_draining = True
        self._load_waiting(now_s)

    def devices_held(self, now_s: float) -> int:
        """Devices held now: loaded workers, draining ones included, and those still unloading."""
        loaded = sum(w.loaded_at_s <= now_s for w in self.prefill + self.decode)
        return loaded + sum(w.released_at_s is not None and w.released_at_s > now_s for w in self.retired)

    def _load_waiting(self, now_s: float) -> None:
        for worker in [w for w in self.prefill + self.decode if w.loaded_at_s == math.inf]:
            if self.device_budget is not None and self.devices_held(now_s) >= self.device_budget:
                return
            worker.loaded_at_s, worker.ready_at_s = now_s, now_s + self.startup_s

    def step(self, now_s: float, done: list[Request]) -> None:
        self._load_waiting(now_s)
        for worker in self.prefill:
            if worker.batch and worker.busy_until_s <= now_s:
                for request in worker.batch:
                    request.first_token_s = worker.busy_until_s
                    request.queued_at_step_s = now_s
                    self.decode_queue.append(request)
                    self.first_tokens.append(request)
                worker.batch = []
            if not worker.batch and not worker.is_draining and worker.ready_at_s <= now_s and self.prefill_queue:
                tokens = 0
                while self.prefill_queue and (not worker.batch or tokens + self.prefill_queue[0].input_tokens <= PREFILL_BATCH_TOKENS):
                    request = self.prefill_queue.popleft()
                    worker.batch.append(request)
                    tokens += request.input_tokens
                ttft_ms = self.profile.prefill.ttft_at_ms(tokens / len(worker.batch), len(worker.batch))
                worker.busy_until_s = now_s + ttft_ms / 1000.0
        ready_decode = [w for w in self.decode if not w.is_draining and w.ready_at_s <= now_s]
        while self.decode_queue and ready_decode:
            request = self.decode_queue[0]
            worker = min(ready_decode, key=lambda w: len(w.running))
            if len(worker.running) >= self.max_running_per_decode_worker:
                break
            if sum(r.input_tokens + r.generated for r in worker.running) + request.input_tokens + request.output_tokens > DECODE_KV_TOKENS:
                break
            # ITL is measured from the exact first token, so decode time is accounted exactly too: a
            # request admitted the step its prefill returned decodes from its first token, and it
            # finishes within a step, not at its end. Rounding both to steps charged a 1-3 token
            # decode 50-100 ms whatever the ITL: 290 short Mooncake requests missed a 40 ms target
            # under every pool size.
            is_queued_this_step = request.queued_at_step_s == now_s
            request.decoded_until_s = request.first_token_s if is_queued_this_step else now_s
            worker.running.append(self.decode_queue.popleft())
        for worker in self.decode:
            if not worker.running:
                continue
            context = sum(r.input_tokens + r.generated for r in worker.running) / len(worker.running)
            tokens_per_s = 1000.0 / self.profile.decode.itl_at_ms(len(worker.running), context)
            still = []
            for request in worker.running:
                remaining_tokens = request.output_tokens - 1 - request.generated
                available_s = now_s + STEP_S - request.decoded_until_s
                if remaining_tokens <= available_s * tokens_per_s:
                    request.generated += remaining_tokens
                    request.finish_s = request.decoded_until_s + remaining_tokens / tokens_per_s
                    done.append(request)
                else:
                    request.generated += available_s * tokens_per_s
                    request.decoded_until_s = now_s + STEP_S
                    still.append(request)
            worker.running = still
        for pool in (self.prefill, self.decode):
            for worker in [w for w in pool if w.is_draining and w.is_idle()]:
                worker.released_at_s = now_s + self.unload_s
                pool.remove(worker)
                self.retired.append(worker)

    def observe(self, now_s: float, interval_s: float, arrived: list[Request], finished: list[Request],
                grace_s: float) -> IntervalObservation:
        """The interval as the planner's metrics reader sees it on a real server (planner/scrape.py).

        Arrivals give the rate and mean prompt length (`llm` counts prompts when it accepts them);
        requests that finished give the mean output length (counted when a request ends), and
        first tokens the mean TTFT; the mean ITL is over the decode time of requests that finished
        (waits for a slot included); queued and in-flight prompts, running and waiting decode
        requests and KV usage are read at the tick. Empties `first_tokens`.
        """
        first_tokens, self.first_tokens = self.first_tokens, []
        ttfts = [(r.first_token_s - r.arrival_s) * 1000.0 for r in first_tokens]
        decoded = [r for r in finished if r.output_tokens > 1]
        num_gaps = sum(r.output_tokens - 1 for r in decoded)
        live_p, live_d = self.live(self.prefill), self.live(self.decode)
        return IntervalObservation(
            num_prefill_workers=len(live_p),
            num_decode_workers=len(live_d),
            num_requests=len(arrived),
            request_rate_per_s=len(arrived) / interval_s,
            mean_input_tokens=_mean([r.input_tokens for r in arrived]),
            mean_output_tokens=_mean([r.output_tokens for r in finished]),
            num_prefill_workers_in_grace=sum(now_s - w.loaded_at_s < grace_s for w in live_p if w.loaded_at_s > 0),
            num_decode_workers_in_grace=sum(now_s - w.loaded_at_s < grace_s for w in live_d if w.loaded_at_s > 0),
            ttft_p50_ms=percentile(ttfts, 0.5),
            ttft_p99_ms=percentile(ttfts, 0.99),
            ttft_mean_ms=_mean(ttfts),
            itl_mean_ms=sum((r.finish_s - r.first_token_s) * 1000.0 for r in decoded) / num_gaps if num_gaps else None,
            prefill_queue_tokens=sum(r.input_tokens for r in self.prefill_queue),
            active_prefill_tokens=sum(r.input_tokens for w in live_p for r in w.batch),
            decode_running_requests=sum(len(w.running) for w in live_d) / len(live_d) if live_d else None,
            decode_waiting_requests=len(self.decode_queue) / len(live_d) if live_d else None,
            decode_kv_usage=self.kv_usage(),
        )

    def kv_usage(self) -> float:
        workers = self.live(self.decode)
        if not workers:
            return 0.0
        used = sum(r.input_tokens + r.generated for w in workers for r in w.running)
        return used / (len(workers) * DECODE_KV_TOKENS)

    def device_s(self, from_s: float, end_s: float) -> float:
        """Device-seconds the workers held between `from_s` and `end_s`."""
        workers = self.retired + self.prefill + self.decode
        return sum(
            max(0.0, min(end_s, w.released_at_s if w.released_at_s is not None else end_s) - max(from_s, w.loaded_at_s))
            for w in workers
        )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
