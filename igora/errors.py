"""Typed errors of the public API; each message says what happened and what to do."""

from __future__ import annotations

from typing import Any

from .protocol import TaskField


class IgoraError(Exception):
    """Base class of Igora's errors."""


class MarketUnreachable(IgoraError, ConnectionError):
    """No market answered at the given URL."""


class NotAdmitted(IgoraError):
    """The market did not admit the identity a task would be put as (not a member, or
    banned: docs/security.md §5); ``id``: that identity."""

    def __init__(self, message: str, id: str) -> None:
        super().__init__(message)
        self.id = id


class NoWorkerError(IgoraError):
    """No worker on the market serves the requested model, or none offers a capability
    the request needs (``missing``: e.g. ``("tools",)``, see ``igora.capabilities``)."""

    def __init__(
        self,
        model: str | None,
        available: list[str],
        missing: tuple[str, ...] = (),
        reason: str | None = None,
    ) -> None:
        self.model = model
        self.available = available
        self.missing = missing
        self.reason = reason  # a sentence of the caller's (a trust list's), else None
        if reason:
            msg = reason
        elif missing:
            msg = f"no worker on the market offers {' + '.join(missing)}" + (
                f" on model {model!r}" if model else ""
            )
        elif not available:
            msg = "no worker is on the market right now: start one with `igora worker`"
        else:
            msg = f"no worker serves model {model!r}; models on the market: " + ", ".join(
                sorted(available)
            )
        super().__init__(msg)


class TaskError(IgoraError):
    """A task ended without an answer; ``task``: its final state, as the market has it."""

    def __init__(self, message: str, task: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.task = task or {}

    @property
    def code(self) -> str | None:
        """The task's ``errorCode`` (``igora.protocol.ErrorCode`` values), if it has one."""
        code = self.task.get(TaskField.ERROR_CODE)
        return code if isinstance(code, str) else None


class TaskFailed(TaskError):
    """The task ended ``failed``; ``str(err)`` is the worker's or broker's reason."""


class TaskAborted(TaskError):
    """The task ended ``aborted``."""


class TaskTimeout(TaskError):
    """No answer before the task's deadline (``errorCode`` ``deadline``), or none within
    the client's own wait."""
