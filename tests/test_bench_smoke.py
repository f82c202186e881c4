"""The benchmarks cannot rot: their quickest fan-out runs and delivers everything in order.

Runs ``bench/fanout.py``'s first scenario with tiny sizes through the shared
harness: a real ``chatcore serve`` process (and websockets' asyncio server,
the peer it is compared with) on 127.0.0.1, all clients in one more process,
every delivery checked for count and order by the clients.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    monkeypatch.syspath_prepend(str(BENCH))
    import fanout
    import profile_server

    return {"fanout": fanout, "profile": profile_server}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chatcore-serve", "websockets"])
def test_quickest_fanout_delivers_every_message_in_order(
    bench: dict[str, ModuleType], kind: str
) -> None:
    row = bench["fanout"].run_fanout(kind, 20, 10, timeout=20)
    assert row["server"] == kind
    assert row["received"] == 20 * 10
    assert row["verified"]  # and no offset out of order or twice, at any receiver
    assert 0 < row["frames_per_message"] <= 1


def test_profile_ranks_functions_by_own_samples(bench: dict[str, ModuleType]) -> None:
    raw = (
        "main (/x/chatcore/_hub.py:10);send_all (/v/site-packages/trio/_socket.py:5) 7\n"
        "main (/x/chatcore/_hub.py:10);send_all (/v/site-packages/trio/_socket.py:9) 2\n"
        "main (/x/chatcore/_hub.py:12) 1\n"
    )
    top = bench["profile"].top_functions(raw, 5)
    assert top == [("send_all (trio/_socket.py)", 9, 0.9), ("main (chatcore/_hub.py)", 1, 0.1)]
    inclusive = bench["profile"].top_functions(raw, 1, cumulative=True)
    assert inclusive == [("main (chatcore/_hub.py)", 10, 1.0)]


@pytest.fixture
def abuse(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    import abuse

    return abuse


@pytest.mark.slow
def test_abuse_quick_hoarding_and_typing_stay_bounded(abuse: ModuleType) -> None:
    # Real `chatcore serve examples.chat.app:app` processes, CHAT_SECRET set.
    env = abuse.environment(quick=True)
    [hoard_plan, typing_plan] = abuse.plan(["hoard", "typing"], quick=True)
    hoard = abuse.run_attack(*hoard_plan, quick=True, timeout=60, env=env)
    phases, outcome = hoard["phases"], hoard["outcome"]
    assert outcome["codes"]["publish:ok"] > 0
    assert outcome["closed"] == {}  # paced under the rate limit: never closed
    # 18 MB of emoji offered; the history keeps at most the 16 MiB budget
    # (generous: the allocator, buffers and the interpreter's own growth).
    grown = phases["during"]["peak_rss_mb"] - phases["before"]["rss_mb"]
    assert grown < abuse.QUICK_BUDGET / 2**20 + 40
    assert phases["swept"]["rss_mb"] <= phases["after"]["rss_mb"] + 2
    typing = abuse.run_attack(*typing_plan, quick=True, timeout=60, env=env)
    assert typing["outcome"]["typer_closed"] == 1008
    assert typing["outcome"]["sent"] <= 2_000
    # Unbounded: 2,000 x 20 deliveries. The frame budget lets ~33 through.
    assert typing["outcome"]["typing_delivered"] <= 40 * 20
    for result in (hoard, typing):
        for phase in result["phases"].values():
            assert phase["pings"] > 0  # the bystander was served throughout
