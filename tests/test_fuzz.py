"""Hostile updates (issue 20): the fuzzer's cases, every crash it ever found, and a room
that stays joinable and keeps answering honest tasks after them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import sys

import pytest
from pycrdt import Doc, Map
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from igora import Client
from igora.market.app import Market
from igora.market.frames import BadFrame, check_frame
from igora.market.room import MarketRoom
from igora.protocol import MapName
from igora.updates import Parsed, check_update

from . import fuzz
from .conftest import ROOT, Cluster
from .faults import observer

pytestmark = pytest.mark.timeout(180)

ISSUE_FRAME = dict(fuzz.corpus())["issue-20-block-store-60.hex"][0]


@pytest.mark.parametrize("chain", [False, True], ids=["fresh-room", "one-room"])
def test_thousands_of_fuzz_cases_find_no_frame_that_passes_the_checks_and_crashes(
    chain: bool,
) -> None:
    # A bound in time too, on a slow machine.
    run = fuzz.fuzz(10_000 if chain else 20_000, seed=20, seconds=12, chain=chain)
    assert run.cases > 1000 and 0 < run.refused < run.cases
    assert run.crashes == [], [[f.hex() for f in c] for c in run.crashes]


def test_every_crash_ever_found_is_a_crash_for_pycrdt_and_none_for_the_market() -> None:
    cases = fuzz.corpus()
    assert len(cases) > 10 and any(len(frames) > 1 for _, frames in cases)
    base, _ = fuzz.seeds()
    for name, frames in cases:
        if name.startswith("segv-"):  # it would kill this process: in a child
            code = (
                "import sys; from tests import fuzz; "
                "fuzz.replay(fuzz.seeds()[0], fuzz.corpus_entry(sys.argv[1]), raw=True)"
            )
            child = subprocess.run(
                [sys.executable, "-c", code, name],
                cwd=ROOT,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert child.returncode == -signal.SIGSEGV, f"{name} is no crash"
        else:
            assert not fuzz.replay(base, frames, raw=True), f"{name} is no crash"
        assert fuzz.replay(base, frames, raw=False), f"{name} crashes the market's room"
    with pytest.raises(BadFrame, match="refused update"):
        check_frame(ISSUE_FRAME)


async def test_an_update_that_makes_pycrdt_panic_leaves_the_room_intact() -> None:
    # Straight to the room, past the frame checks: the last line of defence.
    market = Market(None)
    async with market.server:
        room = await market.server.get_room("r")
        writer = Doc()
        todos = writer.get("todos", type=Map)
        todos["a"] = {"id": "a"}
        assert receive(room, writer.get_update()) is None
        await room.history.flush()  # "a" in the store, "b" pending
        todos["b"] = {"id": "b"}
        assert receive(room, writer.get_update()) is None
        update = fuzz.carried(ISSUE_FRAME)
        assert update is not None
        anything = Parsed([], b"", 0, {}, {}, False, {})  # what the checks would refuse
        refusal = room.receive(None, update, anything)
        assert refusal is not None and "panic" in refusal and "reloaded" in refusal
        newcomer = Doc()
        newcomer.apply_update(room.ydoc.get_update())  # what the issue's frame broke
        assert newcomer.get("todos", type=Map).to_py() == {"a": {"id": "a"}, "b": {"id": "b"}}
        todos["c"] = {"id": "c"}  # the room goes on
        assert receive(room, writer.get_update()) is None
        assert set(room.ydoc.get("todos", type=Map).keys()) == {"a", "b", "c"}


def receive(room: MarketRoom, update: bytes) -> str | None:
    return room.receive(None, update, check_update(update))


async def _send(url: str, frame: bytes) -> None:
    with contextlib.suppress(ConnectionClosed, OSError):
        async with connect(url, max_size=None, open_timeout=10) as ws:
            await ws.send(frame)
            with contextlib.suppress(asyncio.TimeoutError):
                while True:  # until the market closes it, or answers nothing more
                    await asyncio.wait_for(ws.recv(), 0.2)


async def test_issue_frame_corpus_and_fuzz_frames_leave_the_room_joinable(
    echo_market: Cluster,
) -> None:
    market = echo_market.procs[0]
    url = f"{echo_market.url}/market"
    async with Client(echo_market.url) as client:
        assert await client.chat("before", timeout=30) == "Echo: before"
    await _send(url, ISSUE_FRAME)
    assert "refused update: a clock past what Yjs can represent" in market.log()
    mutants = (
        data if is_frame else fuzz.create_update_message(data)
        for data, is_frame in fuzz.cases(seed=7)
    )
    frames = [f for _, fs in fuzz.corpus() for f in fs] + list(itertools.islice(mutants, 300))
    for frame in frames:
        await _send(url, frame)
    assert market.alive()
    async with observer(echo_market, "newcomer") as newcomer:  # joins and syncs
        assert newcomer.synced.is_set()
    async with Client(echo_market.url) as client:
        assert await client.chat("after the fuzz", timeout=30) == "Echo: after the fuzz"
    assert "Traceback" not in market.log() and "panic" not in market.log()


async def test_an_agent_drops_a_bad_relayed_update_with_one_line_and_resyncs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A market that relays the issue's frame to whoever joins (first connection only).
    from websockets.asyncio.server import serve

    from igora.agent import Agent
    from igora.config import market_address

    joins: list[int] = []
    state = Doc()
    state.get("todos", type=Map)["t"] = {"id": "t"}

    async def relay(ws) -> None:  # type: ignore[no-untyped-def]
        joins.append(1)
        step2 = bytes([0, 1]) + fuzz.create_update_message(state.get_update())[2:]
        await ws.send(step2)
        if len(joins) == 1:
            await ws.send(ISSUE_FRAME)
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    async with serve(relay, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        address = market_address(f"ws://127.0.0.1:{port}", "market")
        async with Agent(address, type="client", name="victim", style="normal") as agent:
            for _ in range(100):
                if len(joins) >= 2 and agent.connected:
                    break
                await asyncio.sleep(0.05)
            assert len(joins) >= 2, "the agent did not reconnect"
            assert agent.maps[MapName.TODOS].to_py() == {"t": {"id": "t"}}
            Doc().apply_update(agent.doc.get_update())  # its document is whole
    dropped = [r for r in caplog.records if "dropped a sync message" in r.getMessage()]
    assert len(dropped) == 1 and "clock past" in dropped[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]
