"""What a long-running broker and worker remember about past tasks costs the same memory
after 20,000 tasks as after the first (docs/faults.md "Agents that run for months")."""

from __future__ import annotations

import sys

import pytest

from igora.broker import fairness
from igora.broker.fairness import Fairness
from igora.worker.moves import Ended


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(fairness.time, "monotonic", c)
    return c


def test_fairness_counts_the_last_window_and_forgets_askers_gone(clock: Clock) -> None:
    f = Fairness(window=60)
    for _ in range(5):
        f.record({"asker": "A"})
    clock.now += 30
    f.record({"asker": "A"})
    f.record({"asker": "B"})
    assert (f.recent("A"), f.recent("B"), f.recent("C")) == (6, 1, 0)
    clock.now += 40  # the first five are more than a window old
    assert (f.recent("A"), f.recent("B")) == (1, 1)
    clock.now += 61
    f.record({"asker": "C"})  # a window since the last sweep: A and B are forgotten
    assert sorted(f._served) == ["C"]


def test_fairness_memory_does_not_grow_with_the_rate(clock: Clock) -> None:
    f = Fairness(window=60)
    for _ in range(100):  # one asker served for a whole window: every step counted
        f.record({"asker": "A"})
        clock.now += 0.6
    before = sys.getallocatedblocks()
    for _ in range(20_000):  # 500 tasks/s for 40 s
        f.record({"asker": "A"})
        clock.now += 0.002
    assert f.recent("A") > 20_000
    assert sys.getallocatedblocks() - before < 500


def test_ended_remembers_the_last_ids_in_a_fixed_ring() -> None:
    ended = Ended(3)
    for tid in ("a", "b", "c", "d"):
        ended.add(tid)
    assert [t in ended for t in ("a", "b", "c", "d", "e")] == [False, True, True, True, False]
    ended = Ended()
    before = sys.getallocatedblocks()
    for i in range(20_000):
        ended.add(f"task-{i:012d}")
    assert f"task-{19_999:012d}" in ended and f"task-{0:012d}" not in ended
    assert sys.getallocatedblocks() - before < 100
