"""The protocol's names: maps, states, task and awareness fields, error codes, limits, ids.

The layout stays compatible with the original JavaScript Igora agents (see
``docs/protocol.md``): four kanban maps of *task id -> plain JSON task*, awareness
states ``{id, name, type, style, state, date}``. Everything Igora adds is an extra
field or an extra map, never a rename.
"""

from __future__ import annotations

import secrets
import time
import uuid
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


class TaskField:
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
    USAGE = "usage"  # {PROMPT_TOKENS, COMPLETION_TOKENS}
    PROMPT_TOKENS = "promptTokens"  # in ``usage``
    COMPLETION_TOKENS = "completionTokens"  # in ``usage``
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
    PRICE = "price"  # v3, kept by the asker: millicredits its receipt of the run signed


class TaskKind(str, Enum):
    CHAT = "chat"
    EMBED = "embed"


class ErrorCode(str, Enum):
    """Typed reason of a task that ended without an answer (field ``errorCode``, beside
    the sentence in ``error``), for programs to test instead of parsing ``error``."""

    MODEL_NOT_SERVED = "model_not_served"  # no worker on the market serves the model
    CAPABILITY_NOT_SERVED = "capability_not_served"  # ... none can do what the task asks
    DEADLINE = "deadline"  # its deadline passed, waiting or running
    WORKER_LOST = "worker_lost"  # the worker running it vanished, no attempt left
    NOT_STARTED = "not_started"  # its worker never started it, no attempt left
    ENGINE_ERROR = "engine_error"  # the worker's engine failed on it
    ENGINE_UNAVAILABLE = "engine_unavailable"  # engine down, and no other worker to take it
    INVALID_TASK = "invalid_task"  # the task breaks the protocol (docs/protocol.md, 4.1)
    DOING_DELETED = "doing_deleted"  # its entry in doing was deleted while it ran
    ABORTED = "aborted"  # state ``aborted``: its asker asked it to stop, or left
    UNREADABLE = "unreadable"  # v3: its encrypted answer did not open or check (security.md §6)
    UNTRUSTED_WORKER = "untrusted_worker"  # v3: assigned to a worker outside the asker's trust list


class AgentField:
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
    KEY = "key"  # workers: the identity id of its data folder (claimed: v2 proves nothing)


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


FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})
"""The values of a task's ``finishReason`` (OpenAI's); any other reads as ``stop``."""


def number(value: Any) -> float | None:
    """``value`` as a float if it is a number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def stream_key(task_id: str, attempt: int) -> str:
    """Key of a task's token stream in the ``streams`` map; one per attempt."""
    return f"{task_id}#{attempt}"


def attempt_of(key: str) -> tuple[str, int]:
    """The task and attempt a ``streams`` key names (``stream_key`` read back); attempt 0
    for a key that names none."""
    tid, _, n = key.rpartition("#")
    try:
        return tid, int(n)
    except ValueError:
        return key, 0


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
    return any(isinstance(e, dict) and bool(e.get(TaskField.ABORTED)) for e in entries)
