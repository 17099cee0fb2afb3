"""The market's setup errors: a store it cannot open, and the new limits' flags, each one
line and exit code 2 (issue 20, finding 6, the market's part)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from igora.config import ConfigError

from .conftest import free_port


def market_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("YJS_")}
    return subprocess.run(
        [sys.executable, "-m", "igora", "market", "--port", str(free_port()), *args],
        check=False,
        cwd=cwd,
        text=True,
        capture_output=True,
        env=clean,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: p.mkdir(), "it is a folder"),
        (lambda p: p.write_bytes(b"this is no database " * 100), "file is not a database"),
    ],
)
def test_a_store_the_market_cannot_open_is_one_line_and_exit_2(
    tmp_path: Path,
    make: Callable[[Path], object],
    why: str,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make(data / "market.sqlite3")
    done = market_cli("--data", str(data), "--log-level", "error", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"igora market: error: cannot open the store {data / 'market.sqlite3'}: {why}"
    ]


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_rooms": 0}, "--max-rooms must be at least 1"),
        ({"max_rooms_per_address": 0}, "--max-rooms-per-address must be at least 1"),
        ({"header_timeout": 0}, "--header-timeout must be a positive number"),
        ({"header_timeout": float("nan")}, "--header-timeout must be a positive number"),
    ],
)
def test_room_and_header_limits_are_checked_before_anything_starts(
    tmp_path: Path, limits: dict[str, float], message: str
) -> None:
    from igora.market.limits import MarketSettings
    from igora.market.run import run_market

    with pytest.raises(ConfigError, match=message):
        run_market("127.0.0.1", 1234, tmp_path / "data", MarketSettings(**limits))  # type: ignore[arg-type]
    assert not (tmp_path / "data").exists()
