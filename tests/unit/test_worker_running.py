"""A running task's answer stream (igora.worker.running): what is written when."""

from __future__ import annotations

from igora.engines.base import Request
from igora.engines.echo import EchoEngine
from igora.worker.running import Pieces, Running, stream_chat


class Written(Pieces):
    """Pieces kept as each write gave them (``hold``: ``HOLD_LAST`` as a v3 run has it)."""

    def __init__(self, hold: bool) -> None:
        super().__init__()
        self.HOLD_LAST = hold
        self.writes: list[str] = []

    def _write(self, piece: str, now: float) -> None:
        self.writes.append(piece)


async def run(engine: EchoEngine, answer: Written, prompt: str) -> str | None:
    request = Request(messages=[{"role": "user", "content": prompt}])
    finish = await stream_chat(engine, Running("T" * 16, 1), {}, request, answer, 5.0)
    return None if finish is None else finish.reason


async def test_pieces_that_come_with_the_engine_s_end_are_held_for_it() -> None:
    # the echo engine gives its whole answer and its end at once: a v3 run writes
    # nothing before its end (the text goes in the final chunk, one update)
    held = Written(hold=True)
    assert await run(EchoEngine(), held, "hello there") == "stop"
    assert held.writes == [] and held.held == held.response == "Echo: hello there"
    # v2's stream writes them at once, as before (its done entry has the text too)
    written = Written(hold=False)
    assert await run(EchoEngine(), written, "hello there") == "stop"
    assert written.writes == ["Echo: hello there"] and written.held == ""


async def test_pieces_that_come_before_the_end_are_written_as_they_come() -> None:
    # 0.2 s between tokens (STREAM_INTERVAL is 0.025 s): the first pieces are written
    # before the end; only what came with the end is held
    answer = Written(hold=True)
    assert await run(EchoEngine(delay=0.2), answer, "one two") == "stop"
    assert answer.writes and answer.writes[0] == "Echo:"
    assert answer.held and "".join(answer.writes) + answer.held == "Echo: one two"
