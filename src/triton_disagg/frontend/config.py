"""Settings of the OpenAI frontend."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: Largest request body accepted by default (bytes): room for a long prompt, not for abuse.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class FrontendConfig:
    """One frontend in front of a model's Triton server, and of more models' servers. Defaults run on a laptop."""

    #: Triton's gRPC endpoint (host:port).
    triton_url: str = "localhost:8001"
    host: str = "0.0.0.0"
    port: int = 8080
    #: The name clients pass as `model`; None: the checkpoint directory's name.
    served_model_name: str | None = None
    #: Checkpoint whose tokenizer and chat template to use; None: the one the `llm` model serves.
    model_path: Path | None = None
    #: Context window; None: the `llm` model's, else the checkpoint's max_position_embeddings.
    max_model_len: int | None = None
    #: Bearer keys accepted on /v1/*; empty: no authentication.
    api_keys: tuple[str, ...] = ()
    #: Largest request body, in bytes; larger ones get 413.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: How long to wait at start for Triton's llm model to be ready.
    startup_timeout_s: float = 300.0
    #: More models served side by side: (name clients send as `model`, its entry server's gRPC endpoint).
    #: Each one's tokenizer, chat template and context window come from its `llm` model.
    more_models: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("api_keys must not contain empty keys")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        names = [name for name, _ in self.more_models]
        for name, url in self.more_models:
            if not name or not re.fullmatch(r"[^\s:/]+:\d+", url):
                raise ValueError(f"more_models: each entry is NAME=HOST:PORT (a model name and its Triton gRPC endpoint), got {name}={url}")
            if names.count(name) > 1 or name == self.served_model_name:
                raise ValueError(f"more_models: model {name!r} is named twice")

    @staticmethod
    def parse_model_routes(text: str) -> tuple[tuple[str, str], ...]:
        """`NAME=HOST:PORT[,...]` (the --more-models flag) as ((name, url), ...)."""
        routes = []
        for route in text.split(","):
            if route.strip():
                name, _, url = route.partition("=")
                routes.append((name.strip(), url.strip()))
        return tuple(routes)
