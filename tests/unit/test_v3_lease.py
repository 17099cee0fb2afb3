"""The broker lease of a v3 room (igora.market.v3.lease), without a market."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from igora.market.v3.lease import Lease


def test_the_first_asker_holds_the_others_wait_in_order() -> None:
    lease: Lease[str] = Lease()
    assert lease.request("a") and (lease.holder, lease.epoch) == ("a", 1)
    assert lease.request("a") and lease.epoch == 1  # asking again changes nothing
    assert not lease.request("b") and not lease.request("c") and not lease.request("b")
    assert lease.waiting == ["b", "c"]
    assert lease.release("c") is None and lease.waiting == ["b"]  # a waiting one leaves
    assert lease.release("a") == "b" and (lease.holder, lease.epoch) == ("b", 2)
    assert lease.release("b") is None and lease.holder is None and lease.epoch == 2
    assert lease.request("d") and lease.epoch == 3


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4)), max_size=60))
def test_one_holder_at_most_and_the_epoch_only_grows(events: list[tuple[bool, int]]) -> None:
    lease: Lease[int] = Lease()
    epoch = 0
    for ask, peer in events:
        holder = lease.holder
        if ask:
            lease.request(peer)
        else:
            lease.release(peer)
        assert lease.epoch >= epoch
        assert (lease.epoch > epoch) == (lease.holder is not None and lease.holder is not holder)
        epoch = lease.epoch
        assert lease.holder not in lease.waiting
        assert len(set(lease.waiting)) == len(lease.waiting)
        assert lease.holder is not None or not lease.waiting
