"""``igora credits``: an identity's balance and recent entries, and ``igora credits send``.

``igora credits`` reads the ledger a market keeps in its data folder
(``DATA/ledger.sqlite3``), or the file given with ``--ledger``. ``send`` hands its signed
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
folder (the default finds it when the market shares yours), or --ledger FILE.

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
    s.add_argument(
        "--market",
        type=arg.market_url,
        default=None,
        metavar="URL",
        help="the market to send the order to (default: YJS_LOCAL_URL, else ws://localhost:1234)",
    )
    s.add_argument("--room", type=arg.room, default=None, help="a protocol 3 room of it")
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


def _line(e: Entry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at / 1000))
    what = f"task {e.task} attempt {e.attempt}" if e.task else e.key.split(":", 1)[0]
    return f"{when}  #{e.seq:<6} {e.kind.value:<8} {pricing.credits_text(e.amount):>12}  {what}"


def _identity(args: argparse.Namespace) -> Identity:
    identity, made = load_identity(args.data)
    if made:
        print(f"igora credits: made a new identity in {identity.path}", file=sys.stderr)
    return identity


def show(args: argparse.Namespace) -> int:
    with _open(_ledger_path(args)) as ledger:
        identity = _identity(args)
        balance = ledger.balance(identity.id)
        entries = ledger.entries(identity.id, RECENT)
    if args.json:
        body = {
            "id": identity.id,
            "balance": balance,
            "unit": "millicredit",
            "entries": [e.to_json() for e in entries],
        }
        print(json.dumps(body))
        return 0
    print(f"balance: {pricing.credits_text(balance)}")
    print(f"id: {identity.id}")
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
    from ..config import market_address
    from ..v3.session import Session
    from ..v3.wire import notice_answer

    address = market_address(args.market, args.room)

    async def main() -> dict[str, Any]:
        session = Session(address, identity, name="credits", state={"type": "credits"})
        await session.start()  # a refusal raises its typed error: one line, exit 2
        try:
            assert session.market is not None
            order = TransferOrder.make(identity, session.market, args.id, args.amount)
            answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

            def on_notice(event: Any) -> None:
                body = notice_answer(event.text, "transfer")
                if body is not None and body.get("nonce") == order.nonce and not answer.done():
                    answer.set_result(body)

            session.observe(on_notice)
            session.control({"op": "transfer", **order.to_json()})
            try:
                return await within(answer, ANSWER_WAIT)
            except TimeoutError:
                return {"result": "refused", "error": f"no answer within {ANSWER_WAIT:g} s"}
        finally:
            await session.stop()

    body = asyncio.run(main())
    if body.get("result") not in ("settled", "duplicate"):
        return arg.fail("igora credits send", str(body.get("error") or "refused"))
    print(f"sent {pricing.credits_text(args.amount)} credits to {args.id}")
    balance = body.get("balance")
    if isinstance(balance, int):
        print(f"balance: {pricing.credits_text(balance)}")
    return 0


def run(args: argparse.Namespace) -> int:
    return send(args) if args.credits_command == "send" else show(args)
