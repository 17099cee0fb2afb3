"""The command line as a user runs it: `igora up`, `igora chat`, `igora status`, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import Cluster, free_port


def igora(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "igora", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]


def test_chat_streams_the_answer_to_the_terminal(echo_market: Cluster) -> None:
    run = igora("chat", "hello from the terminal", "--market", echo_market.url)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "Echo: hello from the terminal\n"


def test_status_shows_agents_and_tasks(echo_market: Cluster) -> None:
    run = igora("status", "--market", echo_market.url)
    assert run.returncode == 0, run.stderr
    assert "worker" in run.stdout and "echo" in run.stdout
    assert "broker" in run.stdout and "(active)" in run.stdout
    assert "todo" in run.stdout and "failed" in run.stdout


def test_errors_are_one_clear_line_without_traceback(tmp_path: Path) -> None:
    port = free_port()
    cases = [
        (["chat", "hi", "--market", f"ws://127.0.0.1:{port}", "--timeout", "5"], "no market"),
        (["chat", "hi", "--market", "http://nope"], "not a websocket URL"),
        (["worker", "--market", f"ws://127.0.0.1:{port}", "--model", str(tmp_path / "x.gguf")],
         "not found"),
    ]
    for args, expected in cases:
        run = igora(*args, cwd=tmp_path, env={**os.environ, "IGORA_LOG_LEVEL": "error"})
        assert run.returncode == 2, (args, run.stderr)
        assert expected in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model")
    run = igora("worker", "--market", f"ws://127.0.0.1:{port}", "--model", str(bad), cwd=tmp_path)
    assert run.returncode == 2 and "cannot load model" in run.stderr
    assert "Traceback" not in run.stderr


# Each bad value is refused before anything starts: one line naming it, exit status 2.
BAD_VALUES: list[tuple[list[str], dict[str, str], str]] = [
    (["chat", "hi", "--max-tokens", "-5"], {}, "--max-tokens: -5 is out of range: use 1 to 1"),
    (["chat", "hi", "--max-tokens", "many"], {}, "--max-tokens: 'many' is not a whole number"),
    (["chat", "hi", "--temperature", "nan"], {}, "--temperature: nan is not a finite number"),
    (["chat", "hi", "--temperature", "50"], {}, "--temperature: 50 is out of range: use 0 to 2"),
    (["chat", "hi", "--timeout", "0"], {}, "--timeout: 0 is too small: use more than 0"),
    (["chat", "hi", "--heartbeat", "inf"], {}, "--heartbeat: inf is not a finite number"),
    (["chat", "hi", "--market", "ws://[::1"], {}, "--market: market URL 'ws://[::1' is not"),
    (["status", "--market", "ws://[::1"], {}, "--market: market URL 'ws://[::1' is not a valid"),
    (["gateway", "--market", "ws://[::1"], {}, "--market: market URL 'ws://[::1' is not a valid"),
    (["worker", "--engine", "echo", "--market", "ws://[::1"], {}, "--market: market URL"),
    (["broker", "--market", "ws://h:99999"], {}, "market URL 'ws://h:99999' has a bad port"),
    (["chat", "hi"], {"YJS_LOCAL_URL": "ws://[::1"}, "wss://host (from YJS_LOCAL_URL)"),
    (["status"], {"YJS_ENV": "REMOTE", "YJS_REMOTE_URL": "http://x"}, "(from YJS_REMOTE_URL)"),
    (["worker", "--engine", "echo", "--slots", "0"], {}, "--slots: 0 is out of range: use 1 or"),
    (["worker", "--engine", "echo", "--delay", "-1"], {}, "--delay: -1 is out of range"),
    (["broker", "--grace", "-1"], {}, "--grace: -1 is out of range: use 0 or more"),
    (["broker", "--max-attempts", "0"], {}, "--max-attempts: 0 is out of range"),
    (["gateway", "--port", "70000"], {}, "--port: 70000 is not a TCP port"),
    (["chat", "hi", "--room", "a\nb"], {}, "--room: room name 'a\\nb' is invalid"),
    (["status", "--room", "a/b"], {}, "--room: room name 'a/b' is invalid"),
    (["chat", "hi"], {"YJS_MARKET_ROOM": "a b"}, "room name 'a b' is invalid: use 1 to"),
]


@pytest.mark.parametrize(("args", "env", "expected"), BAD_VALUES,
                         ids=[" ".join(a) + "".join(f" {k}={v}" for k, v in e.items())
                              for a, e, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_it_and_exit_status_2(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str,
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("YJS_", "IGORA_"))}
    run = igora(*args, cwd=tmp_path, env={**clean, **env}, timeout=30)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"igora {args[0]}: error: "), lines[0]
    assert expected in lines[0], lines[0]


def test_up_starts_everything_answers_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port, gport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "igora", "up", "--port", str(port), "--gateway-port", str(gport),
         "--data", str(tmp_path / "data"), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    try:
        end = time.monotonic() + 180
        while time.monotonic() < end:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line and proc.poll() is not None:
                break
            out.append(line)
            if "Ctrl-C stops all" in line:
                break
        text = "".join(out)
        assert "the market answers" in text, text
        answer = [ln for ln in out if ln.strip().startswith("A:")][0]
        assert len(answer.strip()) > 4
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) >= 3  # market + broker + worker (+ gateway)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        time.sleep(0.5)
        left = [c for c in children if Path(f"/proc/{c}").exists()
                and "zombie" not in Path(f"/proc/{c}/status").read_text().lower()]
        assert left == [], f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_up_children_do_not_outlive_a_killed_up(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "igora", "up", "--port", str(port), "--no-gateway", "--no-check",
         "--engine", "echo", "--data", str(tmp_path / "data"), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 60
        children: list[str] = []
        while time.monotonic() < end and len(children) < 3:
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                      text=True).stdout.split()
            time.sleep(0.2)
        assert len(children) == 3, children
        proc.kill()
        proc.wait(10)
        end = time.monotonic() + 20
        alive = children
        while alive and time.monotonic() < end:
            alive = [c for c in children if Path(f"/proc/{c}").exists()
                     and "zombie" not in Path(f"/proc/{c}/status").read_text().lower()]
            time.sleep(0.2)
        assert alive == [], f"children left behind after kill -9 of igora up: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
