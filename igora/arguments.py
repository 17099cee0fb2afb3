"""The command line's argument types: each checks one value and says, in one line, what is
wrong with it. Every subcommand uses these, so a bad value gets the same answer
everywhere: ``igora chat: error: argument --temperature: 50 is out of range: use 0 to 2``,
exit status 2, no traceback, nothing started."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .config import ConfigError, check_market_urls, check_room
from .protocol import MAX_TOKENS_LIMIT


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``igora chat: error: ...``), without
    the usage block: the error names the argument, ``--help`` shows the rest."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _parse_optional(self, arg_string: str) -> Any:
        # An agent id is base64url and starts with "-" once in 64: a value, not an option
        # (``igora market ban -Xy…``, ``--broker-key -Xy…``), where argparse would say
        # "the following arguments are required".
        if _LEADING_DASH_ID.fullmatch(arg_string) and arg_string not in self._option_string_actions:
            return None
        return super()._parse_optional(arg_string)


_LEADING_DASH_ID = re.compile(r"-[A-Za-z0-9_-]{42}")
"""What an agent id (43 base64url characters) starting with a dash looks like."""


def data_folder(p: argparse.ArgumentParser, what: str, *, inner: bool = False) -> None:
    """Add ``--data DATA``, the folder of ``what``. ``inner``: an action's own copy of its
    command's option, which leaves the command's value alone when not given (``igora
    market --data D members list`` and ``igora market members list --data D`` agree)."""
    p.add_argument(
        "--data",
        type=Path,
        default=argparse.SUPPRESS if inner else None,
        metavar="DATA",
        help=f"{what} (default: IGORA_DATA or ~/.local/share/igora)",
    )


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def number(
    *,
    least: float | None = None,
    most: float | None = None,
    above: float | None = None,
    integer: bool = False,
) -> Callable[[str], float]:
    """A finite number (an integer with ``integer``) in ``[least, most]``, or ``> above``."""

    def parse(text: str) -> float:
        try:
            value: float = int(text) if integer else float(text)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{text} is too small: use more than {_fmt(above)}")
        low = least if least is not None else -math.inf
        high = most if most is not None else math.inf
        if not low <= value <= high:
            if least is not None and most is not None:
                use = f"use {_fmt(least)} to {_fmt(most)}"
            elif least is not None:
                use = f"use {_fmt(least)} or more"
            else:
                use = f"use {_fmt(high)} or less"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {use}")
        return value

    parse.__name__ = "integer" if integer else "number"
    return parse


def count(least: int = 1, most: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[least, most]``."""
    parse = number(least=least, most=most, integer=True)
    return parse  # type: ignore[return-value]


positive_seconds = number(above=0)
"""Seconds, more than 0 (timeouts, heartbeats)."""
seconds = number(least=0)
"""Seconds, 0 or more (grace times, delays)."""
temperature = number(least=0, most=2)
"""Sampling temperature: OpenAI's range, 0 to 2."""
max_tokens = count(1, MAX_TOKENS_LIMIT)
seed = count(-(2**63), 2**63 - 1)
_port = count(1, 65535)


def credits(text: str) -> int:
    """An amount of credits, 0 or more with at most three decimals, in millicredits."""
    from .credits.pricing import PriceError, parse_credits

    if text.strip() in ("0", "0.0", "0.000"):
        return 0
    try:
        return parse_credits(text)
    except PriceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def model_pin(text: str) -> tuple[str, str]:
    """``NAME=B``: a model's name and its size in billions of parameters (decimal text),
    as ``igora market --model-params`` pins it."""
    from .credits.pricing import PriceError, parse_pin

    try:
        return parse_pin(text)
    except PriceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    try:
        return _port(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1-65535)") from None


def agent_id(text: str) -> str:
    """An agent id: the canonical base64url of an Ed25519 public key (``igora id``)."""
    from .identity import IdentityError, public_key

    try:
        public_key(text)
    except IdentityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def trust_worker(p: argparse.ArgumentParser) -> None:
    """Add ``--trust-worker ID`` (repeatable; ``@FILE``: a file of ids), the workers an
    asker's prompts may go to (``igora.v3.trust``, docs/security.md §6)."""
    p.add_argument(
        "--trust-worker",
        action="append",
        type=_trust_entry,
        default=None,
        metavar="ID",
        help="seal prompts only to this worker (its id, from `igora id` on its machine or "
        "`igora status`); repeatable, or @FILE: a file of ids, one per line. The broker "
        "then gives the tasks to no other worker. Protocol 3 rooms only "
        "(default: any worker the broker chooses)",
    )


def _trust_entry(text: str) -> str:
    return text if text.startswith("@") else agent_id(text)


def invite(text: str) -> str:
    """An invitation code (``igora market invite``); the market checks the rest."""
    from .market.members import MAX_CODE, PREFIX

    if not text.startswith(PREFIX) or len(text) > MAX_CODE:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not an invitation: they start with {PREFIX}"
        )
    return text


def _config(check: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__
    return parse


market_url = _config(check_market_urls)
"""A market URL (or several, comma-separated: replicas), checked as
``config.market_address`` checks those of the environment."""
room = _config(check_room)
"""A room name, checked as ``config.market_address`` checks ``YJS_MARKET_ROOM``."""


def fail(prog: str, message: str) -> int:
    """Say what went wrong, in one line, the way argparse does; the exit status is 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
