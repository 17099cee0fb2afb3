"""The OpenAI-compatible gateway on the deterministic echo engine: answers, every error
case, API keys, CORS, abort when the HTTP client goes away, and a schemathesis fuzz run.

One market serves the whole module, with three rooms:
- ``market``: a broker, a fast echo worker (model ``echo``, 4 slots) and a slow one
  (model ``slow``, 0.05 s per token, 1 slot);
- ``fuzz``: a broker and a fast echo worker, for the fuzz run alone;
- ``empty``: nobody, so every request there finds no worker.
Gateways: ``main`` (no key), ``strict`` (two API keys, 3 s task timeout, one CORS
origin), ``empty``, ``fuzz``, and ``down`` (its market does not exist).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from igora.agent import Agent
from igora.config import market_address
from igora.protocol import GATEWAY_STYLE, MapName
from igora.testing import wait_until

from .conftest import Cluster, Proc, free_port
from .market_peers import JS, ensure_node_modules

KEYS = ("key-one", "key-two")
ALLOWED_ORIGIN = "http://allowed.example"


@dataclass
class Setup:
    cluster: Cluster
    main: str
    strict: str
    empty: str
    fuzz: str
    down: str

    def archived(self, task_id: str) -> dict[str, Any] | None:
        r = httpx.get(f"http://127.0.0.1:{self.cluster.port}/rooms/market/tasks/{task_id}")
        return r.json() if r.status_code == 200 else None


def _gateway(c: Cluster, name: str, *extra: str, market: str | None = None) -> tuple[Proc, str]:
    port = free_port()
    proc = c.spawn(
        "gateway",
        "--market",
        market or c.url,
        "--port",
        str(port),
        "--heartbeat",
        "1",
        "--log-level",
        "debug",
        *extra,
        name=name,
    )
    return proc, f"http://127.0.0.1:{port}"


def _answers(url: str, proc: Proc, status: int = 200) -> Callable[[], bool]:
    def check() -> bool:
        if not proc.alive():
            raise AssertionError(f"gateway exited:\n{proc.log()}")
        try:
            return httpx.get(url, timeout=2).status_code == status
        except httpx.HTTPError:
            return False

    return check


def _models(base: str) -> set[str]:
    try:
        return {m["id"] for m in httpx.get(f"{base}/v1/models", timeout=2).json()["data"]}
    except (httpx.HTTPError, KeyError, ValueError):
        return set()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Setup]:
    c = Cluster(tmp_path_factory.mktemp("gateway"))
    failed_before = request.session.testsfailed
    try:
        c.market()
        c.broker()
        c.broker("--room", "fuzz", name="broker-fuzz")
        c.worker("--model", "echo", "--slots", "4", name="echo")
        c.worker("--model", "slow", "--delay", "0.05", name="slow")
        c.worker("--room", "fuzz", "--slots", "4", name="echo-fuzz")
        main, main_url = _gateway(c, "gw-main")
        strict, strict_url = _gateway(
            c,
            "gw-strict",
            "--api-key",
            KEYS[0],
            "--api-key",
            KEYS[1],
            "--timeout",
            "3",
            "--cors-origin",
            ALLOWED_ORIGIN,
        )
        empty, empty_url = _gateway(c, "gw-empty", "--room", "empty")
        fuzz, fuzz_url = _gateway(c, "gw-fuzz", "--room", "fuzz")
        down, down_url = _gateway(c, "gw-down", market=f"ws://127.0.0.1:{free_port()}")
        for proc, url in (
            (main, main_url),
            (strict, strict_url),
            (empty, empty_url),
            (fuzz, fuzz_url),
        ):
            wait_until(_answers(f"{url}/health", proc), 60, f"{url}/health")
        wait_until(_answers(f"{down_url}/health", down, 503), 60, f"{down_url}/health")
        wait_until(lambda: _models(main_url) >= {"echo", "slow"}, 60, "workers seen by the gateway")
        wait_until(lambda: _models(fuzz_url) == {"echo"}, 60, "worker seen by the fuzz gateway")
        yield Setup(c, main_url, strict_url, empty_url, fuzz_url, down_url)
    finally:
        if request.session.testsfailed > failed_before:
            print(c.logs(60))
        c.stop()


def chat(base: str, content: str, **body: Any) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": content}], **body}
    return httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=30)


def sse_events(response: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_openai_error(
    r: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------- command line
def test_api_keys_come_from_flags_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from igora.gateway.cli import api_keys

    monkeypatch.setenv("IGORA_API_KEYS", " one, two ,,")
    assert api_keys(argparse.Namespace(api_key=None)) == ["one", "two"]
    assert api_keys(argparse.Namespace(api_key=["flag"])) == ["flag"]
    monkeypatch.setenv("IGORA_API_KEYS", "")
    assert api_keys(argparse.Namespace(api_key=None)) == []


def test_bad_settings_are_clear_errors_not_tracebacks(gw: Setup) -> None:
    taken = gw.main.rsplit(":", 1)[1]
    for args, expected in (
        (["--market", "http://nope"], "not a websocket URL"),
        (["--port", taken], f"port {taken}"),
        (["--port", "70000"], "not a TCP port"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "igora", "gateway", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stderr
        assert expected in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------------- answers
def test_health_says_connected_and_lists_models(gw: Setup) -> None:
    body = httpx.get(f"{gw.main}/health").json()
    assert body["connected"] is True and body["status"] == "ok"
    assert {"echo", "slow"} <= set(body["models"])


def test_gateway_shows_on_the_market_as_an_openai_endpoint(gw: Setup) -> None:
    gateways = [a for a in gw.cluster.agents("client") if a.get("name") == "openai-gateway"]
    assert gateways and all(a["style"] == GATEWAY_STYLE for a in gateways)


def test_models_lists_what_workers_serve_now(gw: Setup) -> None:
    listed = httpx.get(f"{gw.main}/v1/models").json()
    assert listed["object"] == "list"
    assert {m["id"] for m in listed["data"]} == {"echo", "slow"}
    one = httpx.get(f"{gw.main}/v1/models/echo").json()
    assert one == {
        "id": "echo",
        "object": "model",
        "created": one["created"],
        "owned_by": "igora-market",
        "capabilities": ["chat", "embed"],
    }
    assert_openai_error(httpx.get(f"{gw.main}/v1/models/nope"), 404, "model_not_found")


def test_chat_answer_with_usage_and_task_id(gw: Setup) -> None:
    r = chat(gw.main, "hello there", model="echo", user="alice", temperature=0.5, top_p=0.9, seed=7)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"] == "chatcmpl-" + r.headers["x-igora-task"]
    assert body["model"] == "echo"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Echo: hello there"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_gives_finish_reason_length(gw: Setup, field: str) -> None:
    body = chat(gw.main, "#repeat 50", model="echo", **{field: 5}).json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_stop_sequence_ends_the_answer(gw: Setup) -> None:
    body = chat(gw.main, "#repeat 50", model="echo", stop=["tok3"]).json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("model", [None, "", "default", "igora"])
def test_generic_model_names_mean_any_worker(gw: Setup, model: str | None) -> None:
    extra = {} if model is None else {"model": model}
    r = chat(gw.main, "anyone", **extra)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Echo: anyone"
    assert r.json()["model"] in {"echo", "slow"}


def test_stream_sends_chunks_usage_and_done(gw: Setup) -> None:
    payload = {
        "model": "echo",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "one two three"}],
    }
    with httpx.stream("POST", f"{gw.main}/v1/chat/completions", json=payload, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"] == "chatcmpl-" + r.headers["x-igora-task"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Echo: one two three"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_without_usage_option_has_no_usage(gw: Setup) -> None:
    payload = {
        "model": "echo",
        "stream": True,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "#repeat 9"}],
    }
    with httpx.stream("POST", f"{gw.main}/v1/chat/completions", json=payload, timeout=30) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all("usage" not in c for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_legacy_completions_plain_echo_and_stream(gw: Setup) -> None:
    r = httpx.post(f"{gw.main}/v1/completions", json={"model": "echo", "prompt": "#repeat 40"})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    # OpenAI's legacy default: 16 tokens.
    assert body["choices"][0]["text"] == "".join(f"tok{i} " for i in range(16))
    assert body["choices"][0]["finish_reason"] == "length"
    r = httpx.post(
        f"{gw.main}/v1/completions", json={"prompt": ["say this"], "echo": True, "max_tokens": 100}
    )
    assert r.json()["choices"][0]["text"] == "say thisEcho: say this"
    with httpx.stream(
        "POST",
        f"{gw.main}/v1/completions",
        timeout=30,
        json={"model": "echo", "prompt": "a b", "stream": True},
    ) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Echo: a b"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_openai_sdk_against_echo_workers(gw: Setup) -> None:
    client = openai.OpenAI(base_url=f"{gw.main}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="echo",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "sdk works"},
        ],
    )
    assert answer.choices[0].message.content == "Echo: sdk works"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="echo", n=2, messages=[{"role": "user", "content": "x"}]
        )
    assert [m.id for m in client.models.list()] == ["echo", "slow"]


# ---------------------------------------------------------------------- errors
BAD_CHAT: list[tuple[str, Any, str | None]] = [
    ("malformed JSON", '{"messages": [', "invalid_json"),
    ("array body", "[]", "invalid_value"),
    ("string body", '"hello"', "invalid_value"),
    ("empty body", "", "missing_required_parameter"),
    ("no messages", {"model": "echo"}, "missing_required_parameter"),
    ("empty messages", {"messages": []}, "invalid_value"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "invalid_value"),
    ("content number", {"messages": [{"role": "user", "content": 5}]}, "invalid_value"),
    (
        "image part",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ]
        },
        "unsupported_value",
    ),
    ("max_tokens string", {"max_tokens": "10"}, "invalid_value"),
    ("max_tokens zero", {"max_tokens": 0}, "invalid_value"),
    ("max_tokens float", {"max_tokens": 1.5}, "invalid_value"),
    ("temperature high", {"temperature": 3}, "invalid_value"),
    ("temperature text", {"temperature": "hot"}, "invalid_value"),
    ("top_p high", {"top_p": 1.5}, "invalid_value"),
    ("seed float", {"seed": 1.5}, "invalid_value"),
    ("seed huge", {"seed": 2**70}, "invalid_value"),
    ("stop too many", {"stop": [str(i) for i in range(17)]}, "invalid_value"),
    ("stop empty string", {"stop": ""}, "invalid_value"),
    # Fields the echo workers cannot honour: 400 naming what no worker offers.
    ("n two", {"n": 2}, "capability_not_served"),
    ("stream text", {"stream": "yes"}, "invalid_value"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, "invalid_value"),
    ("logprobs", {"logprobs": True}, "capability_not_served"),
    (
        "tools",
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        "capability_not_served",
    ),
    ("json mode", {"response_format": {"type": "json_object"}}, "capability_not_served"),
    (
        "json schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            }
        },
        "capability_not_served",
    ),
    (
        "json_schema missing",
        {"response_format": {"type": "json_schema"}},
        "missing_required_parameter",
    ),
    ("unknown response type", {"response_format": {"type": "yaml"}}, "invalid_value"),
    ("legacy functions", {"functions": [{"name": "f"}]}, "unsupported_parameter"),
    ("tool_choice without tools", {"tool_choice": "required"}, "invalid_value"),
    (
        "tool_choice names another tool",
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "invalid_value",
    ),
    (
        "tool without name",
        {"tools": [{"type": "function", "function": {}}]},
        "missing_required_parameter",
    ),
    ("top_logprobs alone", {"top_logprobs": 2}, "invalid_value"),
    ("model not a string", {"model": 12}, "invalid_value"),
    ("model too long", {"model": "m" * 500}, "invalid_value"),
]


@pytest.mark.parametrize("what,body,code", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_invalid_chat_request_is_a_400_in_openai_format(
    gw: Setup, what: str, body: Any, code: str | None
) -> None:
    if isinstance(body, dict) and "messages" not in body and what != "no messages":
        body = {"messages": [{"role": "user", "content": "x"}], **body}
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        f"{gw.main}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert_openai_error(r, 400, code)


BAD_TEXT: list[tuple[str, Any, str | None]] = [
    ("no prompt", {"model": "echo"}, "missing_required_parameter"),
    ("two prompts", {"prompt": ["a", "b"]}, "unsupported_value"),
    ("token ids", {"prompt": [1, 2, 3]}, "invalid_value"),
    ("suffix", {"prompt": "a", "suffix": "b"}, "unsupported_parameter"),
    ("best_of", {"prompt": "a", "best_of": 3}, "unsupported_parameter"),
    ("logprobs", {"prompt": "a", "logprobs": 2}, "unsupported_parameter"),
    ("n", {"prompt": "a", "n": 4}, "unsupported_parameter"),
]


@pytest.mark.parametrize("what,body,code", BAD_TEXT, ids=[b[0] for b in BAD_TEXT])
def test_invalid_completion_request_is_a_400(
    gw: Setup, what: str, body: Any, code: str | None
) -> None:
    r = httpx.post(f"{gw.main}/v1/completions", json=body, timeout=30)
    assert_openai_error(r, 400, code)


def test_an_error_in_a_field_of_several_types_names_the_field_not_a_type(gw: Setup) -> None:
    """``prompt`` is a text or a list of texts: an empty list's error is the list's, and
    its ``param`` is ``prompt`` (not ``prompt.constrained-str``, pydantic's union member)."""
    r = httpx.post(f"{gw.main}/v1/completions", json={"model": "echo", "prompt": []})
    err = assert_openai_error(r, 400, "invalid_value", "prompt")
    assert "at least 1 item" in err["message"]
    r = httpx.post(f"{gw.main}/v1/embeddings", json={"model": "echo", "input": 7})
    assert_openai_error(r, 400, "invalid_value", "input")


def test_embeddings_from_echo_workers_as_floats_or_base64(gw: Setup) -> None:
    client = openai.OpenAI(base_url=f"{gw.main}/v1", api_key="unused", max_retries=0)
    floats = client.embeddings.create(model="echo", input=["a b", "c"], encoding_format="float")
    packed = client.embeddings.create(model="echo", input=["a b", "c"])  # the SDK asks base64
    for f, p in zip(floats.data, packed.data, strict=True):
        assert f.embedding == pytest.approx(p.embedding, abs=1e-6)
    assert len(floats.data[0].embedding) == 16 and floats.model == "echo"
    assert floats.usage.prompt_tokens == 3
    assert (
        len(client.embeddings.create(model="default", input="a", dimensions=4).data[0].embedding)
        == 4
    )
    listed = httpx.get(f"{gw.main}/v1/models", timeout=10).json()["data"]
    assert listed[0]["id"] == "echo" and listed[0]["capabilities"] == ["chat", "embed"]


BAD_EMBED: list[tuple[str, Any, int, str | None]] = [
    ("no input", {"model": "echo"}, 400, "missing_required_parameter"),
    ("empty list", {"input": []}, 400, "invalid_value"),
    ("token ids", {"input": [1, 2, 3]}, 400, "invalid_value"),
    ("dimensions zero", {"input": "a", "dimensions": 0}, 400, "invalid_value"),
    ("encoding", {"input": "a", "encoding_format": "hex"}, 400, "invalid_value"),
    ("unknown model", {"input": "a", "model": "text-embedding-3-small"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("what,body,status,code", BAD_EMBED, ids=[b[0] for b in BAD_EMBED])
def test_invalid_embeddings_request_is_an_openai_error(
    gw: Setup, what: str, body: Any, status: int, code: str | None
) -> None:
    r = httpx.post(f"{gw.main}/v1/embeddings", json=body, timeout=30)
    assert_openai_error(r, status, code)


def test_form_encoded_json_is_still_read_as_json(gw: Setup) -> None:
    # curl -d sends application/x-www-form-urlencoded; OpenAI reads the body as JSON anyway.
    r = httpx.post(
        f"{gw.main}/v1/chat/completions",
        timeout=30,
        content='{"model": "echo", "messages": [{"role": "user", "content": "hi"}]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.json()["choices"][0]["message"]["content"] == "Echo: hi"


def test_too_large_body_is_a_413(gw: Setup) -> None:
    r = httpx.post(
        f"{gw.main}/v1/chat/completions",
        timeout=30,
        content=b'{"messages": "' + b"x" * (9 * 1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_openai_error(r, 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the gateway counts as it reads
        yield b'{"messages": "'
        for _ in range(9):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(
        f"{gw.main}/v1/chat/completions",
        timeout=30,
        content=chunked(),
        headers={"content-type": "application/json"},
    )
    assert_openai_error(r, 413, "request_too_large")


def test_unknown_path_and_method_are_openai_errors(gw: Setup) -> None:
    assert_openai_error(httpx.get(f"{gw.main}/v1/nothing"), 404, "not_found")
    assert_openai_error(httpx.delete(f"{gw.main}/v1/models"), 405, "method_not_allowed")


def test_unknown_model_is_a_404_naming_the_served_ones(gw: Setup) -> None:
    err = assert_openai_error(chat(gw.main, "x", model="gpt-4o"), 404, "model_not_found", "model")
    assert "echo" in err["message"] and "slow" in err["message"]
    with httpx.stream(
        "POST",
        f"{gw.main}/v1/chat/completions",
        timeout=30,
        json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ) as r:
        r.read()
    assert_openai_error(r, 404, "model_not_found")


def test_no_worker_on_the_market_is_a_503(gw: Setup) -> None:
    err = assert_openai_error(chat(gw.empty, "anyone?"), 503, "no_worker")
    assert err["type"] == "server_error"
    assert_openai_error(chat(gw.empty, "anyone?", model="echo"), 503, "no_worker")
    assert httpx.get(f"{gw.empty}/v1/models").json()["data"] == []


def test_unreachable_market_is_a_503_and_health_says_so(gw: Setup) -> None:
    health = httpx.get(f"{gw.down}/health")
    assert health.status_code == 503 and health.json()["connected"] is False
    assert_openai_error(chat(gw.down, "hello"), 503, "market_unreachable")


def test_worker_failure_is_a_502_with_the_reason(gw: Setup) -> None:
    r = chat(gw.main, "#fail", model="echo")
    err = assert_openai_error(r, 502, "worker_error")
    assert "asked to fail" in err["message"]
    assert r.headers["x-should-retry"] == "false"
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    sdk = openai.OpenAI(base_url=f"{gw.main}/v1", api_key="unused", http_client=http)
    with pytest.raises(openai.InternalServerError):  # the SDK retries 5xx twice by default
        sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "#fail"}])
    assert len(sent) == 1
    r = chat(gw.main, "#fail", model="echo", stream=True)
    assert_openai_error(r, 502, "worker_error")


def test_task_timeout_is_a_504(gw: Setup) -> None:
    auth = {"authorization": f"Bearer {KEYS[0]}"}
    r = httpx.post(
        f"{gw.strict}/v1/chat/completions",
        headers=auth,
        timeout=30,
        json={"model": "slow", "messages": [{"role": "user", "content": "#repeat 400"}]},
    )
    err = assert_openai_error(r, 504, "task_timeout")
    assert err["type"] == "timeout"
    assert r.headers["x-should-retry"] == "false"  # the openai package would retry a 504


def test_timeout_after_the_stream_started_is_an_error_event(gw: Setup) -> None:
    auth = {"authorization": f"Bearer {KEYS[1]}"}
    with httpx.stream(
        "POST",
        f"{gw.strict}/v1/chat/completions",
        headers=auth,
        timeout=30,
        json={
            "model": "slow",
            "stream": True,
            "messages": [{"role": "user", "content": "#repeat 400"}],
        },
    ) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "task_timeout"
    streamed = "".join(
        e["choices"][0]["delta"].get("content", "") for e in events[:-1] if "choices" in e
    )
    assert streamed.startswith("tok0 tok1")


# ---------------------------------------------------------------------- the Responses API
def responses_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The ``event:`` / ``data:`` pairs of a Responses API stream."""
    out: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
            assert data["type"] == kind
            out.append((kind, data))
    return out


def test_responses_api_answers_as_a_response_object(gw: Setup) -> None:
    r = httpx.post(
        f"{gw.main}/v1/responses",
        json={
            "model": "echo",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "first question"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "first answer"}],
                },
                {"role": "developer", "content": "Answer in English."},
                {"role": "user", "content": [{"type": "input_text", "text": "hello there"}]},
            ],
            "metadata": {"team": "blue"},
            "store": True,
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    task = r.headers["x-igora-task"]
    assert body["id"] == "resp_" + task and body["object"] == "response"
    assert body["status"] == "completed" and body["error"] is None
    assert body["model"] == "echo"
    assert body["output"] == [
        {
            "type": "message",
            "id": "msg_" + task,
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": "Echo: hello there",
                    "annotations": [],
                    "logprobs": [],
                }
            ],
        }
    ]
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + 3
    assert body["instructions"] == "Be brief." and body["metadata"] == {"team": "blue"}
    assert body["store"] is False  # nothing is kept, whatever the request asked
    sdk = openai.OpenAI(base_url=f"{gw.main}/v1", api_key="unused", max_retries=0)
    assert sdk.responses.create(model="echo", input="plain text").output_text == "Echo: plain text"


def test_responses_api_cut_by_max_output_tokens_is_incomplete(gw: Setup) -> None:
    payload = {"model": "echo", "input": "#repeat 50", "max_output_tokens": 5}
    body = httpx.post(f"{gw.main}/v1/responses", json=payload, timeout=30).json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 "
    with httpx.stream(
        "POST", f"{gw.main}/v1/responses", json={**payload, "stream": True}, timeout=30
    ) as r:
        events = responses_events(r)
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_api_streams_openai_events_in_order(gw: Setup) -> None:
    payload = {"model": "slow", "input": "#repeat 6", "stream": True}
    with httpx.stream("POST", f"{gw.main}/v1/responses", json=payload, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        task = r.headers["x-igora-task"]
        events = responses_events(r)
    kinds = [k for k, _ in events]
    deltas = [d["delta"] for k, d in events if k == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert len(deltas) >= 2  # the slow worker's pieces come as it writes them
    text = "".join(f"tok{i} " for i in range(6))
    assert "".join(deltas) == text
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert events[0][1]["response"]["status"] == "in_progress"
    assert events[0][1]["response"]["id"] == "resp_" + task
    assert dict(events)["response.output_text.done"]["text"] == text
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] == 6
    # The SDK's stream helper reads the same events into its final response.
    sdk = openai.OpenAI(base_url=f"{gw.main}/v1", api_key="unused", max_retries=0)
    with sdk.responses.stream(model="echo", input="one two") as stream:
        got = [e.type for e in stream]
        assert stream.get_final_response().output_text == "Echo: one two"
    assert got[0] == "response.created" and got[-1] == "response.completed"


def test_responses_api_failures_are_errors_before_the_stream_and_events_after(
    gw: Setup,
) -> None:
    r = httpx.post(f"{gw.main}/v1/responses", json={"model": "echo", "input": "#fail"})
    assert "asked to fail" in assert_openai_error(r, 502, "worker_error")["message"]
    auth = {"authorization": f"Bearer {KEYS[1]}"}
    payload = {"model": "slow", "stream": True, "input": "#repeat 400"}
    with httpx.stream(
        "POST", f"{gw.strict}/v1/responses", headers=auth, json=payload, timeout=30
    ) as r:
        assert r.status_code == 200
        events = responses_events(r)
    assert events[-1][0] == "response.failed"
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "task_timeout"
    assert "timed out" in failed["error"]["message"]
    streamed = "".join(d["delta"] for k, d in events if k == "response.output_text.delta")
    assert streamed.startswith("tok0 tok1")


def test_the_javascript_openai_package_against_the_gateway(gw: Setup) -> None:
    """The official openai package for JavaScript (tests/js/openai_client.mjs): chat,
    streamed with usage, the Responses API and its stream helper, embeddings, an error."""
    ensure_node_modules()
    run = subprocess.run(
        ["node", str(JS / "openai_client.mjs"), f"{gw.main}/v1", "echo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["chat"] == "Echo: hello there" and got["task"].startswith("chatcmpl-")
    assert got["streamed"] == "Echo: one two three"
    assert got["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert got["responses"] == "Echo: plain text"
    assert got["responsesStreamed"] == "Echo: streamed text"
    assert got["responseEvents"][0] == "response.created"
    assert got["responseEvents"][-1] == "response.completed"
    assert got["dimensions"] == [16, 16]
    assert got["error"] == {"status": 404, "code": "model_not_found", "type": "NotFoundError"}


def test_stored_responses_are_a_404_that_says_none_is_kept(gw: Setup) -> None:
    sdk = openai.OpenAI(base_url=f"{gw.main}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="stores no responses"):
        sdk.responses.retrieve("resp_123")
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{gw.main}/v1/responses/resp_123")
        assert_openai_error(r, 404, "response_not_found")


BAD_RESPONSES: list[tuple[str, Any, str, str | None]] = [
    ("no input", {"model": "echo"}, "missing_required_parameter", "input"),
    ("empty input", {"input": []}, "invalid_value", "input"),
    (
        "stored response",
        {"input": "x", "previous_response_id": "resp_1"},
        "unsupported_parameter",
        "previous_response_id",
    ),
    ("conversation", {"input": "x", "conversation": "conv_1"}, "unsupported_parameter", None),
    ("background", {"input": "x", "background": True}, "unsupported_parameter", "background"),
    (
        "built-in tool",
        {"input": "x", "tools": [{"type": "web_search"}]},
        "unsupported_value",
        "tools[0].type",
    ),
    ("nameless tool", {"input": "x", "tools": [{"type": "function"}]}, None, "tools[0].name"),
    (
        "image",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "unsupported_value",
        "input[0].content[0]",
    ),
    ("item reference", {"input": [{"type": "item_reference", "id": "x"}]}, None, "input[0]"),
    ("roleless message", {"input": [{"content": "x"}]}, None, "input[0].role"),
    (
        "call without id",
        {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
        "missing_required_parameter",
        None,
    ),
    (
        "choice of no tool",
        {"input": "x", "tool_choice": {"type": "function", "name": "f"}},
        "invalid_value",
        "tool_choice",
    ),
    (
        "other choice kind",
        {
            "input": "x",
            "tools": [{"type": "function", "name": "f"}],
            "tool_choice": {"type": "mcp"},
        },
        "unsupported_value",
        "tool_choice",
    ),
    ("bad format", {"input": "x", "text": {"format": {"type": "xml"}}}, "invalid_value", None),
    ("string tokens", {"input": "x", "max_output_tokens": "9"}, "invalid_value", None),
]


@pytest.mark.parametrize("what,body,code,param", BAD_RESPONSES, ids=[b[0] for b in BAD_RESPONSES])
def test_invalid_responses_request_is_a_400_naming_the_field(
    gw: Setup, what: str, body: Any, code: str | None, param: str | None
) -> None:
    r = httpx.post(f"{gw.main}/v1/responses", json={"model": "echo", **body}, timeout=30)
    assert_openai_error(r, 400, code, param)


def test_api_key_is_required_when_configured(gw: Setup) -> None:
    url = f"{gw.strict}/v1/models"
    assert_openai_error(httpx.get(url), 401, "invalid_api_key")
    assert_openai_error(
        httpx.get(url, headers={"authorization": "Bearer wrong"}), 401, "invalid_api_key"
    )
    assert_openai_error(httpx.get(url, headers={"authorization": KEYS[0]}), 401)
    # A wrong key is a 401 even when the body is garbage too.
    assert_openai_error(httpx.post(f"{gw.strict}/v1/chat/completions", content="{"), 401)
    for key in KEYS:
        assert httpx.get(url, headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{gw.strict}/health").status_code == 200  # health stays open
    sdk = openai.OpenAI(base_url=f"{gw.strict}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()
    sdk = openai.OpenAI(base_url=f"{gw.strict}/v1", api_key=KEYS[1], max_retries=0)
    answer = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "key ok"}]
    )
    assert answer.choices[0].message.content == "Echo: key ok"


def test_cors_lets_browsers_call_the_api(gw: Setup) -> None:
    preflight = {
        "origin": "http://page.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    r = httpx.options(f"{gw.main}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in {"*", "http://page.example"}
    r = httpx.post(
        f"{gw.main}/v1/chat/completions",
        headers={"origin": "http://page.example"},
        json={"model": "echo", "messages": [{"role": "user", "content": "c"}]},
    )
    assert r.headers["access-control-allow-origin"] == "*"
    assert "x-igora-task" in r.headers["access-control-expose-headers"]
    # The strict gateway allows one origin only; its preflight needs no key.
    r = httpx.options(f"{gw.strict}/v1/models", headers={**preflight, "origin": ALLOWED_ORIGIN})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = httpx.options(f"{gw.strict}/v1/models", headers=preflight)
    assert "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------------- abort
def test_client_disconnecting_mid_stream_aborts_its_task(gw: Setup) -> None:
    payload = {
        "model": "slow",
        "stream": True,
        "messages": [{"role": "user", "content": "#repeat 400"}],
    }
    with httpx.stream("POST", f"{gw.main}/v1/chat/completions", json=payload, timeout=30) as r:
        assert r.status_code == 200
        task_id = r.headers["x-igora-task"]
        tokens = 0
        for line in r.iter_lines():
            tokens += '"content":"tok' in line
            if tokens >= 3:
                break
    # Leaving the block closes the connection with 397 tokens still to come (~20 s).
    final = wait_until(lambda: gw.archived(task_id), 15, f"task {task_id} archived")
    assert final["state"] == "aborted", final
    # Whoever ended it (worker or broker) kept at most what was streamed before the abort.
    assert len((final.get("response") or "").split()) < 100
    slow = wait_until(
        lambda: [
            w
            for w in gw.cluster.agents("worker")
            if w.get("models") and w["models"][0]["name"] == "slow" and w.get("running") == 0
        ],
        15,
        "slow worker free again",
    )
    assert slow[0]["state"] == "ready"


async def test_client_giving_up_on_a_plain_request_aborts_its_task(gw: Setup) -> None:
    nonce = f"nonce{time.monotonic_ns()}"
    address = market_address(gw.cluster.url, "market")
    async with Agent(address, type="client", name="test-observer", style="text") as agent:
        # Every entry written to done, seen as it comes: the gateway's client removes the
        # end of its task from done within 50 ms, faster than a poll may look.
        seen: list[Any] = []
        agent.observe_keys(
            MapName.DONE, lambda changes: seen.extend(c.get("newValue") for c in changes.values())
        )
        async with httpx.AsyncClient(timeout=1.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(
                    f"{gw.main}/v1/chat/completions",
                    json={
                        "model": "slow",
                        "messages": [{"role": "user", "content": f"#repeat 400 {nonce}"}],
                    },
                )

        def ended() -> dict[str, Any] | None:
            for value in seen:
                if isinstance(value, dict) and nonce in json.dumps(value.get("messages")):
                    return value
            return None

        end = time.monotonic() + 15
        while ended() is None and time.monotonic() < end:
            await asyncio.sleep(0.05)
        final = ended()
    assert final is not None, "the task did not end within 15 s"
    assert final["state"] == "aborted"  # before it started, or at its next token
    assert len((final.get("response") or "").split()) < 200


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_worker_lost_mid_stream_restarts_the_answer_with_a_marked_chunk(
    gw: Setup, api: str
) -> None:
    c = gw.cluster
    relays = {
        name: c.worker("--model", "relay", "--delay", "0.05", name=name)
        for name in (f"relay-a-{api}", f"relay-b-{api}")
    }
    try:
        wait_until(
            lambda: (
                "relay" in _models(gw.main)
                and len([w for w in c.agents("worker") if w["name"] in relays]) == 2
            ),
            60,
            "two relay workers",
        )
        if api == "chat":
            path = "/v1/chat/completions"
            payload = {"messages": [{"role": "user", "content": "#repeat 60"}]}
        else:
            path, payload = "/v1/responses", {"input": "#repeat 60"}
        payload = {**payload, "model": "relay", "stream": True}
        events: list[Any] = []
        with httpx.stream("POST", f"{gw.main}{path}", json=payload, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"tok' in line:
                    break
            busy = wait_until(
                lambda: [
                    w["name"]
                    for w in c.agents("worker")
                    if w["name"] in relays and w.get("running")
                ],
                15,
                "the relay worker running the task",
            )
            relays[busy[0]].kill()
            for line in lines:
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
        if api == "chat":
            assert events.pop() == "[DONE]"
        else:
            assert events.pop()["type"] == "response.completed"
        marked = [i for i, e in enumerate(events) if e.get("igora", {}).get("restart")]
        assert len(marked) == 1, events
        after = "".join(
            e["choices"][0]["delta"].get("content", "") if api == "chat" else e.get("delta", "")
            for e in events[marked[0] + 1 :]
            if api != "chat" or e["choices"]
        )
        assert after == "".join(f"tok{i} " for i in range(60))
    finally:
        for proc in relays.values():
            proc.stop()


# ---------------------------------------------------------------------- fuzz
def test_openapi_schema_fuzz_run_finds_no_server_error(gw: Setup, tmp_path: Path) -> None:
    schema = httpx.get(f"{gw.fuzz}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])
    st = Path(sys.executable).with_name("st")
    cmd = [
        str(st),
        "run",
        f"{gw.fuzz}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        "fuzzing,stateful",
        "--max-examples",
        "50",
        "--workers",
        "2",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--no-color",
        # An endless event stream (the web page's live view) has no response to check.
        "--exclude-path",
        "/api/market/events",
        # No input to fuzz (a GET without parameters), and in this v2 room always the
        # 404 `no_credits` (schemathesis warns of that); tests/test_web_credits.py tests it.
        "--exclude-path",
        "/v1/igora/balance",
        # Always the 404 `response_not_found`: the gateway stores no responses
        # (schemathesis warns of that); test_stored_responses_... tests it.
        "--exclude-path",
        "/v1/responses/{response_id}",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "No issues found" in run.stdout, run.stdout[-4000:]
