"""The ``board`` of a v3 room (igora.v3.board): a task's row from the broker's reads, the
keeper's counts and bounds, and the market's log of a document rewritten whole
(igora.market.v3.doclog, ``rewritten``), with real pycrdt documents, no process."""

from __future__ import annotations

import sys
from typing import Any

from pycrdt import Doc, Map

from igora.market.v3.doclog import DocLog
from igora.v3 import view as room_view
from igora.v3.board import BOARD, RECENT, SUMMARY, BoardKeeper, row

ASKER, WORKER = "a" * 43, "w" * 43


def header(tid: str, model: str = "echo", date: int = 1_000) -> dict[str, Any]:
    return {"id": tid, "asker": ASKER, "model": model, "date": date, "sig": "s"}


def assigned(n: int = 1) -> dict[str, Any]:
    return {"state": "assigned", "worker": WORKER, "attempt": n, "start": 1_100}


def run(state: str, tokens: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"state": state, "start": 1_200}
    if state in ("done", "failed", "aborted"):
        out["end"] = 1_500
    if tokens:
        out["usage"] = {"promptTokens": 3, "completionTokens": tokens}
    return out


def tid(i: int) -> str:
    return f"{i:016d}"


def test_a_row_says_the_state_the_worker_and_the_tokens_of_a_task() -> None:
    assert row(header(tid(1)), None, None)["state"] == "waiting"
    assert row(header(tid(1)), assigned(), None)["state"] == "waiting"  # not started
    assert row(header(tid(1)), assigned(), run("doing"))["state"] == "running"
    done = row(header(tid(1)), assigned(2), run("done", 7))
    assert done["state"] == "done" and done["worker"] == WORKER and done["attempt"] == 2
    assert (done["tokens"], done["promptTokens"], done["start"], done["end"]) == (7, 3, 1200, 1500)
    ended = {"state": "failed", "attempt": 3, "errorCode": "deadline", "error": "a sentence"}
    failed = row(header(tid(1)), ended, None)
    assert failed["state"] == "failed" and failed["errorCode"] == "deadline"
    assert "a sentence" not in str(failed)  # codes only: no text anyone wrote


def test_the_keeper_counts_each_end_once_and_keeps_only_the_last_tasks() -> None:
    keeper = BoardKeeper(since=0)
    total = RECENT * 3
    for i in range(total):
        keeper.turn({tid(i): row(header(tid(i)), assigned(), run("doing"))})
        # seen done for several turns (the asker has not read it yet), then gone
        for _ in range(3):
            keeper.turn({tid(i): row(header(tid(i)), assigned(), run("done", 2))})
        keeper.gone(tid(i), keeper.live.get(tid(i)), run("done", 2))
    s = keeper.summary(now=2_000)
    assert s["counts"]["done"] == total and s["counts"]["running"] == 0
    assert len(s["tasks"]) == RECENT and len(keeper.finished) == RECENT
    assert s["models"] == {"echo": {"waiting": 0, "running": 0, "done": total}}
    assert s["perMinute"] == {"done": total, "tokens": 2 * total}


def test_the_keepers_memory_does_not_grow_with_the_tasks_served() -> None:
    """20,000 tasks at 200 a second, each read done for two turns, then its header gone:
    the keeper holds after them what it held after the first 1,000 (it kept an id and a
    completion per task, up to 10,000 of each: the broker grew over the v3 soak), and
    its last minute counts every task of it (it counted only those 10,000)."""
    keeper = BoardKeeper(since=0)

    def serve(first: int, n: int) -> None:
        for i in range(first, first + n):
            end = 1_000_000 + i * 5
            done = {**row(header(tid(i)), assigned(), run("done", 2)), "end": end}
            keeper.turn({tid(i): done})
            keeper.turn({tid(i): done})  # read again until its asker deletes the header
            keeper.turn({})
            if i % 200 == 0:
                keeper.due(now=end, clock=end / 1000)  # the broker writes once a second

    serve(0, 1_000)
    before = sys.getallocatedblocks()
    serve(1_000, 19_000)
    grown = sys.getallocatedblocks() - before
    s = keeper.summary(now=1_000_000 + 19_999 * 5)
    assert s["counts"]["done"] == 20_000
    # 60 s at 200 a second, and the window's first second whole
    assert 12_000 <= s["perMinute"]["done"] <= 12_200
    assert s["perMinute"]["tokens"] == 2 * s["perMinute"]["done"]
    assert grown < 1_000


