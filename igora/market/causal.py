"""Causal order for a room: an update reaches the document only once everything it
builds on is there.

Why: yrs keeps an update that refers to clocks the document lacks as *pending* structs and
a pending delete set, and retries them after every later update. Pending structs that
overlap (two updates claiming the same clocks of a client beyond what the document has)
crash the process: a segmentation fault inside ``apply_update``, found by
``tests/fuzz.py --chain`` after some thousands of updates into one room. Honest peers
never claim the same clocks twice with different content, but a hostile one can, and a
segmentation fault cannot be caught.

So the market never lets yrs hold anything pending: it keeps the state vector of the
room's document itself (every update it applies starts at or below it), and an update
whose structs start past it, or whose items refer to (origin, parent) or delete clocks
the document will not have, waits here until the updates it needs have been applied (in
the order they come), as yrs would have made it wait. Waiting updates are bounded
(``MAX_WAITING`` updates, ``MAX_WAITING_BYTES``): past that the sender of a new one is
disconnected. An update with Skip structs (a merge of updates with gaps between them:
Igora's agents and Yjs's providers never send one) is refused outright.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from ..updates import Parsed, state_vector

MAX_WAITING = 256
MAX_WAITING_BYTES = 1024 * 1024
"""Per room. Honest updates wait rarely and briefly (an agent's live write racing its own
sync after a reconnection): these bounds are for a hostile sender."""

T = TypeVar("T")


class CausalGate(Generic[T]):
    """The state vector of one document, and the updates waiting for their causes.

    ``T`` is whatever the room keeps with a waiting update (its sender, its bytes)."""

    def __init__(self, state: bytes) -> None:
        self.state: dict[int, int] = {}
        self.waiting: list[tuple[Parsed, T, int]] = []
        self.waiting_bytes = 0
        self.reset(state)

    def reset(self, state: bytes) -> None:
        """The document was replaced (reloaded, compacted): take its state vector."""
        self.state = state_vector(state)

    def ready(self, parsed: Parsed) -> bool:
        """Whether the document has everything the update builds on."""
        state = self.state
        for client, (first, _) in parsed.clocks.items():
            if first > state.get(client, 0):
                return False
        for client, end in parsed.needs.items():
            have = state.get(client, 0)
            if client in parsed.clocks:
                have = max(have, parsed.clocks[client][1])
            if end > have:
                return False
        return True

    def splits_a_character(self, parsed: Parsed) -> bool:
        """Whether the update overlaps the document's clocks of a client up to the middle
        of one of its characters (a surrogate pair). yrs keeps the part past its state,
        cut between the two halves, and then encodes that half as an empty string: the
        room's state no longer decodes (found by ``tests/fuzz.py``). Honest re-sends
        overlap at the end of a transaction, never inside a character."""
        return any(self.state.get(client, 0) in halves for client, halves in parsed.halves.items())

    def applied(self, parsed: Parsed) -> None:
        """The update is in the document now."""
        for client, (_, end) in parsed.clocks.items():
            if end > self.state.get(client, 0):
                self.state[client] = end

    def wait(self, parsed: Parsed, item: T, size: int) -> bool:
        """Keep an update that is not ready; False if too many wait already."""
        if len(self.waiting) >= MAX_WAITING or self.waiting_bytes + size > MAX_WAITING_BYTES:
            return False
        self.waiting.append((parsed, item, size))
        self.waiting_bytes += size
        return True

    def released(self) -> Iterator[tuple[Parsed, T]]:
        """The waiting updates that became ready, oldest first; the caller applies each
        (and calls ``applied``) before asking for the next."""
        progress = True
        while progress:
            progress = False
            for i, (parsed, item, size) in enumerate(self.waiting):
                if self.ready(parsed):
                    del self.waiting[i]
                    self.waiting_bytes -= size
                    progress = True
                    yield parsed, item
                    break
