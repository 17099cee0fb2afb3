"""``igora credits``: an identity's balance and recent entries, and ``igora credits send``.

``igora credits`` reads the ledger a market keeps in its data folder
(``DATA/ledger.sqlite3``), or the file given with ``--ledger``; with ``--market`` it asks
the market over its connection (``CONTROL {"op": "entries"}``). ``send`` hands its signed
order to the market (``CONTROL {"op": "transfer"}``, answered once on disk); with
``--ledger FILE`` it applies it to a ledger file no market is running on (offline), and
with ``--print`` it prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import arguments as arg
from ..aio import within
from ..config import data_dir
from ..identity import Identity, IdentityError, load_identity, public_key
from . import pricing
from .ledger import LEDGER_FILE, Entry, Ledger, LedgerError
from .transfer import TransferError, TransferOrder

RECENT = 20
ANSWER_WAIT = 10.0  # seconds the market has to answer a transfer

DESCRIPTION = f"""\
Show the balance of this data folder's identity (the key of `igora id`) and its last
{RECENT} entries, read from a market's ledger: DATA/ledger.sqlite3 in the market's data
folder (the default finds it when the market shares yours), or --ledger FILE. On another
machine than the market's, --market URL (and --room ROOM, a protocol 3 room) asks the
market over its connection, as this identity: it answers for that identity only.

Amounts are credits with three decimals (the ledger counts millicredits). A run costs
(prompt tokens + 3 x completion tokens) x a factor of the model's size (ceil of 10 x its
billions of parameters, 1 to 2000) thousandths of a credit; 2 % of it is burned as tax,
the worker earns the rest (docs/credits.md).

