"""What every benchmark shares: real processes on loopback, statistics, report sections."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igora.up import wait_http as answers

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


@dataclass
class Target:
    """One goal of issue #8 and where this run stands."""

    name: str
    goal: str
    measured: str
    met: bool


@dataclass
class Section:
    title: str
    body: str
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


_LIVE: set[Cluster] = set()


@atexit.register
def _stop_all() -> None:
    """Whatever ends the benchmark, its processes end too (they run in their own sessions)."""
    for c in list(_LIVE):
        c.stop()


class Cluster:
    """``python -m igora`` processes of one benchmark; logs under a temporary folder."""

    def __init__(self, name: str) -> None:
        _LIVE.add(self)
        self.dir = Path(tempfile.mkdtemp(prefix=f"igora-bench-{name}-"))
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._n = 0

    def spawn(self, *args: str, name: str, module: str = "igora") -> subprocess.Popen[bytes]:
        self._n += 1
        log = open(self.dir / f"{self._n:02d}-{name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        p = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log,
                             stderr=subprocess.STDOUT, env=env, cwd=str(self.dir),
                             start_new_session=True)
        self.procs.append(p)
        return p

    def market(self, *extra: str, memory: bool = False) -> subprocess.Popen[bytes]:
        store = ["--memory"] if memory else ["--data", str(self.dir / "data")]
        p = self.spawn("market", "--port", str(self.port), *store, "--log-level", "warning",
                       *extra, name="market")
        wait_http(f"http://127.0.0.1:{self.port}/", 30, p)
        return p

    def broker(self, *extra: str) -> subprocess.Popen[bytes]:
        return self.spawn("broker", "--market", self.url, "--log-level", "warning", *extra,
                          name="broker")

    def worker(self, *extra: str, name: str = "worker", engine: str = "echo") -> subprocess.Popen[bytes]:
        return self.spawn("worker", "--market", self.url, "--name", name, "--engine", engine,
                          "--log-level", "warning", *extra, name=name)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=10) as r:
            return json.loads(r.read())

    def agents(self, type: str) -> list[dict[str, Any]]:
        out = []
        for room in self.status()["rooms"]:
            out += [a for a in room["agents"] if a.get("type") == type]
        return out

    async def wait_agents(self, type: str, n: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = await asyncio.to_thread(self.agents, type)
            if len([a for a in found if a.get("state") != "busy"]) >= n:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"fewer than {n} {type}(s) on the market after {timeout} s "
                           f"(logs in {self.dir})")

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()
        _LIVE.discard(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    if answers(url, timeout, [proc] if proc is not None else []):
        return
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"process {proc.args} exited early")
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
