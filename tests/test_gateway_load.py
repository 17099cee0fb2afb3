"""The gateway under load (issue #17), on real processes: 200 streamed chat completions at
once (some read slowly) and 20 whose clients disconnect after the first token. Every
other request completes with its whole answer, none gets a 5xx, every disconnected task
ends ``aborted`` in the market's archive; a body of exactly the size limit is served and
one a byte over is refused with 413. The scenario is ``bench.gateway_load`` (which also
reports latencies; none are asserted here)."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.gateway_load import GONE, STREAMS, hammer
from tests.conftest import Cluster


@pytest.mark.timeout(240)
async def test_gateway_serves_200_streams_and_aborts_the_disconnected(cluster: Cluster) -> None:
    cluster.market("--log-level", "info")
    cluster.broker()
    for name in ("w1", "w2"):
        cluster.worker("--slots", "16", "--delay", "0.005", name=name)
    gateway, base = cluster.gateway("--heartbeat", "1", "--wait-worker", "30")
    cluster.wait_agents("worker", 2)
    out = await hammer(base, cluster.port)
    print(
        f"{len(out.latencies)} streams in {out.seconds:.2f} s; statuses {dict(out.statuses)}; "
        f"disconnected: {dict(out.gone_states)}"
    )
    assert out.statuses == Counter({200: STREAMS + GONE}), out.statuses
    assert not out.incomplete, out.incomplete[:3]
    assert len(out.latencies) == STREAMS
    assert len(set(out.gone_ids)) == GONE and all(out.gone_ids)
    assert out.gone_states == Counter({"aborted": GONE}), out.gone_states
    assert (out.limit_status, out.over_status) == (200, 413)
    assert gateway.alive()
