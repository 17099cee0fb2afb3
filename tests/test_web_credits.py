"""The balance and each answer's cost (issue 16; docs/web.md, docs/credits.md §8), on real
processes: a market with a v3 room and a ledger (``--grant``), a broker, an echo worker and
a gateway, each with its own identity. ``GET /v1/igora/balance`` answers the balance of the
identity a request speaks as; the official ``openai`` SDK's chat completions move it down by
exactly the rule's price; the page (Debian's headless Chromium through Playwright) shows
the balance, each answer's cost and the cost of the market view's finished tasks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import BrowserContext

from igora.credits import pricing
from igora.engines.echo import PARAMS as ECHO_PARAMS
from igora.gateway.keys import KeyStore
from igora.testing import Cluster, wait_until
from tests.conftest import open_page
from tests.test_credits_market import ROOM, balances, identity, runs, start
from tests.test_v3_membership import igora

pytestmark = pytest.mark.slow

GRANT = "10"  # credits
GRANT_MILLI = 10 * pricing.MILLI


def balance(base: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{base}/v1/igora/balance", headers=headers, timeout=30)


def wait_balance(base: str, key: str | None, want: int) -> None:
    """Until the gateway's endpoint says ``want`` (the market settles a run once the
    worker claims it with the receipt)."""
    seen: list[Any] = []

    def right() -> bool:
        reply = balance(base, key)
        seen.append(reply.json().get("balance"))
        return reply.status_code == 200 and reply.json()["balance"] == want

    wait_until(right, 20, lambda: f"balance {want} expected, saw {seen[-5:]}")


def rule_price(usage: Any) -> int:
    return pricing.price(usage.prompt_tokens, usage.completion_tokens, ECHO_PARAMS)


def test_the_balance_endpoint_falls_by_exactly_each_answers_price(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A key's identity starts with the grant; each answer through the ``openai`` SDK
    (plain and streamed) carries its price (``igora.price``, the receipt's) and the
    balance falls by exactly that, the rule's price; the gateway's own identity pays
    nothing; bad requests are 4xx with an OpenAI-style body."""
    gw_data = tmp_path / "gw"
    added = igora("gateway", "keys", "add", "alice", "--data", str(gw_data))
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    alice = KeyStore(gw_data).find_name("alice")
    assert alice is not None
    start(cluster, 1, "--grant", GRANT)
    _, base = cluster.gateway("--room", ROOM, "--data", str(gw_data), data=True)

    first = balance(base, key)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "object": "igora.balance",
        "id": alice.id,
        "balance": GRANT_MILLI,
        "unit": "millicredit",
        "credits": "10.000",
    }
    assert balances(cluster)[alice.id] == GRANT_MILLI

    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
    answer = sdk.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "what does this cost?"}],
        max_tokens=50,  # the gateway's 402 counts 4,096 tokens without it: over the grant
    )
    assert answer.choices[0].message.content == "Echo: what does this cost?"
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    paid = (answer.model_extra or {})["igora"]["price"]
    assert paid == rule_price(answer.usage) > 0
    wait_balance(base, key, GRANT_MILLI - paid)

    stream = sdk.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "and a streamed one, a little longer"}],
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.usage is not None and not last.choices
    streamed = (last.model_extra or {})["igora"]["price"]
    assert streamed == rule_price(last.usage) > 0
    wait_balance(base, key, GRANT_MILLI - paid - streamed)

    # The ledger says the same: alice paid both runs; the gateway's own identity nothing.
    spent = sorted(e.amount for e in runs(cluster) if e.account == alice.id)
    assert spent == sorted([-paid, -streamed]), spent
    book = balances(cluster)
    assert book[alice.id] == GRANT_MILLI - paid - streamed
    assert book[identity(cluster, "gateway").id] == GRANT_MILLI

    # Bad requests: 4xx, an OpenAI-style body, nothing moved.
    auth = {"Authorization": f"Bearer {key}"}
    for reply, status, code in (
        (balance(base), 401, "invalid_api_key"),
        (balance(base, "ig-" + "A" * 43), 401, "invalid_api_key"),
        (httpx.post(f"{base}/v1/igora/balance", headers=auth), 405, "method_not_allowed"),
        (httpx.get(f"{base}/v1/igora/balances", headers=auth), 404, "not_found"),
    ):
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        assert error["code"] == code
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}]
        )
    assert balances(cluster)[alice.id] == GRANT_MILLI - paid - streamed


