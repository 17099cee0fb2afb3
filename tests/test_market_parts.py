"""The market's parts that need no server: the awareness messages it writes, the summary
of a room, its refusal log and its connection limits."""

from __future__ import annotations

import logging

import pytest
from pycrdt import Awareness, Doc, Map, create_awareness_message, read_message

from igora import ratelog
from igora.market.fanout import coalesce
from igora.market.frames import (
    EncodedStates,
    awareness_entries,
    awareness_message,
    check_frame,
    removal_message,
)
from igora.market.limits import Connections
from igora.market.summary import kanban_maps, tasks_by_map, tasks_by_state
from igora.protocol import MapName
from igora.ratelog import RateLimitedLog


def test_a_removal_message_reads_back_as_null_states_at_their_clocks() -> None:
    message = removal_message([(7, 3), (2**40, 0)])
    frame = check_frame(message)  # what the market accepts from a peer, too
    assert frame.awareness == [(7, 3, None), (2**40, 0, None)]
    assert awareness_entries(message[2:]) == frame.awareness


def test_awareness_messages_in_a_row_are_merged_into_one() -> None:
    first, second = removal_message([(1, 1)]), removal_message([(2, 5), (3, 9)])
    (merged,) = coalesce([first, second])
    assert check_frame(merged).awareness == [(1, 1, None), (2, 5, None), (3, 9, None)]


def test_encoded_states_match_pycrdt_and_follow_each_change() -> None:
    def apply(states: list[tuple[int, int, dict[str, object] | None]]) -> None:
        aw.apply_awareness_update(read_message(awareness_message(states)[1:]), None)

    aw = Awareness(Doc())
    b = (2**40, 3, {"name": "b", "n": [1]})
    apply([(5, 1, {"name": "a"}), b])
    cache, ids = EncodedStates(), [5, 2**40]
    first = cache.message(aw, ids)
    assert first == create_awareness_message(aw.encode_awareness_update(ids))
    assert check_frame(first).awareness == [(5, 1, {"name": "a"}), b]
    apply([(5, 2, {"name": "a2"})])
    again = cache.message(aw, ids)  # the new state of 5, the same entry for the other
    assert again == create_awareness_message(aw.encode_awareness_update(ids))
    assert check_frame(again).awareness == [(5, 2, {"name": "a2"}), b]
    aw.remove_awareness_states([5], "test")
    assert check_frame(cache.message(aw, [2**40])).awareness == [b]


def test_tasks_are_counted_by_map_and_by_the_state_they_say() -> None:
    doc: Doc[object] = Doc()
    maps = kanban_maps(doc)
    maps[MapName.TODOS]["a"] = {"id": "a", "state": "todo"}
    maps[MapName.DOING]["b"] = {"id": "b", "state": "doing"}
    maps[MapName.DONE]["c"] = {"id": "c", "state": "failed"}
    maps[MapName.DONE]["d"] = {"id": "d", "state": "done"}
    maps[MapName.DONE]["e"] = {"id": "e", "state": "no such state"}
    maps[MapName.DONE]["f"] = "not a task"
    doc.get("streams", type=Map)["a"] = "not counted"
    assert tasks_by_map(maps) == {"todos": 1, "prepared": 0, "doing": 1, "done": 4}
    assert tasks_by_state(maps) == {
        "todo": 1,
        "prepared": 0,
        "doing": 1,
        "done": 1,
        "failed": 1,
        "aborted": 0,
    }


def test_the_refusal_log_writes_one_line_per_key_and_second(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(ratelog.time, "monotonic", lambda: clock[0])
    log = RateLimitedLog(logging.getLogger("test.ratelog"))
    with caplog.at_level(logging.WARNING, "test.ratelog"):
        for _ in range(3):
            log("%s: refused", "a", key="1.2.3.4")
        log("%s: refused", "b", key="5.6.7.8")
        log("late")
        log("late")
        assert caplog.messages == ["a: refused", "b: refused", "late"]
        clock[0] += 1.0
        log("%s: refused", "a", key="1.2.3.4")
        log("late")
        log("%s: refused", "b", key="5.6.7.8")
    assert caplog.messages[3:] == [
        "a: refused (2 more from 1.2.3.4 in the last second)",
        "late (1 more in the last second)",
        "b: refused",
    ]


def test_connections_are_refused_past_their_limits() -> None:
    limits = Connections(max_connections=3, max_per_address=2)
    assert limits.refusal("room", "a") is None
    assert limits.refusal("x" * 201, "a") == "room name too long or not printable"
    assert limits.refusal("bad\nname", "a") == "room name too long or not printable"
    limits.opened("a")
    limits.opened("a")
    assert limits.refusal("room", "a") == "2 connections from a already"
    limits.opened("b")
    assert limits.refusal("room", "c") == "3 connections already"
    limits.closed("a")
    limits.closed("a")
    assert limits.total == 1 and "a" not in limits.per_address
    assert limits.refusal("room", "a") is None
