"""Waiting and stopping without losing a cancellation (igora.aio), without processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from igora.aio import stop_task, within

log = logging.getLogger("test.aio")


async def test_a_cancellation_landing_as_the_result_comes_is_not_lost() -> None:
    """The result and the cancellation in the same turn: the caller is cancelled (with
    ``asyncio.wait_for`` before Python 3.12 it got the result and went on)."""
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    went_on: list[str] = []

    async def caller() -> None:
        went_on.append(await within(answer, 10))

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)  # the caller waits for the answer
    answer.set_result("frame")
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done and task.cancelled() and went_on == []


async def test_within_gives_the_result_or_times_out_and_cancels_what_it_waited_for() -> None:
    assert await within(asyncio.sleep(0, "soon"), 5) == "soon"
    slow = asyncio.get_running_loop().create_future()
    with pytest.raises(asyncio.TimeoutError):
        await within(slow, 0.05)
    assert slow.cancelled()


async def test_a_task_that_goes_on_after_a_cancellation_is_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cancellations = 0

    async def stubborn() -> None:
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 2:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    caplog.set_level(logging.WARNING, "test.aio")
    assert await stop_task(task, "stubborn", log, patience=0.1)
    assert task.cancelled() and cancellations == 2
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "stubborn still runs 0.1 s after it was cancelled; cancelling it again (2 of 3)"


async def test_a_task_that_never_stops_is_given_up_after_the_last_try_and_said_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()

    async def deaf() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # deaf to it
                await asyncio.sleep(10)

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    caplog.set_level(logging.WARNING, "test.aio")
    assert not await stop_task(task, "deaf", log, patience=0.05, tries=2)
    assert not task.done()
    assert caplog.records[-1].levelno == logging.ERROR
    assert caplog.records[-1].getMessage() == (
        "deaf did not stop after 2 cancellations, 0.05 s each; left running"
    )
    stop.set()
    task.cancel()  # wakes it from its sleep: it sees stop and ends
    await asyncio.wait({task}, timeout=5)
    assert task.done()


async def test_a_task_ending_with_an_error_while_stopped_has_it_consumed() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("while closing") from None

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    assert await stop_task(task, "failing", log)
    assert isinstance(task.exception(), RuntimeError)
