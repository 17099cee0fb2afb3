"""Fixtures that run real Igora processes on 127.0.0.1, on free ports, and clean up
(``igora.testing.Cluster``, shared with the benchmarks).

Every process started here logs to a file under the test's tmp folder; on failure the
tail of each log is printed, so a red test says what the processes saw.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy
import pytest

from igora.testing import Cluster, Proc, free_port, wait_http, wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

__all__ = ["ROOT", "Cluster", "Proc", "free_port", "open_page", "wait_http"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(c.logs())
    c.stop()


@pytest.fixture
def echo_market(cluster: Cluster) -> Cluster:
    """Market + broker + one echo worker."""
    cluster.market()
    cluster.broker()
    cluster.worker()
    cluster.wait_agents("worker", 1)
    wait_active_broker(cluster)
    return cluster


def wait_active_broker(cluster: Cluster) -> None:
    """A broker on the market that took the lead: a task put before would wait for it,
    its deadline running."""
    cluster.wait_agents("broker", 1)
    wait_until(
        lambda: any(b.get("leader") for b in cluster.agents("broker")),
        20,
        "an active broker",
        cluster,
    )


@pytest.fixture(scope="session")
def llama_market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Market + broker + a llama.cpp worker on the bundled model, shared by the session."""
    c = Cluster(tmp_path_factory.mktemp("llama"))
    c.market()
    c.broker()
    c.worker("--slots", "2", name="llama", engine="llama")
    c.wait_agents("worker", 1, timeout=120)
    yield c
    c.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for a module of the web page's tests."""
    from playwright.sync_api import sync_playwright

    from tests.test_web import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A browser context for one test: English, 1280 × 800, 30 s for any one step."""
    ctx = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


def open_page(ctx: BrowserContext, base: str, view: str = "chat") -> Page:
    """A page of the web app at ``base`` on ``view``, once its script is ready; its
    JavaScript errors gather in ``page.errors`` (none is expected)."""
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{base}/#{view}")
    page.wait_for_selector("html[data-ready=true]")
    page.errors = errors  # type: ignore[attr-defined]
    return page
