"""A room of the market: its document, who receives what, and who speaks for whom.

``MarketRoom`` is a pycrdt-websocket ``YRoom`` whose document is loaded from, and
written to, the store (``persistence.RoomHistory``) and compacted now and then
(``compactor.RoomCompactor``). What it changes in ``YRoom``:
- updates reach the document through ``receive``, in causal order (``causal``); one
  pycrdt panics on all the same makes the room rebuild its document from its history;
- its fan-out (``fanout``): one outbox per connection, the sender of an update skipped,
  awareness relayed in batches;
- awareness ownership: the states a connection brought into the room are removed, and
  the removal broadcast, when its socket closes, so the others notice a dead agent at once;
- with replicas (``replicas``), its ``link``: what its connections bring goes to the other
  replicas, what theirs bring comes in as if from a connection of no one here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from pycrdt import (
    Doc,
    Map,
    MapEvent,
    Subscription,
    TransactionEvent,
    create_update_message,
    read_message,
)
from pycrdt.websocket import YRoom

from ..protocol import FINAL_VALUES, KANBAN, MapName
from ..updates import Parsed, is_panic
from .causal import MAX_WAITING, CausalGate
from .channel import MarketChannel
from .compactor import RoomCompactor
from .fanout import AwarenessRelay, Outbox
from .frames import AwarenessEntry, EncodedStates, removal_message
from .limits import DEFAULT_COMPACT_EVERY
from .persistence import RoomHistory, replay
from .store import Store
from .summary import room_summary

if TYPE_CHECKING:
    from .replicas import RoomLink

log = logging.getLogger("igora.market")

_background: set[asyncio.Task[Any]] = set()


class _Elsewhere:
    """The sender of awareness that came from another replica: none of the connections
    here, so all of them receive it."""

    @property
    def outbox(self) -> Outbox:
        raise RuntimeError("awareness from another replica has no outbox here")


REMOTE = _Elsewhere()


def background(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` without awaiting it, keeping a reference until it ends (asyncio only
    keeps weak ones, so an unreferenced task may vanish mid-way)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


class MarketRoom(YRoom):
    """A room whose document is loaded from, and written to, the store."""

    clients: set[MarketChannel]  # type: ignore[assignment]  # only ours join

    def __init__(
        self,
        name: str,
        store: Store,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        *,
        writing: bool = True,
    ) -> None:
        self.name = name
        self.store = store
        self.link: RoomLink | None = None  # set while the room is shared with replicas
        self.history = RoomHistory(name, store, lambda: self.ydoc.get_update(), writing)
        doc = self.history.load()
        self.gate: CausalGate[tuple[MarketChannel | None, bytes]] = CausalGate(doc.get_state())
        super().__init__(ready=True, ydoc=doc, log=logging.getLogger("igora.market.room"))
        self.on_message_error = self._message_error
        self.compactor = RoomCompactor(
            name, compact_every, lambda: self.ydoc, self.swap, self.history
        )
        self._observe(doc)
        self.holders = 0  # connections using the room (including ones still joining)
        self.idle_since = 0.0
        self.sender: MarketChannel | None = None
        self._fan_out_sub: Subscription | None = None  # set once the room has started
        self.controllers: dict[int, MarketChannel] = {}  # awareness client id -> its socket
        self.encoded_states = EncodedStates()  # for the snapshots sent to who joins
        self._awareness_relay = AwarenessRelay(lambda: self.clients)
        # What this replica's connections say, batched the same way for the others.
        self._to_replicas = AwarenessRelay(lambda: [] if self.link is None else [self.link])

    # ------------------------------------------------------------------ updates in
    def receive(self, channel: MarketChannel | None, update: bytes, parsed: Parsed) -> str | None:
        """Take an update a connection sent (checked by ``frames.check_frame``); return
        why it is refused, if it is. An update whose causes the document lacks waits for
        them (``igora.market.causal``)."""
        if not self.gate.ready(parsed):
            if not self.gate.wait(parsed, (channel, update), len(update)):
                return f"{MAX_WAITING} updates wait already for updates that never came"
            return None
        refusal = self._apply(channel, update, parsed)
        for ready, (sender, waited) in self.gate.released():
            late = self._apply(sender, waited, ready)
            if late is not None and sender is not None and not sender.closed:
                background(sender.reject(late))
        return refusal

    def _apply(self, channel: MarketChannel | None, update: bytes, parsed: Parsed) -> str | None:
        """Apply an update; return why it is refused, if it is.

        Should pycrdt panic on it all the same, the document it broke is replaced by one
        rebuilt from the room's history (stored, being stored and pending: every update
        the room applied), and the update is dropped. Applying a copy first would cost a
        copy of the room per update; a panic costs one reload."""
        if update == b"\x00\x00":  # an empty update (y-websocket sends them)
            return None
        if self.gate.splits_a_character(parsed):
            return "refused update: it overlaps the room's clocks up to half a character"
        self.sender = channel  # the fan-out skips it
        try:
            self.ydoc.apply_update(update)
        except Exception as exc:  # any error of the decoder
            return f"bad update ({type(exc).__name__}: {exc})"
        except BaseException as exc:
            if not is_panic(exc):
                raise
            self.swap(replay(self.name, self.history.history()))
            if self.link is not None:  # the store may lag behind Redis: read it all again
                self.link.reload()
            return f"update made pycrdt panic ({exc}); room {self.name} reloaded"
        finally:
            self.sender = None
        self.gate.applied(parsed)
        return None

    async def _message_error(self, exc: Exception, message: bytes, channel: Any) -> bool:
        """YRoom's hook for an error while it handles a message (a sync step 1)."""
        reject = getattr(channel, "reject", None)
        if reject is not None:
            await reject(f"bad update ({type(exc).__name__}: {exc})")
        else:
            log.warning("%s: bad message: %s", getattr(channel, "peer", "?"), exc)
        return True

    # ------------------------------------------------------------------ the document
    def _observe(self, doc: Doc[Any]) -> None:
        for m in KANBAN:
            doc.get(m.value, type=Map)
        doc.get(MapName.STREAMS.value, type=Map)
        self._store_sub = doc.observe(lambda event: self.history.updated(event.update))
        # Keep the Map (and its subscription): pycrdt drops the observer of a
        # temporary Map wrapper when it is garbage collected.
        self._done_map: Map[Any] = doc.get(MapName.DONE.value, type=Map)
        self._done_sub = self._done_map.observe(self._on_done)

    def swap(self, doc: Doc[Any]) -> None:
        """Replace the room's document (reloaded after a panic, or compacted), moving
        every subscription to the new one."""
        old = self.ydoc
        old.unobserve(self._store_sub)
        self._done_map.unobserve(self._done_sub)
        self.ydoc = doc
        self.gate.reset(doc.get_state())
        self._observe(doc)
        if self._fan_out_sub is not None:  # else _watch_ready observes it when it starts
            old.unobserve(self._fan_out_sub)
            self._fan_out_sub = doc.observe(self._fan_out)

    def _on_done(self, event: MapEvent) -> None:
        left = 0
        for key, change in event.keys.items():  # type: ignore[attr-defined]  # in __slots__
            action = change.get("action")
            if action == "delete":
                left += 1
                continue
            value = change.get("newValue")
            if (
                action in ("add", "update")
                and isinstance(value, dict)
                and value.get("state") in FINAL_VALUES
            ):
                self.history.finished({**value, "id": value.get("id", key)})
        if left:
            self.compactor.task_left(left)

    async def stop(self) -> None:
        self.compactor.cancel()
        self._to_replicas.cancel()
        await super().stop()
        if self._fan_out_sub is not None:
            self.ydoc.unobserve(self._fan_out_sub)
            self._fan_out_sub = None

    # ------------------------------------------------------------------ fan-out
    async def _watch_ready(self) -> None:
        # Private in YRoom, overridden: there is no public hook for how updates go out.
        await self.ready_event.wait()
        self._fan_out_sub = self.ydoc.observe(self._fan_out)
        self.ydoc_observed.set()

    async def _broadcast_updates(self) -> None:
        # Private in YRoom, overridden: its task per message and receiver is replaced by
        # _fan_out, which sends as updates are applied (fanout.py).
        return None

    def _fan_out(self, event: TransactionEvent) -> None:
        # Awareness received before this update goes out before it: agents rely on the
        # order (a worker says "busy" before it hands a task back).
        self._awareness_relay.flush()
        if self.sender is not None and self.link is not None:
            self._to_replicas.flush()  # in the same order for the other replicas
            self.link.publish_update(event.update)
        message = create_update_message(event.update)
        for client in self.clients:
            if client is not self.sender:
                client.outbox.put(message)

    def relay_awareness(
        self, channel: MarketChannel, message: bytes, entries: list[AwarenessEntry]
    ) -> None:
        """Forward an awareness update (``entries``: what ``check_frame`` read of it) to
        everyone (its sender too, as a keep-alive, unless it says goodbye: its one state
        removed) and apply it to the room's view."""
        leaving = len(entries) == 1 and entries[0][2] is None
        self._awareness_relay.add(channel, message, leaving)  # batched: fanout.py
        self.awareness.apply_awareness_update(read_message(message[1:]), self)
        if self.link is not None:
            self._to_replicas.add(channel, message, leaving)

    def relay_remote_awareness(self, message: bytes, payload: bytes) -> None:
        """Forward an awareness message of another replica's agents to everyone here."""
        self._awareness_relay.add(REMOTE, message, False)
        self.awareness.apply_awareness_update(payload, self)

    # ------------------------------------------------------------------ awareness ownership
    def claim(self, channel: MarketChannel, entries: list[AwarenessEntry]) -> None:
        """Record which connection speaks for which awareness client id: the ids it brought
        into the room. A y-websocket client also re-broadcasts the states of others: that
        must not make it their speaker, or its leaving would remove them. (An agent whose
        old socket the market has not yet seen close does not take its id over: when that
        socket closes, the agent hears its state removed and announces it again.)"""
        for client_id, _clock, state in entries:
            holder = self.controllers.get(client_id)
            if state is None:
                if holder is channel:
                    del self.controllers[client_id]
                    channel.controlled.discard(client_id)
            elif holder is None:
                self.controllers[client_id] = channel
                channel.controlled.add(client_id)

    def forget(self, channel: MarketChannel, peer: str) -> None:
        """Remove the awareness states a closed connection spoke for and tell everyone."""
        for c in channel.controlled:
            if self.controllers.get(c) is channel:
                del self.controllers[c]
        gone = list(channel.controlled)
        channel.controlled = set()
        removed = self.remove_states(gone, publish=True)
        if removed:
            log.info("room %s: %s left (%d awareness state(s) removed)", self.name, peer, removed)

    def remove_states(self, ids: list[int], publish: bool = False) -> int:
        """Remove these awareness states (those present), tell everyone here (and the
        other replicas, if ``publish``); return how many were removed."""
        aw = self.awareness
        gone = [c for c in ids if c in aw.states]
        if not gone:
            return 0
        message = removal_message((c, int(aw.meta.get(c, {}).get("clock", 0))) for c in gone)
        aw.remove_awareness_states(gone, "disconnect")
        for c in gone:
            aw.meta.pop(c, None)  # a returning client may reuse its clock
        self._awareness_relay.flush()  # what came before the removal goes before it
        for client in self.clients:  # into each outbox: no task per connection
            client.outbox.put(message)
        if publish and self.link is not None:
            self._to_replicas.flush()
            self.link.publish_awareness(message)
        return len(gone)

    def summary(self) -> dict[str, Any]:
        out = room_summary(
            self.name,
            self.ydoc,
            self.awareness,
            connections=len(self.clients),
            archived=self.store.archive_count(self.name),
            compactions=self.compactor.compactions,
        )
        if self.link is not None:  # whether this replica holds the room's persister lease
            out["stored_here"] = self.link.persister
        return out
