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
    "ROOT",
    "Cluster",
    "Section",
    "Target",
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


class Cluster(testing.Cluster):
    """``igora.testing.Cluster`` as a benchmark runs it: in a temporary folder (kept, for
    the logs), every role at log level warning and with its own default heartbeat and
    grace, and the repository on the children's path (``python -m bench.swarm``...)."""

    def __init__(self, name: str) -> None:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        super().__init__(
            Path(tempfile.mkdtemp(prefix=f"igora-bench-{name}-")),
            log_level="warning",
            heartbeat=None,
            grace=None,
            env={"PYTHONPATH": path},
        )


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
