"""What every engine offers the worker: models, and a token stream for one request."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..capabilities import BASIC
from ..protocol import TaskField, chat_messages, number, stop_list


class EngineError(RuntimeError):
    """Generation failed; the message is meant for a person (it ends up in ``error``)."""


class EngineUnavailable(EngineError):
    """The engine cannot serve right now (e.g. its upstream is down): another worker may."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int | None = None
    capabilities: frozenset[str] = BASIC  # see igora.capabilities.Cap
    params: str | None = None  # billions of parameters, as decimal text: the price factor

    def advert(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.context_length:
            out["contextLength"] = self.context_length
        if self.params is not None:
            out["params"] = self.params  # text: canonical JSON has no floats (credits.md §1)
        out["capabilities"] = sorted(self.capabilities)
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
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @classmethod
    def from_task(cls, task: dict[str, Any]) -> Request:
        def num(name: str) -> float | None:
            return number(task.get(name))

        seed = num(TaskField.SEED)
        max_tokens = num(TaskField.MAX_TOKENS)
        return cls(
            messages=chat_messages(task),
            model=task.get(TaskField.MODEL) or None,
            temperature=num(TaskField.TEMPERATURE),
            top_p=num(TaskField.TOP_P),
            seed=int(seed) if seed is not None else None,
            max_tokens=int(max_tokens) if max_tokens is not None else None,
            stop=stop_list(task),
            tools=list(task.get(TaskField.TOOLS) or []),
            tool_choice=task.get(TaskField.TOOL_CHOICE),
            response_format=task.get(TaskField.RESPONSE_FORMAT),
            n=int(num(TaskField.N) or 1),
            logprobs=task.get(TaskField.LOGPROBS) is True,
            top_logprobs=int(num(TaskField.TOP_LOGPROBS) or 0) or None,
        )


@dataclass(frozen=True)
class Finish:
    """Last item of a stream. Besides the text streamed before it (choice 0's content),
    an answer may hold choice 0's tool calls and log probabilities, and, for n > 1, every
    choice (``{"index", "content", "toolCalls", "finishReason", "logprobs"}``, the
    protocol's shape, docs/protocol.md 4.5)."""

    reason: str  # "stop", "length" or "tool_calls"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's shape: {id, type, function}
    logprobs: dict[str, Any] | None = None  # OpenAI's shape: {"content": [...]}
    choices: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Embeddings:
    """The answer to an embed task: one vector per input."""

    vectors: list[list[float]]
    prompt_tokens: int = 0


class Engine(abc.ABC):
    """An LLM backend. ``generate`` yields text pieces (one per token) then a Finish.

    Closing the generator early (abort) must stop generation at the next token.
    """

    kind: str = "engine"

    @abc.abstractmethod
    def models(self) -> list[ModelInfo]: ...

    @abc.abstractmethod
    def generate(self, request: Request) -> AsyncIterator[str | Finish]: ...

    async def embed(
        self, inputs: list[str], *, model: str | None = None, dimensions: int | None = None
    ) -> Embeddings:
        """Vectors for ``inputs`` (engines whose models offer ``embed``)."""
        raise EngineError(f"the {self.kind} engine does not compute embeddings")

    def default_model(self) -> str:
        return self.models()[0].name

    def model_for(self, needs: frozenset[str]) -> str | None:
        """This engine's first model offering every capability in ``needs``."""
        return next((m.name for m in self.models() if needs <= m.capabilities), None)

    async def available(self) -> bool:
        """Whether the engine can take work now (upstream engines check their server)."""
        return True

    async def close(self) -> None:
        return None
