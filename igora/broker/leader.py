"""One active broker per room.

Every broker advertises ``since`` (its start time); the active one is the present broker
with the smallest ``(since, id)``. A broker only claims the role once it has been synced
for ``settle`` seconds, so that it has heard of the brokers already there. When the
active broker goes (socket closed: at once; silent: after 3 missed heartbeats) the next
one takes over at its next round.
"""

from __future__ import annotations

import time

from ..agent import Agent
from ..protocol import A, AgentType
from .presence import Presence

DEFAULT_SETTLE = 1.0


class Leadership:
    def __init__(self, agent: Agent, presence: Presence, settle: float = DEFAULT_SETTLE) -> None:
        self.agent = agent
        self.presence = presence
        self.settle = settle
        self.leading = False

    def _rank(self, state: dict) -> tuple[float, str]:
        since = state.get(A.SINCE)
        since = float(since) if isinstance(since, (int, float)) else float("inf")
        return since, str(state.get(A.ID))

    def decide(self) -> bool:
        """Return whether this broker is the active one now (and advertise it)."""
        me = self._rank(self.agent.local_state)
        settled = (time.monotonic() - self.agent.connected_at) >= self.settle
        others = [self._rank(p.state) for p in self.presence.of_type(AgentType.BROKER)]
        leading = settled and self.agent.synced.is_set() and all(me < o for o in others)
        if leading != self.leading:
            self.leading = leading
            self.agent.log.info("%s %s the active broker", self.agent.name,
                                "is now" if leading else "is no longer")
            self.agent.set_state(**{A.LEADER: leading})
        return leading
