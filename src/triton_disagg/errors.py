"""Errors every layer shares, so a request's failure keeps its class from the KV plane up to the client."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request that will not run as sent; the message names the offending field. Clients get a 400."""


#: Every ServiceUnavailable message starts with this. Triton's HTTP generate endpoints answer every
#: model error with 400 and its gRPC stream carries no status code, so clients that see only the
#: text (the OpenAI frontend among them) tell a server-side condition from a bad request by it.
UNAVAILABLE_PREFIX = "unavailable"


class ServiceUnavailable(RuntimeError):
    """A server-side condition the client did not cause and may outlast: no worker, all busy, a worker lost.

    `reason` is a short tag ("no_workers", "all_workers_busy", "migration_limit", ...); the message
    reads "unavailable (reason): detail". Clients get 503 / UNAVAILABLE and may retry after
    `retry_after_s`.
    """

    def __init__(self, reason: str, detail: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"{UNAVAILABLE_PREFIX} ({reason}): {detail}")
        self.reason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s


def is_unavailable_message(message: str) -> bool:
    """Whether an error message (as a client receives it) reports a ServiceUnavailable."""
    return message.startswith(f"{UNAVAILABLE_PREFIX} (")
