"""``igora workers --config FILE``: several workers from one TOML file, in one process."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igora import Client
from igora.cli import worker_spec
from igora.config import ConfigError, market_address
from igora.engines.config import EngineConfig
from igora.parser import build_parser
from igora.workers_config import Defaults, describe, parse

from .conftest import Cluster
from .upstream_stub import Stub

TWO = """
market = "ws://127.0.0.1:1234"
heartbeat = 2

[[worker]]
name = "alpha"
engine = "echo"
model = "alpha"

[[worker]]
name = "remote"
engine = "openai"
base_url = "http://127.0.0.1:8000/v1"
models = ["llama3.2:3b=llama3.2", "qwen2.5"]
slots = 4
upstream_timeout = 30
room = "lab"
"""


def test_each_worker_table_becomes_a_worker_with_the_top_level_defaults() -> None:
    alpha, remote = parse(TWO)
    assert alpha.name == "alpha" and alpha.engine.engine == "echo"
    assert alpha.engine.models == ("alpha",)
    assert alpha.address.room_url == "ws://127.0.0.1:1234/market"
    assert alpha.heartbeat == 2.0
    assert remote.address.room_url == "ws://127.0.0.1:1234/lab"  # the worker's own key wins
    assert remote.engine.models == ("llama3.2:3b=llama3.2", "qwen2.5")
    assert remote.engine.slots == 4 and remote.engine.upstream_timeout == 30.0
    assert remote.engine.base_url == "http://127.0.0.1:8000/v1"
    assert "remote: openai via http://127.0.0.1:8000/v1" in describe(remote)


def test_command_line_market_fills_in_what_the_file_leaves_out() -> None:
    cli = Defaults(market="ws://10.0.0.1:9999", room=None, heartbeat=7.0)
    (spec,) = parse('[[worker]]\nengine = "echo"\n', cli=cli)
    assert spec.address.url == "ws://10.0.0.1:9999" and spec.heartbeat == 7.0
    assert spec.name.startswith("worker-")
    (spec,) = parse('market = "ws://127.0.0.1:5"\n[[worker]]\nengine = "echo"\n', cli=cli)
    assert spec.address.url == "ws://127.0.0.1:5"


def test_a_file_sets_every_option_the_command_line_has() -> None:
    """The same worker from ``igora worker`` flags and from a ``[[worker]]`` table: every
    flag has its key, and both give the same settings (max_tokens included)."""
    flags = [
        "worker",
        "--name",
        "w",
        "--engine",
        "openai",
        "--model",
        "a=b",
        "--model",
        "c",
        "--base-url",
        "http://h:1/v1",
        "--api-key",
        "k",
        "--upstream-timeout",
        "9",
        "--context",
        "512",
        "--threads",
        "3",
        "--embedding-model",
        "e.gguf",
        "--slots",
        "2",
        "--delay",
        "0.5",
        "--params",
        "b=8",
        "--params",
        "0.5",
        "--max-tokens",
        "77",
        "--no-warmup",
        "--market",
        "ws://127.0.0.1:7",
        "--room",
        "r",
        "--heartbeat",
        "3",
        "--invite",
        "igora-invite:abc",
    ]
    args = build_parser().parse_args(flags)
    from_flags = worker_spec(args, market_address(args.market, args.room, args.invite))
    (from_file,) = parse("""
