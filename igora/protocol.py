"""The Igora protocol: the one place that names maps, states and fields.

The layout stays compatible with the original JavaScript Igora agents (see
``docs/protocol.md``): four kanban maps of *task id -> plain JSON task*, awareness
states ``{id, name, type, style, state, date}``. Everything Igora adds is an extra
field or an extra map, never a rename.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

PROTOCOL_VERSION = 2
"""Awareness field ``protocol``: 2 is this project; original agents have none (1)."""

DEFAULT_ROOM = "market"
DEFAULT_LOCAL_URL = "ws://localhost:1234"


class MapName(str, Enum):
    """Top-level shared types of the room document."""

    TODOS = "todos"
    PREPARED = "prepared"
    DOING = "doing"
    DONE = "done"
    STREAMS = "streams"  # stream key -> Y.Text, appended token by token (Igora addition)


class State(str, Enum):
    """Task states. ``failed`` and ``aborted`` are Igora additions; both live in ``done``."""

    TODO = "todo"
    PREPARED = "prepared"
    DOING = "doing"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def map(self) -> MapName:
        return STATE_MAP[self]

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


STATE_MAP: dict[State, MapName] = {
    State.TODO: MapName.TODOS,
    State.PREPARED: MapName.PREPARED,
    State.DOING: MapName.DOING,
    State.DONE: MapName.DONE,
    State.FAILED: MapName.DONE,
    State.ABORTED: MapName.DONE,
}
FINAL_STATES = frozenset({State.DONE, State.FAILED, State.ABORTED})
FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)  # as written in a task's ``state``
KANBAN = (MapName.TODOS, MapName.PREPARED, MapName.DOING, MapName.DONE)


class AgentType(str, Enum):
    WORKER = "worker"
    BROKER = "broker"
    CLIENT = "client"


class AgentState(str, Enum):
    READY = "ready"
    WORKING = "working"
    BUSY = "busy"  # worker whose engine is not available (e.g. upstream down)


TEXT_STYLE = "text"
BROKER_STYLE = "normal"
GATEWAY_STYLE = "openai_compatible_endpoint"
ABORTED_MARK = "aborted"  # value of the original ``aborted`` field


class F:
    """Task field names (one source of truth; the original's spelling is kept)."""

    ID = "id"
    ASKER = "asker"
    CLIENT_ID = "clientID"
    STYLE = "style"
    SYSTEM_PROMPT = "systemPrompt"
    PROMPT = "prompt"
    MESSAGES = "messages"
    STATE = "state"
    MODEL = "model"
    TEMPERATURE = "temperature"
    SEED = "seed"
    DATE = "date"
    WORKER = "worker"
    ATTEMPTS = "attemps"  # sic: the original's spelling, kept for compatibility
    START = "start"
    RESPONSE = "response"
    DELTA = "delta"
    CHUNK_DATE = "chunkDate"
    END = "end"
    DURATION = "duration"
    ABORTED = "aborted"
    # Igora additions
    MAX_TOKENS = "maxTokens"
    TOP_P = "topP"
    STOP = "stop"
    DEADLINE = "deadline"
    ERROR = "error"
    FINISH_REASON = "finishReason"
    USAGE = "usage"
    BROKER = "broker"
    STREAM = "stream"
    ASKER_NAME = "askerName"
    # Version 2 additions for agent frameworks (docs/protocol.md, 4.5)
    PROTOCOL = "protocol"  # 2 in every task a v2 client writes; absent: an original agent's
    KIND = "kind"  # "chat" (default) or "embed"
    TOOLS = "tools"
    TOOL_CHOICE = "toolChoice"
    RESPONSE_FORMAT = "responseFormat"
    N = "n"
    LOGPROBS = "logprobs"
    TOP_LOGPROBS = "topLogprobs"
    INPUTS = "inputs"  # embed: the texts to embed
    DIMENSIONS = "dimensions"  # embed: length of each vector asked for
    # results
    TOOL_CALLS = "toolCalls"
    LOGPROBS_RESULT = "tokenLogprobs"
    CHOICES = "choices"
    EMBEDDINGS = "embeddings"
    ERROR_CODE = "errorCode"


class TaskKind(str, Enum):
    CHAT = "chat"
    EMBED = "embed"


class ErrorCode(str, Enum):
    """Typed reasons of a ``failed`` task (field ``errorCode``), for programs to test
    instead of parsing ``error``."""

    MODEL_NOT_SERVED = "model_not_served"  # no worker on the market serves the model
    CAPABILITY_NOT_SERVED = "capability_not_served"  # ... none can do what the task asks


class A:
    """Awareness field names."""

    ID = "id"
    NAME = "name"
    TYPE = "type"
    STYLE = "style"
    STATE = "state"
    DATE = "date"
    ENGINE = "engine"
    # Igora additions
    PROTOCOL = "protocol"
    MODELS = "models"  # [{"name", "contextLength"}]
    SLOTS = "slots"
    RUNNING = "running"
    SPEED = "speed"  # measured tokens per second
    SINCE = "since"  # ms epoch when the agent started (broker leader election)
    LEADER = "leader"  # broker: true while it is the active one
    HEARTBEAT = "heartbeat"  # seconds between two refreshes of ``date``


# Limits applied to anything read from the shared document.
MAX_TEXT = 1_000_000  # characters of prompt / system prompt / one message
MAX_MESSAGES = 1_000
MAX_ID = 200
MAX_TOKENS_LIMIT = 1_000_000
MAX_TOOLS = 128
MAX_CHOICES = 16  # n
MAX_TOP_LOGPROBS = 20
MAX_INPUTS = 2048  # texts in one embed task
MAX_DIMENSIONS = 65_536
TOOL_CHOICES = frozenset({"auto", "none", "required"})
RESPONSE_TYPES = frozenset({"text", "json_object", "json_schema"})


class ProtocolError(ValueError):
    """A value read from (or about to be written to) the market is not a valid task."""


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    """An agent id (UUID, as the original agents use)."""
    return str(uuid.uuid4())


def new_task_id() -> str:
    """A task id: 96 random bits in 16 URL-safe characters. Shorter than a UUID on
    purpose: Yjs keeps every map key it ever saw, so the key length is most of what a
    finished task leaves behind in the document (about 150 bytes instead of 250)."""
    return secrets.token_urlsafe(12)


def stream_key(task_id: str, attempt: int) -> str:
    """Key of a task's token stream in the ``streams`` map; one per attempt."""
    return f"{task_id}#{attempt}"


def task_of(map_name: str, key: str) -> str:
    """The task a key of one of the room's maps belongs to."""
    if map_name == MapName.STREAMS.value:
        return key.rpartition("#")[0] or key
    return key


LIVE = (MapName.TODOS, MapName.PREPARED, MapName.DOING)
"""The maps of a task that has not ended, from the least to the most advanced."""


def abort_asked(*entries: Any) -> bool:
    """Whether any of these entries under one task id carries the abort mark.

    The mark belongs to the task, not to one entry: an abort written while the task moves
    (the broker assigning it, a worker starting it) lands on the entry the move has just
    left, and Yjs keeps both writes, so the id then has two entries, the marked one and
    the moved one (docs/protocol.md, 4.4)."""
    return any(isinstance(e, dict) and bool(e.get(F.ABORTED)) for e in entries)


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
    tid = task.get(F.ID)
    if not isinstance(tid, str) or not tid or len(tid) > MAX_ID:
        raise ProtocolError("id must be a non-empty string")
    for field in (F.ASKER, F.STYLE, F.MODEL, F.WORKER, F.STREAM, F.BROKER):
        _opt_str(task, field, MAX_ID)
    _opt_str(task, F.SYSTEM_PROMPT)
    _opt_str(task, F.PROMPT)
    state = task.get(F.STATE)
    if state is not None and state not in {s.value for s in State}:
        raise ProtocolError(f"unknown state {state!r}")
    messages = task.get(F.MESSAGES)
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
    kind = task.get(F.KIND, TaskKind.CHAT.value)
    if kind not in {k.value for k in TaskKind}:
        raise ProtocolError(f"unknown kind {kind!r}")
    if kind == TaskKind.EMBED.value:
        inputs = task.get(F.INPUTS)
        if (not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_INPUTS
                or not all(isinstance(t, str) and len(t) <= MAX_TEXT for t in inputs)):
            raise ProtocolError(f"inputs must be a list of 1 to {MAX_INPUTS} strings")
        _opt_number(task, F.DIMENSIONS, 1, MAX_DIMENSIONS)
    elif task.get(F.PROMPT) is None and not messages:
        raise ProtocolError("a task needs a prompt or messages")
    _check_v2_options(task)
    _opt_number(task, F.TEMPERATURE, 0, 10)
    _opt_number(task, F.TOP_P, 0, 1)
    _opt_number(task, F.SEED, -(2**63), 2**64)
    _opt_number(task, F.MAX_TOKENS, 1, MAX_TOKENS_LIMIT)
    _opt_number(task, F.DEADLINE, 0, 2**53)
    _opt_number(task, F.ATTEMPTS, 0, 1000)
    stop = task.get(F.STOP)
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) for s in stop):
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
            if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                    or not isinstance(fn.get("arguments"), str)):
                raise ProtocolError("each tool call needs a function name and arguments")
    for field in ("tool_call_id", "name"):
        if m.get(field) is not None and not isinstance(m.get(field), str):
            raise ProtocolError(f"a message's {field} must be a string")


