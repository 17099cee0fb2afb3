"""The ledger survives a kill -9 mid-run (docs/credits.md §2): a child process settles
claims in a loop and is killed with SIGKILL; reopened, the ledger holds every run the
child reported committed, once, and its chain and balances check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from igora.credits.ledger import TAX_ACCOUNT, Kind, Ledger

from .conftest import ROOT
from .unit.credits_world import ASKERS, PARAMS, WORKERS, claim


def test_a_ledger_killed_mid_settlement_loses_and_doubles_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.credits_world", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    committed: list[int] = []
    try:
        deadline = time.monotonic() + 120
        assert child.stdout is not None
        while len(committed) < 200 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            _, first, last = line.split()
            committed.extend(range(int(first), int(last) + 1))
        assert len(committed) >= 200, child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    for line in rest.splitlines():  # committed before the kill, read after it
        _, first, last = line.split()
        committed.extend(range(int(first), int(last) + 1))

    with Ledger(path) as ledger:
        runs = [e for e in ledger.entries(limit=10**6) if e.kind is Kind.SPEND]
        tasks = [e.task for e in runs]
        assert len(tasks) == len(set(tasks))  # nothing doubled
        assert {f"task{n:012d}" for n in committed} <= set(tasks)  # nothing lost
        assert len(tasks) <= len(committed) + 5  # at most the group being written
        assert ledger.count() == len(ASKERS) + 3 * len(tasks)  # no half run
        assert ledger.verify_chain() == ledger.count()
        # The workers present their claims again: only the runs not yet settled count.
        last = max(committed) + 10
        new = sum(
            ledger.settle(claim(ASKERS[i % 10], WORKERS[i % 4], i), WORKERS[i % 4].id, PARAMS)
            for i in range(last + 1)
        )
        assert new == last + 1 - len(tasks)
        grants, tax = ledger.totals()
        held = sum(v for a, v in ledger.balances().items() if a != TAX_ACCOUNT)
        assert held == grants - tax
        assert ledger.verify_chain() == len(ASKERS) + 3 * (last + 1)
