"""``igora market members|invite|ban|unban``: the membership of a secure market, written
to its store (``DATA/market.sqlite3``) while it runs or before it starts
(``igora.market.members``; docs/security.md §5)."""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import time
from pathlib import Path

from .. import arguments as arg
from ..config import data_dir
from ..identity import load_identity
from .members import make_invite
from .store import Store

ACTIONS = ("members", "invite", "ban", "unban")
STORE = "market.sqlite3"
_TTL = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL = 366 * 86400
MAX_TEXT = 500  # characters of a note or a reason (a reason travels in a close frame)

MEMBERS = """\
The ids a market started with --secure (--members list or invite) admits; the others
are refused at the handshake (4403, "not a member of this market"). An id is what
`igora id` prints on the agent's machine. The market reads the table again every
second: a member removed while connected is disconnected within that second."""

INVITE = """\
Print an invitation: a code signed by this market's key (DATA/identity.key) that
admits USES identities until it expires. An agent passes it once, with --invite CODE
(igora.v3.session.Session(invite=CODE)); the market checks its signature, expiry and
the uses left, and adds the id to its members in the same transaction that takes a
use. Invitations admit only on a market started with --secure --members invite.
The code is a secret until used: send it the way you would send a password."""

BAN = """\
Refuse an id in every mode (open, list, invite): at the handshake, and, on a running
market, by closing every connection that proved it within a second (4403, "banned:
REASON"; the agent is told the reason and does not retry). unban lifts it; a member
banned stays a member."""


def _text(text: str) -> str:
    if len(text) > MAX_TEXT or not text.isprintable():
        raise argparse.ArgumentTypeError(f"at most {MAX_TEXT} printable characters, one line")
    return text


def ttl(text: str) -> float:
    """A duration: a number of seconds, or with a unit: 90s, 30m, 12h, 7d."""
    match = _TTL.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 7d, 12h, 30m")
    seconds = float(match[1]) * _UNIT[match[2]]
    if not 0 < seconds <= MAX_TTL:
        raise argparse.ArgumentTypeError(f"{text} is out of range: more than 0, at most 366d")
    return seconds


def add_actions(p: argparse.ArgumentParser, formatter: type[argparse.HelpFormatter]) -> None:
    """``igora market``'s actions; without one, ``igora market`` serves."""

    def data(q: argparse.ArgumentParser) -> None:
        arg.data_folder(q, "the market's data folder", inner=True)

    actions = p.add_subparsers(dest="market_command", metavar="ACTION")
    m = actions.add_parser(
        "members",
        formatter_class=formatter,
        help="add, remove or list the ids a secure market admits",
        description=MEMBERS,
        epilog="examples:\n  igora market members add 3OdLLbH7n1DyLJGaGT2kkQnZ6eB4zTAAZK4fZr_i8LU "
        "--note alice\n  igora market members list --data /srv/igora",
    )
    data(m)
    how = m.add_subparsers(dest="members_command", metavar="HOW", required=True)
    q = how.add_parser("add", formatter_class=formatter, help="admit an id")
    q.add_argument("id", type=arg.agent_id, metavar="ID", help="the agent's id (`igora id`)")
    q.add_argument("--note", type=_text, default="", help="who it is, for you")
    data(q)
    q = how.add_parser("remove", formatter_class=formatter, help="stop admitting an id")
    q.add_argument("id", type=arg.agent_id, metavar="ID", help="the agent's id")
    data(q)
    q = how.add_parser("list", formatter_class=formatter, help="print the members: id and note")
    data(q)

    q = actions.add_parser(
        "invite",
        formatter_class=formatter,
        help="print an invitation code that admits new ids",
        description=INVITE,
        epilog="example:\n  igora market invite --uses 3 --ttl 2d\n"
        "  igora worker --market wss://market.example --invite igora-invite:eyJ…",
    )
    q.add_argument(
        "--uses", type=arg.count(1, 100_000), default=1, metavar="N", help="ids it admits"
    )
    q.add_argument(
        "--ttl",
        type=ttl,
        default=7 * 86400.0,
        metavar="TIME",
        help="how long it is valid: seconds, or 90s, 30m, 12h, 7d (at most 366d)",
    )
    data(q)

    q = actions.add_parser(
        "ban", formatter_class=formatter, help="refuse an id and disconnect it", description=BAN
    )
    q.add_argument("id", type=arg.agent_id, metavar="ID", help="the agent's id")
    q.add_argument("--reason", type=_text, default="", help="told to the agent when it is closed")
    data(q)
    q = actions.add_parser("unban", formatter_class=formatter, help="lift a ban", description=BAN)
    q.add_argument("id", type=arg.agent_id, metavar="ID", help="the agent's id")
    data(q)


def _store(args: argparse.Namespace, exists: bool = False) -> Store:
    folder: Path = getattr(args, "data", None) or data_dir()
    path = folder / STORE
    if exists and not path.exists():
        raise OSError(
            f"no market store {path}: give the market's data folder with --data "
            "(the folder `igora market --data` uses)"
        )
    return Store(path)


def run(args: argparse.Namespace) -> int:
    """One action; its output on stdout, what it did on stderr."""
    try:
        return _run(args)
    except sqlite3.Error as exc:  # locked past its timeout, damaged, read-only, ...
        raise OSError(f"the market's store: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    action: str = args.market_command
    if action == "invite":
        return _invite(args)
    store = _store(args, exists=action == "members" and args.members_command == "list")
    try:
        if action == "members":
            return _members(args, store)
        if action == "ban":
            new = store.set_row("bans", args.id, args.reason)
            what = "banned" if new else "ban reason updated for"
            _say(f"{what} {args.id} in {store.path}")
            return 0
        if store.delete_row("bans", args.id):
            _say(f"unbanned {args.id} in {store.path}")
            return 0
        return arg.fail("igora market unban", f"{args.id} is not banned in {store.path}")
    finally:
        store.close()


def _members(args: argparse.Namespace, store: Store) -> int:
    how: str = args.members_command
    if how == "list":
        members = store.members()
        for id_, note in members.items():
            print(f"{id_}  {note}".rstrip())
        _say(f"{len(members)} member(s) in {store.path}")
        return 0
    if how == "add":
        new = store.set_row("members", args.id, args.note)
        _say(f"{'added' if new else 'note updated for'} {args.id} in {store.path}")
        return 0
    if store.delete_row("members", args.id):
        _say(f"removed {args.id} from {store.path}")
        return 0
    return arg.fail("igora market members remove", f"{args.id} is not a member in {store.path}")


def _invite(args: argparse.Namespace) -> int:
    folder: Path = getattr(args, "data", None) or data_dir()
    store = _store(args)
    try:
        identity, made = load_identity(folder)
        if made:
            _say(f"made the market's identity in {identity.path}")
        invite, code = make_invite(identity, args.uses, args.ttl)
        store.add_invite(invite.nonce, invite.uses, invite.exp)
    finally:
        store.close()
    print(code)
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(invite.exp / 1000))
    _say(
        f"admits {invite.uses} id(s) until {until} on market {identity.id[:8]}… started with "
        "--secure --members invite; the agent passes it with --invite CODE"
    )
    return 0


def _say(text: str) -> None:
    print(f"igora market: {text}", file=sys.stderr)
