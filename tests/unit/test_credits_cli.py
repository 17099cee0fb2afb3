"""`igora credits` and `igora credits send`, as a user runs them on a market's ledger."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from igora.cli import main
from igora.credits.ledger import LEDGER_FILE, Ledger
from igora.credits.receipts import Claim
from igora.identity import Identity, load_identity

from .credits_world import ASKERS, MARKET, PARAMS, WORKERS, header, receipt, task_id


@pytest.fixture
def alice(tmp_path: Path) -> Identity:
    return load_identity(tmp_path)[0]


@pytest.fixture
def ledger(tmp_path: Path, alice: Identity) -> Path:
    """A market ledger in the same data folder (as with `igora up`): alice was granted
    100 credits and asked for one run of 1.260 credits."""
    path = tmp_path / LEDGER_FILE
    with Ledger(path, MARKET.id) as ledger:
        ledger.grant(alice.id)
        head = header(alice, task_id(1))
        c = Claim(head, 1, receipt(alice, WORKERS[0], head))
        ledger.settle(c, WORKERS[0].id, PARAMS)
    return path


def run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def test_credits_prints_the_balance_and_the_entries(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path, alice: Identity
) -> None:
    code, out, _ = run(capfd, "credits", "--data", str(tmp_path))
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == "balance: 98.740"
    assert lines[1] == f"id: {alice.id}"
    assert "grant" in lines[2] and "100.000" in lines[2]
    assert "spend" in lines[3] and "-1.260" in lines[3] and task_id(1) in lines[3]
    assert len(lines) == 4


def test_credits_shows_the_last_20_entries_only(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path, alice: Identity
) -> None:
    with Ledger(ledger) as book:
        for n in range(2, 30):
            head = header(alice, task_id(n))
            book.settle(Claim(head, 1, receipt(alice, WORKERS[1], head)), WORKERS[1].id, PARAMS)
    code, out, _ = run(capfd, "credits", "--data", str(tmp_path), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["balance"] == 100_000 - 29 * 1_260
    assert [e["task"] for e in shown["entries"]] == [task_id(n) for n in range(10, 30)]


def test_credits_of_another_data_folder_and_a_ledger_named_with_ledger(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path
) -> None:
    code, out, err = run(capfd, "credits", "--data", str(tmp_path / "bob"), "--ledger", str(ledger))
    assert code == 0 and out.splitlines()[0] == "balance: 0.000"
    assert "no entries yet" in out and "made a new identity" in err


def test_credits_without_a_ledger_is_a_one_line_error(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capfd, "credits", "--data", str(tmp_path))
    assert code == 2 and out == ""
    assert err == (
        f"igora credits: error: no ledger at {tmp_path / LEDGER_FILE}: a market keeps its "
        "ledger in its data folder (DATA/ledger.sqlite3); name it with --ledger FILE\n"
    )


def test_send_moves_credits_with_a_signed_order(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path
) -> None:
    bob = ASKERS[3].id
    args = ["send", bob, "1.5", "--data", str(tmp_path), "--ledger", str(ledger)]
    code, out, _ = run(capfd, "credits", *args)
    assert code == 0 and out.splitlines()[-1] == "balance: 97.240"
    with Ledger(ledger) as book:
        assert book.balance(bob) == 1_500
        assert book.verify_chain() == 6


def test_send_more_than_the_balance_is_refused_and_changes_nothing(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path
) -> None:
    args = ["send", ASKERS[3].id, "99", "--data", str(tmp_path), "--ledger", str(ledger)]
    code, out, err = run(capfd, "credits", *args)
    assert code == 2 and out == ""
    assert err == "igora credits send: error: balance 98.740 cannot pay 99.000\n"
    with Ledger(ledger) as book:
        assert book.count() == 4


def test_send_print_prints_the_order_without_applying_it(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path, alice: Identity
) -> None:
    args = ["credits", "send", ASKERS[3].id, "2", "--data", str(tmp_path), "--print"]
    code, out, _ = run(capfd, *args)
    order = json.loads(out)
    assert code == 0
    assert (order["from"], order["market"], order["amount"]) == (alice.id, MARKET.id, 2_000)
    with Ledger(ledger) as book:
        assert book.count() == 4
    code, out, _ = run(capfd, *args[:-1], "--print", "--market-key", ASKERS[5].id)
    assert code == 0 and json.loads(out)["market"] == ASKERS[5].id


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", "nobody", "1"], "argument ID: agent id 'nobody' is not 43 characters"),
        (["send", ASKERS[0].id, "1.0001"], "at most three decimals"),
        (["send", ASKERS[0].id, "-3"], "not a positive amount"),
    ],
)
def test_bad_arguments_are_one_line_errors_with_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "igora", "credits", *args, "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert message in done.stderr and len(done.stderr.splitlines()) == 1


def test_the_data_folder_may_come_before_the_action(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, ledger: Path
) -> None:
    args = ["--data", str(tmp_path), "send", ASKERS[3].id, "1", "--ledger", str(ledger)]
    code, out, _ = run(capfd, "credits", *args)
    assert code == 0 and out.splitlines()[-1] == "balance: 97.740"
