"""Who is still here: agents seen in awareness recently.

An agent counts as present while it was seen (fresh awareness state) less than
``grace`` seconds ago. The clock starts again whenever this agent (re)connects, so a
market restart or a network blip on our side does not make everyone look gone.
"""

from __future__ import annotations

import time

from ..agent import Agent
from ..protocol import AgentType, Peer

DEFAULT_GRACE = 8.0


class Presence:
    def __init__(self, agent: Agent, grace: float = DEFAULT_GRACE) -> None:
        self.agent = agent
        self.grace = grace
        self.last_seen: dict[str, float] = {}
        self.peers: list[Peer] = []

    def refresh(self) -> None:
        now = time.monotonic()
        self.peers = self.agent.peers()
        for peer in self.peers:
            if peer.id:
                self.last_seen[peer.id] = now

    def present(self, agent_id: object) -> bool:
        if not isinstance(agent_id, str):
            return False
        if agent_id == self.agent.id:
            return True
        since = max(self.last_seen.get(agent_id, 0.0), self.agent.connected_at)
        return time.monotonic() - since < self.grace

    def of_type(self, kind: AgentType) -> list[Peer]:
        return [p for p in self.peers if p.type == kind.value]
