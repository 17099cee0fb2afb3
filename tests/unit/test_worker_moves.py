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
from igora.protocol import ABORTED_MARK, LIVE, ErrorCode, F, MapName, State
from igora.worker.fit import cannot_serve
from igora.worker.moves import Moves


@pytest.fixture
def moves() -> Moves:
    agent = Agent(market_address("ws://127.0.0.1:9"), type="worker", name="w", style="text")
    return Moves(agent)


def assigned(moves: Moves, tid: str = "t", **extra: Any) -> dict[str, Any]:
    task = {
        F.ID: tid,
        F.PROMPT: "p",
        F.STATE: State.PREPARED.value,
        F.WORKER: moves.agent.id,
        F.ATTEMPTS: 1,
        F.START: 1,
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
    moves.end_running("t", doing[F.STREAM], lambda t: finish(t, 5, "answer"))
    assert where(moves) == [MapName.DONE] and "t#1" not in moves.agent.maps[MapName.STREAMS]
    assert moves.agent.maps[MapName.DONE]["t"][F.RESPONSE] == "answer"
    assert "t" in moves.ended


def test_a_task_taken_away_is_not_ended(moves: Moves) -> None:
    doing = moves.start("t", assigned(moves), 1)
    with moves.agent.transaction():  # the broker re-queued it
        moves.agent.maps[MapName.DOING].pop("t")
        moves.agent.maps[MapName.TODOS]["t"] = requeue(doing).task
    moves.end_running("t", doing[F.STREAM], lambda t: finish(t, 5, "late"))
    assert where(moves) == [MapName.TODOS]


def test_ending_removes_every_other_entry(moves: Moves) -> None:
    doing = moves.start("t", assigned(moves), 1)
    with moves.agent.transaction():  # a write that raced with the start
        moves.agent.maps[MapName.TODOS]["t"] = {F.ID: "t", F.PROMPT: "p"}
    moves.end_running("t", doing[F.STREAM], lambda t: finish(t, 5, "answer"))
    assert where(moves) == [MapName.DONE]


def test_strays(moves: Moves) -> None:
    me = moves.agent.id
    stray: dict[str, Any] = {F.ID: "s", F.PROMPT: "p", F.STATE: "doing", F.WORKER: me, F.START: 1}
    ghost = {**stray, F.ID: "g"}
    marked = {**stray, F.ID: "m", F.ABORTED: ABORTED_MARK}
    mine_running = {**stray, F.ID: "r"}
    with moves.agent.transaction():
        for t in (stray, ghost, marked, mine_running):
            moves.agent.maps[MapName.DOING][t[F.ID]] = t
        moves.agent.maps[MapName.DONE]["g"] = {F.ID: "g", F.STATE: State.DONE.value}
    moves.settle_strays({"r"})
    assert where(moves, "s") == [MapName.TODOS]
    assert F.WORKER not in moves.agent.maps[MapName.TODOS]["s"]
    assert where(moves, "g") == [MapName.DONE]  # the ghost dropped, its end kept
    assert moves.agent.maps[MapName.DONE]["m"][F.STATE] == State.ABORTED.value
    assert where(moves, "r") == [MapName.DOING]


class ChatOnly(EchoEngine):
    def models(self) -> list[ModelInfo]:
        return [ModelInfo("echo", 1_000, frozenset({Cap.CHAT}))]


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({}, None),
        ({F.MODEL: "echo"}, None),
        ({F.MODEL: "gpt-4", F.PROTOCOL: 2}, ErrorCode.MODEL_NOT_SERVED),
        ({F.MODEL: "gpt-4"}, None),  # an original agent's model name: answered anyway
        (
            {F.PROTOCOL: 2, F.KIND: "embed", F.INPUTS: ["x"], F.MODEL: "echo"},
            ErrorCode.CAPABILITY_NOT_SERVED,
        ),
        ({F.PROTOCOL: 2, F.N: 2}, ErrorCode.CAPABILITY_NOT_SERVED),
    ],
)
def test_cannot_serve(extra: dict[str, Any], code: ErrorCode | None) -> None:
    engine = ChatOnly()
    why = cannot_serve(engine, {F.ID: "t", F.PROMPT: "p", **extra}, "w")
    assert (why[0] if why else None) is code
