"""Fixtures that run real Igora processes on 127.0.0.1, on free ports, and clean up.

Every process started here logs to a file under the test's tmp folder; on failure the
tail of each log is printed, so a red test says what the processes saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from igora.up import wait_http as answers

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """One ``python -m igora ...`` child process."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log
        self._log = open(log, "ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.p = subprocess.Popen([sys.executable, "-m", "igora", *args], stdout=self._log,
                                  stderr=subprocess.STDOUT, env=full_env, cwd=str(log.parent),
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.p.wait(10)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(5)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """Processes of one test; all stopped at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.data = tmp / "data"
        self._n = 0

    def spawn(self, *args: str, name: str, env: dict[str, str] | None = None) -> Proc:
        self._n += 1
        proc = Proc(list(args), self.tmp / f"{self._n:02d}-{name}.log", env)
        self.procs.append(proc)
        return proc

    def market(self, *extra: str) -> Proc:
        p = self.spawn("market", "--port", str(self.port), "--data", str(self.data),
                       "--log-level", "debug", *extra, name="market")
        wait_http(f"http://127.0.0.1:{self.port}/", 20, p)
        return p

    def broker(self, *extra: str, name: str = "broker") -> Proc:
        return self.spawn("broker", "--market", self.url, "--name", name, "--heartbeat", "1",
                          "--grace", "3", *extra, name=name)

    def worker(self, *extra: str, name: str = "worker", engine: str = "echo") -> Proc:
        return self.spawn("worker", "--market", self.url, "--name", name, "--engine", engine,
                          "--heartbeat", "1", *extra, name=name)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=5) as r:
            return json.loads(r.read())

    def compactions(self, room: str = "market") -> int:
        """How many times the market compacted the room (0 if it is not in memory)."""
        return next((r["compactions"] for r in self.status()["rooms"] if r["name"] == room), 0)

    def agents(self, type: str | None = None) -> list[dict[str, Any]]:
        out = []
        for room in self.status()["rooms"]:
            out += [a for a in room["agents"] if type is None or a.get("type") == type]
        return out

    def wait_agents(self, type: str, n: int, timeout: float = 60,
                    ready: bool = True) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [a for a in self.agents(type) if not ready or a.get("state") != "busy"]
            if len(found) >= n:
                return found
            time.sleep(0.1)
        raise AssertionError(f"fewer than {n} {type}(s) on the market after {timeout} s\n"
                             + self.logs())

    def logs(self, tail: int = 40) -> str:
        out = []
        for p in self.procs:
            lines = p.log().splitlines()[-tail:]
            out.append(f"--- {p.log_path.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def wait_http(url: str, timeout: float, proc: Proc | None = None) -> None:
    if answers(url, timeout, [proc.p] if proc is not None else []):
        return
    if proc is not None and not proc.alive():
        raise AssertionError(f"process exited early:\n{proc.log()}")
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(c.logs())
    c.stop()


@pytest.fixture
def echo_market(cluster: Cluster) -> Cluster:
    """Market + broker + one echo worker."""
    cluster.market()
    cluster.broker()
    cluster.worker()
    cluster.wait_agents("worker", 1)
    cluster.wait_agents("broker", 1)
    end = time.monotonic() + 20
    while not any(b.get("leader") for b in cluster.agents("broker")):
        assert time.monotonic() < end, "no active broker"
        time.sleep(0.05)
    return cluster


@pytest.fixture(scope="session")
def llama_market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Market + broker + a llama.cpp worker on the bundled model, shared by the session."""
    c = Cluster(tmp_path_factory.mktemp("llama"))
    c.market()
    c.broker()
    c.worker("--slots", "2", name="llama", engine="llama")
    c.wait_agents("worker", 1, timeout=120)
    yield c
    c.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
