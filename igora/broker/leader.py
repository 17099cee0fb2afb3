"""One active broker per room.

Every broker advertises ``since`` (its start time) and ``leader``. A broker takes the
lead only once it has been synced for ``settle`` seconds (so that it has heard of the
brokers already there), and only while no other present broker says it leads; when none
does, the one with the smallest ``(since, id)`` takes it. Two leaders (started at the
same moment) resolve by the same order: the later one steps down. An active broker keeps
the role until it goes: when its socket closes the next one takes over at its next round;
when it falls silent, after 3 missed heartbeats. A broker that finds it was paused steps
down and settles again (``Broker._resettle``), so it never competes with its successor.
"""

from __future__ import annotations

import time
from typing import Any

from ..agent import Agent
from ..protocol import AgentField, AgentType
from .presence import Presence

DEFAULT_SETTLE = 1.0


class Leadership:
    def __init__(self, agent: Agent, presence: Presence, settle: float = DEFAULT_SETTLE) -> None:
        self.agent = agent
        self.presence = presence
        self.settle = settle
        self.leading = False
        self._settle_from = 0.0

    def _rank(self, state: dict[str, Any]) -> tuple[float, str]:
        since = state.get(AgentField.SINCE)
        since = float(since) if isinstance(since, (int, float)) else float("inf")
        return since, str(state.get(AgentField.ID))

    def decide(self) -> bool:
        """Return whether this broker is the active one now (and advertise it)."""
        me = self._rank(self.agent.local_state)
        since = max(self.agent.connected_at, self._settle_from)
        settled = (time.monotonic() - since) >= self.settle and self.agent.synced.is_set()
        brokers = self.presence.of_type(AgentType.BROKER)
        leaders = [self._rank(p.state) for p in brokers if p.state.get(AgentField.LEADER) is True]
        if not settled:
            leading = False
        elif leaders:  # never take over from an active broker; of two leaders, the first
            leading = self.leading and all(me < o for o in leaders)
        else:
            leading = self.leading or all(me < self._rank(p.state) for p in brokers)
        self._set(leading)
        return leading

    def step_down(self) -> None:
        """Stop acting at once and wait one settle time before taking the lead again."""
        self._settle_from = time.monotonic()
        self._set(False)

    def _set(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            self.agent.log.info(
                "%s %s the active broker", self.agent.name, "is now" if leading else "is no longer"
            )
            self.agent.set_state(**{AgentField.LEADER: leading})
