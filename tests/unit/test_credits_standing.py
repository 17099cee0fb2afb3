"""Priority by standing (igora.broker.standing, docs/credits.md §4): the richer asker's
tasks start first, and the poorer one's still within a bounded wait."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igora.broker import standing
from igora.broker.fairness import fair_order
from igora.credits.pricing import MILLI

A = standing.AGEING


def task(tid: str, asker: str, date_s: float) -> dict[str, Any]:
    return {"id": tid, "asker": asker, "date": date_s * 1000}


@pytest.mark.parametrize(
    ("balance", "bucket"),
    [(-5_000, 0), (0, 0), (1, 1), (999, 1), (MILLI, 2), (3 * MILLI, 3), (100 * MILLI, 8)],
)
def test_buckets_are_power_of_two_classes_of_the_balance(balance: int, bucket: int) -> None:
    assert standing.bucket(balance) == bucket
    assert standing.standing({"a": balance}) == {"a": bucket}


def test_buckets_stop_at_the_top_class() -> None:
    assert standing.bucket(10**18) == standing.MAX_BUCKET


def test_an_asker_at_zero_may_have_only_poor_concurrency_tasks() -> None:
    assert standing.may_queue(0, 0) and not standing.may_queue(0, 1)
    assert standing.may_queue(-1, 1, limit=2) and standing.may_queue(1, 50)


def test_the_richer_asker_s_tasks_start_first() -> None:
    waiting = [task(f"p{i}", "poor", 0) for i in range(3)]
    waiting += [task(f"r{i}", "rich", 1) for i in range(3)]
    ordered = standing.order(waiting, {"rich": 8, "poor": 0}, now=2_000)
    assert [t["asker"] for t in ordered] == ["rich"] * 3 + ["poor"] * 3


def test_between_equals_today_s_fair_order_stays() -> None:
    """A newcomer's one task overtakes a long queue of the same standing, as today."""
    waiting = [task(f"q{i}", "queue", 0.1 * i) for i in range(10)] + [task("n", "new", 1)]
    ordered = standing.order(waiting, {"queue": 5, "new": 5}, now=2_000)
    assert ordered == list(fair_order(waiting))
    assert ordered[1]["id"] == "n"


def test_waiting_lifts_a_poor_task_one_class_per_ageing_period() -> None:
    poor = task("p", "poor", 0)
    rich = task("r", "rich", 10 * A)  # arrived 10 periods later, 9 buckets richer
    buckets = {"rich": 9, "poor": 0}
    assert standing.order([rich, poor], buckets, now=10 * A * 1000)[0] is poor
    early = task("r", "rich", 8 * A)  # 8 periods later, 9 buckets richer: it passes
    assert standing.order([early, poor], buckets, now=10 * A * 1000)[0] is early


@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 300_000)), min_size=2, max_size=30),
    st.fixed_dictionaries({k: st.integers(0, 12) for k in "abcd"}),
    st.integers(0, 100_000),
)
def test_a_task_is_passed_only_by_tasks_arriving_within_ageing_times_classes(
    arrivals: list[tuple[str, int]], buckets: dict[str, int], extra: int
) -> None:
    waiting = [{"id": f"t{i}", "asker": a, "date": d} for i, (a, d) in enumerate(arrivals)]
    now = max(d for _, d in arrivals) + extra
    ordered = standing.order(waiting, buckets, now)
    assert sorted(t["id"] for t in ordered) == sorted(t["id"] for t in waiting)
    for i, y in enumerate(ordered):
        for x in ordered[i + 1 :]:
            if x["asker"] == y["asker"]:
                assert x["date"] >= y["date"]  # one asker's tasks: oldest first
                continue
            lag = (y["date"] - x["date"]) / 1000
            assert lag < A * (buckets[y["asker"]] - buckets[x["asker"]] + 1)


def simulate(buckets: dict[str, int], ageing: float, until: float) -> dict[str, float]:
    """One slot serving a task per second; "rich" sends 3 tasks at once then one a
    second, "poor" one task at 0. When each task started."""
    arrivals = [task(f"r{i}", "rich", 0) for i in range(3)]
    arrivals += [task(f"r{i}", "rich", i - 2) for i in range(3, int(until))]
    arrivals.append(task("p", "poor", 0))
    started: dict[str, float] = {}
    t = 0.0
    while t < until:
        waiting = [x for x in arrivals if x["date"] <= t * 1000 and x["id"] not in started]
        if waiting:
            first = standing.order(waiting, buckets, t * 1000, ageing=ageing)[0]
            started[first["id"]] = t
        t += 1
    return started


def test_the_poorer_asker_is_served_within_ageing_times_classes() -> None:
    rich_bucket = standing.bucket(1_000 * MILLI)  # 11
    started = simulate({"rich": rich_bucket, "poor": 0}, A, until=400)
    first = sorted(started, key=started.__getitem__)
    assert first[:3] == ["r0", "r1", "r2"]  # the richer asker first
    assert started["p"] <= A * (rich_bucket + 1) + 3  # + what was queued before it
    # Without ageing the poor task would wait as long as the richer asker sends.
    assert "p" not in simulate({"rich": rich_bucket, "poor": 0}, float("inf"), until=400)
