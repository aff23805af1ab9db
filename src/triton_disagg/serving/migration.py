"""Moving a request to another decode worker when its worker fails under it (pure decisions).

A decode worker can fail under a request in four ways `llm` sees: its
Python stub process died (Triton answers "Stub process ... is not healthy",
and a stream already open just stops), it was unloaded (new requests find
no such model; requests in flight end with finish reason "abort" that
nobody asked for), it stopped answering, or the Triton server it runs in
on another host went away (its gRPC calls fail: "Triton server
unreachable"). Each of these is the server's fault, not the client's, so
the request continues on another decode worker from its prompt plus every
token already streamed to the client, asking for the tokens still missing.
The client's stream neither repeats nor loses a token; with greedy sampling the text equals an uninterrupted run (a seeded
sampler restarts on the new worker, so seeded output may differ).

Nothing here calls Triton: `llm` feeds in what it saw, whether the worker runs
in its own server or another one, and acts on the answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from triton_disagg.errors import ServiceUnavailable

#: Error texts that mean the worker itself is gone or dead, not that it refused the request.
_LOST_WORKER = re.compile(
    r"Stub process .* is not healthy|Failed to (?:process|send) .*stub|unknown model|is not found"
    r"|has no available versions|is not ready|not ready for inference|engine is shutting down"
    r"|Triton server unreachable",
    re.IGNORECASE,
)


class WorkerLost(Exception):
    """The worker a request was on failed under it; `reason` is "dead", "gone" or "aborted"."""

    def __init__(self, worker_name: str, reason: str, detail: str) -> None:
        super().__init__(f"decode worker {worker_name} {reason}: {detail}")
        self.worker_name = worker_name
        self.reason = reason


def lost_worker_reason(error_message: str) -> str | None:
    """"dead" when an error text says the worker's stub died or its server cannot be reached, "gone"
    when the worker is not (or no longer) loaded, None when it is the worker's own verdict on the
    request (pass that on)."""
    match = _LOST_WORKER.search(error_message)
    if match is None:
        return None
    text = match.group(0).lower()
    return "dead" if "stub" in text or "unreachable" in text else "gone"


@dataclass(slots=True, frozen=True)
class Continuation:
    """What to send the next decode worker: the prompt grown by the tokens already streamed."""

    prompt_token_ids: list[int]
    max_tokens: int
    #: 1 for the first move, 2 for the second, ...
    migration: int


def plan_continuation(
    prompt_token_ids: list[int],
    generated_token_ids: list[int],
    max_tokens: int,
    num_migrations: int,
    migration_limit: int,
    lost: WorkerLost,
) -> Continuation:
    """The request's continuation after `lost`, its `num_migrations + 1`-th move.

    Raises ServiceUnavailable ("migration_limit") when it has moved `migration_limit` times already
    (0 turns migration off). `generated_token_ids` are every token the client has been sent or will
    be, in order; fewer than `max_tokens` of them, or the request would have finished.
    """
    if num_migrations >= migration_limit:
        raise ServiceUnavailable(
            "migration_limit",
            f"{lost}; the request moved {num_migrations} times already (limit {migration_limit}); retry it",
        )
    num_generated = len(generated_token_ids)
    if num_generated >= max_tokens:
        raise ValueError(f"the request has all its {max_tokens} tokens already; nothing to continue")
    return Continuation(
        prompt_token_ids=list(prompt_token_ids) + list(generated_token_ids),
        max_tokens=max_tokens - num_generated,
        migration=num_migrations + 1,
    )
