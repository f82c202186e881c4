"""bench/metrics_cost.py cannot rot: its quickest round runs, metrics on and off, and delivers.

A real ``chatcore serve`` with metrics off (``--metrics-path none``) and on
(scraped while the fan-out runs), through the benchmarks' shared harness.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def metrics_cost(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    import metrics_cost

    monkeypatch.setattr(metrics_cost, "SCRAPE_EVERY", 0.2)
    return metrics_cost


@pytest.mark.slow
def test_metrics_cost_rounds_deliver_everything_with_metrics_on_and_off(
    metrics_cost: ModuleType,
) -> None:
    off = metrics_cost.run(20, 40, False, timeout=20)
    on = metrics_cost.run(20, 40, True, timeout=20)
    for row in (off, on):
        assert row["received"] == 20 * 40
        assert row["verified"]
    assert off["scrapes"] == 0
    assert on["scrapes"] >= 1  # /metrics answered 200 while the fan-out ran
