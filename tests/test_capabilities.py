"""Capabilities: what a task needs, what each worker's model offers, where the broker
sends a task, and how fast a task that nobody can serve fails.

The pure parts are tested without processes; the rest on real processes: echo workers
(chat only) next to an OpenAI-upstream worker (every capability) over the stub upstream,
which records what it was sent.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from igora import Client, NoWorkerError
from igora.broker.matching import pick_worker
from igora.capabilities import Cap, fits, model_for, offered, required, unservable
from igora.protocol import (
    ErrorCode,
    MapName,
    Peer,
    ProtocolError,
    State,
    TaskField,
    new_task_id,
    now_ms,
    validate_task,
)

from .conftest import Cluster
from .faults import archived_async, observer, wait_for
from .upstream_stub import Stub

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _worker(cid: int, wid: str, models: list[dict[str, Any]], state: str = "ready") -> Peer:
    return Peer(
        cid,
        {
            "id": wid,
            "type": "worker",
            "style": "text",
            "state": state,
            "protocol": 2,
            "models": models,
            "slots": 2,
        },
    )


def _v2(**fields: Any) -> dict[str, Any]:
    return {"id": "t", "protocol": 2, "prompt": "x", **fields}


CHAT = _worker(1, "chat", [{"name": "m"}])  # advertised before capabilities: chat only
FULL = _worker(2, "full", [{"name": "m", "capabilities": [c.value for c in Cap]}])
EMBED_ONLY = _worker(3, "emb", [{"name": "e5", "capabilities": ["embed"]}])


# ---------------------------------------------------------------------- pure
@pytest.mark.parametrize(
    "task,needs",
    [
        (_v2(), {"chat"}),
        (_v2(tools=[TOOL]), {"chat", "tools"}),
        (_v2(tools=[TOOL], toolChoice="none"), {"chat"}),
        (_v2(responseFormat={"type": "json_object"}), {"chat", "json_object"}),
        (
            _v2(responseFormat={"type": "json_schema", "json_schema": {"schema": {}}}),
            {"chat", "json_schema"},
        ),
        (_v2(responseFormat={"type": "text"}), {"chat"}),
        (_v2(n=3, logprobs=True), {"chat", "n", "logprobs"}),
        (_v2(n=1), {"chat"}),
        ({"id": "t", "protocol": 2, "kind": "embed", "inputs": ["a"]}, {"embed"}),
    ],
)
def test_a_task_needs_what_its_fields_ask(task: dict[str, Any], needs: set[str]) -> None:
    validate_task(task)
    assert required(task) == needs


def test_what_a_worker_offers_per_model() -> None:
    assert offered(CHAT, "m") == {"chat"}
    assert offered(FULL, "m") >= {"tools", "embed", "json_schema"}
    assert offered(FULL, "other") == frozenset()
    original = Peer(4, {"id": "o", "type": "worker", "style": "text", "state": "ready"})
    assert offered(original, None) == {"chat"} and offered(original, "m") == frozenset()
    assert fits(EMBED_ONLY, None, {"embed"}) and not fits(EMBED_ONLY, None, {"chat", "tools"})


def test_broker_gives_a_task_only_to_a_worker_offering_what_it_needs() -> None:
    for _ in range(20):  # ties are broken at random: the chat-only worker must never win
        assert pick_worker(_v2(model="m", tools=[TOOL]), [CHAT, FULL], {}) is FULL
        assert pick_worker(_v2(n=2), [CHAT, FULL, EMBED_ONLY], {}) is FULL
    assert pick_worker(_v2(model="m", tools=[TOOL]), [CHAT, FULL], {"full": 2}) is None
    assert pick_worker(_v2(model="m"), [CHAT, FULL], {"full": 2}) is CHAT
    embed = {"id": "t", "protocol": 2, "kind": "embed", "inputs": ["a"]}
    assert pick_worker(embed, [CHAT, EMBED_ONLY], {}) is EMBED_ONLY


def test_unservable_names_the_missing_model_or_capability() -> None:
    why = unservable(_v2(model="gpt-4"), [CHAT, FULL])
    assert why is not None and why.code == ErrorCode.MODEL_NOT_SERVED and "gpt-4" in why.reason
    why = unservable(_v2(model="m", logprobs=True), [CHAT])
    assert why is not None and why.code == ErrorCode.CAPABILITY_NOT_SERVED
    assert why.missing == ("logprobs",)
    assert unservable(_v2(model="m", logprobs=True), [CHAT, FULL]) is None
    # Busy or full workers still count: the task waits for them.
    busy = _worker(5, "busy", [{"name": "m", "capabilities": ["chat", "tools"]}], "busy")
    assert unservable(_v2(model="m", tools=[TOOL]), [CHAT, busy]) is None


def test_an_original_task_naming_an_unserved_model_is_served_by_any_text_worker() -> None:
    original = {"id": "t", "prompt": "x", "model": "gpt-3.5-turbo"}
    assert model_for(original, [CHAT]) is None
    assert pick_worker(original, [CHAT], {}) is CHAT
    assert model_for({**original, "model": "m"}, [CHAT]) == "m"  # served: asked as it is
    assert model_for(_v2(model="gpt-3.5-turbo"), [CHAT]) == "gpt-3.5-turbo"
    assert pick_worker(_v2(model="gpt-3.5-turbo"), [CHAT], {}) is None


@pytest.mark.parametrize(
    "task,why",
    [
        (_v2(tools="f"), "tools must be a list"),
        (_v2(tools=[{"function": {}}]), "function.name"),
        (
            _v2(tools=[TOOL], toolChoice={"type": "function", "function": {"name": "g"}}),
            "not in tools",
        ),
        (_v2(toolChoice="sometimes"), "toolChoice"),
        (_v2(toolChoice="required"), "needs tools"),
        (_v2(responseFormat={"type": "yaml"}), "responseFormat.type"),
        (_v2(n=0), "n must be between"),
        (_v2(logprobs="yes"), "logprobs"),
        ({"id": "t", "protocol": 2, "kind": "embed"}, "inputs"),
        ({"id": "t", "protocol": 2, "kind": "embed", "inputs": [1]}, "inputs"),
        ({"id": "t", "protocol": 2, "kind": "draw", "prompt": "x"}, "unknown kind"),
        (
            _v2(messages=[{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]),
            "tool call",
        ),
    ],
)
def test_invalid_v2_fields_are_protocol_errors(task: dict[str, Any], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        validate_task(task)


# ---------------------------------------------------------------------- processes
@pytest.fixture
def mixed(cluster: Cluster) -> tuple[Cluster, Stub, dict[str, str]]:
    """Two echo workers (chat only) and an upstream worker, all serving model ``m``."""
    stub = Stub().start()
    cluster.market()
    cluster.broker()
    cluster.worker("--model", "m", "--slots", "4", name="echo-1")
    cluster.worker("--model", "m", "--slots", "4", name="echo-2")
    cluster.worker(
        "--engine",
        "openai",
        "--base-url",
        stub.url,
        "--model",
        "ok=m",
        name="upstream",
        engine="openai",
    )
    workers = {a["name"]: a["id"] for a in cluster.wait_agents("worker", 3)}
    yield cluster, stub, workers
    stub.stop()


async def test_a_worker_without_a_capability_never_receives_a_task_that_needs_it(
    mixed: tuple[Cluster, Stub, dict[str, str]],
) -> None:
    cluster, stub, workers = mixed
    async with Client(cluster.url) as client:
        tasks = [
            await client.submit(f"q{i}", model="m", tools=[TOOL], tool_choice="auto")
            for i in range(6)
        ]
        tasks += [
            await client.submit(f"j{i}", model="m", response_format={"type": "json_object"})
            for i in range(6)
        ]
        plain = [await client.submit(f"p{i}", model="m") for i in range(12)]
        answers = await asyncio.gather(*(t.result() for t in tasks))
        plain_answers = await asyncio.gather(*(t.result() for t in plain))
    assert {a.task[TaskField.WORKER] for a in answers} == {workers["upstream"]}
    assert len({a.task[TaskField.WORKER] for a in plain_answers}) >= 2  # chat goes anywhere
    # The upstream worker forwarded the fields as they were asked.
    sent = [r for r in stub.requests if r.get("tools")]
    assert len(sent) == 6 and all(r["tools"] == [TOOL] and r["tool_choice"] == "auto" for r in sent)
    assert sum(r.get("response_format") == {"type": "json_object"} for r in stub.requests) == 6


async def test_a_task_no_worker_can_serve_fails_within_seconds(echo_market: Cluster) -> None:
    async with Client(echo_market.url) as client:
        start = time.monotonic()
        with pytest.raises(NoWorkerError) as info:
            await client.chat("x", tools=[TOOL], wait_worker=1.0)
        assert info.value.missing == ("tools",) and "tools" in str(info.value)
        with pytest.raises(NoWorkerError, match="gpt-4"):
            await client.chat("x", model="gpt-4", wait_worker=1.0)
        with pytest.raises(NoWorkerError) as info:
            await client.chat("x", logprobs=True, n=2, wait_worker=1.0)
        assert info.value.missing == ("logprobs", "n")
        assert time.monotonic() - start < 15


async def test_broker_fails_at_once_a_v2_task_nobody_serves_with_a_typed_code(
    echo_market: Cluster,
) -> None:
    """A v2 agent that writes its task without looking at the market first."""
    agent = observer(echo_market)
    await agent.start()
    try:
        cases = {
            new_task_id(): ({TaskField.MODEL: "gpt-4"}, ErrorCode.MODEL_NOT_SERVED),
            new_task_id(): ({TaskField.N: 2}, ErrorCode.CAPABILITY_NOT_SERVED),
        }
        with agent.transaction():
            for tid, (fields, _code) in cases.items():
                agent.maps[MapName.TODOS][tid] = {
                    TaskField.ID: tid,
                    TaskField.PROTOCOL: 2,
                    TaskField.ASKER: agent.id,
                    TaskField.STYLE: "text",
                    TaskField.STATE: State.TODO.value,
                    TaskField.PROMPT: "x",
                    TaskField.DATE: now_ms(),
                    **fields,
                }
        start = time.monotonic()
        for tid, (_fields, code) in cases.items():
            final = await archived_async(echo_market, tid)
            assert final[TaskField.STATE] == State.FAILED.value
            assert final[TaskField.ERROR_CODE] == code.value, final
        assert time.monotonic() - start < 10
        await wait_for(lambda: len(agent.maps[MapName.TODOS]) == 0, 5, "todos empty")
    finally:
        await agent.stop()
