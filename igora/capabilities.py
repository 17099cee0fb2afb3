"""What a task needs from a worker, what a worker offers, and whether anyone can serve it.

Workers advertise, per model, the capabilities of their engine on that model
(``models: [{"name", "contextLength", "capabilities": [...]}]`` in awareness). A model
advertised without ``capabilities`` (an Igora worker older than this list) offers
``chat`` only; an original worker advertises no models at all and serves chat tasks
naming no model. The broker gives a task only to a worker whose model offers everything
the task needs (``matching``), and fails at once a task that no worker on the market could
ever serve (``unservable``), with a typed ``errorCode``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .protocol import ErrorCode, Peer, TaskField, TaskKind, is_original


class Cap(str, Enum):
    CHAT = "chat"  # chat and text completion
    TOOLS = "tools"  # function calling (tools / toolChoice)
    JSON_OBJECT = "json_object"  # responseFormat {"type": "json_object"}
    JSON_SCHEMA = "json_schema"  # responseFormat {"type": "json_schema", ...}
    N = "n"  # several choices (n > 1)
    LOGPROBS = "logprobs"  # token log probabilities
    EMBED = "embed"  # the embed task kind


BASIC = frozenset({Cap.CHAT.value})
"""What a model advertised without a list offers."""

# What each capability is called in an OpenAI request, to name it in an error.
PARAM = {
    Cap.CHAT: "messages",
    Cap.TOOLS: "tools",
    Cap.JSON_OBJECT: "response_format",
    Cap.JSON_SCHEMA: "response_format",
    Cap.N: "n",
    Cap.LOGPROBS: "logprobs",
    Cap.EMBED: "model",
}


def required(task: dict[str, Any]) -> frozenset[str]:
    """The capabilities a task needs."""
    if task.get(TaskField.KIND) == TaskKind.EMBED.value:
        return frozenset({Cap.EMBED.value})
    needs = {Cap.CHAT.value}
    if task.get(TaskField.TOOLS) and task.get(TaskField.TOOL_CHOICE) != "none":
        needs.add(Cap.TOOLS.value)
    fmt = task.get(TaskField.RESPONSE_FORMAT)
    if isinstance(fmt, dict) and fmt.get("type") in (Cap.JSON_OBJECT.value, Cap.JSON_SCHEMA.value):
        needs.add(fmt["type"])
    n = task.get(TaskField.N)
    if isinstance(n, (int, float)) and n > 1:
        needs.add(Cap.N.value)
    if task.get(TaskField.LOGPROBS) is True:
        needs.add(Cap.LOGPROBS.value)
    return frozenset(needs)


def offered(worker: Peer, model: str | None) -> frozenset[str]:
    """What ``worker`` can do on ``model`` (None: on any of its models, for a task naming
    none: the broker then lets the worker pick its first model that fits)."""
    raw = worker.state.get("models")
    if not isinstance(raw, list) or not raw:
        return BASIC if model is None else frozenset()
    out: set[str] = set()
    for m in raw:
        name = m.get("name") if isinstance(m, dict) else m
        if model is not None and name != model:
            continue
        caps = m.get("capabilities") if isinstance(m, dict) else None
        if isinstance(caps, list):
            out.update(c for c in caps if isinstance(c, str))
        else:
            out.update(BASIC)
    return frozenset(out)


def fits(worker: Peer, model: str | None, needs: Iterable[str]) -> bool:
    """Whether ``worker`` serves ``model`` with every capability in ``needs``."""
    return worker.serves(model) and frozenset(needs) <= offered(worker, model)


def model_for(task: dict[str, Any], workers: Iterable[Peer]) -> str | None:
    """The model a task is matched on. An original agent's task may name any model its
    user typed (the original OpenAI endpoint passes ``gpt-3.5-turbo`` through): when no
    worker on the market serves that name, any text worker answers it, as the original
    did. A v2 task's model is taken as it is."""
    model = task.get(TaskField.MODEL) or None
    if model is None or not is_original(task):
        return model
    return model if any(w.serves(model) for w in workers) else None


@dataclass(frozen=True)
class Unservable:
    """Why no worker on the market can serve a task: a typed code, a sentence, and the
    capabilities missing (empty when the model itself is not served)."""

    code: ErrorCode
    reason: str
    missing: tuple[str, ...] = ()


def unservable(task: dict[str, Any], workers: list[Peer]) -> Unservable | None:
    """Why no worker present on the market could serve ``task`` (whatever their load),
    or None if one could. Workers: every worker present, busy or not."""
    return unservable_kind(model_for(task, workers), required(task), workers)


def unservable_kind(
    model: str | None, needs: frozenset[str], workers: list[Peer]
) -> Unservable | None:
    """Why no worker present could serve a task of ``model`` (None: any) that needs
    ``needs``, or None if one could (a v3 task's header says both)."""
    if any(fits(w, model, needs) for w in workers):
        return None
    serving = [w for w in workers if w.serves(model)]
    if not serving:
        names = sorted({n for w in workers for n in w.models})
        return Unservable(
            ErrorCode.MODEL_NOT_SERVED,
            f"no worker on the market serves model {model!r}"
            + (f" (served: {', '.join(names)})" if names else " (no worker is present)"),
        )
    have = frozenset().union(*(offered(w, model) for w in serving))
    missing = tuple(sorted(needs - have)) or tuple(sorted(needs - BASIC))
    what = f"model {model!r}" if model else "any worker"
    return Unservable(
        ErrorCode.CAPABILITY_NOT_SERVED,
        f"no worker on the market offers {' + '.join(missing)} on {what}",
        missing,
    )
