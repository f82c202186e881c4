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
@pytest.mark.parametrize("kind", ["chatcore-serve", "chatcore-lean", "websockets"])
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
