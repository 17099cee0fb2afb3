"""Real Igora processes on 127.0.0.1, for tests and benchmarks, and condition polling.

``Cluster`` starts ``python -m igora`` roles (market or replicas of one, brokers, workers,
gateways) on free ports, each logging to a file of its folder, and stops them all (also at
interpreter exit); ``RedisServer`` runs the Redis that replicas share.
The test suite (tests/conftest.py) and the benchmarks (bench/common.py) share it; it lives
in the package, not in tests/, so that ``python -m bench`` needs only igora installed (no
pytest), and so that an application can test itself against a real local market.

Waits poll a condition with a deadline (``wait_until``, ``wait_for``); they never assert on
timing, and a timeout says what was awaited, with the processes' logs when there are some.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar, overload

from .aio import within
from .identity import load_identity
from .net import wait_http as _answers
from .v3 import view
from .v3.session import Session

T = TypeVar("T")
Text = str | Callable[[], str]


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; macOS uses 49152-65535


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) can be taken by any
    outgoing connection's local end before the server we start binds it; with dozens of
    agents connecting during a test run, that happened. Ports below the range are only
    taken by servers, and the ports handed out by this process are never handed out again.
    """
    low, _ = _ephemeral_ports()
    top = low - 1 if low > 11024 else 65535
    bottom = max(1024, top - 10000) if low > 11024 else 50000
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(bottom, top)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # every try was taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed_out(timeout: float, what: Text, cluster: Cluster | None) -> AssertionError:
    text = what() if callable(what) else what
    logs = ("\n" + cluster.logs()) if cluster is not None else ""
    return AssertionError(f"not within {timeout:g} s: {text}{logs}")


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: Text,
    cluster: Cluster | None = None,
    every: float = 0.05,
) -> T:
    """Call ``check`` until it gives something truthy and return that; after ``timeout``
    s, fail with ``what`` (a text, or a function giving one) and the logs of ``cluster``."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise _timed_out(timeout, what, cluster)
        time.sleep(every)


@overload
async def wait_for(
    cond: Callable[[], Awaitable[T | None]],
    timeout: float,
    what: Text,
    cluster: Cluster | None = None,
    every: float = 0.05,
) -> T: ...
@overload
async def wait_for(
    cond: Callable[[], T | None],
    timeout: float,
    what: Text,
    cluster: Cluster | None = None,
    every: float = 0.05,
) -> T: ...
async def wait_for(
    cond: Callable[[], T | Awaitable[T | None] | None],
    timeout: float,
    what: Text,
    cluster: Cluster | None = None,
    every: float = 0.05,
) -> T:
    """``wait_until`` for a coroutine: ``cond`` may be plain or async, and the loop runs
    between two calls."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise _timed_out(timeout, what, cluster)
        await asyncio.sleep(every)


async def bounded(
    awaitable: Awaitable[T], timeout: float, what: Text, cluster: Cluster | None = None
) -> T:
    """``await awaitable``; after ``timeout`` s, cancel it and fail with ``what`` and the
    logs of ``cluster``, rather than leave the suite's limit to end a hang (a timeout of
    its own, raised before, is its own)."""
    end = time.monotonic() + timeout
    try:
        return await within(awaitable, timeout)
    except asyncio.TimeoutError:
        if time.monotonic() < end:
            raise
        raise _timed_out(timeout, what, cluster) from None


