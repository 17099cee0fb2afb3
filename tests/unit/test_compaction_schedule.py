"""The compaction schedule shared by the market's rooms and the agents' replicas
(igora.market.compaction.CompactionSchedule), driven with a fake pass."""

from __future__ import annotations

import asyncio

from igora.market.compaction import CompactionSchedule

LONG = 60.0  # a quiet period no test waits for


class FakePass:
    """Records each pass (the count of tasks left when it began), optionally blocks until
    released, and returns ``marks`` in turn (whether the pass marked tasks)."""

    def __init__(self, marks: list[bool] | None = None, block: bool = False) -> None:
        self.schedule: CompactionSchedule | None = None
        self.marks = marks or []
        self.block = block
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.passes: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.cancelled = False

    async def __call__(self) -> bool:
        self.passes.append(self.schedule.left if self.schedule else -1)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            if self.block:
                await self.release.wait()
                self.release.clear()
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.running -= 1
        return self.marks.pop(0) if self.marks else False


def schedule_with(fake: FakePass, every: int, quiet: float) -> CompactionSchedule:
    schedule = CompactionSchedule(every, fake, quiet=quiet)
    fake.schedule = schedule
    return schedule


async def settle(schedule: CompactionSchedule) -> None:
    """Wait (bounded) until the schedule has nothing more to do."""
    task = schedule._task
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), 5)


async def test_a_pass_starts_as_soon_as_every_tasks_have_left() -> None:
    fake = FakePass()
    schedule = schedule_with(fake, every=10, quiet=LONG)
    schedule.task_left(9)
    for _ in range(5):
        await asyncio.sleep(0)
    assert fake.passes == []  # fewer than ``every``, the flow has not paused
    schedule.task_left(1)
    await asyncio.wait_for(fake.started.wait(), 5)  # not after the quiet period
    assert fake.passes == [0]  # the count restarts when the pass begins
    assert schedule.left == 0
    schedule.cancel()


async def test_tasks_left_during_a_pass_count_for_the_next_one() -> None:
    fake = FakePass(block=True)
    schedule = schedule_with(fake, every=10, quiet=LONG)
    schedule.task_left(10)
    await asyncio.wait_for(fake.started.wait(), 5)
    fake.started.clear()
    schedule.task_left(25)  # due again while the first pass runs: no second pass now
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(fake.passes) == 1
    assert fake.most_at_once == 1
    fake.release.set()
    await asyncio.wait_for(fake.started.wait(), 5)  # the next one follows at once
    assert len(fake.passes) == 2
    assert fake.most_at_once == 1
    assert schedule.left == 0
    schedule.cancel()


async def test_a_pause_in_the_flow_brings_a_marking_pass_then_a_collecting_one() -> None:
    fake = FakePass(marks=[True, False])
    schedule = schedule_with(fake, every=1000, quiet=0.05)
    schedule.task_left(3)
    await settle(schedule)
    # The first quiet pass marked tasks: a second one collected them, then nothing more.
    assert len(fake.passes) == 2
    assert schedule._task is not None and schedule._task.done()
    schedule.task_left(1)  # tasks leave again: the schedule starts again
    await settle(schedule)
    assert len(fake.passes) == 3


async def test_no_quiet_pass_while_tasks_keep_leaving() -> None:
    fake = FakePass()
    schedule = schedule_with(fake, every=1000, quiet=0.2)
    for _ in range(8):  # a task every 0.05 s: never 0.2 s without one
        schedule.task_left(1)
        await asyncio.sleep(0.05)
    assert fake.passes == []
    await settle(schedule)
    assert len(fake.passes) == 1


async def test_nothing_is_scheduled_when_never_compacting_or_when_nothing_left() -> None:
    fake = FakePass()
    schedule = schedule_with(fake, every=0, quiet=0.01)
    schedule.task_left(5)  # every = 0: never
    schedule = schedule_with(fake, every=10, quiet=0.01)
    schedule.task_left(0)
    assert schedule._task is None
    await asyncio.sleep(0.05)
    assert fake.passes == []


async def test_cancel_ends_the_pass_under_way_and_the_schedule() -> None:
    fake = FakePass(block=True)
    schedule = schedule_with(fake, every=5, quiet=0.01)
    schedule.task_left(5)
    await asyncio.wait_for(fake.started.wait(), 5)
    task = schedule._task
    schedule.cancel()
    assert task is not None
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
    assert fake.cancelled and task.cancelled()
    await asyncio.sleep(0.05)
    assert len(fake.passes) == 1


async def test_a_pass_that_stops_the_schedule_is_the_last() -> None:
    fake = FakePass(block=True, marks=[True])
    schedule = schedule_with(fake, every=5, quiet=0.01)
    schedule.task_left(5)
    await asyncio.wait_for(fake.started.wait(), 5)
    schedule.task_left(50)  # due again, and tasks are marked: would compact again
    schedule.stop()  # what a pass does when it failed
    fake.release.set()
    await settle(schedule)
    assert len(fake.passes) == 1
    schedule.task_left(50)
    await asyncio.sleep(0.05)
    assert len(fake.passes) == 1
