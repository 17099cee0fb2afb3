"""The v3 task schema: the field names of a task's documents (docs/protocol-v3.md §4, §7),
in one place for the asker, the broker and the worker (as ``igora.protocol.names`` is
for version 2).

| document | map | key | value |
|---|---|---|---|
| ``a/<asker>`` | ``tasks`` | tid | the signed header (``Header``, ``igora.v3.header``) |
| ``a/<asker>`` | ``aborts`` | tid | ``True``: the asker asked the task to stop |
| ``p/<asker>/<tid>`` | ``prompt`` | ``ct`` | private request fields, sealed (``seal_prompt``) |
| ``p/<asker>/<tid>`` | ``prompt`` | ``grants`` | worker id -> its grant (``seal_grant``) |
| ``p/<asker>/<tid>`` | ``prompt`` | ``abort`` | ``True`` (read by the attached worker) |
| ``p/<asker>/<tid>`` | ``receipts`` | ``<n>`` | run n's receipt, as written (``Receipt.written``) |
| ``in/<worker>`` | ``tasks`` | tid | an ``Assignment`` |
| ``in/<asker>`` | ``tasks`` | tid | a ``Status`` |
| ``r/<worker>/<tid>.<n>`` | ``run`` | ``RunField`` | salt, state, end, finishReason, usage |
| ``r/<worker>/<tid>.<n>`` | ``chunks`` (array) | | the answer's chunks (``crypto.AnswerWriter``) |
| ``w/<worker>`` | ``runs`` | ``<tid>.<n>`` | ``{state, start, end, usage, error, errorCode}`` |

Encoding: ``ct``, each grant, ``salt`` and each chunk are byte values (a Yjs
``Uint8Array``; pycrdt gives ``bytearray``), not base64 text: a third smaller, and no
decoding step. The header carries the asker's session key (``key``, base64url: it is
signed as canonical JSON) and the ``candidates`` it made grants for. The results
(``toolCalls``, log probabilities, ``choices``, ``embeddings``) and the answer's text are
only in the chunks; in clear the run holds its state, ``finishReason``, ``usage``, ``end``
(and ``error``, ``errorCode`` of a failure).
"""

from __future__ import annotations

from enum import Enum

from ..protocol import TaskField

# Top-level types of the documents.
TASKS = "tasks"  # a/ (headers), in/ (assignments, statuses)
ABORTS = "aborts"  # a/
PROMPT = "prompt"  # p/ (a Map)
RECEIPTS = "receipts"  # p/ (a Map): attempt (as text) -> the signed receipt, as written
RUNS = "runs"  # w/
RUN = "run"  # r/ (a Map)
CHUNKS = "chunks"  # r/ (an Array)

ANY_MODEL = "*"  # a header's model when the task names none: any text worker answers
CIPHERTEXT = "ct"  # in PROMPT: the private request fields, sealed (bytes)
GRANTS = "grants"  # in PROMPT: a Map, worker id -> grant (bytes)
ABORT = "abort"  # in PROMPT, and in an assignment


class Header:
    """Fields of a signed task header (§7.1); ``sig`` signs all the others."""

    ID = "id"
    ASKER = "asker"
    MODEL = "model"
    MAX_TOKENS = "maxTokens"
    PROMPT_BYTES = "promptBytes"
    DATE = "date"
    DEADLINE = "deadline"
    NEEDS = "needs"  # the capabilities the task needs (chat, tools, ...): for matching
    KEY = "key"  # the asker's session key (X25519, base64url): the worker's answer key
    CANDIDATES = "candidates"  # the workers the asker made grants for: the broker picks among them
    # true: the broker assigns only among the candidates (the asker's trusted workers)
    CANDIDATES_ONLY = "candidatesOnly"
    MAX_PRICE = "maxPrice"  # millicredits: the asker's consent (credits.md §1)
    VERSION = "v"
    SIG = "sig"


class Assignment:
    """Fields of ``in/<worker>.tasks[tid]``, written by the lease holder."""

    HEADER = "header"
    ATTEMPT = "attempt"
    START = "start"
    EPOCH = "epoch"
    ABORT = ABORT  # the asker left or asked to stop: the worker ends the run
    # the worker's session key (its advert's encKey) when assigned: a worker restarted
    # since (a new key) does not run it, the broker gives it a new attempt
    KEY = "key"


class Status:
    """Fields of ``in/<asker>.tasks[tid]``, written by the lease holder."""

    STATE = "state"  # a StatusState
    WORKER = "worker"
    ATTEMPT = "attempt"
    EPOCH = "epoch"
    START = "start"  # ms: when this attempt was assigned (the claim timeout runs from it)
    ERROR = TaskField.ERROR
    ERROR_CODE = TaskField.ERROR_CODE
    END = TaskField.END


class StatusState(str, Enum):
    WAITING = "waiting"  # taken from its worker after attempt ATTEMPT: waits for another
    ASSIGNED = "assigned"  # given to WORKER, attempt ATTEMPT: its run is r/WORKER/tid.ATTEMPT
    FAILED = "failed"  # ended by the broker (deadline, no worker, attempts used)
    ABORTED = "aborted"  # ended by the broker before any worker ran it


class RunField:
    """Fields of ``r/<worker>/<tid>.<n>.run`` (and of ``w/<worker>.runs``)."""

    STATE = "state"  # a RunState
    SALT = "salt"  # 16 random bytes of this run: its answer key
    START = TaskField.START
    END = TaskField.END
    FINISH_REASON = TaskField.FINISH_REASON
    USAGE = TaskField.USAGE
    ERROR = TaskField.ERROR
    ERROR_CODE = TaskField.ERROR_CODE
    # results beyond the text, as in v2's done entry
    TOOL_CALLS = TaskField.TOOL_CALLS
    LOGPROBS = TaskField.LOGPROBS_RESULT
    CHOICES = TaskField.CHOICES
    EMBEDDINGS = TaskField.EMBEDDINGS


class RunState(str, Enum):
    DOING = "doing"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"
    HANDBACK = "handback"  # the engine is down: the broker gives the task to another


FINAL_RUNS = frozenset({RunState.DONE.value, RunState.FAILED.value, RunState.ABORTED.value})
"""Run states that end the task (a hand back ends only the attempt)."""

RESULTS = (
    RunField.FINISH_REASON,
    RunField.USAGE,
    RunField.TOOL_CALLS,
    RunField.LOGPROBS,
    RunField.CHOICES,
    RunField.EMBEDDINGS,
)
"""Run fields the asker copies into its ``Answer``'s task."""


def run_key(tid: str, attempt: int) -> str:
    """``<tid>.<n>``: the key of a run in ``w/<worker>.runs``."""
    return f"{tid}.{attempt}"


def prompt_doc(asker: str, tid: str) -> str:
    return f"p/{asker}/{tid}"


def run_doc(worker: str, tid: str, attempt: int) -> str:
    return f"r/{worker}/{tid}.{attempt}"


def inbox(agent: str) -> str:
    return f"in/{agent}"


def asker_doc(agent: str) -> str:
    return f"a/{agent}"


def worker_doc(agent: str) -> str:
    return f"w/{agent}"
