"""The command line as a user runs it: `igora up`, `igora chat`, `igora status`, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest

from igora.testing import wait_until
from igora.up import exit_code, how_it_ended, last_lines

from .conftest import Cluster, free_port


def igora(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igora", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )  # type: ignore[call-overload]


def children_of(pid: int) -> list[str]:
    return subprocess.run(
        ["pgrep", "-P", str(pid)], check=False, capture_output=True, text=True
    ).stdout.split()


def alive(pids: list[str]) -> list[str]:
    """The processes of ``pids`` still running (a zombie counts as gone)."""
    running = []
    for p in pids:
        try:
            if "zombie" not in Path(f"/proc/{p}/status").read_text().lower():
                running.append(p)
        except OSError:  # gone (and reaped) between two reads
            pass
    return running


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
    assert "tasks in the room now, by state" in run.stdout


def test_errors_are_one_clear_line_without_traceback(tmp_path: Path) -> None:
    port = free_port()
    cases = [
        (["chat", "hi", "--market", f"ws://127.0.0.1:{port}", "--timeout", "5"], "no market"),
        (["chat", "hi", "--market", "http://nope"], "not a websocket URL"),
        (
            ["worker", "--market", f"ws://127.0.0.1:{port}", "--model", str(tmp_path / "x.gguf")],
            "not found",
        ),
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
    (
        ["market", "--v3-room", "x", "--redis", "redis://127.0.0.1:1/0", "--memory"],
        {},
        "Redis at redis://127.0.0.1:1/0 does not answer",
    ),
]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    BAD_VALUES,
    ids=[" ".join(a) + "".join(f" {k}={v}" for k, v in e.items()) for a, e, _ in BAD_VALUES],
)
def test_bad_value_is_one_line_naming_it_and_exit_status_2(
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    expected: str,
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
        [
            sys.executable,
            "-m",
            "igora",
            "up",
            "--port",
            str(port),
            "--gateway-port",
            str(gport),
            "--data",
            str(tmp_path / "data"),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # Ctrl-C as a terminal delivers it: a test run started in the background (nohup,
        # `cmd &` in a script) passes SIGINT ignored, and Python then keeps it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
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
        answer = next(ln for ln in out if ln.strip().startswith("A:"))
        assert len(answer.strip()) > 4
        children = children_of(proc.pid)
        assert len(children) >= 3  # market + broker + worker (+ gateway)
        proc.send_signal(signal.SIGINT)
        # Read on, as a terminal does: igora up relays its children's last lines, and a
        # pipe nobody reads would block it once full.
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired as exc:
            left = children_of(proc.pid)
            raise AssertionError(
                f"igora up still running 30 s after Ctrl-C; children {left}; "
                f"it said: {exc.output!r}"
            ) from None
        assert proc.returncode == 0, rest
        wait_until(lambda: not alive(children), 5, lambda: f"left behind: {alive(children)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_up_children_do_not_outlive_a_killed_up(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "igora",
            "up",
            "--port",
            str(port),
            "--no-gateway",
            "--no-check",
            "--engine",
            "echo",
            "--data",
            str(tmp_path / "data"),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        children = wait_until(
            lambda: c if len(c := children_of(proc.pid)) == 3 else None,
            60,
            lambda: f"igora up's children: {children_of(proc.pid)} (3 expected)",
        )
        proc.kill()
        proc.wait(10)
        wait_until(
            lambda: not alive(children),
            20,
            lambda: f"children left behind after kill -9 of igora up: {alive(children)}",
        )
    finally:
        if proc.poll() is None:
            proc.kill()


class Up:
    """``igora up`` on free ports, its output read line by line."""

    def __init__(self, tmp: Path, *args: str, **popen: Any) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "igora",
                "up",
                "--port",
                str(self.port),
                "--no-gateway",
                "--data",
                str(tmp / "data"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            **{
                "env": {**os.environ, "PYTHONUNBUFFERED": "1"},
                # SIGINT as a terminal delivers it, however the test run was started (one
                # started in the background passes it on ignored); a test may choose.
                "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                **popen,
            },
        )
        self.lines: list[str] = []

    def read_until(self, text: str, timeout: float) -> str:
        """Lines up to the first containing ``text`` (or all, if igora up ends first)."""
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            if text in line:
                break
        return "".join(self.lines)

    def end(self, timeout: float) -> tuple[int, str]:
        """igora up's exit code and its whole output, once it ends by itself."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"igora up still runs after {timeout} s:\n" + "".join(self.lines)
            ) from None
        return self.proc.returncode, "".join(self.lines) + out

    def child(self, role: str) -> int:
        found = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid), "-f", f"igora {role}"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(found) == 1, (role, found, "".join(self.lines))
        return int(found[0])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def message(output: str) -> str:
    """igora up's own closing message: from its error line to the end."""
    assert "igora up: error:" in output, output
    return output[output.index("igora up: error:") :]


