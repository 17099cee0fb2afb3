"""``igora up``: a complete local market as one process tree.

Children: market, broker, worker (and the gateway with its web page). ``igora up`` watches
them from the first second: their output goes through it, each line prefixed with the
child's name, and it keeps their last lines. When a child exits or is killed, during
start-up or later, everything stops with one message naming the child, how it ended and
what it said last. Once a worker is on the market, a first prompt is answered to show that
everything works. Ctrl-C (or SIGTERM) stops every child.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TypeVar

from .config import ConfigError, data_dir
from .credits.ledger import LEDGER_FILE
from .errors import IgoraError
from .net import POLL, port_free, wait_http_async
from .protocol import DEFAULT_ROOM

__all__ = [
    "ChildEnded",
    "Supervisor",
    "exit_code",
    "how_it_ended",
    "last_lines",
    "up",
]

CHECK_PROMPT = "What is the capital of France? Answer in one short sentence."
CHECK_WAIT = 180.0
"""Seconds the first prompt waits for a worker (loading a large model takes a while)."""
ROOM = DEFAULT_ROOM
"""The room ``igora up`` serves: the one agents join when given no ``--room``."""
AGENTS = "agents"
"""Under the data folder, the folders of a protocol 3 ``igora up``'s broker and worker."""
START_WAIT = 20.0
"""Seconds the market and the gateway have to answer HTTP once started."""
TAIL_LINES = 15
"""Lines of a dead child's output repeated in the message."""
KEPT_LINES = 200
"""Lines of each child's output kept (a Python crash dump is 30 to 100 lines)."""
CRASH_DUMP = "Fatal Python error:"
_STDLIB = sysconfig.get_paths()["stdlib"]

T = TypeVar("T")


def how_it_ended(code: int) -> str:
    """``exited with code 2``, ``was killed by SIGSEGV (Segmentation fault)``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            sig = signal.Signals(-code)
            return f"was killed by {sig.name} ({signal.strsignal(sig)})"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def exit_code(code: int) -> int:
    """The code ``igora up`` ends with when a child ended with ``code`` (as a shell
    reports a signal: 128 + its number)."""
    if code < 0:
        return 128 - code
    return code or 1


def last_lines(lines: list[str], n: int = TAIL_LINES) -> list[str]:
    """The last ``n`` lines of a child's output, read as a person would: of a Python crash
    dump (faulthandler's, after a crash in llama.cpp), only the error, the thread headers
    and the frames outside the standard library, which say where it died."""
    starts = [i for i, ln in enumerate(lines) if ln.startswith(CRASH_DUMP)]
    if starts:
        lines = lines[: starts[-1]] + [ln for ln in lines[starts[-1] :] if _telling(ln)]
    return lines[-n:]


def _telling(dump_line: str) -> bool:
    text = dump_line.strip()
    if not text or text.startswith("Extension modules:"):
        return False
    if text.startswith("File "):
        stdlib = f'"{_STDLIB}/' in text and "-packages/" not in text
        return not stdlib and '"<frozen ' not in text
    return True


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up here: a child between fork and exec must not import."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
PR_SET_PDEATHSIG = 1


def _child_signals() -> None:
    """In the child: SIGINT, what ``stop_all`` sends, at its default (an ``igora up``
    started in the background, ``igora up &`` in a script, passes it on ignored: its
    agents then waited out the stop's timeout and were killed); on Linux, SIGTERM when
    ``igora up`` dies, even by SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One ``python -m igora ROLE`` process: its output is relayed and its tail kept."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_level: str,
        out: IO[str],
        lock: threading.Lock,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
        self._out = out
        self._lock = lock
        cmd = [sys.executable, "-m", "igora", *args, "--log-level", log_level]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=_child_signals,
        )
        self._relay = threading.Thread(target=self._relay_output, name=f"relay-{name}", daemon=True)
        self._relay.start()

    def _relay_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            with self._lock, contextlib.suppress(OSError, ValueError):
                self._out.write(f"{self.name} | {line}\n")
                self._out.flush()

    def drain(self) -> None:
        """Wait (briefly) until everything it wrote is relayed."""
        self._relay.join(2.0)

    def last_lines(self) -> list[str]:
        """Its last lines, once everything it wrote before ending has been read."""
        self.drain()
        return last_lines(list(self.tail))


class ChildEnded(Exception):
    def __init__(self, child: Child) -> None:
        super().__init__(child.name)
        self.child = child


class Supervisor:
    """The children of one ``igora up``, in start order (the market first)."""

    def __init__(self, log_level: str) -> None:
        self.children: list[Child] = []
        self.log_level = log_level
        self.started = False
        self._lock = threading.Lock()

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, args, self.log_level, sys.stderr, self._lock, env)
        self.children.append(child)
        return child

    def ended(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    async def watch(self) -> Child:
        """Wait until a child ends (one spawned later counts too)."""
        while True:
            child = self.ended()
            if child is not None:
                return child
            await asyncio.sleep(POLL)

    async def unless_a_child_ends(self, step: Awaitable[T]) -> T:
        """Run ``step``; raise ChildEnded as soon as a child ends, whatever ``step`` is at."""
        task = asyncio.ensure_future(step)
        watcher = asyncio.ensure_future(self.watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watcher):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
        if watcher.done() and not watcher.cancelled():
            raise ChildEnded(watcher.result())
        return task.result()

    def report(self, child: Child, code: int) -> str:
        when = "after start-up" if self.started else "during start-up"
        lines = child.last_lines()
        said = (
            "; its last lines:\n" + "\n".join(f"  {child.name} | {ln}" for ln in lines)
            if lines
            else "; it wrote nothing"
        )
        return f"igora up: error: the {child.name} {how_it_ended(code)} {when}{said}"

    def stop(self, timeout: float = 8.0) -> None:
        stop_all(self.children, timeout)
        for c in self.children:
            c.drain()  # what the children said while stopping is printed before we go on


def stop_all(children: list[Child], timeout: float = 8.0) -> None:
    """Stop the agents first (they say goodbye to the market), then the market; one that
    has not stopped ``timeout`` s after its SIGINT is killed, and said so."""
    agents, market = children[1:], children[:1]
    for group in (agents, market):
        for c in group:
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGINT)
        end = time.monotonic() + timeout
        for c in group:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(max(0.1, end - time.monotonic()))
            if c.proc.poll() is None:
                print(
                    f"igora up: the {c.name} did not stop within {timeout:g} s of Ctrl-C: killed",
                    file=sys.stderr,
                    flush=True,
                )
                c.proc.kill()
                c.proc.wait()