def _check_v2_options(task: dict[str, Any]) -> None:
    tools = task.get(F.TOOLS)
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise ProtocolError(f"tools must be a list of at most {MAX_TOOLS}")
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ProtocolError("each tool needs function.name")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise ProtocolError("a tool's function.parameters must be a JSON schema object")
    choice = task.get(F.TOOL_CHOICE)
    if choice is not None:
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if isinstance(
                choice.get("function"), dict) else None
            if not isinstance(name, str):
                raise ProtocolError("toolChoice must name a function: {type, function: {name}}")
            if name not in tool_names(task):
                raise ProtocolError(f"toolChoice names {name!r}, which is not in tools")
        elif choice not in TOOL_CHOICES:
            raise ProtocolError(f"toolChoice must be one of {sorted(TOOL_CHOICES)} or a function")
        elif choice == "required" and not tool_names(task):
            raise ProtocolError("toolChoice 'required' needs tools")
    fmt = task.get(F.RESPONSE_FORMAT)
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_TYPES:
            raise ProtocolError(f"responseFormat.type must be one of {sorted(RESPONSE_TYPES)}")
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ProtocolError("responseFormat json_schema needs json_schema.schema (an object)")
    _opt_number(task, F.N, 1, MAX_CHOICES)
    _opt_number(task, F.TOP_LOGPROBS, 0, MAX_TOP_LOGPROBS)
    if task.get(F.LOGPROBS) is not None and not isinstance(task.get(F.LOGPROBS), bool):
        raise ProtocolError("logprobs must be true or false")


