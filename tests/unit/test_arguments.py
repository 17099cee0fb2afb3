"""The command line reads an agent id that begins with a dash as a value, not an option."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from igora.identity import Identity
from igora.parser import build_parser


def _dash_id() -> str:
    for _ in range(10_000):  # about 1 id in 64 begins with "-"
        id_ = Identity(SigningKey.generate()).id
        if id_.startswith("-"):
            return id_
    raise AssertionError("no id beginning with '-' in 10,000 tries")


def test_an_id_beginning_with_a_dash_is_a_positional_value() -> None:
    id_ = _dash_id()
    ban = build_parser().parse_args(["market", "ban", id_, "--data", "/tmp/x"])
    assert ban.id == id_
    add = build_parser().parse_args(["market", "members", "add", id_, "--note", "bob"])
    assert (add.id, add.note) == (id_, "bob")


def test_an_id_beginning_with_a_dash_is_an_option_value() -> None:
    id_ = _dash_id()
    args = build_parser().parse_args(["market", "--secure", "--broker-key", id_])
    assert id_ in args.broker_key


def test_a_real_option_still_parses_and_a_wrong_one_is_still_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert build_parser().parse_args(["market", "--secure"]).secure
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["market", "ban", "-" + "x" * 10])
    assert exit_.value.code == 2
    assert "error" in capsys.readouterr().err


BOB = Identity(SigningKey.generate()).id


@pytest.mark.parametrize(
    "argv",
    [
        ["credits", "--market", "ws://h:1", "--room", "r", "send", BOB, "1"],
        ["credits", "send", BOB, "1", "--market", "ws://h:1", "--room", "r"],
    ],
)
def test_credits_send_takes_the_market_before_or_after_send(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.market, args.room, args.credits_command) == ("ws://h:1", "r", "send")
    assert build_parser().parse_args(["credits", "send", BOB, "1"]).market is None