class Proc:
    """One ``python -m <module> ...`` child process, in its own session, logging to a file."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, module: str = "igora"
    ) -> None:
        self.args = args
        self.log_path = log
        self._log: IO[bytes] = open(log, "ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.p = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(log.parent),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def poll(self) -> int | None:
        return self.p.poll()

    @property
    def returncode(self) -> int | None:
        return self.p.returncode

    def alive(self) -> bool:
        return self.p.poll() is None

    def send(self, sig: int) -> None:
        """Send ``sig`` to the process and its children."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, sig)

    def kill(self, sig: int = signal.SIGKILL, wait: float = 10) -> None:
        """Send ``sig``, then wait up to ``wait`` s for the end (SIGKILL after that)."""
        self.send(sig)
        self._reap(wait)

    def stop(self, signalled: bool = False) -> None:
        """SIGTERM (unless ``signalled`` already), wait for the end, close the log."""
        if not signalled:
            self.send(signal.SIGTERM)
        self._reap(10)
        self._log.close()

    def _reap(self, wait: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(wait)
        if self.alive():
            self.send(signal.SIGKILL)
            self.p.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


_LIVE: set[Cluster] = set()


@atexit.register
def _stop_all() -> None:
    """Whatever ends the interpreter, the processes it started end too (they run in their
    own sessions, so a signal to the parent does not reach them)."""
    for cluster in list(_LIVE):
        cluster.stop()


class Cluster:
    """The processes of one test or benchmark, logging under ``folder``; ``stop`` ends them.

    ``log_level`` is given to every role (the market logs at debug level otherwise);
    ``heartbeat`` and ``grace`` (s) to brokers and workers when not None: short ones let a
    test see a departure in seconds, a benchmark keeps the roles' defaults. ``env`` is added
    to every child's environment."""

    def __init__(
        self,
        folder: Path,
        *,
        log_level: str | None = None,
        heartbeat: float | None = 1.0,
        grace: float | None = 3.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = folder
        self.data = folder / "data"
        self.port = free_port()
        self.ports = [self.port]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.log_level = log_level
        self.heartbeat = heartbeat
        self.grace = grace
        self.env = env or {}
        self._n = 0

    @property
    def tmp(self) -> Path:
        return self.dir

    def spawn(
        self, *args: str, name: str, env: dict[str, str] | None = None, module: str = "igora"
    ) -> Proc:
        self._n += 1
        proc = Proc(
            list(args), self.dir / f"{self._n:02d}-{name}.log", {**self.env, **(env or {})}, module
        )
        self.procs.append(proc)
        _LIVE.add(self)
        return proc

    def _role(self, heartbeat: bool = True, grace: bool = False) -> list[str]:
        out = [] if self.log_level is None else ["--log-level", self.log_level]
        if heartbeat and self.heartbeat is not None:
            out += ["--heartbeat", f"{self.heartbeat:g}"]
        if grace and self.grace is not None:
            out += ["--grace", f"{self.grace:g}"]
        return out

    def replicas(self, redis: str, n: int, *extra: str) -> list[Proc]:
        """``n`` markets sharing their rooms through ``redis``, on free ports, once each
        answers HTTP; ``self.url`` lists them all (so roles started next spread over
        them) and ``self.ports`` holds their ports. They share the store folder."""
        ports = [free_port() for _ in range(n)]
        procs = []
        for i, port in enumerate(ports):
            procs.append(
                self.spawn(
                    "market",
                    "--port",
                    str(port),
                    "--data",
                    str(self.data),
                    "--redis",
                    redis,
                    "--log-level",
                    self.log_level or "debug",
                    *extra,
                    name=f"replica{i}",
                )
            )
        for port, p in zip(ports, procs, strict=True):
            wait_http(f"http://127.0.0.1:{port}/", 30, p)
        self.ports = ports
        self.port = ports[0]
        self.url = ",".join(f"ws://127.0.0.1:{port}" for port in ports)
        return procs

    def market(self, *extra: str, memory: bool = False) -> Proc:
        """The market, on ``self.port``, once it answers HTTP; ``memory``: no store."""
        store = ["--memory"] if memory else ["--data", str(self.data)]
        p = self.spawn(
            "market",
            "--port",
            str(self.port),
            *store,
            "--log-level",
            self.log_level or "debug",
            *extra,
            name="market",
        )
        wait_http(f"http://127.0.0.1:{self.port}/", 30, p)
        return p

    def agent_data(self, name: str) -> dict[str, str]:
        """The environment that gives an agent its own data folder, hence its own
        identity (``IGORA_DATA``): ``DIR/data-NAME``. What a v3 room needs of each agent."""
        return {"IGORA_DATA": str(self.dir / f"data-{name}")}

    def broker(self, *extra: str, name: str = "broker", data: bool = False) -> Proc:
        """``data``: its own data folder (``agent_data``), else the default one."""
        return self.spawn(
            "broker",
            "--market",
            self.url,
            "--name",
            name,
            *self._role(grace=True),
            *extra,
            name=name,
            env=self.agent_data(name) if data else None,
        )

    def worker(
        self, *extra: str, name: str = "worker", engine: str = "echo", data: bool = False
    ) -> Proc:
        """``data``: its own data folder (``agent_data``), else the default one."""
        return self.spawn(
            "worker",
            "--market",
            self.url,
            "--name",
            name,
            "--engine",
            engine,
            *self._role(),
            *extra,
            name=name,
            env=self.agent_data(name) if data else None,
        )

    def gateway(
        self, *extra: str, name: str = "gateway", timeout: float = 60, data: bool = False
    ) -> tuple[Proc, str]:
        """A gateway on a free port of 127.0.0.1, once it answers ``/health``; and its
        base URL (``http://127.0.0.1:PORT``). ``data``: its own data folder."""
        port = free_port()
        env = self.agent_data(name) if data else None
        proc = self.spawn(
            "gateway", "--market", self.url, "--port", str(port), *extra, name=name, env=env
        )
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", timeout, proc)
        return proc, base

    def status(self, port: int | None = None) -> dict[str, Any]:
        """The market's ``/status`` (of the replica on ``port``, if given)."""
        url = f"http://127.0.0.1:{port or self.port}/status"
        with urllib.request.urlopen(url, timeout=10) as r:
            status: dict[str, Any] = json.loads(r.read())
        return status

    def compactions(self, room: str = "market") -> int:
        """How many times the market compacted the room (0 if it is not in memory)."""
        rooms = self.status()["rooms"]
        return next((int(r["compactions"]) for r in rooms if r["name"] == room), 0)

    def agents(self, type: str | None = None) -> list[dict[str, Any]]:
        """The awareness states of the market's rooms, of one type of agent if given; with
        replicas, of every replica that answers (a replica shows a room only once one of
        its own agents joined it), each agent once."""
        seen: dict[tuple[str, Any], dict[str, Any]] = {}
        for port in self.ports:
            try:
                rooms = self.status(port)["rooms"]
            except OSError:  # a replica a test killed
                continue
            for room in rooms:
                listed = room.get("agents")
                if listed is None:  # a market that admits members only: ask as the market
                    listed = self._view_as_market(port, room["name"])["agents"]
                for a in listed:
                    if type is None or a.get("type") == type:
                        seen.setdefault((room["name"], a.get("id")), a)
        return list(seen.values())

    def _view_as_market(self, port: int, room: str) -> dict[str, Any]:
        """A v3 room's view, asked over a connection proving the market's own identity
        (always a member): what a market that admits members only keeps out of
        ``/status`` (docs/security.md §5). Run in a thread of its own, so that a caller
        inside an event loop may wait for it too."""
        identity, _ = load_identity(self.data)

        async def ask() -> dict[str, Any]:
            url = f"ws://127.0.0.1:{port}/{room}"
            async with Session(url, identity, data=self.dir, name="test-view") as s:
                return await view.ask(s)

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, ask()).result()

    def _found(self, type: str, n: int, ready: bool) -> list[dict[str, Any]] | None:
        found = [a for a in self.agents(type) if not ready or a.get("state") != "busy"]
        return found if len(found) >= n else None

    def wait_agents(
        self, type: str, n: int, timeout: float = 60, ready: bool = True
    ) -> list[dict[str, Any]]:
        """At least ``n`` agents of ``type`` on the market (not busy, if ``ready``)."""
        return wait_until(
            lambda: self._found(type, n, ready),
            timeout,
            f"{n} {type}(s) on the market",
            self,
            every=0.1,
        )

    async def wait_agents_async(
        self, type: str, n: int, timeout: float = 60, ready: bool = True
    ) -> list[dict[str, Any]]:
        """``wait_agents`` without blocking the loop."""
        return await wait_for(
            lambda: asyncio.to_thread(self._found, type, n, ready),
            timeout,
            f"{n} {type}(s) on the market",
            self,
            every=0.1,
        )

    def logs(self, tail: int = 40) -> str:
        """The last ``tail`` lines of every process's log."""
        out = []
        for p in self.procs:
            lines = p.log().splitlines()[-tail:]
            out.append(f"--- {p.log_path.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM to every process at once, then wait for each (SIGKILL after 10 s)."""
        for p in reversed(self.procs):
            p.send(signal.SIGTERM)
        for p in reversed(self.procs):
            p.stop(signalled=True)
        self.procs.clear()
        _LIVE.discard(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A ``redis-server`` of its own on a free port of 127.0.0.1, without persistence and
    writing nothing outside ``folder``; ``restart`` brings it back empty (what a crash of
    a Redis without persistence does), on the same port."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.p: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 10) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.dir / "redis.log", "ab")
        self.p = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "yes",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(self.dir),
            start_new_session=True,
        )
        wait_until(self._pong, timeout, f"redis-server answering on port {self.port}")
        return self

    def _pong(self) -> bool:
        if self.p is not None and self.p.poll() is not None:
            raise AssertionError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.p = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, down: float = 0.0) -> None:
        """Kill it (SIGKILL: its data is gone), wait ``down`` s, start it again."""
        self.stop(signal.SIGKILL)
        time.sleep(down)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(url: str, timeout: float, proc: Proc | None = None) -> None:
    """Wait until ``url`` answers; fail at once if ``proc`` exits meanwhile."""
    if _answers(url, timeout, [proc.p] if proc is not None else []):
        return
    if proc is not None and not proc.alive():
        raise AssertionError(f"process exited early ({proc.log_path}):\n{proc.log()[-4000:]}")
    raise AssertionError(f"{url} did not answer within {timeout:g} s")
