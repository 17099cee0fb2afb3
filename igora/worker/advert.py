"""What a worker says of itself in its awareness state, and when it says it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..agent import Agent
from ..protocol import AgentField, AgentState

WORKING_WITHIN = 0.1  # seconds: "working" (all slots taken) is advertised within this
ADVERT_INTERVAL = 0.5  # seconds: a change of the running count alone is advertised within this


class Advertiser:
    """Publishes the advert ``make`` builds (``state``, ``slots``, ``running``...)."""

    def __init__(self, agent: Agent, make: Callable[[], dict[str, Any]]) -> None:
        self.agent = agent
        self.make = make
        self._said: dict[str, Any] = {}
        self._due: asyncio.TimerHandle | None = None
        self._dirty_since: float | None = None  # loop time of the first change not said yet

    def publish(self) -> None:
        """Say the advert now."""
        self._cancel()
        self._said = self.make()
        self.agent.set_state(**self._said)

    def changed(self) -> None:
        """A task started or ended: say so, not always at once. Each awareness update is
        relayed to every agent of the room and read by each, and a short task would cost
        two (``working``, then ``ready`` again) on top of its own document updates. So
        ``ready`` again (a slot freed after ``working`` was said) is said at once;
        ``working`` within WORKING_WITHIN, not at all if a slot frees before; a change of
        the running count alone within ADVERT_INTERVAL."""
        advert = self.make()
        said = self._said
        if advert == said:
            self._cancel()
            return
        loop = asyncio.get_running_loop()
        if self._dirty_since is None:
            self._dirty_since = loop.time()
        if advert[AgentField.STATE] != said.get(AgentField.STATE) or advert[
            AgentField.SLOTS
        ] != said.get(AgentField.SLOTS):
            if advert[AgentField.STATE] == AgentState.READY.value:
                self.publish()
                return
            when = min(loop.time() + WORKING_WITHIN, self._dirty_since + ADVERT_INTERVAL)
        else:
            when = self._dirty_since + ADVERT_INTERVAL
        if self._due is None or self._due.when() != when:
            if self._due is not None:
                self._due.cancel()
            self._due = loop.call_at(when, self.publish)

    def _cancel(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
        self._dirty_since = None
