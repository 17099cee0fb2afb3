"""Small network checks shared by the launcher, the gateway, tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence

POLL = 0.1
"""Seconds between two tries of ``wait_http``."""


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str) -> bool:
    """Whether ``GET url`` answers 200 within a second."""
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
        return bool(r.status == 200)
    return False


def wait_http(url: str, timeout: float, procs: Sequence[subprocess.Popen[bytes]] = ()) -> bool:
    """Whether ``url`` answers 200 within ``timeout`` s while every process lives."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            return False
        if http_ok(url):
            return True
        time.sleep(POLL)
    return False


async def wait_http_async(url: str, timeout: float) -> bool:
    """``wait_http`` for a running event loop (the requests run in a thread)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await asyncio.to_thread(http_ok, url):
            return True
        await asyncio.sleep(POLL)
    return False
