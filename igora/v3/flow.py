"""What the v3 broker does with one task, as a pure function of what it reads
(docs/protocol-v3.md §7.2-§7.3), and the entries it writes.

Version 2's transitions (``igora.lifecycle``) move one task dict between maps; in
version 3 a task is spread over documents of three owners (the asker's header, the
broker's assignment and status, the worker's run), so the broker decides from a
``View`` of all three and writes only its own: ``decide`` says what to do, the
functions below it say what the entries become. The policies' numbers (attempts, claim
timeout, default deadline) are version 2's (``igora.broker.policies``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..broker.policies import DEFAULT_CLAIM_TIMEOUT, DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT
from ..protocol import ErrorCode, number
from .tasks import FINAL_RUNS, Assignment, Header, RunField, RunState, Status, StatusState

DEADLINE_GRACE = 8.0
"""Seconds a running task may pass its deadline before the broker ends it (the worker
ends it itself at its next piece; this is for a worker that stopped writing)."""

__all__ = [
    "DEADLINE_GRACE",
    "DEFAULT_CLAIM_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "Act",
    "Decision",
    "View",
    "decide",
]


class Act(Enum):
    WAIT = "wait"  # nothing to do now
    MATCH = "match"  # give it to a worker (attempt ``Decision.attempt``)
    REQUEUE = "requeue"  # take it from its worker; it waits for another
    FAIL = "fail"  # end it without an answer (``code``, ``error``)
    ABORT = "abort"  # end it: its asker asked, or left


@dataclass(frozen=True)
class View:
    """What the broker reads of one task."""

    header: dict[str, Any]
    status: dict[str, Any] | None  # in/<asker>.tasks[tid]
    aborted: bool  # a/<asker>.aborts[tid]
    run: dict[str, Any] | None  # w/<worker>.runs[<tid>.<n>] of the current attempt
    worker_present: bool
    asker_present: bool
    now: int  # ms
    worker_restarted: bool = False  # its session key is not the one it was assigned with


@dataclass(frozen=True)
class Decision:
    act: Act
    attempt: int = 0  # MATCH: the attempt to assign
    code: ErrorCode | None = None
    error: str = ""


def attempt_of(status: dict[str, Any] | None) -> int:
    """The last attempt a status names (0: never assigned)."""
    return int(number((status or {}).get(Status.ATTEMPT)) or 0)


def deadline_of(header: dict[str, Any]) -> float:
    """The header's deadline in ms, or its date + the default timeout."""
    deadline = number(header.get(Header.DEADLINE))
    if deadline is not None:
        return deadline
    return (number(header.get(Header.DATE)) or 0) + DEFAULT_TIMEOUT * 1000


def decide(
    v: View,
    *,
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Decision:
    """What to do with a task now."""
    state = (v.status or {}).get(Status.STATE)
    if state in (StatusState.FAILED.value, StatusState.ABORTED.value):
        return Decision(Act.WAIT)  # ended
    attempt = attempt_of(v.status)
    deadline = deadline_of(v.header)
    if state != StatusState.ASSIGNED.value:  # waiting: never assigned, or re-queued
        if v.aborted or not v.asker_present:
            return Decision(Act.ABORT)
        if v.now > deadline:
            return Decision(Act.FAIL, code=ErrorCode.DEADLINE, error=_deadline(v, attempt))
        return Decision(Act.MATCH, attempt=attempt + 1)
    run_state = (v.run or {}).get(RunField.STATE)
    if run_state in FINAL_RUNS:
        return Decision(Act.WAIT)  # the asker reads the end in the run
    if v.aborted or not v.asker_present:
        return Decision(Act.ABORT)
    if v.now > deadline + (DEADLINE_GRACE * 1000 if v.run else 0):
        return Decision(Act.FAIL, code=ErrorCode.DEADLINE, error=_deadline(v, attempt))
    if run_state == RunState.HANDBACK.value:
        return _again(attempt, max_attempts, ErrorCode.ENGINE_UNAVAILABLE, "its worker's engine")
    if not v.worker_present:
        return _again(attempt, max_attempts, ErrorCode.WORKER_LOST, "its worker left")
    if v.worker_restarted:  # its new process does not run this attempt (its run's name
        # would take the previous process's run, whose chunks open with another key)
        return _again(attempt, max_attempts, ErrorCode.WORKER_LOST, "its worker restarted")
    start = number((v.status or {}).get(Status.START)) or v.now
    if v.run is None and v.now - start > claim_timeout * 1000:
        return _again(attempt, max_attempts, ErrorCode.NOT_STARTED, "its worker did not start it")
    return Decision(Act.WAIT)


def _deadline(v: View, attempt: int) -> str:
    where = "running" if v.run else "waiting"
    return f"task {v.header.get(Header.ID)} passed its deadline while {where} (attempt {attempt})"


def _again(attempt: int, max_attempts: int, code: ErrorCode, why: str) -> Decision:
    if attempt >= max_attempts:
        return Decision(Act.FAIL, code=code, error=f"{why}, {attempt} attempts used")
    return Decision(Act.REQUEUE, code=code, error=why)


# ---------------------------------------------------------------------- entries
def assignment(
    header: dict[str, Any], attempt: int, epoch: int, now: int, key: str | None = None
) -> dict[str, Any]:
    """``in/<worker>.tasks[tid]`` (``key``: the worker's session key as advertised)."""
    out = {
        Assignment.HEADER: header,
        Assignment.ATTEMPT: attempt,
        Assignment.START: now,
        Assignment.EPOCH: epoch,
    }
    if key is not None:
        out[Assignment.KEY] = key
    return out


def assigned(worker: str, attempt: int, epoch: int, now: int) -> dict[str, Any]:
    """``in/<asker>.tasks[tid]`` of a task given to ``worker``."""
    return {
        Status.STATE: StatusState.ASSIGNED.value,
        Status.WORKER: worker,
        Status.ATTEMPT: attempt,
        Status.EPOCH: epoch,
        Status.START: now,
    }


def waiting(attempt: int, epoch: int) -> dict[str, Any]:
    """``in/<asker>.tasks[tid]`` of a task taken from its worker, waiting for another."""
    return {Status.STATE: StatusState.WAITING.value, Status.ATTEMPT: attempt, Status.EPOCH: epoch}


def ended(
    state: StatusState, epoch: int, now: int, code: ErrorCode, error: str, attempt: int
) -> dict[str, Any]:
    """``in/<asker>.tasks[tid]`` of a task the broker ended (failed or aborted)."""
    return {
        Status.STATE: state.value,
        Status.ATTEMPT: attempt,
        Status.EPOCH: epoch,
        Status.END: now,
        Status.ERROR: error,
        Status.ERROR_CODE: code.value,
    }
