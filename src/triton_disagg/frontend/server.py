"""Run the frontend under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from triton_disagg.frontend.app import create_app
from triton_disagg.frontend.config import FrontendConfig


def run(config: FrontendConfig) -> None:
    """Serve until interrupted (SIGINT/SIGTERM stop it gracefully)."""
    config.validate()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=10,
        # Keys in the access log would leak; requests are counted in /metrics instead.
        access_log=False,
    )
