"""Installing Igora: the light install compiles nothing, and scripts/install-llama.sh puts
exactly its portable llama.cpp build in place of any other build.

These tests make fresh virtual environments and install into them from the package
index (pip's cache of pure wheels makes a second run quick).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-llama.sh"
OWN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
"""The environment of commands run in a fresh venv: they see its packages only."""


def run(*cmd: str | Path, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in cmd],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )  # type: ignore[call-overload]
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin" / "python"


def clean_clone(dest: Path) -> Path:
    """What a clone of the repository holds for pip (no .venv, no build leftovers)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "igora",
        dest / "igora",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return dest


@pytest.mark.slow
def test_light_install_builds_no_llama_cpp_and_runs_market_and_gateway(
    tmp_path: Path,
) -> None:
    python = fresh_venv(tmp_path / "venv")
    src = clean_clone(tmp_path / "igora")
    env = OWN_ENV
    run(python, "-m", "pip", "install", "--progress-bar", "off", src, env=env)
    installed = run(python, "-m", "pip", "list", "--format=json", env=env).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "igora" in names and "llama-cpp-python" not in names, names
    igora = tmp_path / "venv" / "bin" / "igora"
    for command in ("gateway", "market", "broker", "worker", "chat"):
        shown = run(igora, command, "--help", env=env, cwd=tmp_path).stdout
        assert f"usage: igora {command}" in shown
    # The llama engine is the one thing missing: one line says what to install.
    worker = subprocess.run(
        [igora, "worker", "--market", "ws://127.0.0.1:9"],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 2, worker.stderr
    assert worker.stderr.count("\n") == 1 and "Traceback" not in worker.stderr, worker.stderr
    assert "needs llama-cpp-python, which is not installed" in worker.stderr
    assert f"scripts/install-llama.sh {python}" in worker.stderr
    # The OpenAI-compatible and echo engines come with the light install.
    openai = subprocess.run(
        [igora, "worker", "--engine", "openai", "--base-url", "nope", "--model", "m"],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert openai.returncode == 2 and "must look like http://host:port/v1" in openai.stderr


def test_starting_the_cli_imports_no_llama_cpp() -> None:
    code = (
        "import sys, igora.cli, igora.roles, igora.up, igora.workers_config, "
        "igora.engines.openai, igora.engines.echo, igora.gateway.cli\n"
        "igora.cli.build_parser()\n"
        "assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'\n"
    )
    run(sys.executable, "-c", code, timeout=60)


def installed_wheel() -> Path:
    """The wheel file the running environment's llama-cpp-python was installed from."""
    from importlib.metadata import distribution

    origin = json.loads(distribution("llama-cpp-python").read_text("direct_url.json") or "{}")
    url = str(origin.get("url", ""))
    assert url.startswith("file://") and url.endswith(".whl"), (
        f"llama-cpp-python was not installed from a wheel file ({url or 'from an index'}): "
        "install it with scripts/install-llama.sh"
    )
    return Path(url.removeprefix("file://"))


@pytest.mark.slow
def test_install_script_replaces_another_build_with_its_own_then_keeps_it(
    tmp_path: Path,
) -> None:
    """A user who built llama.cpp before (another build of the same version) gets the
    script's build at the next `make up`; later runs find it and do nothing."""
    wheel = installed_wheel()
    python = fresh_venv(tmp_path / "venv")
    env = {**OWN_ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("IGORA_LLAMA_CMAKE_ARGS", None)
    house = Path(run("bash", SCRIPT, "--wheelhouse", python, env=env).stdout.strip())
    assert house.is_relative_to(tmp_path / "cache" / "igora" / "wheels")
    version = wheel.name.split("-")[1]
    assert f"llama-cpp-python-{version}-" in house.name
    house.mkdir(parents=True)
    shutil.copy(wheel, house / wheel.name)  # as if built by the script before
    other = tmp_path / "elsewhere" / wheel.name
    other.parent.mkdir()
    shutil.copy(wheel, other)
    run(python, "-m", "pip", "install", "--quiet", other, env=env)

    first = run("bash", SCRIPT, python, env=env)
    assert f"replacing llama-cpp-python {version} (another build)" in first.stdout, first.stdout
    assert "building llama.cpp" not in first.stdout
    assert "AVX512" not in first.stdout and "AMX" not in first.stdout
    origin = json.loads(
        run(
            python,
            "-c",
            "import importlib.metadata as m; print(m.distribution("
            "'llama-cpp-python').read_text('direct_url.json'))",
            env=env,
        ).stdout
    )
    assert origin["url"] == (house / wheel.name).as_uri()

    again = run("bash", SCRIPT, python, env=env)
    assert again.stdout == (
        f"llama.cpp: llama-cpp-python {version} (portable "
        f"{platform.machine()} baseline) is installed\n"
    )
