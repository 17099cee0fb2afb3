"""Peers used by the market tests: the original stack's node client, a Python agent,
raw websockets that speak (or mangle) the y-websocket protocol, and condition polling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pycrdt import Doc, Map

from igora.agent import Agent
from igora.config import market_address
from igora.testing import wait_for

JS = Path(__file__).resolve().parent / "js"


def ensure_node_modules() -> None:
    """Install the npm packages of tests/js (yjs, y-websocket, ws, openai) if they are
    missing."""
    if all((JS / "node_modules" / name).is_dir() for name in ("y-websocket", "ws", "openai")):
        return
    npm = shutil.which("npm")
    assert npm, "npm is needed by the wire tests: run scripts/test-tools.sh"
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS,
        check=True,
        timeout=600,
    )


async def until(check: Callable[[], Any], timeout: float, what: str | Callable[[], str]) -> Any:
    """``igora.testing.wait_for`` at a faster pace (20 ms), for in-process peers."""
    return await wait_for(check, timeout, what, every=0.02)


class NodePeer:
    """``node tests/js/peer.mjs``: a yjs + y-websocket client, driven through stdin/stdout."""

    def __init__(
        self, url: str, room: str, log: Path, name: str = "node-peer", silent: bool = False
    ) -> None:
        self.name = name
        self._stderr = open(log, "ab")
        self._events = open(log.with_suffix(".events"), "a")  # what it saw, for post-mortems
        self.p = subprocess.Popen(
            ["node", str(JS / "peer.mjs"), url, room, name, *(["--silent"] if silent else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.maps: dict[str, dict[str, Any]] = {}
        self.states: dict[int, dict[str, Any]] = {}
        self.client_id: int | None = None
        self.synced = 0
        self.status = "connecting"
        self.seen_states: list[dict[str, Any]] = []  # every remote state ever seen
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self._events.write(f"{time.time():.3f} {line}")
            self._events.flush()
            try:
                event = json.loads(line)
            except ValueError:
                continue
            ev = event.get("ev")
            if ev == "doc":
                self.maps = event["maps"]
            elif ev == "awareness":
                self.client_id = event["self"]
                self.states = {int(k): v for k, v in event["states"].items()}
                self.seen_states += [v for k, v in self.states.items() if int(k) != self.client_id]
            elif ev == "synced":
                self.synced += 1
            elif ev == "status":
                self.status = event["status"]

    def send(self, **command: Any) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(command) + "\n")
        self.p.stdin.flush()

    def set(self, map: str, key: str, value: Any) -> None:
        self.send(op="set", map=map, key=key, value=value)

    def aware(self, state: dict[str, Any] | None) -> None:
        self.send(op="aware", state=state)

    def others(self) -> list[dict[str, Any]]:
        return [s for c, s in self.states.items() if c != self.client_id and s]

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait(10)
        self._stderr.close()


def agent(url: str, room: str, name: str = "py-agent", heartbeat: float = 1.0) -> Agent:
    """A Python agent that retries at least every second (tests restart markets)."""
    return Agent(
        market_address(url, room),
        type="client",
        name=name,
        style="normal",
        heartbeat=heartbeat,
        backoff_max=1.0,
    )


def stored_maps(db: Path, room: str) -> dict[str, dict[str, Any]]:
    """The room's document as the market's SQLite store holds it right now."""
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT data FROM updates WHERE room=? ORDER BY rowid", (room,))
        updates = [bytes(r[0]) for r in rows]
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()
    doc: Doc[Any] = Doc()
    for u in updates:
        doc.apply_update(u)
    return {m: doc.get(m, type=Map).to_py() or {} for m in ("todos", "prepared", "doing", "done")}


def entry(a: Agent, map: str, key: str) -> Any:
    """One entry of one of the agent's maps (None if absent)."""
    from igora.protocol import MapName

    return a.maps[MapName(map)].get(key)


class TcpProxy:
    """A TCP relay to the market whose connections the test can cut (a network drop), and
    that can hold every byte for ``delay`` seconds each way (a distant peer)."""

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def deliver() -> None:
                while True:
                    due, data = await held.get()
                    await asyncio.sleep(due - loop.time())
                    if not data:
                        return
                    dst.write(data)
                    await dst.drain()

            sender = asyncio.ensure_future(deliver())
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    held.put_nowait((loop.time() + self.delay, data))
                held.put_nowait((loop.time() + self.delay, b""))
                await sender
            sender.cancel()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> int:
        """Reset every relayed connection at once; return how many were cut."""
        writers, self._writers = self._writers, set()
        for w in writers:
            w.transport.abort()
        return len(writers) // 2

    async def stop(self) -> None:
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
