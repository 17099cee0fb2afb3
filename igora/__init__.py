"""Igora: an open market where anyone's machine can offer an LLM service."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Answer, Client, Restart, SyncClient, Task
from .errors import (
    IgoraError,
    MarketUnreachable,
    NoWorkerError,
    TaskAborted,
    TaskError,
    TaskFailed,
    TaskTimeout,
)

__all__ = [
    "Answer",
    "Client",
    "IgoraError",
    "MarketUnreachable",
    "NoWorkerError",
    "Restart",
    "SyncClient",
    "Task",
    "TaskAborted",
    "TaskError",
    "TaskFailed",
    "TaskTimeout",
    "__version__",
]