[[worker]]
name = "w"
engine = "openai"
models = ["a=b", "c"]
base_url = "http://h:1/v1"
api_key = "k"
upstream_timeout = 9
context = 512
threads = 3
embedding_model = "e.gguf"
slots = 2
delay = 0.5
params = ["b=8", "0.5"]
max_tokens = 77
warmup = false
market = "ws://127.0.0.1:7"
room = "r"
heartbeat = 3
invite = "igora-invite:abc"
""")
    assert from_file == from_flags
    assert from_file.max_tokens == 77 and from_file.engine == EngineConfig(
        engine="openai",
        models=("a=b", "c"),
        base_url="http://h:1/v1",
        api_key="k",
        upstream_timeout=9.0,
        context=512,
        threads=3,
        embedding_model="e.gguf",
        slots=2,
        delay=0.5,
        params=("b=8", "0.5"),
    )
    # Every flag of `igora worker` but the shared ones (--log-level) has its key.
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    worker_flags = {a.dest for a in commands.choices["worker"]._actions if a.option_strings}
    keys = {
        "no_warmup" if k == "warmup" else "model" if k == "models" else k
        for k in (
            "name",
            "engine",
            "models",
            "base_url",
            "api_key",
            "upstream_timeout",
            "context",
            "threads",
            "embedding_model",
            "slots",
            "delay",
            "params",
            "max_tokens",
            "warmup",
            "market",
            "room",
            "heartbeat",
            "invite",
        )
    }
    assert worker_flags - {"help", "log_level"} == keys


def test_api_key_can_come_from_a_named_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = (
        '[[worker]]\nengine = "openai"\nbase_url = "https://api.example/v1"\n'
        'model = "m"\napi_key_env = "IGORA_TEST_KEY"\n'
    )
    monkeypatch.setenv("IGORA_TEST_KEY", "sk-123")
    assert parse(text)[0].engine.api_key == "sk-123"
    monkeypatch.delenv("IGORA_TEST_KEY")
    with pytest.raises(ConfigError, match=r"IGORA_TEST_KEY .* is not set"):
        parse(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("x = [", "is not valid TOML"),
        ("market = 'ws://127.0.0.1:1'\n", r"no \[\[worker\]\] table"),
        ("worker = 3\n", "must be tables written"),
        ("[[worker]]\nslotz = 2\n", "unknown key 'slotz' .*known keys: .*slots"),
        ("[[worker]]\nslots = 'two'\n", "slots must be an integer"),
        ("[[worker]]\nslots = true\n", "slots must be an integer"),
        ("[[worker]]\nupstream_timeout = 'soon'\n", "upstream_timeout must be a number"),
        ("[[worker]]\nwarmup = 'no'\n", "warmup must be true or false"),
        ("[[worker]]\nslots = 0\n", "slots must be positive"),
        ("[[worker]]\nmax_tokens = 0\n", "max_tokens must be positive"),
        ("[[worker]]\nmax_tokens = 2.5\n", "max_tokens must be an integer"),
        ("[[worker]]\nmax_tokens = 10000001\n", "max_tokens must be at most"),
        ("[[worker]]\nengine = 'vllm'\n", "engine must be one of llama, echo, openai"),
        ("[[worker]]\nmodel = ['a', 3]\n", "list of non-empty strings"),
        ("name = 'x'\n[[worker]]\n", "'name' belongs in each"),
        (
            "[[worker]]\nname = 'a'\nengine = 'echo'\n[[worker]]\nname = 'a'\nengine = 'echo'\n",
            "worker 2 .*two workers are named 'a'",
        ),
        ("[[worker]]\nengine = 'echo'\nmodel = 'a'\nmodels = ['b']\n", "model or models, not both"),
        ("[[worker]]\nengine = 'openai'\nmodel = 'a'\n", "engine openai needs base_url"),
        ("[[worker]]\nengine = 'openai'\nbase_url = 'http://h/v1'\n", "engine openai needs models"),
        ("[[worker]]\nengine = 'openai'\nbase_url = 'http://h/v1'\nmodel = 'a='\n", "malformed"),
        ("[[worker]]\nengine = 'openai'\nbase_url = 'h:1'\nmodel = 'a'\n", "http://host:port/v1"),
        ("[[worker]]\nengine = 'echo'\nmarket = 'http://x'\n", "not a websocket URL"),
        ("[[worker]]\nengine = 'llama'\nparams = 8\n", "params is for engine openai"),
        (
            "[[worker]]\nengine = 'openai'\nbase_url = 'http://h/v1'\nmodel = 'a'\n"
            "params = 'z=1'\n",
            "'z' is not a served model",
        ),
        (
            "[[worker]]\nengine = 'openai'\nbase_url = 'http://h/v1'\nmodel = 'a'\nparams = -1\n",
            "must be a positive number",
        ),
    ],
)
def test_bad_files_are_refused_with_where_and_what(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(text, source="w.toml")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igora", "workers", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_check_prints_the_workers_and_bad_files_exit_2_without_traceback(tmp_path: Path) -> None:
    good = tmp_path / "w.toml"
    good.write_text(TWO)
    out = run_cli("--config", str(good), "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "alpha: echo serving alpha, 1 slot(s), on ws://127.0.0.1:1234/market",
        "remote: openai via http://127.0.0.1:8000/v1 serving llama3.2:3b=llama3.2, qwen2.5, "
        "4 slot(s), on ws://127.0.0.1:1234/lab",
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text("[[worker]]\nengine = 'openai'\n")
    for config in (bad, tmp_path / "missing.toml"):
        out = run_cli("--config", str(config), cwd=tmp_path)
        assert out.returncode == 2
        assert out.stderr.startswith("igora workers: error: ")
        assert "Traceback" not in out.stderr


async def test_one_command_puts_several_workers_on_the_market(cluster: Cluster) -> None:
    cluster.market()
    cluster.broker()
    with Stub() as stub:
        config = cluster.tmp / "workers.toml"
        config.write_text(f"""
heartbeat = 1
warmup = false

[[worker]]
name = "alpha"
engine = "echo"
model = "alpha"

[[worker]]
name = "beta"
engine = "echo"
model = "beta"
slots = 2
max_tokens = 3

[[worker]]
name = "upstream"
engine = "openai"
base_url = "{stub.url}"
models = ["ok=stubbed", "ok=also-stubbed"]
""")
        proc = cluster.spawn(
            "workers", "--config", str(config), "--market", cluster.url, name="workers"
        )
        workers = cluster.wait_agents("worker", 3, timeout=60)
        by_name = {w["name"]: w for w in workers}
        assert set(by_name) == {"alpha", "beta", "upstream"}
        assert len({w["id"] for w in workers}) == 3  # three agents, one process
        assert by_name["beta"]["slots"] == 2
        assert [m["name"] for m in by_name["upstream"]["models"]] == ["stubbed", "also-stubbed"]
        async with Client(cluster.url, timeout=30) as client:
            ids = {w.name: w.id for w in client.workers()}
            a = await (await client.submit("un deux", model="alpha")).result()
            b = await (await client.submit("trois", model="beta")).result()
            s = await (await client.submit("hi", model="also-stubbed")).result()
            long = await (await client.submit("un deux trois quatre", model="beta")).result()
        assert (a.text, a.task["worker"]) == ("Echo: un deux", ids["alpha"])
        assert (b.text, b.task["worker"]) == ("Echo: trois", ids["beta"])
        # beta's max_tokens (3) bounds the answers of tasks that set none.
        assert (long.text, long.finish_reason) == ("Echo: un deux", "length")
        assert (s.text, s.task["worker"]) == ("Hello from the stub", ids["upstream"])
        assert stub.requests[-1]["model"] == "ok"
        proc.stop()
        end = time.monotonic() + 20
        while time.monotonic() < end and cluster.agents("worker"):
            time.sleep(0.1)
        assert cluster.agents("worker") == []  # all left with the process
