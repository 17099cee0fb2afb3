"""Workers in front of an OpenAI-compatible upstream.

Three layers: the engine alone against a misbehaving stub upstream (every failure
class), real ``igora worker --engine openai`` processes on a real market in front of
that stub, and the proof of normal operation: llama-cpp-python's own server on the
bundled model, behind an openai worker, answering through the market.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from igora import Client, TaskAborted, TaskFailed, TaskTimeout
from igora.engines.base import EngineError, EngineUnavailable, Finish, Request
from igora.engines.llama import bundled_model
from igora.engines.openai import OpenAIEngine, UpstreamModel
from igora.engines.upstream import parse_models, parse_params
from igora.protocol import AgentField, State, TaskField
from igora.testing import wait_for, wait_until

from .conftest import Cluster, free_port, wait_http
from .upstream_stub import MODES, Stub

HI = [{"role": "user", "content": "Hi"}]


async def collect(engine: OpenAIEngine, model: str | None = None, **kw: Any) -> list[Any]:
    return [item async for item in engine.generate(Request(HI, model=model, **kw))]


@pytest.fixture
def stub() -> Iterator[Stub]:
    with Stub() as s:
        yield s


@pytest.fixture
async def engine(stub: Stub) -> AsyncIterator[OpenAIEngine]:
    e = OpenAIEngine(stub.url, [MODES[0], "ok=friendly", *MODES[1:]], timeout=1.0)
    yield e
    await e.close()


# ---------------------------------------------------------------------- the engine alone
async def test_engine_streams_the_upstream_pieces_then_its_usage(engine: OpenAIEngine) -> None:
    items = await collect(engine, "ok")
    assert items == ["Hello", " from", " the", " stub", Finish("stop", 7, 4)]


async def test_alias_is_advertised_and_the_upstream_id_is_sent(
    engine: OpenAIEngine, stub: Stub
) -> None:
    assert "friendly" in [m.name for m in engine.models()]
    assert (
        "".join(i for i in await collect(engine, "friendly") if isinstance(i, str))
        == "Hello from the stub"
    )
    assert stub.requests[-1]["model"] == "ok"
    assert stub.requests[-1]["stream"] is True


async def test_max_tokens_is_forwarded_and_length_reported(engine: OpenAIEngine) -> None:
    items = await collect(engine, "ok", max_tokens=2, temperature=0.5, seed=3)
    assert items == ["Hello", " from", Finish("length", 7, 2)]


async def test_upstream_refusing_stream_options_is_asked_again_without_them() -> None:
    with Stub(strict_options=True) as s:
        e = OpenAIEngine(s.url, ["ok"])
        try:
            first = await collect(e, "ok")
            second = await collect(e, "ok")
        finally:
            await e.close()
    assert first[-1] == second[-1] == Finish("stop", 0, 4)  # usage counted from the pieces
    assert ["stream_options" in r for r in s.requests] == [True, False, False]


async def test_non_streaming_answer_is_accepted(engine: OpenAIEngine) -> None:
    assert await collect(engine, "json") == ["a whole answer", Finish("stop", 3, 3)]


@pytest.mark.parametrize(
    "model, message",
    [
        ("e400", "HTTP 400: stub: the request is invalid"),
        ("e401", "HTTP 401: Incorrect API key provided"),
        ("e404", "HTTP 404: stub: no such model (check the model name"),
        ("e500", "HTTP 500: stub: internal failure while generating"),
    ],
)
async def test_request_errors_fail_with_the_upstream_message(
    engine: OpenAIEngine, model: str, message: str
) -> None:
    with pytest.raises(EngineError, match=message.replace("(", r"\(")) as err:
        await collect(engine, model)
    assert not isinstance(err.value, EngineUnavailable)


@pytest.mark.parametrize(
    "model, message",
    [
        ("e429", "HTTP 429: stub: rate limit reached"),
        ("e503", "HTTP 503: stub: overloaded"),
    ],
)
async def test_overload_statuses_mean_unavailable(
    engine: OpenAIEngine, model: str, message: str
) -> None:
    with pytest.raises(EngineUnavailable, match=message):
        await collect(engine, model)


@pytest.mark.parametrize(
    "model, message",
    [
        ("cut", "cut the answer off after 3 piece"),
        (
            "cut-clean",
            r"cut the answer off after 3 piece\(s\) \(the stream ended without finishing",
        ),
        ("interrupted", r"after 3 piece\(s\) \(\[DONE\] came without a finish reason"),
        ("midstream-error", "failed mid-answer: stub: the GPU fell off the bus"),
    ],
)
async def test_stream_broken_mid_answer_fails(
    engine: OpenAIEngine, model: str, message: str
) -> None:
    pieces: list[Any] = []
    with pytest.raises(EngineError, match=message) as err:
        async for item in engine.generate(Request(HI, model=model)):
            pieces.append(item)
    assert not isinstance(err.value, EngineUnavailable)
    assert pieces and all(isinstance(p, str) for p in pieces)


async def test_silent_upstream_fails_after_the_upstream_timeout(engine: OpenAIEngine) -> None:
    with pytest.raises(EngineError, match=r"sent nothing for 1 s \(upstream timeout\)"):
        await collect(engine, "hang")


async def test_unreachable_upstream_is_unavailable() -> None:
    e = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", ["ok"])
    try:
        assert await e.available() is False
        with pytest.raises(
            EngineUnavailable, match=r"cannot reach the upstream .*connection refused"
        ):
            await collect(e)
    finally:
        await e.close()


async def test_health_check_needs_the_right_api_key() -> None:
    with Stub(api_key="sesame") as s:
        wrong, right = (
            OpenAIEngine(s.url, ["ok"], api_key="nope"),
            OpenAIEngine(s.url, ["ok=smart"], api_key="sesame"),
        )
        try:
            assert await wrong.available() is False
            assert await right.available() is True
            advert = right.models()[0].advert()
            assert advert["name"] == "smart" and advert["contextLength"] == 4096
            assert {"chat", "tools", "json_schema", "embed"} <= set(advert["capabilities"])
            assert (await collect(right, "smart"))[-1] == Finish("stop", 7, 4)
        finally:
            await wrong.close()
            await right.close()


async def test_closing_the_stream_closes_the_upstream_connection(
    engine: OpenAIEngine, stub: Stub
) -> None:
    gen = engine.generate(Request(HI, model="slow"))
    pieces = [await gen.__anext__() for _ in range(3)]
    assert pieces == ["tok0 ", "tok1 ", "tok2 "]
    await gen.aclose()
    await wait_for(lambda: stub.disconnects >= 1, 5, "the upstream did not see the abort")


@pytest.mark.parametrize(
    "spec, what",
    [
        ("=alias", "malformed"),
        ("name=", "malformed"),
        ("", "malformed"),
    ],
)
def test_bad_model_specs_are_refused_clearly(spec: str, what: str) -> None:
    with pytest.raises(EngineError, match=what):
        OpenAIEngine("http://127.0.0.1:1/v1", [spec])


def test_params_give_each_served_model_its_advertised_size() -> None:
    served = parse_models(["a", "x=b", "c"])
    assert parse_params([], served) == {}
    assert parse_params(["8"], served) == {"a": "8", "b": "8", "c": "8"}
    assert parse_params(["b=70", "0.5"], served) == {"a": "0.5", "b": "70", "c": "0.5"}
    assert parse_params(["b=70"], served) == {"b": "70"}
    for specs, message in [
        (["z=1"], "'z' is not a served model \\(served: a, b, c\\)"),
        (["0"], "must be a positive number of billions"),
        (["b=big"], "is not a number"),
        (["1", "2"], "one size without ALIAS= at most"),
    ]:
        with pytest.raises(EngineError, match=message):
            parse_params(specs, served)
    engine = OpenAIEngine("http://127.0.0.1:9/v1", ["a", "x=b"], params=["b=70"])
    assert [(m.name, m.params) for m in engine.models()] == [("a", None), ("b", "70")]


def test_model_spec_and_url_checks() -> None:
    assert UpstreamModel.parse("llama3.2:3b=llama") == UpstreamModel("llama3.2:3b", "llama")
    assert UpstreamModel.parse("qwen") == UpstreamModel("qwen", "qwen")
    with pytest.raises(EngineError, match="two models are advertised as 'x'"):
        OpenAIEngine("http://127.0.0.1:1/v1", ["a=x", "b=x"])
    with pytest.raises(EngineError, match="must look like http://host:port/v1"):
        OpenAIEngine("localhost:11434", ["a"])


def test_cli_refuses_a_bad_base_url_without_a_traceback(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "igora",
            "worker",
            "--engine",
            "openai",
            "--base-url",
            "ftp://x",
            "--model",
            "a",
            "--market",
            "ws://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "must look like http://host:port/v1" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------- through the market
@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("openai"))
    c.market()
    c.broker()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stub_workers(market: Cluster) -> Iterator[tuple[Cluster, Stub]]:
    """Workers in front of one stub: one serving many behaviours, two offering model
    ``flaky`` (one over a 503-answering upstream, with more slots so it is picked
    first), one alone on model ``lonely`` (503), and one whose upstream is not there."""
    s = Stub().start()

    def worker(name: str, *extra: str, base_url: str = s.url) -> None:
        market.worker("--no-warmup", "--base-url", base_url, *extra, name=name, engine="openai")

    worker(
        "multi",
        "--model",
        "ok=stub-ok",
        "--model",
        "hang=stub-hang",
        "--model",
        "cut=stub-cut",
        "--model",
        "e400=stub-400",
        "--model",
        "e401=stub-401",
        "--model",
        "e500=stub-500",
        "--model",
        "slow=stub-slow",
        "--upstream-timeout",
        "2",
        "--slots",
        "2",
        "--params",
        "stub-ok=8",
    )
    worker("flaky-bad", "--model", "e503=flaky", "--slots", "3")
    worker("flaky-good", "--model", "ok=flaky")
    worker("lonely", "--model", "e503=lonely")
    worker(
        "down",
        "--model",
        "ok=flaky",
        "--model",
        "ok=nowhere",
        base_url=f"http://127.0.0.1:{free_port()}/v1",
    )
    wait_until(
        lambda: (
            {"multi", "flaky-bad", "flaky-good", "lonely", "down"}
            <= {a.get("name") for a in market.agents("worker")}
        ),
        60,
        lambda: "the stub workers did not all join\n" + market.logs(),
    )
    yield market, s
    s.stop()


def worker_state(cluster: Cluster, name: str) -> dict[str, Any]:
    found = [a for a in cluster.agents("worker") if a.get("name") == name]
    return found[0] if found else {}


def wait_ready(cluster: Cluster, *names: str, timeout: float = 30) -> None:
    for name in names:
        wait_until(
            lambda name=name: worker_state(cluster, name).get(AgentField.STATE) == "ready",
            timeout,
            lambda name=name: f"worker {name} did not become ready\n" + cluster.logs(),
        )


async def test_market_task_is_answered_by_the_upstream_under_its_alias(
    stub_workers: tuple[Cluster, Stub],
) -> None:
    cluster, stub = stub_workers
    wait_ready(cluster, "multi")
    advert = worker_state(cluster, "multi")
    assert advert[AgentField.ENGINE] == "openai" and advert[AgentField.SLOTS] == 2
    assert {m["name"] for m in advert[AgentField.MODELS]} >= {"stub-ok", "stub-hang", "stub-slow"}
    sizes = {m["name"]: m.get("params") for m in advert[AgentField.MODELS]}
    assert sizes["stub-ok"] == "8" and sizes["stub-hang"] is None  # --params stub-ok=8
    async with Client(cluster.url, timeout=30) as client:
        answer = await (await client.submit("Hi", model="stub-ok")).result()
    assert answer.text == "Hello from the stub"
    assert answer.finish_reason == "stop"
    assert answer.usage == {"promptTokens": 7, "completionTokens": 4}
    assert stub.models_of("ok")


@pytest.mark.parametrize(
    "model, message",
    [
        ("stub-400", "HTTP 400: stub: the request is invalid"),
        ("stub-401", "HTTP 401: Incorrect API key provided"),
        ("stub-500", "HTTP 500: stub: internal failure while generating"),
        ("stub-hang", r"sent nothing for 2 s \(upstream timeout\)"),
        ("stub-cut", r"cut the answer off after 3 piece"),
    ],
)
async def test_upstream_failure_ends_the_task_failed_with_its_reason(
    stub_workers: tuple[Cluster, Stub],
    model: str,
    message: str,
) -> None:
    cluster, _ = stub_workers
    wait_ready(cluster, "multi")
    async with Client(cluster.url, timeout=30) as client:
        with pytest.raises(TaskFailed, match=message) as err:
            await client.chat("Hi", model=model)
    assert err.value.task[TaskField.STATE] == State.FAILED.value
    assert int(err.value.task[TaskField.ATTEMPTS]) == 1


async def test_abort_mid_stream_ends_the_task_aborted_and_closes_the_upstream_stream(
    stub_workers: tuple[Cluster, Stub],
) -> None:
    cluster, stub = stub_workers
    wait_ready(cluster, "multi")
    before = stub.disconnects
    async with Client(cluster.url, timeout=60) as client:
        task = await client.submit("a long answer please", model="stub-slow")
        pieces = []
        with pytest.raises(TaskAborted) as err:
            async for piece in task.stream():
                pieces.append(piece)
                if len("".join(pieces)) >= 10:
                    task.abort()
    assert "".join(pieces).startswith("tok0 tok1")
    assert err.value.task[TaskField.STATE] == State.ABORTED.value
    assert (
        len(err.value.task.get(TaskField.RESPONSE) or "") < 200
    )  # stopped early, not run to its end
    await wait_for(
        lambda: stub.disconnects > before, 10, "the upstream stream was not closed after the abort"
    )


async def test_worker_streams_as_many_upstream_answers_at_once_as_it_has_slots(
    stub_workers: tuple[Cluster, Stub],
) -> None:
    cluster, _stub = stub_workers
    wait_ready(cluster, "multi")  # 2 slots
    async with Client(cluster.url, timeout=60) as client:
        tasks = [await client.submit(f"long {i}", model="stub-slow") for i in range(2)]
        streams = [t.stream() for t in tasks]
        firsts = await asyncio.wait_for(asyncio.gather(*(s.__anext__() for s in streams)), 30)
        assert all(f.startswith("tok0 ") for f in firsts)  # both streams run at once
        # the advert follows within 0.5 s
        wait_until(
            lambda: worker_state(cluster, "multi").get(AgentField.RUNNING) == 2,
            10,
            "the worker to advertise both tasks running",
        )
        for t in tasks:
            t.abort()
        for s in streams:
            with pytest.raises(TaskAborted):
                async for _ in s:
                    pass


async def test_unavailable_upstream_hands_the_task_to_another_worker_once(
    stub_workers: tuple[Cluster, Stub],
) -> None:
    cluster, stub = stub_workers
    wait_ready(cluster, "flaky-bad", "flaky-good")
    async with Client(cluster.url, timeout=30) as client:
        ids = {w.name: w.id for w in client.workers()}
        answer = await (await client.submit("Hi", model="flaky")).result()
    assert answer.text == "Hello from the stub"
    assert answer.task[TaskField.WORKER] == ids["flaky-good"]
    assert answer.task[TaskField.ATTEMPTS] == 2  # tried on flaky-bad (503), then handed back once
    assert len(stub.models_of("e503")) >= 1


async def test_unavailable_upstream_with_no_other_worker_fails_with_its_reason(
    stub_workers: tuple[Cluster, Stub],
) -> None:
    cluster, _ = stub_workers
    wait_ready(cluster, "lonely")
    async with Client(cluster.url, timeout=30) as client:
        with pytest.raises(TaskFailed, match="HTTP 503: stub: overloaded"):
            await client.chat("Hi", model="lonely")
    # it advertised itself busy at once; the health poll (every 5 s) brings it back
    wait_ready(cluster, "lonely", timeout=20)


async def test_worker_with_unreachable_upstream_advertises_busy_and_takes_nothing(
    stub_workers: tuple[Cluster, Stub],
) -> None:
    cluster, _ = stub_workers
    down = worker_state(cluster, "down")
    assert down[AgentField.STATE] == "busy" and down[AgentField.SLOTS] == 0
    assert {m["name"] for m in down[AgentField.MODELS]} == {"flaky", "nowhere"}
    async with Client(cluster.url) as client:
        with pytest.raises(TaskTimeout, match="deadline passed while waiting"):
            await client.chat("Hi", model="nowhere", timeout=2)
    log = next(p for p in cluster.procs if p.log_path.name.endswith("-down.log"))
    wait_until(lambda: "connection refused" in log.log(), 10, "the down worker did not log why")


async def test_worker_goes_busy_while_its_upstream_is_down_and_comes_back(
    market: Cluster,
) -> None:
    s = Stub().start()
    port = s.port
    market.worker(
        "--no-warmup", "--base-url", s.url, "--model", "ok=phoenix", name="phoenix", engine="openai"
    )
    try:
        wait_ready(market, "phoenix")
        async with Client(market.url, timeout=30) as client:
            assert await client.chat("Hi", model="phoenix") == "Hello from the stub"
        s.stop()
        wait_until(
            lambda: worker_state(market, "phoenix").get(AgentField.STATE) == "busy",
            20,
            lambda: "the worker did not report its upstream down\n" + market.logs(),
        )
        s = Stub(port=port).start()
        wait_ready(market, "phoenix", timeout=20)
        async with Client(market.url, timeout=30) as client:
            assert await client.chat("Hi", model="phoenix") == "Hello from the stub"
    finally:
        with contextlib.suppress(Exception):
            s.stop()


# ---------------------------------------------------------------------- a real upstream
@pytest.fixture(scope="module")
def real_upstream(market: Cluster) -> Iterator[Cluster]:
    """llama-cpp-python's own OpenAI-compatible server on the bundled model, and an
    ``igora worker --engine openai`` in front of it advertising it as ``smol``."""
    port = free_port()
    log_path = market.tmp / "llama-server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(bundled_model()),
                "--model_alias",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--verbose",
                "False",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models", 90)
        except AssertionError:
            raise AssertionError(
                "llama_cpp.server did not start:\n" + log_path.read_text(errors="replace")[-3000:]
            ) from None
        market.worker(
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--model",
            "smollm2=smol",
            "--slots",
            "1",
            name="real",
            engine="openai",
        )
        wait_ready(market, "real", timeout=60)
        yield market
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


async def test_real_openai_server_answers_through_the_market(real_upstream: Cluster) -> None:
    advert = worker_state(real_upstream, "real")
    assert advert[AgentField.ENGINE] == "openai"
    assert [m["name"] for m in advert[AgentField.MODELS]] == ["smol"]
    assert advert[AgentField.SPEED] and advert[AgentField.SPEED] > 0  # measured at start
    async with Client(real_upstream.url, timeout=60) as client:
        assert "smol" in client.models()
        answer = await (
            await client.submit(
                "What is the capital of France?", model="smol", max_tokens=12, temperature=0.0
            )
        ).result()
    assert answer.text.strip()
    assert answer.finish_reason in ("stop", "length")
    assert 0 < answer.usage["completionTokens"] <= 12


async def test_real_openai_server_stream_is_aborted_by_the_client(real_upstream: Cluster) -> None:
    async with Client(real_upstream.url, timeout=60) as client:
        # at temperature 0 the bundled model writes ~600 tokens here: many seconds of work
        task = await client.submit(
            "Write a very long story about a dragon.",
            model="smol",
            max_tokens=1500,
            temperature=0.0,
        )
        pieces: list[str] = []
        with pytest.raises(TaskAborted) as err:
            async for piece in task.stream():
                pieces.append(piece)
                if len(pieces) == 1:
                    task.abort()
        assert pieces
    assert err.value.task[TaskField.STATE] == State.ABORTED.value
    assert len(err.value.task.get(TaskField.RESPONSE) or "") < 1000  # stopped long before its end
    server_log = real_upstream.tmp / "llama-server.log"
    await wait_for(
        lambda: "Disconnected from client" in server_log.read_text(errors="replace"),
        20,
        "llama_cpp.server did not see the worker close the stream",
    )
    wait_ready(real_upstream, "real")  # the worker's slot is free again
