"""An OpenAI-compatible upstream's names and words: the models a worker serves under which
alias, its base URL, and the human part of its errors."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from ..credits.pricing import PriceError, params_text, parse_pin
from .base import EngineError


@dataclass(frozen=True)
class UpstreamModel:
    """One served model: ``upstream`` is the id sent to the server, ``alias`` the name
    advertised on the market (what tasks ask for)."""

    upstream: str
    alias: str

    @classmethod
    def parse(cls, spec: str) -> UpstreamModel:
        """``NAME`` or ``NAME=ALIAS``."""
        name, sep, alias = str(spec).strip().partition("=")
        name, alias = name.strip(), alias.strip()
        if not name or (sep and not alias):
            raise EngineError(
                f"model {spec!r} is malformed: give NAME or NAME=ALIAS (NAME is the "
                "upstream's model id, ALIAS the name tasks ask for on the market)"
            )
        return cls(name, alias or name)


def parse_models(specs: Sequence[str]) -> list[UpstreamModel]:
    models = [UpstreamModel.parse(s) for s in specs]
    if not models:
        raise EngineError("give at least one model: --model NAME[=ALIAS]")
    seen: set[str] = set()
    for m in models:
        if m.alias in seen:
            raise EngineError(f"two models are advertised as {m.alias!r}: give distinct aliases")
        seen.add(m.alias)
    return models


def parse_params(specs: Sequence[str], served: Sequence[UpstreamModel]) -> dict[str, str]:
    """The size each served alias advertises, in billions of parameters (the credits
    price factor, credits.md §1): ``ALIAS=BILLIONS`` for one model, ``BILLIONS`` for
    every model not named. Aliases left out advertise none (priced as the smallest)."""
    aliases = [m.alias for m in served]
    sizes: dict[str, str] = {}
    default: str | None = None
    for spec in specs:
        try:
            if "=" in str(spec):
                alias, text = parse_pin(spec)  # NAME=B, as a market pins a size
            else:
                alias, text = "", params_text(str(spec).strip())
        except PriceError as exc:
            raise EngineError(f"--params {spec!r}: {exc} (e.g. 8, or 0.5 for 500M)") from None
        if not alias:
            if default is not None:
                raise EngineError(f"--params {spec!r}: give one size without ALIAS= at most")
            default = text
        elif alias not in aliases:
            raise EngineError(
                f"--params {spec!r}: {alias!r} is not a served model (served: {', '.join(aliases)})"
            )
        else:
            sizes[alias] = text
    chosen = {a: sizes.get(a, default) for a in aliases}
    return {a: size for a, size in chosen.items() if size is not None}


def check_base_url(base_url: str) -> str:
    url = str(base_url).strip().rstrip("/")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise EngineError(f"base URL {base_url!r} is not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise EngineError(
            f"base URL {base_url!r} must look like http://host:port/v1 (e.g. Ollama: "
            "http://localhost:11434/v1)"
        )
    return url


def upstream_message(body: bytes) -> str:
    """The human part of an error answer (OpenAI, FastAPI and plain-text shapes)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty answer)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err.get("msg") or err
        if isinstance(err, list) and err and isinstance(err[0], dict):  # FastAPI validation
            err = "; ".join(str(e.get("msg", e)) for e in err[:3])
        if err is not None:
            return str(err)[:500]
    return text[:500]


def why(exc: BaseException) -> str:
    """A short reason, looking through httpx's wrapping for the socket error."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError) or "Connection refused" in str(seen):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return f"unknown host ({seen})"
        seen = seen.__cause__ or seen.__context__
    return str(exc).strip() or type(exc).__name__
