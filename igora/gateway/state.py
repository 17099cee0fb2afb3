"""What the gateway's routes share: the market client and the gateway's settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from ..client import DEFAULT_TIMEOUT, Client, Task
from ..protocol import TaskField
from .defaults import STARTUP_GRACE, WAIT_WORKER

FALLBACK_MODEL = "igora"
"""The model named in an answer when neither the request nor the worker names one."""


@dataclass
class Gateway:
    """The market client of one gateway application, and its settings."""

    client: Client
    api_keys: tuple[str, ...] = ()
    wait_worker: float = WAIT_WORKER
    timeout: float = DEFAULT_TIMEOUT
    started: float = field(default_factory=time.time)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def worker_wait(self) -> float:
        """How long a request may wait for a fitting worker to show up."""
        return max(self.wait_worker, STARTUP_GRACE - self.client.connected_for(), 0.0)

    def served_model(self, task: Task, requested: str | None) -> str:
        """The model that answers: the one asked for, else the first of its worker's."""
        if requested:
            return requested
        worker_id = (task.final or {}).get(TaskField.WORKER)
        if not isinstance(worker_id, str):
            worker_id = self.client.worker_of(task.id)
        for peer in self.client.workers():
            if peer.id == worker_id and peer.models:
                return str(peer.models[0])
        return FALLBACK_MODEL


def gateway_of(request: Request) -> Gateway:
    """The ``Gateway`` of the application serving ``request``."""
    return request.app.state.gateway  # type: ignore[no-any-return]
