"""The Igora protocol: the one place that names maps, states and fields.

The layout stays compatible with the original JavaScript Igora agents (see
``docs/protocol.md``): four kanban maps of *task id -> plain JSON task*, awareness
states ``{id, name, type, style, state, date}``. Everything Igora adds is an extra
field or an extra map, never a rename.

- ``names``: maps, states, field names, error codes, limits, ids;
- ``validation``: what a valid task is, and the readings of a task every role shares;
- ``peer``: one agent as seen through awareness;
- ``canonical``: the canonical JSON bytes that v3 signatures and hashes cover.

The task's state changes live in ``igora.lifecycle``.
"""

from .canonical import CanonicalError, canonical
from .names import (
    ABORTED_MARK,
    BROKER_STYLE,
    DEFAULT_LOCAL_URL,
    DEFAULT_ROOM,
    FINAL_STATES,
    FINAL_VALUES,
    FINISH_REASONS,
    GATEWAY_STYLE,
    KANBAN,
    LIVE,
    MAX_CHOICES,
    MAX_DIMENSIONS,
    MAX_ID,
    MAX_INPUTS,
    MAX_MESSAGES,
    MAX_TEXT,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    PROTOCOL_VERSION,
    RESPONSE_TYPES,
    STATE_MAP,
    TEXT_STYLE,
    TOOL_CHOICES,
    AgentField,
    AgentState,
    AgentType,
    ErrorCode,
    MapName,
    ProtocolError,
    State,
    TaskField,
    TaskKind,
    abort_asked,
    attempt_of,
    new_id,
    new_task_id,
    now_ms,
    number,
    stream_key,
    task_of,
)
from .peer import Peer
from .validation import (
    chat_messages,
    is_original,
    stop_list,
    tool_names,
    validate_task,
)

__all__ = [
    "ABORTED_MARK",
    "BROKER_STYLE",
    "DEFAULT_LOCAL_URL",
    "DEFAULT_ROOM",
    "FINAL_STATES",
    "FINAL_VALUES",
    "FINISH_REASONS",
    "GATEWAY_STYLE",
    "KANBAN",
    "LIVE",
    "MAX_CHOICES",
    "MAX_DIMENSIONS",
    "MAX_ID",
    "MAX_INPUTS",
    "MAX_MESSAGES",
    "MAX_TEXT",
    "MAX_TOKENS_LIMIT",
    "MAX_TOOLS",
    "MAX_TOP_LOGPROBS",
    "PROTOCOL_VERSION",
    "RESPONSE_TYPES",
    "STATE_MAP",
    "TEXT_STYLE",
    "TOOL_CHOICES",
    "AgentField",
    "AgentState",
    "AgentType",
    "CanonicalError",
    "ErrorCode",
    "MapName",
    "Peer",
    "ProtocolError",
    "State",
    "TaskField",
    "TaskKind",
    "abort_asked",
    "attempt_of",
    "canonical",
    "chat_messages",
    "is_original",
    "new_id",
    "new_task_id",
    "now_ms",
    "number",
    "stop_list",
    "stream_key",
    "task_of",
    "tool_names",
    "validate_task",
]
