"""Chaos: an asker that dies, deadlines that pass, engines that fail.

Every task ends (``done``, ``failed`` with a readable ``error``, or ``aborted``) and the
agents keep serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from igora import Client, TaskFailed, TaskTimeout
from igora.protocol import MapName, State, TaskField, now_ms

from .conftest import ROOT, Cluster, wait_active_broker
from .faults import archived_async, observer, put, raw_task, wait_for

LONG = 400  # tokens; at 0.05 s each the answer would take 20 s


def slow_market(cluster: Cluster) -> None:
    cluster.market()
    cluster.broker()
    cluster.worker("--delay", "0.05", name="w")
    cluster.wait_agents("worker", 1)
    wait_active_broker(cluster)  # the 2 s deadline below must not run while one is chosen


async def test_task_of_a_killed_client_is_aborted_and_frees_the_worker_slot(
    cluster: Cluster,
) -> None:
    slow_market(cluster)
    chat = cluster.spawn(
        "chat", f"#repeat {LONG}", "--market", cluster.url, "--timeout", "120", name="chat"
    )
    async with observer(cluster) as seer:
        doing = seer.maps[MapName.DOING]

        def running() -> str | None:
            for tid, t in doing.items():
                if isinstance(t, dict) and t.get(TaskField.ASKER_NAME) == "igora-chat":
                    return tid
            return None

        tid = await wait_for(running, 30, "the chat's task runs", cluster)
        await wait_for(lambda: "tok5" in chat.log(), 20, "the chat prints the stream", cluster)
        chat.kill()
        final = await archived_async(cluster, tid)
        assert final[TaskField.STATE] == State.ABORTED.value
        # Stopped at once, not at the end: a fraction of the answer was generated.
        assert len(final.get(TaskField.RESPONSE) or "") < len(
            "".join(f"tok{i} " for i in range(LONG))
        )
        await wait_for(
            lambda: [w.get("running") for w in cluster.agents("worker")] == [0],
            20,
            "the worker's slot is free again",
            cluster,
        )
    assert "aborted after" in cluster.procs[2].log()
    async with Client(cluster.url) as client:
        assert await client.chat("next one", timeout=60) == "Echo: next one"


async def test_task_waiting_past_its_deadline_ends_failed_with_the_reason(
    cluster: Cluster,
) -> None:
    slow_market(cluster)
    async with observer(cluster) as asker:
        # The only worker's only slot is taken by a long task: the next one can only wait.
        # (A model nobody serves would not wait: an original task naming one is answered by
        # any text worker, a v2 task fails at once.)
        long = raw_task(asker, f"#repeat {LONG}")
        put(asker, MapName.TODOS, long[TaskField.ID], long)
        await wait_for(
            lambda: long[TaskField.ID] in asker.maps[MapName.DOING],
            20,
            "the long task runs",
            cluster,
        )
        task = raw_task(asker, "anyone?", deadline=now_ms() + 1500)
        put(asker, MapName.TODOS, task[TaskField.ID], task)
        done = asker.maps[MapName.DONE]
        final = await wait_for(lambda: done.get(task[TaskField.ID]), 30, "the task ends", cluster)
    assert final[TaskField.STATE] == State.FAILED.value
    assert "deadline passed while waiting" in final[TaskField.ERROR]


async def test_task_running_past_its_deadline_ends_failed_and_worker_keeps_serving(
    cluster: Cluster,
) -> None:
    slow_market(cluster)
    async with Client(cluster.url) as client:
        task = await client.submit(f"#repeat {LONG}", timeout=2)
        with pytest.raises(TaskTimeout, match="deadline") as err:
            await task.result()
        final = err.value.task
        assert final[TaskField.STATE] == State.FAILED.value
        assert 0 < len(final[TaskField.RESPONSE]) < 20 * LONG  # it ran, then was cut
        assert await client.chat("after the deadline", timeout=60) == "Echo: after the deadline"


async def test_task_the_broker_ends_at_its_deadline_keeps_the_text_streamed(
    cluster: Cluster,
) -> None:
    """Its worker stopped (SIGSTOP) mid-answer cannot end it: the broker does, at the
    deadline, with the text streamed so far, as the worker would have."""
    slow_market(cluster)
    worker = cluster.procs[2]
    async with Client(cluster.url) as client:
        task = await client.submit(f"#repeat {LONG}", timeout=4)
        pieces = task.stream()
        first = await anext(pieces)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TaskTimeout, match="deadline passed while running") as err:
                async for _ in pieces:
                    pass
            final = err.value.task
            assert final[TaskField.STATE] == State.FAILED.value
            assert final[TaskField.RESPONSE].startswith(first)
            assert 0 < len(final[TaskField.RESPONSE]) < 20 * LONG
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert await client.chat("after the deadline", timeout=60) == "Echo: after the deadline"


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "igora", "worker", "--market", "ws://127.0.0.1:9", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )


@pytest.mark.parametrize("content", [b"\x00garbage" * 500, b"GGUF\x03\x00\x00\x00truncated"])
def test_worker_on_a_bad_model_file_exits_with_one_clear_line(
    tmp_path: Path, content: bytes
) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(content)
    result = run_worker("--model", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[-1]] and errors[-1].startswith("igora worker: error: ")
    assert "not-a-model.gguf" in errors[-1] and "GGUF" in errors[-1]


def test_worker_on_a_folder_or_a_missing_file_says_so(tmp_path: Path) -> None:
    for spec, says in ((tmp_path, "is a folder"), (tmp_path / "nope.gguf", "not found")):
        result = run_worker("--model", str(spec))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("igora worker: error: ")
        assert says in result.stderr


@pytest.mark.slow
async def test_context_overflow_on_the_real_model_fails_readably_and_worker_keeps_serving(
    cluster: Cluster,
) -> None:
    cluster.market()
    cluster.broker()
    cluster.worker("--context", "256", "--no-warmup", name="llama", engine="llama")
    cluster.wait_agents("worker", 1, timeout=120)
    async with Client(cluster.url) as client:
        with pytest.raises(TaskFailed) as err:
            await client.chat("tell me about " + "the sea and the sky " * 150, timeout=120)
        message = str(err.value)
        assert "too long" in message and "256" in message
        answer = await client.chat("Hi", max_tokens=8, temperature=0, timeout=120)
        assert answer.strip()
