"""Who is still here: agents seen in awareness recently.

An agent counts as present while it was seen (fresh awareness state), or first
mentioned by a task, less than ``grace`` seconds ago. The clock starts again whenever
this agent (re)connects, so a market restart or a network blip on our side does not make
everyone look gone; it also starts again after this agent was paused (see
``Broker._resettle``).
"""

from __future__ import annotations

import time

from ..agent import BACKOFF_MAX, Agent
from ..protocol import AgentType, Peer

DEFAULT_GRACE = 8.0
# After reconnecting, the others may still be in their reconnect backoff (up to
# BACKOFF_MAX, +20 % jitter, e.g. all of them after a market restart): their grace starts
# only once that has passed.
RECONNECT_ALLOWANCE = BACKOFF_MAX * 1.2 + 1.0


class Presence:
    def __init__(self, agent: Agent, grace: float = DEFAULT_GRACE) -> None:
        self.agent = agent
        self.grace = grace
        self.last_seen: dict[str, float] = {}
        self.peers: list[Peer] = []
        self.version = 0  # counts the refreshes of ``peers``
        self.clock_start = time.monotonic()
        self.first_connected_at: float | None = None

    def refresh(self) -> None:
        now = time.monotonic()
        if self.first_connected_at is None and self.agent.connected:
            self.first_connected_at = self.agent.connected_at
        self.peers = self.agent.peers()
        self.version += 1
        for peer in self.peers:
            if peer.id:
                self.last_seen[peer.id] = now
        if len(self.last_seen) > 10_000:  # forget agents long gone
            old = now - 100 * self.grace
            self.last_seen = {k: v for k, v in self.last_seen.items() if v > old}

    def present(self, agent_id: object) -> bool:
        if not isinstance(agent_id, str):
            return False
        if agent_id == self.agent.id:
            return True
        if agent_id not in self.last_seen:
            # First mention (e.g. a new asker's task): its awareness may still be on the
            # way (the market relays awareness in batches), so its grace starts now.
            self.last_seen[agent_id] = time.monotonic()
        since = max(self.last_seen[agent_id], self.clock_start, self.agent.connected_at)
        if self.agent.connected_at != self.first_connected_at:
            since = max(since, self.agent.connected_at + RECONNECT_ALLOWANCE)
        return time.monotonic() - since < self.grace

    def settled(self) -> bool:
        """Whether this agent has been connected long enough to have heard every agent
        present: one grace after its first connection, and after a reconnection once the
        others' reconnect backoff has passed too."""
        if not self.agent.connected:
            return False
        since = max(self.agent.connected_at, self.clock_start)
        if self.agent.connected_at != self.first_connected_at:
            since = self.agent.connected_at + RECONNECT_ALLOWANCE
        return time.monotonic() - since >= self.grace

    def restart_clock(self) -> None:
        """Give everyone a new grace from now (after this agent was paused)."""
        self.clock_start = time.monotonic()

    def of_type(self, kind: AgentType) -> list[Peer]:
        return [p for p in self.peers if p.type == kind.value]
