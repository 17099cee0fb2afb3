"""The web page, end to end: ``igora up`` with the bundled model, driven by Debian's
headless Chromium through Playwright.

One ``igora up`` serves the whole module. The chat tests type into the page as a person
would; the market tests read the page's live view (and ``/api/market``) while tasks run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from igora.agent import Agent
from igora.config import market_address
from igora.identity import load_identity
from igora.protocol import MapName
from igora.testing import wait_until
from tests.conftest import open_page

from .conftest import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
GROUP_STATES = {"waiting", "running", "done", "failed", "aborted"}

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------- igora up
class Up:
    """One ``igora up`` process tree on free ports."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.gateway_port = free_port()
        self.base = f"http://127.0.0.1:{self.gateway_port}"
        self.log_path = tmp / "up.log"
        self.identities = tmp / "identity"  # IGORA_DATA of its agents: the workers' key
        self._log = open(self.log_path, "ab")
        self.p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "igora",
                "up",
                "--port",
                str(self.port),
                "--gateway-port",
                str(self.gateway_port),
                "--data",
                str(tmp / "data"),
                "--no-check",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "IGORA_DATA": str(self.identities)},
            cwd=str(tmp),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def market(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base}/api/market", timeout=5) as r:
            return json.loads(r.read())

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        def step() -> Any:
            if self.p.poll() is not None:
                raise AssertionError(f"igora up exited with {self.p.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, ValueError):
                return check()
            return None

        return wait_until(step, timeout, lambda: f"{what}\n{self.log()}", every=0.1)

    def ready_worker(self) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for a in self.market()["agents"]:
                if a["type"] == "worker" and a["state"] == "ready":
                    return a
            return None

        return self.wait("a ready worker on the market", check, timeout=120)

    def task(self, task_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for t in self.market()["tasks"][state]:
                if t["id"] == task_id:
                    return t
            return None

        return self.wait(f"task {task_id} {state}", check, timeout)

    def children(self) -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.p.pid:
                    out.append(int(stat.parent.name))
        return out

    def stop(self) -> None:
        children = self.children()  # each in its own session: `igora up` stops them itself
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(20)
        for pid in [self.p.pid, *children]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(5)
        self._log.close()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    u = Up(tmp_path_factory.mktemp("web"))
    try:
        u.wait(
            "the gateway",
            lambda: urllib.request.urlopen(f"{u.base}/health", timeout=2).status == 200,
            timeout=60,
        )
        u.ready_worker()
        yield u
    finally:
        u.stop()


def bundled_model(up: Up) -> str:
    with urllib.request.urlopen(f"{up.base}/v1/models", timeout=5) as r:
        ids = [m["id"] for m in json.loads(r.read())["data"]]
    assert any("SmolLM2" in i for i in ids), ids
    return next(i for i in ids if "SmolLM2" in i)


def ask(page: Page, prompt: str, *, max_tokens: int, system: str | None = None) -> None:
    """Fill the settings and send ``prompt`` with the Enter key."""
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#seed", "7")
    if system is not None:
        page.select_option("#preset", system)
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


RECORD_LENGTHS = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const bodies = document.querySelectorAll('.msg-assistant .body');
    const last = bodies[bodies.length - 1];
    if (last && window.__lengths[window.__lengths.length - 1] !== last.textContent.length)
      window.__lengths.push(last.textContent.length);
  }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
}"""

RECORD_STATES = """() => {
  window.__seen = {};
  const look = () => {
    for (const card of document.querySelectorAll('#board li.task')) {
      const group = card.closest('section[data-group]').dataset.group;
      const seen = (window.__seen[card.dataset.id] ||= []);
      if (seen[seen.length - 1] !== group) seen.push(group);
    }
  };
  new MutationObserver(look).observe(document.getElementById('board'),
                                    {subtree: true, childList: true});
  look();
}"""


# ---------------------------------------------------------------------- tests
def test_market_api_gives_agents_tasks_and_throughput(up: Up) -> None:
    snap = up.market()
    assert set(snap) >= {"time", "room", "self", "agents", "tasks", "counts", "throughput"}
    assert snap["room"] == "market" and snap["connected"] is True
    types = {a["type"] for a in snap["agents"]}
    assert {"worker", "broker", "client"} <= types
    worker = next(a for a in snap["agents"] if a["type"] == "worker")
    assert worker["slots"] == 1 and worker["engine"] == "llama.cpp"
    # its key: the identity id of its data folder (an extra awareness field in a v2 room)
    assert worker["key"] == load_identity(up.identities)[0].id
    assert any("SmolLM2" in m["name"] and m["contextLength"] for m in worker["models"])
    me = next(a for a in snap["agents"] if a["self"])
    assert me["id"] == snap["self"]["id"] and me["style"] == "openai_compatible_endpoint"
    assert set(snap["tasks"]) == GROUP_STATES
    assert snap["counts"] == {g: len(v) for g, v in snap["tasks"].items()}
    th = snap["throughput"]
    assert th["series"] and {"t", "tasksPerMin", "tokensPerSec"} <= set(th["series"][0])
    for bad in ("/static/nope.js", "/static/../routes.py", "/static/%2e%2e/routes.py"):
        r = httpx.get(up.base + bad, timeout=5)
        assert r.status_code == 404 and "error" in r.json(), bad
    page = httpx.get(up.base + "/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in page.text
    # The event stream pushes the same kind of snapshot.
    with httpx.stream("GET", f"{up.base}/api/market/events", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                pushed = json.loads(line[5:])
                assert pushed["self"] == snap["self"]
                break


def test_page_follows_the_browser_language_and_the_switch(browser: Browser, up: Up) -> None:
    ctx = browser.new_context(locale="fr-FR")
    try:
        page = open_page(ctx, up.base)
        assert page.get_attribute("html", "lang") == "fr"
        assert page.inner_text("#tab-chat") == "Discussion"
        assert page.inner_text("#send") == "Envoyer"
        unlabelled = page.evaluate("""() =>
            [...document.querySelectorAll('input, select, textarea')]
            .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)""")
        assert unlabelled == []
        assert "Prompt système" in page.inner_text("label[for=system]")
        page.click("#lang-en")
        assert page.get_attribute("html", "lang") == "en"
        assert page.inner_text("#tab-chat") == "Chat"
        assert page.get_attribute("#lang-en", "aria-pressed") == "true"
        # The choice is remembered over the browser's language.
        again = open_page(ctx, up.base, "market")
        assert again.inner_text("#tab-market") == "Market"
        again.click("#lang-fr")
        assert again.inner_text("#group-running").startswith("En cours")
        assert not page.errors and not again.errors  # type: ignore[attr-defined]
    finally:
        ctx.close()


def test_model_picker_lists_the_bundled_model_and_presets_fill_the_system_prompt(
    context: BrowserContext, up: Up
) -> None:
    model = bundled_model(up)
    page = open_page(context, up.base)
    page.wait_for_function(
        "m => [...document.querySelectorAll('#model option')].some(o => o.value === m)", arg=model
    )
    assert page.input_value("#model") == model
    page.select_option("#preset", "romancier")
    assert "novelist" in page.input_value("#system")
    page.click("#lang-fr")
    assert "romancier" in page.input_value("#system")  # a preset's text follows the language
    page.fill("#system", "Réponds en une phrase.")
    assert page.input_value("#preset") == "custom"


def test_enter_sends_and_the_answer_streams_in(context: BrowserContext, up: Up) -> None:
    page = open_page(context, up.base)
    page.evaluate(RECORD_LENGTHS)
    page.fill("#prompt", "Write two sentences")
    page.press("#prompt", "Shift+Enter")  # a new line, not a send
    page.type("#prompt", "about Paris.")
    assert page.locator(".msg").count() == 0
    assert page.input_value("#prompt") == "Write two sentences\nabout Paris."
    ask(page, page.input_value("#prompt"), max_tokens=48)
    page.wait_for_selector(".msg-user")
    assert page.inner_text(".msg-user .body") == "Write two sentences\nabout Paris."
    assert page.is_enabled("#stop")
    page.wait_for_selector(".msg-assistant[data-finish]", timeout=90_000)
    finish = page.get_attribute(".msg-assistant", "data-finish")
    answer = page.inner_text(".msg-assistant .body")
    assert finish in ("stop", "length"), page.inner_text("#log")
    assert answer.strip()
    lengths = page.evaluate("window.__lengths")
    assert len([n for n in lengths if n > 0]) >= 3, lengths  # it grew piece by piece
    assert lengths == sorted(lengths)
    task_id = page.get_attribute(".msg-assistant", "data-task")
    done = up.task(task_id, "done")
    assert done["askerName"] == "openai-gateway" and done["workerName"].startswith("worker")
    assert not page.is_enabled("#stop") and page.is_enabled("#send")


def test_a_json_answer_is_shown_indented(context: BrowserContext, up: Up) -> None:
    page = open_page(context, up.base)
    page.select_option("#format", "json_object")
    ask(page, "Describe a cat as JSON.", max_tokens=800)
    page.wait_for_selector(".msg-assistant[data-finish]", timeout=90_000)
    assert page.get_attribute(".msg-assistant", "data-finish") == "stop", page.inner_text("#log")
    shown = page.inner_text(".msg-assistant .body pre.json")
    value = json.loads(shown)
    assert isinstance(value, dict)
    assert not value or shown.startswith('{\n  "')  # indented, one member a line
    page.reload()
    assert page.input_value("#format") == "json_object"  # the setting is kept


WEATHER_TOOL = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather now in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def test_a_tool_call_is_shown_with_its_arguments(context: BrowserContext, up: Up) -> None:
    page = open_page(context, up.base)
    page.click("#tools-more summary")
    page.fill("#tools", "[not json")
    ask(page, "What is the weather in Paris?", max_tokens=200)
    assert page.locator(".msg").count() == 0  # refused on the page, nothing sent
    assert page.evaluate("document.getElementById('tools').validationMessage")
    page.fill("#tools", json.dumps(WEATHER_TOOL))
    assert page.input_value("#tool-choice") == "auto"  # the default
    page.select_option("#tool-choice", "required")  # a call, whatever the model would prefer
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "What is the weather in Paris?", max_tokens=200)
    body = json.loads(sent.value.post_data or "")
    assert body["tools"] == WEATHER_TOOL and body["tool_choice"] == "required"
    page.wait_for_selector(".msg-assistant[data-finish]", timeout=90_000)
    finish = page.get_attribute(".msg-assistant", "data-finish")
    assert finish == "tool_calls", page.inner_text("#log")
    assert page.inner_text(".tool-call h4 code") == "get_weather"
    assert isinstance(json.loads(page.inner_text(".tool-call pre.json"))["city"], str)
    page.reload()
    assert page.input_value("#tool-choice") == "required"  # the setting is kept


def test_stop_aborts_a_long_answer(context: BrowserContext, up: Up) -> None:
    up.ready_worker()
    page = open_page(context, up.base)
    ask(
        page,
        "Raconte une très longue histoire de dragons, de chevaliers et de châteaux.",
        max_tokens=400,
        system="romancier",
    )
    page.wait_for_function(
        "() => (document.querySelector('.msg-assistant .body')?.textContent.length || 0) > 0",
        timeout=90_000,
    )
    page.click("#stop")
    page.wait_for_selector(".msg-assistant[data-finish=stopped]")
    assert page.inner_text(".msg-assistant .note-info") == "Stopped."
    stopped_at = page.inner_text(".msg-assistant .body")
    task_id = page.get_attribute(".msg-assistant", "data-task")
    assert task_id
    aborted = up.task(task_id, "aborted", timeout=30)
    assert aborted["workerName"].startswith("worker")  # it was running, then aborted
    worker = up.ready_worker()  # the worker is free again long before 400 tokens
    assert worker["running"] == 0
    assert page.inner_text(".msg-assistant .body") == stopped_at  # it stopped growing
    assert page.is_enabled("#send")


def test_errors_are_readable(context: BrowserContext, up: Up) -> None:
    page = open_page(context, up.base)
    page.evaluate("""() => {
      const o = document.createElement('option');
      o.value = o.textContent = 'no-such-model';
      document.getElementById('model').append(o);
      document.getElementById('model').value = 'no-such-model';
    }""")
    ask(page, "Bonjour", max_tokens=8)
    alert = page.wait_for_selector(".msg-assistant [role=alert]")
    assert alert.inner_text() == "This model is not on the market."
    page.click("#lang-fr")
    page.fill("#max-tokens", "0")
    page.select_option("#model", bundled_model(up))
    page.fill("#prompt", "Bonjour")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg-assistant [role=alert]').length == 2")
    second = page.locator(".msg-assistant [role=alert]").nth(1).inner_text()
    assert second.startswith("La requête a été refusée") and "max_tokens" in second


def test_market_view_shows_the_worker_and_tasks_moving_through_their_states(
    context: BrowserContext, up: Up
) -> None:
    up.ready_worker()
    model = bundled_model(up)
    market = open_page(context, up.base, "market")
    market.wait_for_selector("#agents tr[data-type=worker]")
    row = market.locator("#agents tr[data-type=worker]")
    assert row.get_attribute("data-name").startswith("worker")
    assert model in row.locator("td.models").inner_text()
    assert row.locator("td.slots").inner_text().replace(" ", "") in ("0/1", "1/1")
    market.evaluate(RECORD_STATES)

    first, second = open_page(context, up.base), open_page(context, up.base)
    # long enough for the second task to be seen waiting behind it
    ask(first, "Tell a long story about a cat.", max_tokens=300)
    first.wait_for_selector(".msg-assistant[data-task]")
    a = first.get_attribute(".msg-assistant", "data-task")
    market.wait_for_selector(f"#board section[data-group=running] li[data-id='{a}']")
    # The worker's slot count comes with its awareness, which the market batches (50 ms):
    # it may follow the board's move by a batch.
    market.wait_for_function(
        "document.querySelector('#agents tr[data-type=worker] td.slots')"
        ".textContent.includes('1 / 1')",
        timeout=10_000,
    )
    # waits: the only slot is taken; long enough to be seen running (snapshots: 4 per second)
    ask(second, "Tell a long story about a dog.", max_tokens=60)
    second.wait_for_selector(".msg-assistant[data-task]")
    b = second.get_attribute(".msg-assistant", "data-task")
    for page in (first, second):
        page.wait_for_selector(".msg-assistant[data-finish]", timeout=90_000)
    market.wait_for_selector(f"#board section[data-group=done] li[data-id='{b}']")
    seen = market.evaluate("window.__seen")
    assert seen[a][-2:] == ["running", "done"], seen
    assert seen[b] == ["waiting", "running", "done"], seen
    card = market.locator(f"#board li[data-id='{b}']")
    assert "openai-gateway" in card.inner_text() and "worker" in card.inner_text()
    key = load_identity(up.identities)[0].id
    assert card.get_attribute("data-worker-key") == key and key[:8] in card.inner_text()
    market.wait_for_function("Number(document.getElementById('tasks-per-min').textContent) > 0")
    assert not market.errors  # type: ignore[attr-defined]


def test_market_view_survives_malformed_tasks(up: Up) -> None:
    # Playwright's sync API holds this thread's event loop: the agent runs in another.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _write_malformed_tasks(up)).result(timeout=90)


async def _write_malformed_tasks(up: Up) -> None:
    agent = Agent(
        market_address(f"ws://127.0.0.1:{up.port}", "market"),
        type="client",
        name="vandal",
        style="text",
    )
    async with agent:
        with agent.transaction():
            agent.maps[MapName.DONE]["bad-done"] = {
                "id": "bad-done",
                "state": "done",
                "usage": {"completionTokens": "lots"},
                "end": "soon",
                "attemps": True,
                "asker": ["x"],
                "model": 42,
            }
            agent.maps[MapName.DONE]["bad-state"] = {"id": "bad-state", "state": "weird"}
            agent.maps[MapName.DONE]["not-a-task"] = "hello"
        try:
            done = await asyncio.to_thread(up.task, "bad-done", "done", 30)
            assert done["tokens"] is None and done["model"] is None and done["asker"] is None
            snap = await asyncio.to_thread(up.market)
            ids = {t["id"] for group in snap["tasks"].values() for t in group}
            assert "bad-state" not in ids and "not-a-task" not in ids
        finally:
            with agent.transaction():
                for key in ("bad-done", "bad-state", "not-a-task"):
                    agent.maps[MapName.DONE].pop(key, None)
            await asyncio.sleep(0.2)


def test_snapshot_groups_tasks_and_counts_throughput_from_finished_tasks() -> None:
    from igora import Client
    from igora.protocol import now_ms
    from igora.web.market_view import MarketTracker

    client = Client("ws://127.0.0.1:9", "market", name="page")  # never connected
    agent = client.agent  # the test writes the (local) document through it
    tracker = MarketTracker(client)
    now = now_ms()
    maps = agent.maps
    with agent.transaction():
        maps[MapName.TODOS]["t1"] = {
            "id": "t1",
            "state": "todo",
            "asker": agent.id,
            "prompt": "a",
            "date": now,
            "protocol": 2,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "responseFormat": {"type": "json_object"},
        }
        maps[MapName.PREPARED]["t2"] = {
            "id": "t2",
            "state": "prepared",
            "askerName": "bob",
            "worker": "w-1",
            "prompt": "b",
            "date": now,
        }
        maps[MapName.DOING]["t3"] = {
            "id": "t3",
            "state": "doing",
            "worker": "w-1",
            "prompt": "c",
            "date": now,
            "aborted": "aborted",
        }
    version = tracker.version
    with agent.transaction():
        for i, (state, tokens) in enumerate(
            (("done", 30), ("done", 10), ("failed", 0), ("aborted", 0))
        ):
            maps[MapName.DONE][f"f{i}"] = {
                "id": f"f{i}",
                "state": state,
                "end": now - 5000 + i,
                "prompt": "x",
                "usage": {"completionTokens": tokens},
                "error": "boom" if state == "failed" else None,
            }
    assert tracker.version > version
    # A client removes its finished tasks from `done`: the tracker has recorded them.
    with agent.transaction():
        for i in range(4):
            del maps[MapName.DONE][f"f{i}"]
    snap = tracker.snapshot()
    ids = {g: [t["id"] for t in ts] for g, ts in snap["tasks"].items()}
    assert ids == {
        "waiting": ["t1", "t2"],
        "running": ["t3"],
        "done": ["f1", "f0"],  # newest first
        "failed": ["f2"],
        "aborted": ["f3"],
    }
    t1, t2 = snap["tasks"]["waiting"]
    assert t1["askerName"] == "page" and t2["askerName"] == "bob"  # resolved, or as given
    assert t1["needs"] == ["json_object", "tools"] and t2["needs"] == []
    assert snap["tasks"]["running"][0]["abortAsked"] is True
    assert snap["tasks"]["failed"][0]["error"] == "boom"
    assert snap["counts"] == {"waiting": 2, "running": 1, "done": 2, "failed": 1, "aborted": 1}
    th = snap["throughput"]
    assert th["tasksPerMin"] == 4.0 and th["tokensPerSec"] == round(40 / 60, 2)
    assert sum(p["tasksPerMin"] for p in th["series"]) * th["bucket"] / 60 == 4
    # The same task seen again in `done` is not counted twice.
    with agent.transaction():
        maps[MapName.DONE]["f0"] = {
            "id": "f0",
            "state": "done",
            "end": now - 5000,
            "usage": {"completionTokens": 30},
            "prompt": "x",
        }
    assert tracker.throughput()["tasksPerMin"] == 4.0


def test_agent_rows_and_usage_read_what_others_wrote_without_trusting_it() -> None:
    """``igora status`` and the web page share these readers of awareness states and tasks
    written by any peer: wrong types become None or 0, long values are cut."""
    from igora.summary import agent_order, agent_summary, tasks_by_state, usage_counts

    worker = agent_summary(
        {"id": "w", "name": "x" * 500, "type": "worker", "slots": 2, "running": True,
         "speed": "fast", "models": [{"name": "m", "contextLength": 2048}, "n", 3],
         "leader": 1, "protocol": 2}
    )  # fmt: skip
    assert worker["name"] == "x" * 200 and worker["slots"] == 2
    assert worker["running"] is None and worker["speed"] is None  # a bool, a string: not numbers
    assert worker["models"] == [
        {"name": "m", "contextLength": 2048},
        {"name": "n", "contextLength": None},
    ]
    assert worker["leader"] is True and worker["igora"] is True
    bare = agent_summary({}, "42")  # an original agent that says nothing of itself
    assert bare["name"] == "42" and bare["leader"] is None and bare["igora"] is False
    rows = [bare, agent_summary({"type": "broker", "name": "b"}), worker]
    assert [r["type"] for r in sorted(rows, key=agent_order)] == ["worker", "broker", None]
    maps = {
        MapName.TODOS: {"a": {"state": "todo"}, "b": "not a task"},
        MapName.PREPARED: {},
        MapName.DOING: {"c": {"state": "doing"}, "d": {"state": "weird"}},
        MapName.DONE: {"e": {"state": "done"}, "f": {"state": "failed"}},
    }
    counts = tasks_by_state(maps)
    assert (counts["todo"], counts["doing"], counts["done"], counts["failed"]) == (1, 1, 1, 1)
    assert sum(counts.values()) == 4  # the malformed entries are not counted
    assert usage_counts({"usage": {"promptTokens": 7, "completionTokens": 5}}) == (7, 5)
    assert usage_counts({"usage": {"promptTokens": -1, "completionTokens": True}}) == (0, 0)
    assert usage_counts({"usage": "lots"}) == usage_counts({}) == (0, 0)
