"""``igora up``: a complete local market as one process tree.

Children: market, broker, worker (and the gateway with its web page). Once a worker is
on the market, a first prompt is answered to show that everything works. Ctrl-C (or
SIGTERM) stops every child; if one of them dies, everything stops with its exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .config import ConfigError, data_dir

CHECK_PROMPT = "What is the capital of France? Answer in one short sentence."


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_http(url: str, timeout: float, procs: list[subprocess.Popen[bytes]]) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            return False
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        time.sleep(0.1)
    return False


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when ``igora up`` dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(args: list[str], log_level: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "igora", *args, "--log-level", log_level]
    return subprocess.Popen(cmd, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 8.0) -> None:
    """Stop the agents first (they say goodbye to the market), then the market."""
    agents, market = procs[1:], procs[:1]
    for group in (agents, market):
        for p in group:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
        end = time.monotonic() + timeout
        for p in group:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, end - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait()


async def first_answer(url: str, wait: float) -> str:
    from .client import Client

    async with Client(url, name="igora-up-check", timeout=120) as client:
        return await client.chat(CHECK_PROMPT, max_tokens=48, temperature=0.0, seed=1,
                                 wait_worker=wait)


def up(args: argparse.Namespace) -> int:
    host = args.host
    ports = [("market", args.port)]
    gateway = not args.no_gateway and importlib.util.find_spec("igora.gateway.app") is not None
    if gateway:
        ports.append(("gateway", args.gateway_port))
    for what, port in ports:
        if not port_free(host, port):
            raise ConfigError(f"port {port} on {host} is taken (another {what} running?): "
                              f"stop it or choose another with --{'gateway-' if what == 'gateway' else ''}port")
    data: Path = args.data or data_dir()
    url = f"ws://{host}:{args.port}"
    common = ["--market", url]
    procs: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        procs.append(_spawn(["market", "--host", host, "--port", str(args.port),
                             "--data", str(data)], args.log_level))
        if not wait_http(f"http://{host}:{args.port}/", 20, procs):
            print("igora up: error: the market did not start (see the log above)", file=sys.stderr)
            return 1
        procs.append(_spawn(["broker", *common], args.log_level))
        worker = ["worker", *common, "--engine", args.engine, "--slots", str(args.slots)]
        if args.model:
            worker += ["--model", args.model]
        procs.append(_spawn(worker, args.log_level))
        if gateway:
            procs.append(_spawn(["gateway", *common, "--host", host, "--port",
                                 str(args.gateway_port)], args.log_level))
            wait_http(f"http://{host}:{args.gateway_port}/health", 20, procs)
        if not args.no_check:
            answer = asyncio.run(first_answer(url, wait=180))
            print(f"\nigora up: the market answers.\n  Q: {CHECK_PROMPT}\n  A: {answer.strip()}\n",
                  flush=True)
        print(f"igora up: market {url} (room 'market'), store {data}", flush=True)
        if gateway:
            print(f"igora up: web page and OpenAI API at http://{host}:{args.gateway_port}/ "
                  f"(base_url http://{host}:{args.gateway_port}/v1)", flush=True)
        print('igora up: try `igora chat "Bonjour"` in another terminal; Ctrl-C stops all.',
              flush=True)
        while True:
            for p in procs:
                code = p.poll()
                if code is not None:
                    print(f"igora up: a child ({' '.join(p.args[3:5])}) exited with {code}; "
                          "stopping", file=sys.stderr)
                    return code or 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nigora up: stopping ...", file=sys.stderr, flush=True)
        return 0
    finally:
        stop_all(procs)
