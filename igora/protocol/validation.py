"""Validation of a task read from (or about to be written to) the market, and the
readings of a task every role shares (its conversation, stop strings, tool names)."""

from __future__ import annotations

import math
from typing import Any

from .names import (
    MAX_CHOICES,
    MAX_DIMENSIONS,
    MAX_ID,
    MAX_INPUTS,
    MAX_MESSAGES,
    MAX_TEXT,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    RESPONSE_TYPES,
    TOOL_CHOICES,
    ProtocolError,
    State,
    TaskField,
    TaskKind,
)


def _opt_number(task: dict[str, Any], field: str, lo: float, hi: float) -> None:
    value = task.get(field)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{field} must be a number")
    if not lo <= value <= hi:
        raise ProtocolError(f"{field} must be between {lo} and {hi}")


def _opt_str(task: dict[str, Any], field: str, limit: int = MAX_TEXT) -> None:
    value = task.get(field)
    if value is None:
        return
    if not isinstance(value, str):
        raise ProtocolError(f"{field} must be a string")
    if len(value) > limit:
        raise ProtocolError(f"{field} is longer than {limit} characters")


def validate_task(value: Any) -> dict[str, Any]:
    """Check a task read from the market; return it (a plain dict) or raise ProtocolError.

    Unknown fields are kept: other agents may add their own.
    """
    if not isinstance(value, dict):
        raise ProtocolError("a task must be a JSON object")
    task = value
    tid = task.get(TaskField.ID)
    if not isinstance(tid, str) or not tid or len(tid) > MAX_ID:
        raise ProtocolError("id must be a non-empty string")
    for field in (
        TaskField.ASKER,
        TaskField.STYLE,
        TaskField.MODEL,
        TaskField.WORKER,
        TaskField.STREAM,
        TaskField.BROKER,
    ):
        _opt_str(task, field, MAX_ID)
    _opt_str(task, TaskField.SYSTEM_PROMPT)
    _opt_str(task, TaskField.PROMPT)
    state = task.get(TaskField.STATE)
    if state is not None and state not in {s.value for s in State}:
        raise ProtocolError(f"unknown state {state!r}")
    messages = task.get(TaskField.MESSAGES)
    if messages is not None:
        if not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
            raise ProtocolError(f"messages must be a list of at most {MAX_MESSAGES}")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ProtocolError("each message needs a role and a content")
            content = m.get("content")
            if not isinstance(content, str) or len(content) > MAX_TEXT:
                raise ProtocolError("each message content must be a string")
            _check_message_extras(m)
    kind = task.get(TaskField.KIND, TaskKind.CHAT.value)
    if kind not in {k.value for k in TaskKind}:
        raise ProtocolError(f"unknown kind {kind!r}")
    if kind == TaskKind.EMBED.value:
        inputs = task.get(TaskField.INPUTS)
        if (
            not isinstance(inputs, list)
            or not 0 < len(inputs) <= MAX_INPUTS
            or not all(isinstance(t, str) and len(t) <= MAX_TEXT for t in inputs)
        ):
            raise ProtocolError(f"inputs must be a list of 1 to {MAX_INPUTS} strings")
        _opt_number(task, TaskField.DIMENSIONS, 1, MAX_DIMENSIONS)
    elif task.get(TaskField.PROMPT) is None and not messages:
        raise ProtocolError("a task needs a prompt or messages")
    _check_v2_options(task)
    _opt_number(task, TaskField.TEMPERATURE, 0, 10)
    _opt_number(task, TaskField.TOP_P, 0, 1)
    _opt_number(task, TaskField.SEED, -(2**63), 2**64)
    _opt_number(task, TaskField.MAX_TOKENS, 1, MAX_TOKENS_LIMIT)
    _opt_number(task, TaskField.DEADLINE, 0, 2**53)
    _opt_number(task, TaskField.ATTEMPTS, 0, 1000)
    stop = task.get(TaskField.STOP)
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (
            not isinstance(stop, list)
            or len(stop) > 16
            or not all(isinstance(s, str) for s in stop)
        ):
            raise ProtocolError("stop must be a string or a list of at most 16 strings")
    return task


def _check_message_extras(m: dict[str, Any]) -> None:
    """The OpenAI fields a v2 message may carry besides role and content: an assistant's
    ``tool_calls`` and a tool answer's ``tool_call_id`` (and ``name``)."""
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
            raise ProtocolError("a message's tool_calls must be a list")
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if (
                not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("arguments"), str)
            ):
                raise ProtocolError("each tool call needs a function name and arguments")
    for field in ("tool_call_id", "name"):
        if m.get(field) is not None and not isinstance(m.get(field), str):
            raise ProtocolError(f"a message's {field} must be a string")


def _check_v2_options(task: dict[str, Any]) -> None:
    tools = task.get(TaskField.TOOLS)
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise ProtocolError(f"tools must be a list of at most {MAX_TOOLS}")
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ProtocolError("each tool needs function.name")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise ProtocolError("a tool's function.parameters must be a JSON schema object")
    choice = task.get(TaskField.TOOL_CHOICE)
    if choice is not None:
        if isinstance(choice, dict):
            name = (
                (choice.get("function") or {}).get("name")
                if isinstance(choice.get("function"), dict)
                else None
            )
            if not isinstance(name, str):
                raise ProtocolError("toolChoice must name a function: {type, function: {name}}")
            if name not in tool_names(task):
                raise ProtocolError(f"toolChoice names {name!r}, which is not in tools")
        elif choice not in TOOL_CHOICES:
            raise ProtocolError(f"toolChoice must be one of {sorted(TOOL_CHOICES)} or a function")
        elif choice == "required" and not tool_names(task):
            raise ProtocolError("toolChoice 'required' needs tools")
    fmt = task.get(TaskField.RESPONSE_FORMAT)
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_TYPES:
            raise ProtocolError(f"responseFormat.type must be one of {sorted(RESPONSE_TYPES)}")
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ProtocolError(
                    "responseFormat json_schema needs json_schema.schema (an object)"
                )
    _opt_number(task, TaskField.N, 1, MAX_CHOICES)
    _opt_number(task, TaskField.TOP_LOGPROBS, 0, MAX_TOP_LOGPROBS)
    if task.get(TaskField.LOGPROBS) is not None and not isinstance(
        task.get(TaskField.LOGPROBS), bool
    ):
        raise ProtocolError("logprobs must be true or false")


def tool_names(task: dict[str, Any]) -> list[str]:
    tools = task.get(TaskField.TOOLS)
    if not isinstance(tools, list):
        return []
    return [
        t["function"]["name"]
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]


def is_original(task: dict[str, Any]) -> bool:
    """Whether a task was written by an original (version 1) agent: v2 clients write
    ``protocol: 2`` in every task."""
    return task.get(TaskField.PROTOCOL) is None


def chat_messages(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation a task asks for, system prompt first (as the original builds it)."""
    out: list[dict[str, Any]] = []
    system = task.get(TaskField.SYSTEM_PROMPT)
    messages = task.get(TaskField.MESSAGES) or []
    if system and not any(m.get("role") == "system" for m in messages):
        out.append({"role": "system", "content": system})
    out.extend({k: m[k] for k in _MESSAGE_FIELDS if m.get(k) is not None} for m in messages)
    if not messages and task.get(TaskField.PROMPT) is not None:
        out.append({"role": "user", "content": task[TaskField.PROMPT]})
    return out


_MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name")


def stop_list(task: dict[str, Any]) -> list[str]:
    stop = task.get(TaskField.STOP)
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
