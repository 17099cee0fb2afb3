"""The price rule (docs/credits.md §1): the one place its constants live.

Amounts are integers in millicredits. A run costs ``(promptTokens + 3 × completionTokens)
× factor``, ``factor = clamp(ceil(params × 10), 1, 2000)`` where ``params`` is the model's
size in billions of parameters from the worker's signed advert. 2 % of each price,
rounded up to a millicredit, is burned as tax.

``params`` is read as the decimal its text spells (``0.3`` is three tenths, not the
binary float just above it), so ``ceil`` gives every party the same factor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

MILLI = 1_000
"""Millicredits per credit."""
COMPLETION_WEIGHT = 3
"""A completion token costs three prompt tokens (generating is the expensive part)."""
FACTOR_PER_BILLION = 10
MIN_FACTOR = 1
MAX_FACTOR = 2_000
TAX_PERCENT = 2
DEFAULT_GRANT = 100 * MILLI
"""What a new identity gets at its first handshake as a member (``--grant``)."""
RULE_VERSION = 1
MAX_AMOUNT = 10**15
"""The largest amount one entry moves (a trillion credits; SQLite integers hold 9.2e18)."""
DEFAULT_PARAMS = "0.1"
"""The size of a model whose advert names none: priced at the smallest factor (1)."""


class PriceError(ValueError):
    """A size or a token count the rule cannot price."""


def _params(params: float | int | str | Decimal) -> Decimal:
    if isinstance(params, bool):
        raise PriceError("params is a number of billions of parameters, not a boolean")
    try:
        value = Decimal(str(params))
    except InvalidOperation:
        raise PriceError(f"params {params!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise PriceError(f"params {params!r} must be a positive number of billions")
    return value


def params_text(params: float | int | str | Decimal) -> str:
    """``params`` as the decimal text a ledger proof keeps (canonical JSON has no floats)."""
    return str(_params(params))


def factor(params: float | int | str | Decimal) -> int:
    """The price factor of a model of ``params`` billion parameters (135M: 2; 7B: 70)."""
    raw = math.ceil(_params(params) * FACTOR_PER_BILLION)
    return max(MIN_FACTOR, min(MAX_FACTOR, raw))


def _tokens(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise PriceError(f"{what} {value!r} is not a count of tokens (a whole number, 0 or more)")
    return value


def price(prompt_tokens: int, completion_tokens: int, params: float | int | str | Decimal) -> int:
    """The price of a run, in millicredits."""
    weighted = _tokens(prompt_tokens, "promptTokens") + COMPLETION_WEIGHT * _tokens(
        completion_tokens, "completionTokens"
    )
    return weighted * factor(params)


def parse_pin(spec: str) -> tuple[str, str]:
    """``NAME=B`` (``igora market --model-params``) as the model's name and its size as
    decimal text; PriceError saying what is wrong."""
    name, sep, size = str(spec).strip().rpartition("=")
    if not sep or not name.strip():
        raise PriceError(f"{spec!r} is not NAME=BILLIONS (e.g. smollm2=0.135)")
    try:
        return name.strip(), params_text(size.strip())
    except PriceError as exc:
        raise PriceError(f"{spec!r}: {exc} (e.g. smollm2=0.135, or llama3=8)") from None


def pin_refusal(pinned: Mapping[str, str], models: object) -> str | None:
    """Why an advert of ``models`` contradicts the sizes a market pins (``pinned``: name
    -> size), or None: each advertised model of a pinned name must give the pinned
    size's factor, which is what prices (credits.md §1, pinned sizes)."""
    if not pinned or not isinstance(models, list):
        return None
    for m in models:
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str) or name not in pinned:
            continue
        pin = pinned[name]
        raw = m.get("params")
        try:
            said = params_text(raw) if isinstance(raw, str) else None
        except PriceError:
            said = None
        if said is None or factor(said) != factor(pin):
            shown = f"{said} (factor {factor(said)})" if said is not None else "no size"
            return (
                f"model {name} is priced here as {pin} billion parameters (factor "
                f"{factor(pin)}), not {shown}: --model-params of this market"
            )
    return None


def model_params(models: object, model: str) -> str:
    """The ``params`` a worker's advert gives ``model`` (its first model for a task that
    names none, ``"*"``, as the worker serves such a task with it), as the decimal text
    the rule reads; ``DEFAULT_PARAMS`` when the advert gives none or one the rule cannot
    read. The asker signing a receipt and the market settling it both call this on the
    same signed advert, so they price alike."""
    listed = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
    named = [m for m in listed if m.get("name") == model] or (listed[:1] if model == "*" else [])
    raw = named[0].get("params") if named else None
    try:
        return params_text(raw) if isinstance(raw, str) else DEFAULT_PARAMS
    except PriceError:
        return DEFAULT_PARAMS


def published_price(
    rule: object, prompt_tokens: int, completion_tokens: int, params: float | int | str | Decimal
) -> int | None:
    """The price of a run by a rule a market published (``dir.market.prices``): None when
    ``rule`` is not one this version computes (no rule: a market without credits)."""
    if not isinstance(rule, dict) or rule.get("v") != RULE_VERSION:
        return None
    return price(prompt_tokens, completion_tokens, params)


def max_price(prompt_bytes: int, max_tokens: int, params: float | int | str | Decimal) -> int:
    """The most a task may cost, the header's ``maxPrice`` (the asker's consent) and the
    gateway's estimate: every prompt byte a token, and ``max_tokens`` completion tokens."""
    return price(max(0, prompt_bytes), max(0, max_tokens), params)


def tax(amount: int) -> int:
    """The part of ``amount`` that is burned: 2 %, rounded up to a millicredit."""
    return -(-amount * TAX_PERCENT // 100)


def credits_text(millicredits: int) -> str:
    """``1260`` -> ``"1.260"``: credits with three decimals, as the CLI shows them."""
    sign = "-" if millicredits < 0 else ""
    whole, milli = divmod(abs(millicredits), MILLI)
    return f"{sign}{whole}.{milli:03d}"


def parse_credits(text: str) -> int:
    """``"1.5"`` -> ``1500`` millicredits; PriceError for anything else than a positive
    amount with at most three decimals."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise PriceError(f"{text!r} is not an amount of credits (e.g. 1.5)") from None
    milli = value * MILLI
    if not value.is_finite() or milli != milli.to_integral_value():
        raise PriceError(f"{text!r} is not an amount of credits with at most three decimals")
    if not 0 < milli <= MAX_AMOUNT:
        raise PriceError(f"{text} is not a positive amount of credits up to {MAX_AMOUNT // MILLI}")
    return int(milli)


def prices(grant: int = DEFAULT_GRANT, pinned: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The rule as the market publishes it in ``dir.market.prices``: every party computes
    the same price from it (integers only, so it fits canonical JSON); ``pinned``, the
    model sizes the market pins (decimal text), when there are any."""
    return {
        **({"pinned": dict(pinned)} if pinned else {}),
        "v": RULE_VERSION,
        "unit": "millicredit",
        "perCredit": MILLI,
        "completionWeight": COMPLETION_WEIGHT,
        "factorPerBillion": FACTOR_PER_BILLION,
        "minFactor": MIN_FACTOR,
        "maxFactor": MAX_FACTOR,
        "taxPercent": TAX_PERCENT,
        "grant": grant,
    }
