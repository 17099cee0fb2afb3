"""Where the memory of a process goes, over a run: a diagnostic for the soak (issue #17).

``python -m bench.memprobe DIR -- python -m bench --only soak`` runs the command with
every Python process it starts (market, broker, workers, gateway, client process)
sampling itself every second into ``DIR/<pid>-<role>.jsonl``: resident memory (all, and
its anonymous and file-backed pages), glibc's heap (``mallinfo2``: bytes taken from the
system, in use, free; bytes in separate mappings), pymalloc's blocks and arenas, and the
garbage collector's full passes so far. With ``--trace N`` (frames; the options go
before DIR) the Python heap as ``tracemalloc`` sees it from ``--start`` seconds on, and a
snapshot every ``--every`` seconds (``DIR/<pid>-<role>-<seconds>.snap``): the last one
holds what was allocated since tracing began and is still held. With ``--census`` the
objects the collector tracks, counted by type every ``--every`` seconds. ``python -m
bench.memprobe --report DIR`` prints each process's figures over time, the biggest sites
of its last snapshot and the types whose count grew most.

Each process loads the probe through a ``sitecustomize`` module put first on its
``PYTHONPATH``; nothing in igora knows about it. ``tracemalloc`` slows a process down
and changes what its allocators do: start it late, after the warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

ENV = "IGORA_MEMPROBE"  # the settings (JSON), set for the children by ``main``


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
        fn.restype = _MallInfo2
        return fn
    return None


_RSS = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}


def _rss() -> dict[str, int]:
    """Resident memory: all of it, its anonymous pages (heaps, pymalloc's arenas) and
    its file-backed ones (libraries, SQLite's shared memory)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = _RSS.get(line.split(maxsplit=1)[0]) if line.strip() else None
            if key is not None:
                out[key] = int(line.split()[1]) * 1024
    return out


_ARENAS = re.compile(rb"# arenas allocated current\s*=\s*([\d,]+)")


def _pymalloc_arenas() -> int:
    """Arenas pymalloc holds now (``sys._debugmallocstats`` writes them to fd 2; its
    output goes to a file for the instant of the call)."""
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        m = _ARENAS.search(tmp.read())
    return int(m.group(1).replace(b",", b"")) if m else -1


def _role() -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if sys.argv and sys.argv[0].endswith("soak.py"):
        return "client"
    for a in args:
        if a in ("market", "broker", "worker", "gateway"):
            name = sys.argv[sys.argv.index("--name") + 1] if "--name" in sys.argv else ""
            return a + (f"-{name}" if a == "worker" and name else "")
    return "bench"


def start() -> None:
    """Start sampling this process if ``IGORA_MEMPROBE`` is set (from ``sitecustomize``)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    conf = json.loads(spec)
    folder, frames, delay, every = conf["dir"], conf["frames"], conf["start"], conf["every"]
    census = conf.get("census", False)
    mallinfo = _mallinfo2()
    began = time.monotonic()

    def loop() -> None:
        time.sleep(0.5)  # let ``sys.argv`` settle (``-m`` sets it after site)
        base = Path(folder) / f"{os.getpid()}-{_role()}"
        last_snap = last_census = 0.0
        with open(f"{base}.jsonl", "a") as out:
            while True:
                at = time.monotonic() - began
                row: dict[str, Any] = {"t": round(at, 2), **_rss()}
                if mallinfo is not None:
                    m = mallinfo()
                    row |= {
                        "brk": m.arena,
                        "mmap": m.hblkhd,
                        "used": m.uordblks,
                        "free": m.fordblks,
                    }
                row["blocks"] = sys.getallocatedblocks()
                row["gc2"] = gc.get_stats()[2]["collections"]  # full collections so far
                if census and at - last_census >= every:
                    last_census = at
                    _census(Path(f"{base}-{int(at):05d}.types.json"))
                if frames and not tracemalloc.is_tracing() and at >= delay:
                    tracemalloc.start(frames)
                    last_snap = at
                if not tracemalloc.is_tracing():
                    row["arenas"] = _pymalloc_arenas()
                else:
                    row["traced"] = tracemalloc.get_traced_memory()[0]
                    if at - last_snap >= every:
                        last_snap = at
                        tracemalloc.take_snapshot().dump(f"{base}-{int(at):05d}.snap")
                out.write(json.dumps(row) + "\n")
                out.flush()
                time.sleep(1.0)

    threading.Thread(target=loop, name="memprobe", daemon=True).start()


def _census(path: Path) -> None:
    """How many objects the collector tracks, by type (containers: no ints, no strings)."""
    counts = Counter(type(o).__qualname__ for o in gc.get_objects())
    path.write_text(json.dumps(dict(counts.most_common())))


def report(folder: Path, top: int) -> None:
    for path in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        if not rows:
            continue
        print(f"\n== {path.stem}")
        keys = [k for k in rows[-1] if k != "t"]
        print("     t " + " ".join(f"{k:>8}" for k in keys))
        step = max(1, len(rows) // 25)
        for r in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
            cells = []
            for k in keys:
                v = r.get(k, 0)
                cells.append(f"{v:8}" if k in ("blocks", "arenas", "gc2") else f"{v / 2**20:8.2f}")
            print(f"{r['t']:6.0f} " + " ".join(cells))
        snaps = sorted(folder.glob(f"{path.stem}-*.snap"))
        if snaps:
            last = tracemalloc.Snapshot.load(str(snaps[-1]))
            print(f"-- allocated since tracing began and still held at {snaps[-1].stem}")
            for stat in last.statistics("traceback")[:top]:
                print(f"{stat.size / 1024:9.1f} KiB {stat.count:7} {_where(stat.traceback)}")
        counts = sorted(folder.glob(f"{path.stem}-*.types.json"))
        if len(counts) > 1:
            begin, end = (json.loads(p.read_text()) for p in (counts[0], counts[-1]))
            grown = Counter(end)
            grown.subtract(begin)
            print(f"-- objects by type, {counts[0].stem} -> {counts[-1].stem}: most grown")
            for name, n in grown.most_common(top):
                print(f"{n:+9} {end.get(name, 0):9} {name}")


def _where(tb: tracemalloc.Traceback) -> str:
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(tb)[::-1][:5])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memprobe")
    p.add_argument("dir", type=Path)
    p.add_argument("--trace", type=int, default=0, help="tracemalloc frames (0: no trace)")
    p.add_argument("--start", type=float, default=0, help="seconds before tracing starts")
    p.add_argument("--every", type=float, default=30, help="seconds between snapshots")
    p.add_argument(
        "--census", action="store_true", help="count the objects by type every --every s"
    )
    p.add_argument("--report", action="store_true", help="print what DIR holds")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("command", nargs="*")
    a = p.parse_args()
    if a.report:
        report(a.dir, a.top)
        return
    if not a.command:
        p.error("the command to run is missing (after --)")
    a.dir.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="igora-memprobe-"))
    (site / "sitecustomize.py").write_text("import bench.memprobe\nbench.memprobe.start()\n")
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [str(site), root, os.environ.get("PYTHONPATH")]))
    conf = {
        "dir": str(a.dir.resolve()),
        "frames": a.trace,
        "start": a.start,
        "every": a.every,
        "census": a.census,
    }
    env = {**os.environ, "PYTHONPATH": path, ENV: json.dumps(conf)}
    sys.exit(subprocess.call(a.command, env=env))


if __name__ == "__main__":
    main()
