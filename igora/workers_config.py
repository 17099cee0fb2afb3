"""``igora workers --config FILE``: several workers in one process, from one TOML file.

Each ``[[worker]]`` table is one worker, with the keys of ``igora worker``'s flags
(``--base-url`` becomes ``base_url``). Keys at the top of the file are defaults for
every worker. Each worker is its own agent on the market (own id, name, models and
slots); they share the process and its event loop.

    market = "ws://127.0.0.1:1234"

    [[worker]]
    name = "smol"
    engine = "llama"
    slots = 2

    [[worker]]
    name = "ollama"
    engine = "openai"
    base_url = "http://localhost:11434/v1"
    models = ["llama3.2:3b=llama3.2", "qwen2.5:7b"]

A setting comes from the worker's table, else the top of the file, else the command
line (``--market``, ``--room``, ``--heartbeat``), else the environment.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .config import ConfigError, market_address
from .engines.base import EngineError
from .engines.config import (
    DEFAULT_ENGINE,
    ENGINES,
    EngineConfig,
)
from .engines.openai import check_base_url, parse_models
from .engines.upstream import parse_params
from .protocol import MAX_TOKENS_LIMIT
from .serving import WorkerSpec, check_params, serve

__all__ = ["KEYS", "Defaults", "WorkerSpec", "describe", "load", "parse", "run_workers"]

# key -> (accepted types, what it is); the same meaning as the ``igora worker`` flag.
KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "name shown to others"),
    "engine": ((str,), "llama, echo or openai"),
    "model": ((str, list), "llama: GGUF path; echo: name; openai: NAME[=ALIAS] or a list"),
    "models": ((list, str), "same as model"),
    "base_url": ((str,), "openai: the upstream's base URL"),
    "api_key": ((str,), "openai: the upstream's API key"),
    "api_key_env": ((str,), "openai: environment variable holding the API key"),
    "upstream_timeout": ((int, float), "openai: seconds the upstream may stay silent"),
    "context": ((int,), "llama: context length in tokens"),
    "threads": ((int,), "llama: CPU threads"),
    "embedding_model": ((str,), "llama: GGUF path of a model for embeddings"),
    "slots": ((int,), "tasks run at once"),
    "delay": ((int, float), "echo: seconds per token"),
    "params": ((str, int, float, list), "openai: [ALIAS=]BILLIONS, the models' sizes, or a list"),
    "max_tokens": ((int,), "answer length limit for tasks that set none"),
    "warmup": ((bool,), "measure the speed at start (default true)"),
    "market": ((str,), "market websocket URL"),
    "room": ((str,), "market room"),
    "heartbeat": ((int, float), "seconds between two awareness refreshes"),
    "invite": ((str,), "an invitation to a secure market (`igora market invite`)"),
}
ENGINE_KEYS = (
    "base_url",
    "upstream_timeout",
    "context",
    "threads",
    "slots",
    "delay",
    "embedding_model",
)
"""Keys passed as they are to ``EngineConfig`` (engine, models and api_key are resolved)."""
SECONDS = ("upstream_timeout", "delay")  # integers accepted, kept as floats
POSITIVE = ("slots", "context", "threads", "heartbeat", "upstream_timeout", "max_tokens")


_KIND = {str: "a string", int: "an integer", bool: "true or false", list: "a list of strings"}


@dataclass(frozen=True)
class Defaults:
    """What the command line gives the file: ``--market``, ``--room``, ``--heartbeat``
    (used where neither the worker's table nor the top of the file sets them)."""

    market: str | None = None
    room: str | None = None
    heartbeat: float | None = None
    invite: str | None = None


def _check(where: str, key: str, value: Any) -> None:
    if key not in KEYS:
        known = ", ".join(sorted(KEYS))
        raise ConfigError(f"{where}: unknown key {key!r} (known keys: {known})")
    types, what = KEYS[key]
    bad_bool = isinstance(value, bool) and bool not in types
    if bad_bool or not isinstance(value, types):
        kinds = "a number" if float in types else " or ".join(_KIND[t] for t in types)
        raise ConfigError(f"{where}: {key} must be {kinds} ({what}), not {value!r}")
    if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key} must be a list of non-empty strings")
    if key in POSITIVE and isinstance(value, (int, float)) and value <= 0:
        raise ConfigError(f"{where}: {key} must be positive")
    if key == "max_tokens" and isinstance(value, int) and value > MAX_TOKENS_LIMIT:
        raise ConfigError(f"{where}: max_tokens must be at most {MAX_TOKENS_LIMIT}")
    if key == "engine" and value not in ENGINES:
        raise ConfigError(f"{where}: engine must be one of {', '.join(ENGINES)}, not {value!r}")