def test_a_protocol_2_room_has_no_balance(echo_market: Cluster) -> None:
    """A v2 room counts no credits: a 404 that says so, and answers carry no price."""
    _, base = echo_market.gateway()
    reply = balance(base)
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["code"] == "no_credits" and "protocol 2" in error["message"]
    answer = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "free"}]},
        timeout=30,
    )
    assert answer.status_code == 200 and "igora" not in answer.json()


def test_the_page_shows_the_balance_and_what_each_answer_cost(
    context: BrowserContext, cluster: Cluster
) -> None:
    """The page (no API key: the gateway's own identity) shows the grant; after an
    answer, its cost (the receipt's price, the one the ledger settled) and the balance
    less that; the market view's card of the task shows the rule's price of its tokens,
    the same; in French too, every string translated."""
    start(cluster, 1, "--grant", GRANT)
    _, base = cluster.gateway("--room", ROOM, data=True)
    gateway = identity(cluster, "gateway").id
    page = open_page(context, base, "chat")
    page.wait_for_selector(f"#balance[data-millicredits='{GRANT_MILLI}']")
    assert page.inner_text("#balance") == "Balance: 10.000 credits"

    page.wait_for_function(
        "[...document.querySelectorAll('#model option')].some(o => o.value === 'echo')"
    )
    page.select_option("#model", "echo")
    page.fill("#prompt", "how much was that?")
    page.press("#prompt", "Enter")
    cost = page.wait_for_selector(".msg-assistant .note-cost")
    assert page.inner_text(".msg-assistant .body") == "Echo: how much was that?"
    price = int(cost.get_attribute("data-millicredits") or "0")
    assert price > 0
    assert cost.inner_text().startswith(f"Cost: {pricing.credits_text(price)} credits (")
    deadline = time.monotonic() + 20
    while not runs(cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    (spend,) = runs(cluster)
    assert (spend.account, spend.amount) == (gateway, -price)
    left = GRANT_MILLI - price
    page.wait_for_selector(f"#balance[data-millicredits='{left}']")
    assert page.inner_text("#balance") == f"Balance: {pricing.credits_text(left)} credits"

    page.click("#tab-market")
    card = page.wait_for_selector("#board section[data-group=done] li[data-cost]")
    assert int(card.get_attribute("data-cost") or "0") == price
    assert f"{pricing.credits_text(price)} credits (price rule)" in card.inner_text()

    page.click("#lang-fr")
    french = pricing.credits_text(price).replace(".", ",")
    card = page.wait_for_selector("#board section[data-group=done] li[data-cost]")  # redrawn
    assert f"{french} crédits (règle de prix)" in card.inner_text()
    page.click("#tab-chat")
    assert page.inner_text("#balance").startswith("Solde : ")
    assert page.inner_text(".msg-assistant .note-cost").startswith(f"Coût : {french} crédits")
    missing = page.evaluate(
        """async () => {
            const { STRINGS } = await import('/static/i18n.js');
            const en = Object.keys(STRINGS.en), fr = Object.keys(STRINGS.fr);
            return [...en.filter(k => !fr.includes(k)), ...fr.filter(k => !en.includes(k))];
        }"""
    )
    assert missing == []
    assert not page.errors  # type: ignore[attr-defined]
    snap = json.loads(httpx.get(f"{base}/api/market", timeout=10).text)
    (done,) = snap["tasks"]["done"]
    assert done["cost"] == price and done["promptTokens"] is not None
