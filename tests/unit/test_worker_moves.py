"""A worker's writes (``igora.worker.moves``) and its fit checks, on a document that is
never connected: no market, no process."""

from __future__ import annotations

from typing import Any

import pytest

from igora.agent import Agent
from igora.capabilities import Cap
from igora.config import market_address
from igora.engines.base import ModelInfo
from igora.engines.echo import EchoEngine
from igora.lifecycle import finish, requeue
from igora.protocol import ABORTED_MARK, LIVE, ErrorCode, MapName, State, TaskField
from igora.worker.fit import cannot_serve
from igora.worker.moves import Moves


@pytest.fixture
def moves() -> Moves:
    agent = Agent(market_address("ws://127.0.0.1:9"), type="worker", name="w", style="text")
    return Moves(agent)


def assigned(moves: Moves, tid: str = "t", **extra: Any) -> dict[str, Any]:
    task = {
        TaskField.ID: tid,
        TaskField.PROMPT: "p",
        TaskField.STATE: State.PREPARED.value,
        TaskField.WORKER: moves.agent.id,
        TaskField.ATTEMPTS: 1,
        TaskField.START: 1,
        **extra,
    }
    with moves.agent.transaction():
        moves.agent.maps[MapName.PREPARED][tid] = task
    return task


def where(moves: Moves, tid: str = "t") -> list[MapName]:
    return [m for m in (*LIVE, MapName.DONE) if tid in moves.agent.maps[m]]


def test_start_then_finish(moves: Moves) -> None:
    doing = moves.start("t", assigned(moves), 1)
    assert where(moves) == [MapName.DOING] and "t#1" in moves.agent.maps[MapName.STREAMS]
    moves.end_running("t", doing[TaskField.STREAM], lambda t: finish(t, 5, "answer"))
    assert where(moves) == [MapName.DONE] and "t#1" not in moves.agent.maps[MapName.STREAMS]
    assert moves.agent.maps[MapName.DONE]["t"][TaskField.RESPONSE] == "answer"
    assert "t" in moves.ended


def test_a_task_taken_away_is_not_ended(moves: Moves) -> None:
    doing = moves.start("t", assigned(moves), 1)
    with moves.agent.transaction():  # the broker re-queued it
        moves.agent.maps[MapName.DOING].pop("t")
        moves.agent.maps[MapName.TODOS]["t"] = requeue(doing).task
    moves.end_running("t", doing[TaskField.STREAM], lambda t: finish(t, 5, "late"))
    assert where(moves) == [MapName.TODOS]


def test_ending_removes_every_other_entry(moves: Moves) -> None:
    doing = moves.start("t", assigned(moves), 1)
    with moves.agent.transaction():  # a write that raced with the start
        moves.agent.maps[MapName.TODOS]["t"] = {TaskField.ID: "t", TaskField.PROMPT: "p"}
    moves.end_running("t", doing[TaskField.STREAM], lambda t: finish(t, 5, "answer"))
    assert where(moves) == [MapName.DONE]


def test_strays(moves: Moves) -> None:
    me = moves.agent.id
    stray: dict[str, Any] = {
        TaskField.ID: "s",
        TaskField.PROMPT: "p",
        TaskField.STATE: "doing",
        TaskField.WORKER: me,
        TaskField.START: 1,
    }
    ghost = {**stray, TaskField.ID: "g"}
    marked = {**stray, TaskField.ID: "m", TaskField.ABORTED: ABORTED_MARK}
    mine_running = {**stray, TaskField.ID: "r"}
    with moves.agent.transaction():
        for t in (stray, ghost, marked, mine_running):
            moves.agent.maps[MapName.DOING][t[TaskField.ID]] = t
        moves.agent.maps[MapName.DONE]["g"] = {TaskField.ID: "g", TaskField.STATE: State.DONE.value}
    moves.settle_strays({"r"})
    assert where(moves, "s") == [MapName.TODOS]
    assert TaskField.WORKER not in moves.agent.maps[MapName.TODOS]["s"]
    assert where(moves, "g") == [MapName.DONE]  # the ghost dropped, its end kept
    assert moves.agent.maps[MapName.DONE]["m"][TaskField.STATE] == State.ABORTED.value
    assert where(moves, "r") == [MapName.DOING]


class ChatOnly(EchoEngine):
    def models(self) -> list[ModelInfo]:
        return [ModelInfo("echo", 1_000, frozenset({Cap.CHAT}))]


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({}, None),
        ({TaskField.MODEL: "echo"}, None),
        ({TaskField.MODEL: "gpt-4", TaskField.PROTOCOL: 2}, ErrorCode.MODEL_NOT_SERVED),
        ({TaskField.MODEL: "gpt-4"}, None),  # an original agent's model name: answered anyway
        (
            {
                TaskField.PROTOCOL: 2,
                TaskField.KIND: "embed",
                TaskField.INPUTS: ["x"],
                TaskField.MODEL: "echo",
            },
            ErrorCode.CAPABILITY_NOT_SERVED,
        ),
        ({TaskField.PROTOCOL: 2, TaskField.N: 2}, ErrorCode.CAPABILITY_NOT_SERVED),
    ],
)
def test_cannot_serve(extra: dict[str, Any], code: ErrorCode | None) -> None:
    engine = ChatOnly()
    why = cannot_serve(engine, {TaskField.ID: "t", TaskField.PROMPT: "p", **extra}, "w")
    assert (why[0] if why else None) is code