def test_up_started_with_sigint_ignored_still_stops_its_children_without_killing_them(
    tmp_path: Path,
) -> None:
    """``igora up &`` in a script passes SIGINT on ignored; up stops its children with
    SIGINT, so they must not inherit that (they waited out the stop's timeout, then were
    killed, and up said so)."""
    up = Up(
        tmp_path,
        *("--no-check", "--engine", "echo", "--log-level", "warning"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        up.read_until("Ctrl-C stops all", 60)
        children = children_of(up.proc.pid)
        assert len(children) == 3, up.lines
        wait_until(  # each child resets it before its exec: pgrep may see it just before
            lambda: not [p for p in children if _ignores_sigint(p)],
            10,
            lambda: f"children ignoring SIGINT: {[p for p in children if _ignores_sigint(p)]}",
        )
        up.proc.send_signal(signal.SIGTERM)
        code, out = up.end(60)
        assert code == 0, out
        assert "killed" not in out, out
        assert not alive(children)
    finally:
        up.kill()


def _ignores_sigint(pid: str) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError(f"no SigIgn for process {pid}")


def test_up_ends_at_once_when_the_worker_cannot_load_its_model(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    up = Up(tmp_path, "--model", str(corrupt))
    try:
        code, output = up.end(timeout=60)  # before: 180 s of silence, then no reason
    finally:
        up.kill()
    said = message(output)
    assert code == 2, output
    assert said.startswith(
        "igora up: error: the worker exited with code 2 during start-up; its last lines:\n"
    ), said
    assert f"worker | igora worker: error: cannot load model {corrupt}" in said
    assert "Traceback" not in output


def test_up_ends_at_once_when_the_worker_is_killed_by_sigsegv_during_start_up(
    tmp_path: Path,
) -> None:
    up = Up(tmp_path, "--log-level", "info")  # the worker on the bundled model
    try:
        up.read_until("worker | loading", timeout=60)
        os.kill(up.child("worker"), signal.SIGSEGV)
        code, output = up.end(timeout=60)
    finally:
        up.kill()
    said = message(output)
    assert code == 128 + signal.SIGSEGV, output
    assert said.startswith(
        "igora up: error: the worker was killed by SIGSEGV "
        "(Segmentation fault) during start-up; its last lines:\n"
    ), said
    assert "worker | loading" in said
    # Its own log says where Python was when it died (faulthandler), without stdlib noise.
    assert "worker | Fatal Python error: Segmentation fault" in said
    assert "/igora/" in said and "/asyncio/" not in said
    assert "the market answers" not in output


def test_up_ends_when_a_child_dies_after_start_up(tmp_path: Path) -> None:
    up = Up(tmp_path, "--engine", "echo", "--log-level", "warning")
    try:
        started = up.read_until("Ctrl-C stops all", timeout=60)
        assert "Ctrl-C stops all" in started and "A: Echo:" in started, started
        os.kill(up.child("broker"), signal.SIGKILL)
        code, output = up.end(timeout=30)
    finally:
        up.kill()
    assert code == 128 + signal.SIGKILL, output
    assert message(output).startswith(
        "igora up: error: the broker was killed by SIGKILL (Killed) after start-up"
    ), output


def test_up_protocol_3_gives_each_agent_a_key_encrypts_and_counts_credits(
    tmp_path: Path,
) -> None:
    """``igora up --protocol 3``: the room speaks protocol 3, the broker and the worker
    each prove a key of their own (DATA/agents), the first prompt and ``igora chat`` are
    answered, and the ledger charges the asker for what it received."""
    user = {"IGORA_DATA": str(tmp_path / "user")}
    up = Up(
        tmp_path,
        *("--protocol", "3", "--engine", "echo", "--log-level", "warning"),
        env={**os.environ, "PYTHONUNBUFFERED": "1", **user},
    )
    try:
        started = up.read_until("Ctrl-C stops all", timeout=60)
        assert "A: Echo: What is the capital of France?" in started, started
        assert "room 'market' speaks protocol 3" in started, started
        data = tmp_path / "data"
        keys = {
            role: (data / "agents" / role / "identity.key").read_text()
            for role in ("broker", "worker")
        }
        keys["market"] = (data / "identity.key").read_text()
        keys["user"] = (tmp_path / "user" / "identity.key").read_text()
        assert len(set(keys.values())) == 4, "each agent has a key of its own"
        url = f"ws://127.0.0.1:{up.port}"
        env = {**os.environ, **user}
        chat = igora("chat", "--market", url, "Bonjour", env=env)
        assert chat.returncode == 0 and chat.stdout.strip() == "Echo: Bonjour", chat
        status = igora("status", "--market", url, env=env)
        assert "(protocol 3)" in status.stdout, status.stdout
        ledger = str(data / "ledger.sqlite3")

        def paid() -> dict[str, Any] | None:
            run = igora("credits", "--ledger", ledger, "--json", env=env)
            shown: dict[str, Any] = json.loads(run.stdout)
            return shown if shown["balance"] < 100_000 else None  # the grant, less 2 runs

        shown = wait_until(paid, 30, lambda: "the user's runs were never charged")
        assert any(e["kind"] == "spend" for e in shown["entries"]), shown
        up.proc.send_signal(signal.SIGINT)
        code, out = up.end(30)
        assert code == 0, out
    finally:
        up.kill()


def test_how_a_child_ended_reads_as_a_sentence() -> None:
    assert how_it_ended(2) == "exited with code 2"
    assert how_it_ended(0) == "exited with code 0"
    assert how_it_ended(-signal.SIGSEGV) == "was killed by SIGSEGV (Segmentation fault)"
    assert how_it_ended(-signal.SIGILL) == "was killed by SIGILL (Illegal instruction)"
    assert (exit_code(2), exit_code(0), exit_code(-signal.SIGSEGV)) == (2, 1, 139)


def test_a_crash_dump_is_cut_to_the_lines_that_say_where_it_died() -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    lines = [
        "12:00:00 INFO    igora.market: ...",
        "loading model.gguf ...",
        "Fatal Python error: Illegal instruction",
        "",
        "Thread 0x00007f6585cff6c0 (most recent call first):",
        '  File "/venv/lib/python3.11/site-packages/llama_cpp/llama.py", line 388 in __init__',
        '  File "/src/igora/engines/llama.py", line 118 in _load',
        f'  File "{stdlib}/threading.py", line 982 in run',
        "",
        "Current thread 0x00007f6587a57b80 (most recent call first):",
        f'  File "{stdlib}/asyncio/runners.py", line 118 in run',
        '  File "<frozen runpy>", line 88 in _run_code',
        "",
        "Extension modules: websockets.speedups, numpy._core._multiarray_umath (total: 2)",
    ]
    assert last_lines(lines) == [
        "12:00:00 INFO    igora.market: ...",
        "loading model.gguf ...",
        "Fatal Python error: Illegal instruction",
        "Thread 0x00007f6585cff6c0 (most recent call first):",
        '  File "/venv/lib/python3.11/site-packages/llama_cpp/llama.py", line 388 in __init__',
        '  File "/src/igora/engines/llama.py", line 118 in _load',
        "Current thread 0x00007f6587a57b80 (most recent call first):",
    ]
    assert last_lines([f"line {i}" for i in range(100)], 3) == ["line 97", "line 98", "line 99"]
