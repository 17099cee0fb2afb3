"""Whether a worker can run a task assigned to it, and whether another one could."""

from __future__ import annotations

from typing import Any

from ..agent import Agent
from ..capabilities import fits, model_for, required
from ..engines.base import Engine
from ..lifecycle import attempts
from ..protocol import AgentField, AgentState, ErrorCode, TaskField, is_original

HANDBACK_ATTEMPTS = 3  # a task is handed back to ``todos`` only while it has had fewer assignments


def cannot_serve(
    engine: Engine, task: dict[str, Any], worker_name: str
) -> tuple[ErrorCode, str] | None:
    """Why a worker with ``engine`` cannot run a task assigned to it (a broker that does
    not check capabilities, or a forged assignment), or None."""
    model = task.get(TaskField.MODEL)
    models = {m.name: m for m in engine.models()}
    if model and model not in models:
        if is_original(task) and task.get(TaskField.KIND) is None:
            return None  # an original agent's model name: the worker's own model answers
        return (ErrorCode.MODEL_NOT_SERVED, f"worker {worker_name} does not serve model {model!r}")
    needs = required(task)
    have = (
        models[model].capabilities
        if model
        else (frozenset() if engine.model_for(needs) is None else needs)
    )
    if not needs <= have:
        missing = " + ".join(sorted(needs - have))
        on = model or engine.default_model()
        return (
            ErrorCode.CAPABILITY_NOT_SERVED,
            f"worker {worker_name} does not offer {missing} on model {on!r}",
        )
    return None


def another_can_serve(agent: Agent, task: dict[str, Any]) -> bool:
    """Whether a task this worker cannot run now should go back to ``todos``: only if
    another worker that is not busy serves its model and attempts are left. Otherwise it
    ends ``failed`` here with the engine's reason rather than wait for its deadline."""
    if attempts(task) >= HANDBACK_ATTEMPTS:
        return False
    peers = agent.peers()
    model, needs = model_for(task, peers), required(task)
    return any(
        p.id != agent.id
        and fits(p, model, needs)
        and p.state.get(AgentField.STATE) != AgentState.BUSY.value
        for p in peers
    )