async def first_answer(url: str, wait: float) -> str:
    from .client import Client

    async with Client(url, name="igora-up-check", timeout=120) as client:
        return str(
            await client.chat(
                CHECK_PROMPT, max_tokens=48, temperature=0.0, seed=1, wait_worker=wait
            )
        )


async def _start_and_watch(
    sup: Supervisor, args: argparse.Namespace, data: Path, gateway: bool
) -> int:
    host = args.host
    url = f"ws://{host}:{args.port}"
    common = ["--market", url]
    v3 = args.protocol == 3
    market = ["market", "--host", host, "--port", str(args.port), "--data", str(data)]
    sup.spawn("market", [*market, *(["--v3-room", ROOM] if v3 else [])])
    market_url = f"http://{host}:{args.port}/"
    if not await sup.unless_a_child_ends(wait_http_async(market_url, START_WAIT)):
        print(
            f"igora up: error: the market did not answer on {market_url} within {START_WAIT:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return 1
    sup.spawn("broker", ["broker", *common], agent_data(data, "broker") if v3 else None)
    worker = ["worker", *common, "--engine", args.engine, "--slots", str(args.slots)]
    if args.model:
        worker += ["--model", args.model]
    sup.spawn("worker", worker, agent_data(data, "worker") if v3 else None)
    web = f"http://{host}:{args.gateway_port}/"
    if gateway:
        # --data: the gateway accepts the API keys of that folder, if it has some.
        gw = ["gateway", *common, "--host", host, "--port", str(args.gateway_port)]
        sup.spawn("gateway", [*gw, "--data", str(data)])
        if not await sup.unless_a_child_ends(wait_http_async(f"{web}health", START_WAIT)):
            print(
                f"igora up: error: the gateway did not answer on {web} within {START_WAIT:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            return 1
    if not args.no_check:
        try:
            answer = await sup.unless_a_child_ends(first_answer(url, wait=CHECK_WAIT))
        except IgoraError as exc:
            worker_child = next(c for c in sup.children if c.name == "worker")
            lines = "\n".join(f"  worker | {ln}" for ln in worker_child.last_lines())
            print(
                f"igora up: error: the first prompt got no answer: {exc}; the worker's "
                f"last lines:\n{lines}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        print(
            f"\nigora up: the market answers.\n  Q: {CHECK_PROMPT}\n  A: {answer.strip()}\n",
            flush=True,
        )
    sup.started = True
    print(f"igora up: market {url} (room '{ROOM}'), store {data}", flush=True)
    if v3:
        print(
            f"igora up: room '{ROOM}' speaks protocol 3: prompts and answers encrypted end "
            f"to end, credits in {data / LEDGER_FILE}; broker and worker keys under "
            f"{data / AGENTS}",
            flush=True,
        )
    if gateway:
        print(f"igora up: web page and OpenAI API at {web} (base_url {web}v1)", flush=True)
    print(
        'igora up: try `igora chat "Bonjour"` in another terminal; Ctrl-C stops all.',
        flush=True,
    )
    raise ChildEnded(await sup.watch())


def agent_data(data: Path, role: str) -> dict[str, str]:
    """The environment that gives the ``role`` child of a protocol 3 ``igora up`` its own
    identity: a key of its own, in ``DATA/agents/ROLE`` (agents sharing one key would be
    one agent to the broker and to the ledger). The market and the gateway keep
    ``DATA``'s key (the gateway's API keys are there too)."""
    return {"IGORA_DATA": str(data / AGENTS / role)}


def up(args: argparse.Namespace) -> int:
    host = args.host
    ports = [("market", args.port)]
    gateway = not args.no_gateway
    if gateway:
        ports.append(("gateway", args.gateway_port))
    for what, port in ports:
        if not port_free(host, port):
            raise ConfigError(
                f"port {port} on {host} is taken (another {what} running?): "
                f"stop it or choose another with --{'gateway-' if what == 'gateway' else ''}port"
            )
    data: Path = args.data or data_dir()
    sup = Supervisor(args.log_level)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return asyncio.run(_start_and_watch(sup, args, data, gateway))
    except ChildEnded as ended:
        code = ended.child.proc.wait()
        message = sup.report(ended.child, code)
        sup.stop()
        print(message, file=sys.stderr, flush=True)  # last, so it stays on the screen
        return exit_code(code)
    except KeyboardInterrupt:
        print("\nigora up: stopping ...", file=sys.stderr, flush=True)
        return 0
    finally:
        sup.stop()
