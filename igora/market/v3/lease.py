"""The broker lease of a v3 room (docs/security.md §5): one holder, an epoch, a queue.

A connection whose ids may be a broker asks with ``CONTROL {"op": "lease"}``. The first
gets it (epoch + 1); the others wait in line, in the order they asked. When the holder's
socket closes (or the market closes it for silence, §6 of protocol-v3.md), the lease
goes to the first waiting connection still open, with the next epoch. The market is
the arbiter: there is never a second connection allowed to write ``in/*`` and
``board``.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Lease(Generic[T]):
    """Who holds a room's broker lease, at which epoch, and who waits for it."""

    def __init__(self, epoch: int = 0) -> None:
        self.holder: T | None = None
        self.epoch = epoch  # of the current or last holder; the next grant is epoch + 1
        self.waiting: list[T] = []

    def request(self, peer: T) -> bool:
        """``peer`` asks for the lease: True if it holds it now (or held it already);
        False: it waits in line."""
        if self.holder is peer:
            return True
        if self.holder is None:
            self._grant(peer)
            return True
        if peer not in self.waiting:
            self.waiting.append(peer)
        return False

    def _grant(self, peer: T) -> None:
        self.holder = peer
        self.epoch += 1

    def release(self, peer: T, hand_over: bool = True) -> T | None:
        """``peer`` is gone: it leaves the line, and if it held the lease, the next in
        line gets it (unless not ``hand_over``: a room shared by replicas takes the next
        epoch in Redis first, then calls ``give``). The new holder, if the lease moved."""
        if peer in self.waiting:
            self.waiting.remove(peer)
        if self.holder is not peer:
            return None
        self.holder = None
        if self.waiting and hand_over:
            self._grant(self.waiting.pop(0))
        return self.holder

    def give(self, epoch: int) -> T | None:
        """The lease, taken at ``epoch`` elsewhere (Redis), goes to the first in line."""
        self.epoch = max(self.epoch, epoch)
        if self.holder is None and self.waiting:
            self.holder = self.waiting.pop(0)
        return self.holder
