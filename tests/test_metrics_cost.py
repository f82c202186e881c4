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


@pytest.fixture
def inprocess(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    import _inprocess_fanout

    return _inprocess_fanout


@pytest.mark.parametrize("direct", [False, True], ids=["writer-tasks", "direct-writes"])
def test_inprocess_round_delivers_everything_on_the_same_schedule(
    inprocess: ModuleType, direct: bool
) -> None:
    # Every member receives every message: the round ends only when all did
    # (a lost delivery is a TooSlowError), and the schedule is the same each
    # time, so the frames sent are the same too (what makes instruction
    # counts comparable).
    first = inprocess.run_round(30, 20, direct=direct, metrics=False, timeout=30)
    second = inprocess.run_round(30, 20, direct=direct, metrics=False, timeout=30)
    assert first["deliveries"] == 31 * 20
    assert first["frames"] == second["frames"]
    assert 0 < first["frames"] < first["deliveries"]  # messages were batched
    assert first["observed_publishes"] == 0


def test_inprocess_round_with_metrics_on_counts_every_publish(inprocess: ModuleType) -> None:
    result = inprocess.run_round(10, 15, direct=False, metrics=True, timeout=30)
    assert result["observed_publishes"] == 15
    # The metrics stopped observing when the round ended: the next round off counts nothing.
    assert inprocess.run_round(10, 15, direct=False, metrics=False)["observed_publishes"] == 0


def test_instruction_counts_are_read_from_valgrinds_summary(
    metrics_cost: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command the benchmark runs and how it reads the count, without
    # valgrind itself (minutes under it): a stand-in prints what cachegrind prints.
    seen: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: object) -> object:
        seen.append(argv)
        stderr = "==1== \n==1== I   refs:      2,380,737,882\n"
        stdout = '{"cpu": 0.1, "deliveries": 1, "frames": 1, "observed_publishes": 7}\n'
        return type("Done", (), {"stdout": stdout, "stderr": stderr})()

    monkeypatch.setattr(metrics_cost.subprocess, "run", fake_run)
    assert metrics_cost.count_instructions(5, 7, "direct", True) == 2_380_737_882
    assert seen[0][:2] == ["valgrind", "--tool=cachegrind"]
    assert seen[0][-8:] == [
        "--path",
        "direct",
        "--members",
        "5",
        "--messages",
        "7",
        "--metrics",
        "on",
    ]
    with pytest.raises(RuntimeError, match="counted 7 of 8"):
        metrics_cost.count_instructions(5, 8, "direct", True)
