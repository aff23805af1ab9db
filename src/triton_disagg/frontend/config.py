"""Settings of the OpenAI frontend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Largest request body accepted by default (bytes): room for a long prompt, not for abuse.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class FrontendConfig:
    """One frontend in front of one Triton server. Defaults run on a laptop."""

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

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("api_keys must not contain empty keys")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
