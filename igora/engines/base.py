"""What every engine offers the worker: models, and a token stream for one request."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..protocol import F, chat_messages, stop_list


class EngineError(RuntimeError):
    """Generation failed; the message is meant for a person (it ends up in ``error``)."""


class EngineUnavailable(EngineError):
    """The engine cannot serve right now (e.g. its upstream is down): another worker may."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int | None = None

    def advert(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.context_length:
            out["contextLength"] = self.context_length
        return out


@dataclass
class Request:
    messages: list[dict[str, str]]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_task(cls, task: dict[str, Any]) -> Request:
        def num(name: str) -> float | None:
            v = task.get(name)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        seed = num(F.SEED)
        max_tokens = num(F.MAX_TOKENS)
        return cls(
            messages=chat_messages(task),
            model=task.get(F.MODEL) or None,
            temperature=num(F.TEMPERATURE),
            top_p=num(F.TOP_P),
            seed=int(seed) if seed is not None else None,
            max_tokens=int(max_tokens) if max_tokens is not None else None,
            stop=stop_list(task),
        )


@dataclass(frozen=True)
class Finish:
    """Last item of a stream."""

    reason: str  # "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(abc.ABC):
    """An LLM backend. ``generate`` yields text pieces (one per token) then a Finish.

    Closing the generator early (abort) must stop generation at the next token.
    """

    kind: str = "engine"

    @abc.abstractmethod
    def models(self) -> list[ModelInfo]: ...

    @abc.abstractmethod
    def generate(self, request: Request) -> AsyncIterator[str | Finish]: ...

    def default_model(self) -> str:
        return self.models()[0].name

    async def available(self) -> bool:
        """Whether the engine can take work now (upstream engines check their server)."""
        return True

    async def close(self) -> None:
        return None
