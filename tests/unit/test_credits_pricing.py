"""The price rule of docs/credits.md §1: integers, one home, the same for every party."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igora.credits import pricing
from igora.protocol import canonical


@pytest.mark.parametrize(
    ("params", "factor"),
    [
        ("0.135", 2),  # SmolLM2-135M
        (0.135, 2),
        (7, 70),
        ("0.3", 3),  # 0.3 × 10 is 3 exactly, not the float 3.0000000000000004
        (0.3, 3),
        ("0.001", 1),  # the floor
        (1_000, 2_000),  # the ceiling
        ("1.05", 11),
    ],
)
def test_factor_is_ceil_of_ten_times_billions_clamped(params: object, factor: int) -> None:
    assert pricing.factor(params) == factor  # type: ignore[arg-type]


def test_the_draft_s_example_receipt_costs_1260_millicredits() -> None:
    assert pricing.price(30, 200, "0.135") == 1_260
    assert pricing.tax(1_260) == 26  # 25.2 rounded up


@pytest.mark.parametrize("params", [0, -1, "abc", "nan", "inf", True, None])
def test_a_size_that_is_no_positive_number_is_refused(params: object) -> None:
    with pytest.raises(pricing.PriceError):
        pricing.factor(params)  # type: ignore[arg-type]


@pytest.mark.parametrize(("p", "c"), [(-1, 0), (0, -5), (1.5, 0), (True, 0), ("3", 1)])
def test_token_counts_are_whole_numbers(p: object, c: object) -> None:
    with pytest.raises(pricing.PriceError):
        pricing.price(p, c, 1)  # type: ignore[arg-type]


@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.decimals(min_value=Decimal("0.001"), max_value=Decimal(5000), places=3),
)
def test_price_is_weighted_tokens_times_factor_and_tax_is_two_percent_up(
    p: int, c: int, params: Decimal
) -> None:
    price = pricing.price(p, c, params)
    f = pricing.factor(params)
    assert 1 <= f <= 2_000
    assert price == (p + 3 * c) * f
    tax = pricing.tax(price)
    assert 100 * tax >= 2 * price > 100 * (tax - 1)  # 2 %, rounded up, never more


def test_prices_are_published_as_canonical_json() -> None:
    published = pricing.prices(grant=5_000)
    assert published["grant"] == 5_000 and published["taxPercent"] == 2
    assert canonical(published)  # integers only: no CanonicalError


@pytest.mark.parametrize(
    ("text", "milli"), [("1", 1_000), ("1.5", 1_500), ("0.001", 1), ("100.250", 100_250)]
)
def test_amounts_of_credits_read_with_three_decimals(text: str, milli: int) -> None:
    assert pricing.parse_credits(text) == milli
    assert pricing.parse_credits(pricing.credits_text(milli)) == milli


@pytest.mark.parametrize("text", ["0", "-1", "0.0001", "x", "nan", "1e30", ""])
def test_amounts_that_are_not_positive_millicredits_are_refused(text: str) -> None:
    with pytest.raises(pricing.PriceError):
        pricing.parse_credits(text)


def test_balances_show_as_credits_with_three_decimals() -> None:
    assert pricing.credits_text(98_740) == "98.740"
    assert pricing.credits_text(-1_260) == "-1.260"
    assert pricing.credits_text(0) == "0.000"


def test_a_published_rule_prices_runs_and_no_rule_prices_nothing() -> None:
    """``dir.market.prices`` as the market publishes it prices like the rule; a market
    without one (or a rule of another version) gives no figure rather than a wrong one."""
    rule = pricing.prices(0)
    assert pricing.published_price(rule, 30, 200, "0.135") == 1260
    assert pricing.published_price(rule, 0, 0, "7") == 0
    for other in (None, {}, {**rule, "v": pricing.RULE_VERSION + 1}, [rule], "v1"):
        assert pricing.published_price(other, 30, 200, "0.135") is None
    with pytest.raises(pricing.PriceError):
        pricing.published_price(rule, -1, 0, "1")


def test_a_pin_is_name_and_size_and_refuses_only_another_factor() -> None:
    assert pricing.parse_pin(" smollm2 = 0.135 ") == ("smollm2", "0.135")
    assert pricing.parse_pin("org/model=v2=8") == ("org/model=v2", "8")  # the last '=' splits
    for bad in ("smollm2", "=8", "x=0", "x=-1", "x=big"):
        with pytest.raises(pricing.PriceError):
            pricing.parse_pin(bad)
    pinned = {"smollm2": "0.135"}
    gguf = [{"name": "smollm2", "params": "0.134515008"}]  # as llama.cpp reads it: factor 2
    assert pricing.pin_refusal(pinned, gguf) is None
    assert pricing.pin_refusal(pinned, [{"name": "other", "params": "70"}]) is None
    assert pricing.pin_refusal({}, [{"name": "smollm2", "params": "70"}]) is None
    for said in ({"params": "0.3"}, {}, {"params": "lots"}, {"params": 70}):
        why = pricing.pin_refusal(pinned, [gguf[0], {"name": "smollm2", **said}])
        assert why is not None and why.startswith("model smollm2 is priced here as 0.135")
    assert pricing.prices(pinned=pinned)["pinned"] == pinned
    assert "pinned" not in pricing.prices()
