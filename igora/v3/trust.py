"""The workers an asker trusts with its prompts (``--trust-worker``, docs/security.md §6).

A v3 asker seals each task key only to the workers it trusts, lists them all in the
signed header's ``candidates`` with ``candidatesOnly``, and the broker assigns only among
them; a broker that assigns another gets no grant from the asker, and the task fails
``untrusted_worker``. Here: the list as a user gives it, checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import IgoraError
from ..identity import IdentityError, public_key

MAX_TRUSTED = 32
"""Ids a trust list may hold: every header carries them all (44 bytes each)."""


class TrustError(IgoraError, ValueError):
    """A trust list that cannot be used: its message names the entry and what to do."""


def trust_list(values: Iterable[str]) -> frozenset[str]:
    """The worker ids in ``values``: each an id (``igora id`` prints it), or ``@FILE``, a
    file of ids, one per line (``#`` starts a comment). TrustError for an entry that is
    not an id, a file that cannot be read, an empty list or more than MAX_TRUSTED ids."""
    ids: set[str] = set()
    for value in values:
        value = value.strip()
        if value.startswith("@"):
            ids.update(_read(Path(value[1:]).expanduser()))
        else:
            ids.add(_checked(value, "--trust-worker"))
    if not ids:
        raise TrustError("the trust list names no worker: give at least one worker id")
    if len(ids) > MAX_TRUSTED:
        raise TrustError(f"the trust list names {len(ids)} workers; at most {MAX_TRUSTED}")
    return frozenset(ids)


def refused_in_protocol_2(room_url: str) -> TrustError:
    """The error of a trust list given for a version 2 room."""
    return TrustError(
        f"the room at {room_url} speaks protocol 2, where every agent reads every prompt: "
        "trusted workers (--trust-worker) need a protocol 3 room (`igora market --secure` "
        "or `--v3-room`)"
    )


def unavailable(trusted: int, why: str, present: bool) -> str:
    """Why none of a trust list's ``trusted`` workers takes a task (``why``: what the
    ones ``present`` lack), in one sentence."""
    who = "the trusted worker" if trusted == 1 else f"none of the {trusted} trusted workers"
    if present:
        return f"{who} (--trust-worker) {'cannot' if trusted == 1 else 'can'} take it: {why}"
    return f"{who} (--trust-worker) is {'not ' if trusted == 1 else ''}on the market now"


def _read(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustError(f"cannot read the trust list {path}: {exc}") from None
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.partition("#")[0].strip()
        if entry:
            ids.append(_checked(entry, f"{path}, line {number}"))
    return ids


def _checked(value: str, where: str) -> str:
    try:
        public_key(value)
    except IdentityError as exc:
        raise TrustError(
            f"{where}: {value[:60]!r} is not a worker id ({exc}); a worker's id is the "
            "43-character key `igora id` prints on its machine, or `igora status` lists"
        ) from None
    return value