A market counts credits in its protocol 3 rooms (--secure, --v3-room): a grant at an
identity's first handshake (--grant), the price of each run its asker received (the
asker signs a receipt, the worker presents it), transfers."""

SEND_DESCRIPTION = """\
Give AMOUNT credits (at most three decimals) to the identity ID, as a transfer order
signed by this data folder's key and sent to the market (--market, --room: a protocol 3
room), which applies it to its ledger and answers once it is on disk. The order names
the market, so it is worth nothing on another one, and its random nonce makes it count
once. With --ledger FILE it is applied to that ledger file instead (a ledger no market
is running on: a running market is its ledger's only writer). With --print the signed
order is printed as JSON (its market: the ledger's, or --market-key)."""

EXAMPLES = """\
examples:
  igora credits                              # balance and last entries, default data folder
  igora credits --data ./alice --ledger /srv/igora/ledger.sqlite3
  igora credits --market ws://market.example:1234 --room v3    # asked over the network
  igora credits send 3OdLLbH7n1DyLJGaGT2kkQnZ6eB4zTAAZK4fZr_i8LU 1.5 --market ws://127.0.0.1:1234
"""


def _agent(text: str) -> str:
    try:
        public_key(text)
    except IdentityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _amount(text: str) -> int:
    try:
        return pricing.parse_credits(text)
    except pricing.PriceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _where(p: argparse.ArgumentParser) -> None:
    arg.data_folder(p, "folder of the identity's key")
    p.add_argument(
        "--ledger",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"the market's ledger (default: DATA/{LEDGER_FILE})",
    )


def add_parser(
    sub: Any,
    formatter: type[argparse.HelpFormatter],
    common: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "credits",
        formatter_class=formatter,
        help="this identity's balance and recent entries; send credits",
        description=DESCRIPTION,
        epilog=EXAMPLES,
    )
    _where(p)
    p.add_argument(
        "--market",
        type=arg.market_url,
        default=None,
        metavar="URL",
        help="ask this market over its connection instead of reading a ledger file "
        "(for an identity on another machine than the market's)",
    )
    p.add_argument("--room", type=arg.room, default=None, help="with --market: a protocol 3 room")
    p.add_argument("--json", action="store_true", help="print the balance and entries as JSON")
    common(p)
    actions = p.add_subparsers(dest="credits_command", metavar="ACTION")
    s = actions.add_parser(
        "send",
        formatter_class=formatter,
        help="give credits to another identity (a signed transfer order)",
        description=SEND_DESCRIPTION,
    )
    s.add_argument("id", type=_agent, metavar="ID", help="the receiver's id (`igora id`)")
    s.add_argument("amount", type=_amount, metavar="AMOUNT", help="credits, e.g. 1.5")
    s.add_argument(
        "--print",
        action="store_true",
        help="print the signed order as JSON instead of applying it to the ledger",
    )
    # SUPPRESS: given before `send` (igora credits --market URL send ...), they stand.
    s.add_argument(
        "--market",
        type=arg.market_url,
        default=argparse.SUPPRESS,
        metavar="URL",
        help="the market to send the order to (default: YJS_LOCAL_URL, else ws://localhost:1234)",
    )
    s.add_argument(
        "--room", type=arg.room, default=argparse.SUPPRESS, help="a protocol 3 room of it"
    )
    s.add_argument(
        "--market-key",
        type=_agent,
        default=None,
        metavar="ID",
        help="the market's id, for --print without the ledger file",
    )
    arg.data_folder(s, "folder of the identity's key", inner=True)
    s.add_argument(
        "--ledger",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="apply the order to this ledger file (no market running on it)",
    )
    return p


def _ledger_path(args: argparse.Namespace) -> Path:
    ledger: Path | None = args.ledger
    return ledger if ledger is not None else (args.data or data_dir()) / LEDGER_FILE


def _open(path: Path) -> Ledger:
    try:
        return Ledger(path)
    except LedgerError as exc:
        if path.exists():
            raise
        raise LedgerError(
            f"{exc}: a market keeps its ledger in its data folder (DATA/{LEDGER_FILE}); "
            "name it with --ledger FILE"
        ) from None


def _line(e: dict[str, Any]) -> str:
    """An entry (``Entry.to_json`` with its ``key``) as one line."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(e["at"]) / 1000))
    what = f"task {e['task']} attempt {e['attempt']}" if e["task"] else e["key"].split(":", 1)[0]
    amount = pricing.credits_text(int(e["amount"]))
    return f"{when}  #{e['seq']:<6} {e['kind']:<8} {amount:>12}  {what}"


def _entry_json(e: Entry) -> dict[str, Any]:
    return {**e.to_json(), "key": e.key}


def _identity(args: argparse.Namespace) -> Identity:
    identity, made = load_identity(args.data)
    if made:
        print(f"igora credits: made a new identity in {identity.path}", file=sys.stderr)
    return identity


def show(args: argparse.Namespace) -> int:
    if args.market is not None:
        return _show_from_market(args)
    with _open(_ledger_path(args)) as ledger:
        identity = _identity(args)
        balance = ledger.balance(identity.id)
        entries = [_entry_json(e) for e in ledger.entries(identity.id, RECENT)]
    return _print_entries(args, identity.id, balance, entries)


def _show_from_market(args: argparse.Namespace) -> int:
    """What the market's ledger holds for this identity, asked over its connection
    (``CONTROL entries``): for an identity on another machine than the market's."""
    identity = _identity(args)
    body = _ask_market(
        args,
        identity,
        lambda market: {"op": "entries", "id": identity.id, "limit": RECENT},
        "entries",
        lambda answer: answer.get("id") == identity.id,
    )
    balance, entries = body.get("balance"), body.get("entries")
    if body.get("result") != "ok" or not isinstance(balance, int) or not isinstance(entries, list):
        return arg.fail("igora credits", str(body.get("error") or "the market did not answer"))
    return _print_entries(args, identity.id, balance, entries)


def _print_entries(
    args: argparse.Namespace, id_: str, balance: int, entries: list[dict[str, Any]]
) -> int:
    if args.json:
        print(
            json.dumps({"id": id_, "balance": balance, "unit": "millicredit", "entries": entries})
        )
        return 0
    print(f"balance: {pricing.credits_text(balance)}")
    print(f"id: {id_}")
    if not entries:
        print("no entries yet")
    for e in entries:
        print(_line(e))
    return 0


def send(args: argparse.Namespace) -> int:
    identity = _identity(args)
    if args.id == identity.id:
        return arg.fail("igora credits send", "ID is this identity: send to another one")
    if args.print and args.market_key:
        order = TransferOrder.make(identity, args.market_key, args.id, args.amount)
        print(json.dumps(order.to_json()))
        return 0
    if args.ledger is None and not args.print:
        return _send_to_market(args, identity)
    with _open(_ledger_path(args)) as ledger:
        order = TransferOrder.make(identity, ledger.market, args.id, args.amount)
        if args.print:
            print(json.dumps(order.to_json()))
            return 0
        try:
            ledger.transfer(order)
        except TransferError as exc:
            return arg.fail("igora credits send", str(exc))
        balance = ledger.balance(identity.id)
    print(f"sent {pricing.credits_text(args.amount)} credits to {args.id} (order {order.nonce})")
    print(f"balance: {pricing.credits_text(balance)}")
    return 0


def _send_to_market(args: argparse.Namespace, identity: Identity) -> int:
    orders: list[TransferOrder] = []

    def order_for(market: str) -> dict[str, Any]:
        orders.append(TransferOrder.make(identity, market, args.id, args.amount))
        return {"op": "transfer", **orders[0].to_json()}

    body = _ask_market(
        args,
        identity,
        order_for,
        "transfer",
        lambda answer: bool(orders) and answer.get("nonce") == orders[0].nonce,
    )
    if body.get("result") not in ("settled", "duplicate"):
        return arg.fail("igora credits send", str(body.get("error") or "refused"))
    print(f"sent {pricing.credits_text(args.amount)} credits to {args.id}")
    balance = body.get("balance")
    if isinstance(balance, int):
        print(f"balance: {pricing.credits_text(balance)}")
    return 0


def _ask_market(
    args: argparse.Namespace,
    identity: Identity,
    request: Callable[[str], dict[str, Any]],
    op: str,
    mine: Callable[[dict[str, Any]], bool],
) -> dict[str, Any]:
    """Connect to ``--market``/``--room`` as ``identity``, send ``CONTROL request(the
    market's id)`` and return the market's answer to it (a ``NOTICE`` whose JSON is for
    ``op`` and ``mine``), or a refusal after ``ANSWER_WAIT`` s."""
    from ..config import market_address
    from ..v3.session import Session
    from ..v3.wire import notice_answer

    address = market_address(args.market, args.room)

    async def main() -> dict[str, Any]:
        session = Session(address, identity, name="credits", state={"type": "credits"})
        await session.start()  # a refusal raises its typed error: one line, exit 2
        try:
            assert session.market is not None
            body = request(session.market)
            answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

            def on_notice(event: Any) -> None:
                got = notice_answer(event.text, op)
                if got is not None and mine(got) and not answer.done():
                    answer.set_result(got)

            session.observe(on_notice)
            session.control(body)
            try:
                return await within(answer, ANSWER_WAIT)
            except TimeoutError:
                return {"result": "refused", "error": f"no answer within {ANSWER_WAIT:g} s"}
        finally:
            await session.stop()

    return asyncio.run(main())


def run(args: argparse.Namespace) -> int:
    return send(args) if args.credits_command == "send" else show(args)