def parse(
    text: str,
    *,
    source: str = "config",
    cli: Defaults | None = None,
) -> list[WorkerSpec]:
    """The workers a TOML text describes; ConfigError says what is wrong and where."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    tables = data.pop("worker", None)
    if tables is None:
        raise ConfigError(f"{source}: no [[worker]] table: add one per worker")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}: 'worker' must be tables written [[worker]]")
    defaults = dict(data)
    for key, value in defaults.items():
        if key == "name":
            raise ConfigError(f"{source}: 'name' belongs in each [[worker]] table")
        _check(f"{source} (top level)", key, value)
    host = socket.gethostname()
    specs: list[WorkerSpec] = []
    names: set[str] = set()
    for i, table in enumerate(tables, 1):
        label = f"{source}: worker {i}" + (f" ({table['name']!r})" if "name" in table else "")
        for key, value in table.items():
            _check(label, key, value)
        if "model" in table and "models" in table:
            raise ConfigError(f"{label}: give model or models, not both")
        merged = {**defaults, **table}
        name = merged.get("name") or f"worker-{host}-{i}"
        if name in names:
            raise ConfigError(f"{label}: two workers are named {name!r}")
        names.add(name)
        specs.append(_spec(label, name, merged, cli))
    if not specs:
        raise ConfigError(f"{source}: no [[worker]] table: add one per worker")
    return specs


def _spec(label: str, name: str, s: dict[str, Any], cli: Defaults | None) -> WorkerSpec:
    engine = s.get("engine", DEFAULT_ENGINE)
    models = s.get("models", s.get("model"))
    models = [models] if isinstance(models, str) else list(models or [])
    api_key = s.get("api_key")
    if api_key is None and s.get("api_key_env"):
        api_key = os.environ.get(s["api_key_env"])
        if not api_key:
            raise ConfigError(
                f"{label}: the environment variable {s['api_key_env']} (api_key_env) is not set"
            )
    params = s.get("params", [])  # "8", 8, or a list of "[ALIAS=]B"
    params = [str(params)] if isinstance(params, (str, int, float)) else [str(p) for p in params]
    if engine == "openai":
        if not s.get("base_url"):
            raise ConfigError(
                f'{label}: engine openai needs base_url (e.g. "http://localhost:11434/v1")'
            )
        if not models:
            raise ConfigError(f'{label}: engine openai needs models = ["NAME[=ALIAS]", ...]')
        try:
            check_base_url(s["base_url"])
            parse_params(params, parse_models(models))
        except EngineError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    cli = cli or Defaults()
    try:
        address = market_address(
            s.get("market") or cli.market, s.get("room") or cli.room, s.get("invite") or cli.invite
        )
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    # What the file leaves out takes the defaults of EngineConfig and WorkerSpec.
    given: dict[str, Any] = {
        k: float(s[k]) if k in SECONDS else s[k] for k in ENGINE_KEYS if k in s
    }
    config = EngineConfig(
        engine=engine, models=tuple(models), api_key=api_key, params=tuple(params), **given
    )
    try:
        check_params(config)
    except EngineError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    worker: dict[str, Any] = {k: s[k] for k in ("max_tokens", "warmup") if k in s}
    heartbeat = s.get("heartbeat") or cli.heartbeat
    if heartbeat:
        worker["heartbeat"] = float(heartbeat)
    return WorkerSpec(name, address, config, **worker)


def load(path: Path, cli: Defaults | None = None) -> list[WorkerSpec]:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the config file {path} is not UTF-8 text") from None
    return parse(text, source=str(path), cli=cli)


def describe(spec: WorkerSpec) -> str:
    return spec.describe()


async def run_workers(path: Path, cli: Defaults | None = None, *, check: bool = False) -> int:
    """``igora workers``: every engine is built first (a bad file starts nothing), then
    all the workers run; with ``check``, only print what the file describes."""
    specs = load(path, cli)
    if check:
        for spec in specs:
            print(spec.describe())
        return 0
    return await serve(specs)
