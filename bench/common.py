"""What every benchmark shares: real processes on loopback, statistics, report sections."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igora import testing
from igora.testing import free_port, wait_http

__all__ = [
    "ENGINE_LABELS",
    "PROTOCOLS",
    "ROOT",
    "Cluster",
    "Section",
    "Target",
    "against_v2",
    "cpu_seconds",
    "free_port",
    "ms",
    "pct",
    "rss_mb",
    "table",
    "wait_http",
]

ROOT = Path(__file__).resolve().parent.parent
ENGINE_LABELS = {"echo": "echo (zero latency)", "llama": "llama.cpp, bundled SmolLM2-135M"}


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


@dataclass
class Target:
    """One goal of an issue (#8 unless told) and where this run stands."""

    name: str
    goal: str
    measured: str
    met: bool
    issue: int = 8


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


PROTOCOLS = (2, 3)
"""The protocols a topic compares (issue #19): 2, the original room, and 3 (room ``v3``)."""


def against_v2(new: Target, old: Target) -> Target:
    """Issue 19's target is the new protocol's (3); the original protocol's figure of the
    same run goes beside it, as the reference the issue measures against."""
    return Target(
        new.name,
        new.goal,
        f"{new.measured} (v2, the original protocol: {old.measured})",
        new.met,
        new.issue,
    )


class Cluster(testing.Cluster):
    """``igora.testing.Cluster`` as a benchmark runs it: in a temporary folder (kept, for
    the logs), every role at log level warning and with its own default heartbeat and
    grace, and the repository on the children's path (``python -m bench.swarm``...).

    ``protocol`` 3: the market makes the room ``v3`` speak protocol 3, and ``room_market``,
    ``room_broker``, ``room_worker``, ``room_gateway`` start the roles in it, each agent with
    its own data folder (its own identity); with 2 they are the roles in the market's
    default room, as before."""

    V3_ROOM = "v3"

    def __init__(self, name: str, protocol: int = 2) -> None:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        super().__init__(
            Path(tempfile.mkdtemp(prefix=f"igora-bench-{name}-v{protocol}-")),
            log_level="warning",
            heartbeat=None,
            grace=None,
            env={"PYTHONPATH": path},
        )
        self.protocol = protocol

    @property
    def room(self) -> str | None:
        """The room measured: None for the market's default one (protocol 2)."""
        return self.V3_ROOM if self.protocol == 3 else None

    def room_args(self) -> list[str]:
        return [] if self.room is None else ["--room", self.room]

    def room_market(self, *extra: str) -> testing.Proc:
        v3 = ["--v3-room", self.V3_ROOM] if self.protocol == 3 else []
        return self.market(*extra, *v3)

    def room_broker(self, *extra: str, name: str = "broker") -> testing.Proc:
        return self.broker(*self.room_args(), *extra, name=name, data=self.protocol == 3)

    def room_worker(self, *extra: str, name: str = "worker", engine: str = "echo") -> testing.Proc:
        return self.worker(
            *self.room_args(), *extra, name=name, engine=engine, data=self.protocol == 3
        )

    def room_gateway(self, *extra: str, name: str = "gateway") -> tuple[testing.Proc, str]:
        return self.gateway(*self.room_args(), *extra, name=name, data=self.protocol == 3)

    def load_args(self, name: str) -> list[str]:
        """The options of load process ``name`` (``bench.load``) for this room (protocol 3:
        a data folder per client, under ``DIR/data-NAME``)."""
        if self.protocol == 2:
            return []
        return [*self.room_args(), "--data", str(self.dir / f"data-{name}")]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_processes(clients: int) -> int:
    """Processes the load of ``clients`` closed loops runs in: two (the grid's published
    figures, 2 cores), or one per two cores on a larger machine, so that the askers' side
    (~1.5 ms of CPU per task under protocol 3) does not cap a cell before the market."""
    return min(max(2, (os.cpu_count() or 2) // 2), clients)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time a process (or one of its threads) used so far."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
