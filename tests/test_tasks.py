"""Tasks end to end through real market, broker and worker processes."""

from __future__ import annotations

import pytest

from igora import Client, NoWorkerError, SyncClient, TaskFailed
from igora.protocol import MapName
from igora.testing import wait_for

from .conftest import Cluster


async def test_prompt_is_answered_by_the_echo_worker(echo_market: Cluster) -> None:
    async with Client(echo_market.url) as client:
        assert await client.chat("bonjour le marché") == "Echo: bonjour le marché"


async def test_stream_yields_pieces_that_add_up_to_the_answer(echo_market: Cluster) -> None:
    async with Client(echo_market.url) as client:
        pieces = [p async for p in await client.chat("#repeat 50", stream=True)]
    assert len(pieces) >= 1
    assert "".join(pieces) == "".join(f"tok{i} " for i in range(50))


async def test_finished_task_leaves_done_once_read(echo_market: Cluster) -> None:
    async with Client(echo_market.url) as client:
        task = await client.submit("one two")
        answer = await task.result()
        assert answer.text == "Echo: one two"
        assert answer.finish_reason == "stop"
        await wait_for(
            lambda: task.id not in client.agent.maps[MapName.DONE], 10, "the task leaves done"
        )


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(echo_market: Cluster) -> None:
    async with Client(echo_market.url) as client:
        answer = await (await client.submit("#repeat 30", max_tokens=5)).result()
    assert answer.text == "tok0 tok1 tok2 tok3 tok4 "
    assert answer.finish_reason == "length"
    assert answer.usage["completionTokens"] == 5


async def test_unknown_model_raises_no_worker_error(echo_market: Cluster) -> None:
    async with Client(echo_market.url) as client:
        with pytest.raises(NoWorkerError) as err:
            await client.chat("hi", model="gpt-17", wait_worker=0.2)
    assert "echo" in str(err.value)


async def test_engine_error_ends_the_task_failed_and_worker_keeps_serving(
    echo_market: Cluster,
) -> None:
    async with Client(echo_market.url) as client:
        with pytest.raises(TaskFailed, match="asked to fail"):
            await client.chat("please #fail")
        assert await client.chat("still there") == "Echo: still there"


def test_sync_client_streams(echo_market: Cluster) -> None:
    with SyncClient(echo_market.url) as client:
        assert "".join(client.chat("a b c", stream=True)) == "Echo: a b c"
        assert client.models() == ["echo"]
