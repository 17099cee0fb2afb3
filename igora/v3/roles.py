"""``igora broker`` and ``igora worker`` in a v3 room: each agent with the identity of its
data folder (``IGORA_DATA``), on one ``Session`` (``igora.roles`` chooses these when the
market accepts the ``igora.3`` subprotocol, the v2 roles otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from ..config import MarketAddress
from ..engines.base import Engine
from ..identity import Identity, load_identity
from ..protocol import AgentType
from .broker import V3Broker
from .session import Event, EventKind, Session
from .worker import V3Worker

log = logging.getLogger("igora.roles")

BROKER_SETTINGS = ("claim_timeout", "max_attempts")
"""The v2 broker's settings the v3 broker takes; the others (grace, retention...) have no
v3 meaning yet and are ignored."""


async def _session(
    address: MarketAddress, type: AgentType, name: str, heartbeat: float
) -> tuple[Identity, Session]:
    """The started session of a role, as the identity of its data folder."""
    identity, _ = load_identity()
    session = Session(
        address,
        identity,
        name=name,
        state={"type": type.value, "name": name},
        heartbeat=heartbeat,
        invite=address.invite,
    )
    await session.start()
    return identity, session


async def _while_admitted(session: Session, role: Coroutine[Any, Any, None]) -> None:
    """Run ``role`` while ``session`` lives. A session that gives up (the market refused
    it: banned, no longer a member, an advert it will not list, a changed market key)
    ends the role with that error, which the command prints: a process that stayed up
    with nothing to serve would hide it."""
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def seen(event: Event) -> None:
        if event.kind is EventKind.FAILED and not failed.done():
            failed.set_result(None)

    stop = session.observe(seen)
    running = asyncio.ensure_future(role)
    try:
        await asyncio.wait({running, failed}, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            running.result()
        elif session.error is not None:
            raise session.error
    finally:
        stop()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def run_broker(
    address: MarketAddress, *, name: str, heartbeat: float, **settings: Any
) -> int:
    identity, session = await _session(address, AgentType.BROKER, name, heartbeat)
    broker = V3Broker(session, **{k: v for k, v in settings.items() if k in BROKER_SETTINGS})
    log.info("%s (%s) brokering the v3 room %s", name, identity.id[:8], address.room_url)
    try:
        await _while_admitted(session, broker.run())
    finally:
        await session.stop()
    return 0


async def serve_worker(
    address: MarketAddress,
    engine: Engine,
    *,
    name: str,
    slots: int,
    max_tokens: int,
    heartbeat: float,
) -> None:
    identity, session = await _session(address, AgentType.WORKER, name, heartbeat)
    worker = V3Worker(session, identity, engine, name=name, slots=slots, max_tokens=max_tokens)
    log.info(
        "%s (%s) serving %s with %s, %d slot(s), in the v3 room %s",
        name,
        identity.id[:8],
        ", ".join(m.name for m in engine.models()),
        engine.kind,
        slots,
        address.room_url,
    )
    try:
        await _while_admitted(session, worker.run())
    finally:
        with contextlib.suppress(Exception):
            await session.stop()
