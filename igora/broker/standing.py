"""Priority by standing (docs/credits.md §4): richer askers first, poorer ones still served.

A pure policy: the v3 broker (``igora.v3.broker``) reads each asker's balance ``bucket``
from the market's ``standing`` document and calls ``order`` and ``may_queue``.

Each waiting task gets a **class**: its asker's bucket (a power-of-two class of its
balance, so the document does not publish balances exactly) plus one per ``AGEING``
seconds it has waited. Higher classes go first; within a class, today's fair order
(``fairness.Fairness``: fewest running, fewest served lately, round robin) decides, so
askers of equal standing share as before. Whole classes rather than ``bucket + waited ÷
AGEING`` as a real number: with a real number the oldest task would always win between
equals, and one asker's long queue would again starve a newcomer's single task.

The bound this gives: a task is passed only by tasks that arrived less than ``AGEING ×
(d + 1)`` seconds after it, ``d`` being how many buckets richer their asker is. A poor
asker's task waits behind a richer one's for at most that long (plus the service of what
was already queued), however many tasks the richer one sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..credits.pricing import MILLI
from ..protocol import TaskField, number
from .fairness import Fairness

AGEING = 10.0
"""Seconds of waiting that count as one bucket of balance."""
MAX_BUCKET = 32
DEFAULT_POOR_CONCURRENCY = 1
"""Tasks an asker at or below zero may have waiting or running at a time."""


def bucket(balance: int) -> int:
    """The standing class of a balance in millicredits: 0 at or below zero, then one
    class per power of two of whole credits (below 1 credit: 1; 1: 2; 100: 8)."""
    if balance <= 0:
        return 0
    return min(MAX_BUCKET, (balance // MILLI).bit_length() + 1)


def standing(balances: Mapping[str, int]) -> dict[str, int]:
    """The ``standing`` document the market publishes: asker id -> bucket."""
    return {asker: bucket(amount) for asker, amount in balances.items()}


def may_queue(balance: int, active: int, limit: int = DEFAULT_POOR_CONCURRENCY) -> bool:
    """Whether an asker with ``active`` tasks waiting or running may add one: anyone
    with credits may; an asker at or below zero only under ``--poor-concurrency``."""
    return balance > 0 or active < limit


def task_class(task: dict[str, Any], buckets: Mapping[str, int], now: float, ageing: float) -> int:
    """A waiting task's class at ``now`` (ms epoch, as task dates)."""
    asker = str(task.get(TaskField.ASKER) or "")
    date = number(task.get(TaskField.DATE))
    waited = 0.0 if date is None else max(0.0, now - date) / 1000
    return buckets.get(asker, 0) + int(waited // ageing)


def order(
    waiting: Iterable[dict[str, Any]],
    buckets: Mapping[str, int],
    now: float,
    fairness: Fairness | None = None,
    in_flight: dict[str, int] | None = None,
    ageing: float = AGEING,
) -> list[dict[str, Any]]:
    """``waiting`` in the order the broker should serve it: by class, highest first,
    and within a class in the fair order of ``fairness``."""
    fair = (fairness or Fairness()).order(waiting, in_flight)
    return sorted(fair, key=lambda t: -task_class(t, buckets, now, ageing))
