"""Gateway defaults, apart so that building the CLI does not import FastAPI."""

from ..config import DEFAULT_HOST

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "GATEWAY_NAME",
    "MAX_BODY",
    "STARTUP_GRACE",
    "STARTUP_SYNC_WAIT",
    "WAIT_WORKER",
]

GATEWAY_NAME = "openai-gateway"
DEFAULT_PORT = 5678
MAX_BODY = 8 * 1024 * 1024
"""Bytes of a request body at most (a larger one is answered 413)."""
STARTUP_GRACE = 2.0
"""Seconds after connecting during which a request waits for workers' awareness to
arrive before concluding that no worker serves its model."""
STARTUP_SYNC_WAIT = 3.0
"""Seconds the start-up waits for the market before serving anyway (answering 503)."""
WAIT_WORKER = 0.0
"""Seconds a request waits for a worker serving its model to appear (``--wait-worker``)."""