def tool_names(task: dict[str, Any]) -> list[str]:
    tools = task.get(F.TOOLS)
    if not isinstance(tools, list):
        return []
    return [t["function"]["name"] for t in tools
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)]


def is_original(task: dict[str, Any]) -> bool:
    """Whether a task was written by an original (version 1) agent: v2 clients write
    ``protocol: 2`` in every task."""
    return task.get(F.PROTOCOL) is None


def chat_messages(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation a task asks for, system prompt first (as the original builds it)."""
    out: list[dict[str, Any]] = []
    system = task.get(F.SYSTEM_PROMPT)
    messages = task.get(F.MESSAGES) or []
    if system and not any(m.get("role") == "system" for m in messages):
        out.append({"role": "system", "content": system})
    out.extend({k: m[k] for k in _MESSAGE_FIELDS if m.get(k) is not None} for m in messages)
    if not messages and task.get(F.PROMPT) is not None:
        out.append({"role": "user", "content": task[F.PROMPT]})
    return out


_MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name")


def stop_list(task: dict[str, Any]) -> list[str]:
    stop = task.get(F.STOP)
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


@dataclass(frozen=True)
class Peer:
    """One agent as seen through awareness."""

    client_id: int
    state: dict[str, Any]

    @property
    def id(self) -> str | None:
        v = self.state.get(A.ID)
        return v if isinstance(v, str) else None

    @property
    def type(self) -> str | None:
        return self.state.get(A.TYPE)

    @property
    def name(self) -> str:
        return str(self.state.get(A.NAME) or self.id or self.client_id)

    @property
    def date(self) -> float:
        d = self.state.get(A.DATE)
        return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else 0.0

    @property
    def models(self) -> list[str]:
        raw = self.state.get(A.MODELS)
        if not isinstance(raw, list):
            return []
        names = []
        for m in raw:
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                names.append(m["name"])
            elif isinstance(m, str):
                names.append(m)
        return names

    @property
    def slots(self) -> int:
        s = self.state.get(A.SLOTS)
        if isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 1024:
            return s
        return 1  # an original worker runs one task at a time

    @property
    def igora(self) -> bool:
        return self.state.get(A.PROTOCOL) == PROTOCOL_VERSION

    def serves(self, model: str | None) -> bool:
        """Whether this worker can run a task asking for ``model`` (None: any)."""
        if self.type != AgentType.WORKER.value:
            return False
        if not model:
            return True
        models = self.models
        # An original worker advertises no models: it takes only tasks naming none.
        return model in models
