"""How a run ended, and the write that ends the task accordingly."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .. import lifecycle
from ..engines.base import Embeddings, Finish
from ..protocol import ErrorCode, TaskField, now_ms
from .moves import Moves
from .running import AnswerStream, Stop

log = logging.getLogger("igora.worker")

_DEADLINE_PASSED = "the task passed its deadline while running"


@dataclass
class Outcome:
    """What a run of a task came to: the engine's end, a failure, a stop."""

    finish: Finish | None = None
    embeddings: Embeddings | None = None
    code: ErrorCode | None = None
    error: str | None = None
    requeue: bool = False  # hand the task back: the engine is unavailable, another worker is not
    stop: Stop | None = None
    answered: bool = False  # set by ``conclude``: the task ended ``done``

    def fail(self, code: ErrorCode, error: str) -> None:
        self.code, self.error = code, error


def _results(finish: Finish) -> dict[str, Any]:
    return {
        TaskField.FINISH_REASON: finish.reason,
        TaskField.USAGE: lifecycle.usage(finish.prompt_tokens, finish.completion_tokens),
        TaskField.TOOL_CALLS: finish.tool_calls or None,
        TaskField.LOGPROBS_RESULT: finish.logprobs or None,
        TaskField.CHOICES: finish.choices or None,
    }


def conclude(
    name: str,
    moves: Moves,
    task_id: str,
    task: dict[str, Any],
    answer: AnswerStream,
    out: Outcome,
    elapsed: float,
) -> None:
    """End a task this worker ran, the way its ``out``come says (``name``: the worker's,
    for the log)."""
    key, text = answer.key, answer.response
    now = now_ms()
    if out.stop is Stop.LOST:
        log.info("%s: task %s was taken away; stopped", name, task_id)
        moves.drop_stream(key)
    elif out.stop is Stop.DELETED:
        log.warning(
            "%s: task %s: its entry in doing was deleted by another agent while "
            "it ran; ended failed",
            name,
            task_id,
        )
        moves.end_running(task_id, key, lambda t: lifecycle.doing_deleted(t, now, text), entry=task)
    elif out.requeue:
        log.warning("%s: task %s handed back: %s", name, task_id, out.error)
        moves.requeue_running(task_id, key)
    elif out.code is not None:
        code, error = out.code, str(out.error)
        log.warning("%s: task %s failed: %s", name, task_id, error)
        moves.end_running(
            task_id, key, lambda t: lifecycle.fail(t, now, code, error, response=text)
        )
    elif out.stop is Stop.ABORTED:
        log.info("%s: task %s aborted after %d characters", name, task_id, len(text))
        moves.end_running(task_id, key, lambda t: lifecycle.abort(t, now, response=text))
    elif out.stop is Stop.DEADLINE:
        moves.end_running(
            task_id,
            key,
            lambda t: lifecycle.fail(t, now, ErrorCode.DEADLINE, _DEADLINE_PASSED, response=text),
        )
    elif out.embeddings is not None:
        vectors = out.embeddings
        out.answered = True
        log.info(
            "%s: task %s done (%d embeddings, %.2f s)", name, task_id, len(vectors.vectors), elapsed
        )
        moves.end_running(
            task_id,
            key,
            lambda t: lifecycle.finish(
                t,
                now,
                "",
                **{
                    TaskField.EMBEDDINGS: vectors.vectors,
                    TaskField.USAGE: lifecycle.usage(vectors.prompt_tokens, 0),
                },
            ),
        )
    else:
        finish = out.finish or Finish("stop")
        out.finish, out.answered = finish, True
        log.info(
            "%s: task %s done (%d tokens, %.2f s)", name, task_id, finish.completion_tokens, elapsed
        )
        moves.end_running(
            task_id, key, lambda t: lifecycle.finish(t, now, text, **_results(finish))
        )
