"""What builds an engine: ``EngineConfig``, filled by the command line (``igora worker``)
or a TOML file (``igora workers``), and the engines' defaults, defined here once."""

from __future__ import annotations

from dataclasses import dataclass

ENGINES = ("llama", "echo", "openai")
"""llama: llama.cpp on a GGUF file; echo: deterministic test engine; openai: an
OpenAI-compatible server."""
DEFAULT_ENGINE = "llama"
DEFAULT_CONTEXT = 2048
"""llama: context length in tokens."""
DEFAULT_SLOTS = 1
"""Tasks an engine runs at once."""
UPSTREAM_TIMEOUT = 300.0
"""openai: seconds the upstream may stay silent (before its first byte or between two
chunks)."""
DEFAULT_DELAY = 0.0
"""echo: seconds per token."""
ECHO_MODEL = "echo"
"""echo: the model name served when none is given."""


@dataclass(frozen=True)
class EngineConfig:
    """One engine's settings; each field is read by the engines named in its comment."""

    engine: str = DEFAULT_ENGINE
    models: tuple[str, ...] = ()  # llama: one GGUF path; echo: a name; openai: NAME[=ALIAS]
    base_url: str | None = None  # openai
    api_key: str | None = None  # openai (default: OPENAI_API_KEY)
    upstream_timeout: float = UPSTREAM_TIMEOUT  # openai
    context: int = DEFAULT_CONTEXT  # llama
    threads: int | None = None  # llama
    embedding_model: str | None = None  # llama
    slots: int = DEFAULT_SLOTS  # llama (and the worker)
    delay: float = DEFAULT_DELAY  # echo
    params: tuple[str, ...] = ()  # openai: [ALIAS=]BILLIONS, the advertised sizes
