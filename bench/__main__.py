"""``python -m bench`` (``make bench``): run the benchmark suite, write docs/benchmarks.md.

Options: ``--quick`` (fewer samples, smaller sizes: a smoke run), ``--only NAME``
(repeatable: overhead, streaming, throughput, wire, traffic, sync, scale, replicas, gateway,
gateway_load, soak, structured, secure, priority), ``--update`` (the topics run replace
theirs in docs/benchmarks.md, the others stay), ``--render`` (no run: the report again
from its record and bench/notes.md), ``--out PATH``, ``--protocol 3`` and
``--tasks N`` (the soak: in a v3 room, with N tasks). A partial or quick run writes
bench-report.md unless told otherwise; the report is rendered by ``bench.record``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

from . import record
from .common import ROOT

MODULES = [
    "overhead",
    "streaming",
    "throughput",
    "wire",
    "traffic",
    "sync",
    "scale",
    "replicas",
    "gateway",
    "gateway_load",
    "soak",
    "structured",
    "secure",
    "priority",
]
REPRODUCE = """## How to reproduce

```sh
make bench                                      # every topic, into this report
.venv/bin/python -m bench --update --only gateway   # one topic again, into this report
.venv/bin/python -m bench --render              # after an edit of bench/notes.md
.venv/bin/python -m bench --quick               # a smoke run, to bench-report.md
.venv/bin/python -m bench --only wire --only sync   # some topics, to bench-report.md
.venv/bin/python -m bench --update --only soak --protocol 3 --tasks 50000   # soak, v3 room
```

The modules are in `bench/` (one per topic: {modules}); `docs/benchmarks.json` holds each
topic's last section, raw figures and provenance. Run on an otherwise idle machine: every
process shares the same cores.
"""


def topic_key(name: str, args: argparse.Namespace) -> str:
    """The record's key of a topic: the soak of a v3 room is a topic of its own."""
    return f"{name}:v3" if name == "soak" and args.protocol == 3 else name


async def main_async(args: argparse.Namespace) -> int:
    chosen = args.only or MODULES
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        print(
            f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(MODULES)}",
            file=sys.stderr,
        )
        return 2
    topics: dict[str, record.Topic] = {}
    failed: list[str] = []
    start = time.monotonic()
    for name in MODULES:
        if name not in chosen or args.render:
            continue
        mod = importlib.import_module(f"bench.{name}")
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        t0, load0 = time.monotonic(), record.load_average()
        date, commit = record.Provenance.now()
        try:
            options = inspect.signature(mod.run).parameters
            extra = {k: getattr(args, k) for k in ("protocol", "tasks") if k in options}
            section = await mod.run(args.quick, **extra)
        except Exception:
            failed.append(name)
            print(f"bench: {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            continue
        minutes = (time.monotonic() - t0) / 60
        load = f"{load0:.1f} → {record.load_average():.1f}"
        run = record.Provenance(date, commit, minutes, load, args.quick)
        topics[topic_key(name, args)] = record.Topic(section, run)
        print(f"bench: {name} done in {minutes * 60:.0f} s", file=sys.stderr)
        for t in section.targets:
            print(f"  {t.name}: {t.measured} (goal {t.goal})", file=sys.stderr)
    out = Path(args.out)
    if out.resolve() == record.REPORT.resolve():
        # The project's report: the topics run replace theirs; the others stay as they were.
        topics = record.merged(out, topics)
    notes = ROOT / "bench" / "notes.md"
    text = notes.read_text() if notes.exists() else ""
    record.write(topics, MODULES, out, text, REPRODUCE.format(modules=_modules()))
    elapsed = (time.monotonic() - start) / 60
    print(
        f"bench: wrote {out} and {out.with_suffix('.json')} in {elapsed:.1f} min", file=sys.stderr
    )
    if failed:
        print(f"bench: failed (not written): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _modules() -> str:
    return ", ".join(f"`{m}.py`" for m in MODULES)


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="fewer samples: a smoke run")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this topic (repeatable): {', '.join(MODULES)}",
    )
    p.add_argument(
        "--protocol",
        type=int,
        choices=(2, 3),
        default=2,
        help="the room's protocol, for topics that measure one (soak): 3 is a v3 room",
    )
    p.add_argument(
        "--tasks",
        type=int,
        default=None,
        metavar="N",
        help="tasks of the soak (default 100,000; 10,000 with --quick)",
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="write the topics run into docs/benchmarks.md (and .json), keeping the "
        "others' last figures (what a whole run does too)",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: render docs/benchmarks.md again from docs/benchmarks.json "
        "and bench/notes.md (after an edit of the notes)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where to write a report of the topics run alone (default: bench-report.md "
        "in the current folder with --only or --quick)",
    )
    args = p.parse_args()
    if args.update and (args.quick or args.out is not None):
        p.error("--update writes docs/benchmarks.md from full runs: not with --quick or --out")
    if args.out is None:
        partial = (args.only or args.quick) and not (args.update or args.render)
        args.out = "bench-report.md" if partial else str(record.REPORT)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the processes are stopped
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