def test_a_task_that_ended_in_the_batch_its_header_left_is_counted_with_its_run() -> None:
    keeper = BoardKeeper(since=0)
    keeper.turn({tid(1): row(header(tid(1)), assigned(), run("doing"))})
    keeper.gone(tid(1), keeper.live.get(tid(1)), run("done", 5))
    s = keeper.summary(now=2_000)
    assert s["counts"]["done"] == 1 and s["tasks"][0]["tokens"] == 5
    keeper.turn({tid(2): row(header(tid(2)), None, None)})
    keeper.gone(tid(2), keeper.live.get(tid(2)), None)  # its asker left before it ran
    assert keeper.summary(now=2_000)["counts"]["aborted"] == 1


def test_a_task_that_ended_before_the_turn_after_its_assignment_names_its_worker() -> None:
    """The turn that assigns a task read its row before the assignment; an echo task may
    end, and its header leave, before the next turn: its worker comes from its status."""
    keeper = BoardKeeper(since=0)
    keeper.turn({tid(1): row(header(tid(1)), None, None)})  # waiting, then assigned
    keeper.gone(tid(1), keeper.live.get(tid(1)), run("done", 5), assigned())
    done = keeper.summary(now=2_000)["tasks"][0]
    assert (done["state"], done["worker"], done["attempt"]) == ("done", WORKER, 1)
    assert (done["start"], done["end"], done["tokens"]) == (1_200, 1_500, 5)


def test_the_summary_is_written_at_most_every_second_and_only_when_it_changed() -> None:
    keeper = BoardKeeper(since=0)
    keeper.turn({tid(1): row(header(tid(1)), None, None)})
    assert keeper.due(now=1_000, clock=10.0) is not None
    keeper.turn({tid(1): row(header(tid(1)), assigned(), run("doing"))})
    assert keeper.due(now=1_500, clock=10.5) is None  # within the second
    assert keeper.due(now=2_000, clock=11.0) is not None
    assert keeper.due(now=3_000, clock=12.0) is None  # nothing changed


def test_a_rewritten_log_stays_one_summary_large_where_a_merged_one_grows() -> None:
    keeper = BoardKeeper(since=0)
    owner: Doc[Any] = Doc()
    rewritten, merged = DocLog(rewritten=True), DocLog()
    sizes = []
    for i in range(RECENT * 4):
        keeper.turn({tid(i): row(header(tid(i)), assigned(), run("done", 2))})
        before = owner.get_state()
        owner.get(BOARD, type=Map)[SUMMARY] = keeper.summary(now=2_000 + i)
        update = owner.get_update(before)
        rewritten.append(update)
        merged.append(update)
        sizes.append(rewritten.size)
    one = len(owner.get_update())
    assert rewritten.size <= one + 64  # one summary, and a few bytes of deleted ranges
    assert max(sizes[RECENT:]) <= one + 64
    assert merged.size > 20 * one  # what a plain merge would keep
    reader: Doc[Any] = Doc()
    reader.apply_update(rewritten.state())
    assert reader.get(BOARD, type=Map)[SUMMARY]["counts"]["done"] == RECENT * 4


def test_the_views_rows_name_each_worker_key_and_survive_a_broken_view() -> None:
    view: dict[str, Any] = {
        "broker": {"id": "b" * 43, "epoch": 2},
        "workers": [
            {
                "id": WORKER,
                "name": "w1",
                "engine": "echo",
                "state": "ready",
                "slots": 2,
                "models": [{"name": "echo", "contextLength": 1000}],
            },
        ],
        "agents": [
            {"id": "b" * 43, "type": "broker", "name": "b1"},
            {"id": WORKER, "type": "worker", "name": "w1"},
            {"id": ASKER, "type": "client", "name": "alice"},
        ],
    }
    keeper = BoardKeeper(since=0)
    keeper.turn({tid(1): row(header(tid(1)), assigned(), run("doing"))})
    view["board"] = keeper.summary(now=2_000)
    snap = room_view.snapshot(view)
    worker = next(a for a in snap["agents"] if a["type"] == "worker")
    assert (worker["key"], worker["slots"], worker["running"]) == (WORKER, 2, 1)
    assert next(a for a in snap["agents"] if a["type"] == "broker")["leader"] is True
    (task,) = snap["tasks"]["running"]
    assert (task["workerKey"], task["workerName"], task["askerName"]) == (WORKER, "w1", "alice")
    assert snap["counts"]["running"] == 1
    for junk in (
        {},
        {"workers": {"x": 1}, "agents": [{"id": ["x"]}, 3], "board": []},
        {"broker": [], "board": {"counts": "x", "tasks": [{"state": "done", "id": 5}, None]}},
        {"board": {"models": {"m": "x"}, "perMinute": None, "tasks": "x"}},
    ):
        empty = room_view.snapshot(junk)
        assert empty["counts"] == dict.fromkeys(room_view.GROUPS, 0)
