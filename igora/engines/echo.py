"""A deterministic engine for tests and benchmarks: it answers with the words of the
last user message (``Echo: ...``), optionally waiting ``delay`` seconds per token.

Instructions in the prompt drive it: ``#fail`` makes it raise an engine error, and
``#repeat N`` makes it answer N tokens (``tok0 tok1 ...``).

It also embeds, deterministically: a text's vector counts its words hashed into
``EMBED_DIMENSIONS`` buckets, scaled to length 1 (texts sharing words are close).
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncIterator

from ..capabilities import Cap
from .base import Embeddings, Engine, EngineError, Finish, ModelInfo, Request

_REPEAT = re.compile(r"#repeat (\d+)")
EMBED_DIMENSIONS = 16
CAPABILITIES = frozenset({Cap.CHAT.value, Cap.EMBED.value})
PARAMS = "0.2"
"""The size echo advertises (billions of parameters): price factor 2, as a 135M model's."""


class EchoEngine(Engine):
    kind = "echo"

    def __init__(self, model: str = "echo", delay: float = 0.0) -> None:
        self.model = model
        self.delay = delay
        self._models = (ModelInfo(model, 1_000_000, CAPABILITIES, params=PARAMS),)

    def models(self) -> list[ModelInfo]:
        return list(self._models)  # made once: a worker asks at every task

    async def embed(
        self, inputs: list[str], *, model: str | None = None, dimensions: int | None = None
    ) -> Embeddings:
        size = dimensions or EMBED_DIMENSIONS
        vectors = []
        for text in inputs:
            v = [0.0] * size
            for word in text.lower().split():
                v[zlib.crc32(word.encode()) % size] += 1.0
            norm = sum(x * x for x in v) ** 0.5
            vectors.append([x / norm for x in v] if norm else v)
        return Embeddings(vectors, sum(len(t.split()) for t in inputs))

    @staticmethod
    def tokens_for(request: Request) -> list[str]:
        last = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
        repeat = _REPEAT.search(last)
        if repeat:
            n = int(repeat.group(1))
            return [f"tok{i} " for i in range(n)]
        words = last.split()
        return ["Echo:"] + [" " + w for w in words]

    async def generate(self, request: Request) -> AsyncIterator[str | Finish]:
        last = request.messages[-1]["content"] if request.messages else ""
        if "#fail" in last:
            raise EngineError("the echo engine was asked to fail (#fail in the prompt)")
        tokens = self.tokens_for(request)
        limit = request.max_tokens
        reason = "stop"
        if limit is not None and len(tokens) > limit:
            tokens, reason = tokens[:limit], "length"
        text = ""
        for i, tok in enumerate(tokens):
            text += tok
            if any(s and s in text for s in request.stop):
                cut = min(text.find(s) for s in request.stop if s and s in text)
                before = text[len(text) - len(tok) : cut]
                if before:
                    yield before
                yield Finish("stop", len(last.split()), i + 1)
                return
            if self.delay:
                await asyncio.sleep(self.delay)
            elif i % 64 == 63:
                await asyncio.sleep(0)
            yield tok
        yield Finish(reason, len(last.split()), len(tokens))
