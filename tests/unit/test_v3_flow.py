"""The v3 broker's decision per task (igora.v3.flow), as a pure function."""

from __future__ import annotations

from typing import Any

from igora.protocol import ErrorCode
from igora.v3.flow import DEADLINE_GRACE, Act, View, assigned, decide, ended, waiting
from igora.v3.tasks import StatusState

NOW = 1_800_000_000_000
HEADER = {"id": "t" * 16, "asker": "c", "date": NOW - 1000, "deadline": NOW + 60_000}


def view(
    status: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    *,
    aborted: bool = False,
    worker: bool = True,
    asker: bool = True,
    now: int = NOW,
    header: dict[str, Any] = HEADER,
) -> View:
    return View(header, status, aborted, run, worker, asker, now)


def test_a_new_task_is_matched_as_attempt_1() -> None:
    assert decide(view()) == decide(view(waiting(0, 1))) and decide(view()).act is Act.MATCH
    assert decide(view()).attempt == 1
    assert decide(view(waiting(2, 1))).attempt == 3  # re-queued after attempt 2


def test_a_waiting_task_aborted_or_of_an_asker_gone_or_late() -> None:
    assert decide(view(aborted=True)).act is Act.ABORT
    assert decide(view(asker=False)).act is Act.ABORT
    late = decide(view(now=NOW + 61_000))
    assert late.act is Act.FAIL and late.code is ErrorCode.DEADLINE
    assert "waiting" in late.error


def test_an_assigned_task_waits_for_its_run_then_its_end() -> None:
    status = assigned("w", 1, 1, NOW)
    assert decide(view(status)).act is Act.WAIT
    assert decide(view(status, {"state": "doing"})).act is Act.WAIT
    for final in ("done", "failed", "aborted"):
        # the asker reads the end in the run; even aborted or late it is over
        assert decide(view(status, {"state": final}, aborted=True, now=NOW * 2)).act is Act.WAIT


def test_a_worker_lost_or_not_starting_is_retried_then_failed() -> None:
    lost = decide(view(assigned("w", 1, 1, NOW), {"state": "doing"}, worker=False))
    assert lost.act is Act.REQUEUE and lost.code is ErrorCode.WORKER_LOST
    last = decide(view(assigned("w", 3, 1, NOW), {"state": "doing"}, worker=False))
    assert last.act is Act.FAIL and last.code is ErrorCode.WORKER_LOST
    assert "3 attempts" in last.error
    status = assigned("w", 1, 1, NOW)
    assert decide(view(status, now=NOW + 29_000)).act is Act.WAIT
    slow = decide(view(status, now=NOW + 31_000))
    assert slow.act is Act.REQUEUE and slow.code is ErrorCode.NOT_STARTED
    assert decide(view(status, now=NOW + 31_000), claim_timeout=60).act is Act.WAIT


def test_a_hand_back_is_a_new_attempt() -> None:
    d = decide(view(assigned("w", 1, 1, NOW), {"state": "handback"}))
    assert d.act is Act.REQUEUE and d.code is ErrorCode.ENGINE_UNAVAILABLE


def test_a_running_task_has_a_grace_past_its_deadline() -> None:
    status = assigned("w", 1, 1, NOW)
    past = NOW + 61_000
    assert decide(view(status, {"state": "doing"}, now=past)).act is Act.WAIT
    late = decide(view(status, {"state": "doing"}, now=past + int(DEADLINE_GRACE * 1000)))
    assert late.act is Act.FAIL and late.code is ErrorCode.DEADLINE and "running" in late.error
    assert decide(view(status, now=past)).act is Act.FAIL  # not started: no grace


def test_an_ended_status_is_final() -> None:
    for state in (StatusState.FAILED, StatusState.ABORTED):
        status = ended(state, 1, NOW, ErrorCode.DEADLINE, "late", 1)
        assert decide(view(status, aborted=True, asker=False)).act is Act.WAIT
        assert status["errorCode"] == "deadline" and status["state"] == state.value


def test_a_header_without_deadline_gets_the_default() -> None:
    header = {"id": "t" * 16, "asker": "c", "date": NOW}
    assert decide(view(header=header, now=NOW + 599_000)).act is Act.MATCH
    assert decide(view(header=header, now=NOW + 601_000)).act is Act.FAIL
