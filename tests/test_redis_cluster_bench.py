"""``bench/redis_cluster.py`` cannot rot: its scenarios run on a real one-shard cluster.

Tiny sizes through the benchmark's own code: a cluster of one primary and
one replica on 127.0.0.1 started by the benchmark, a fan-out to three nodes
with every acknowledged offset and every delivery checked, a publish with
``WAIT 1``, and the history memory measurement.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import trio

from tests.redis_server import redis_executable

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.slow


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    redis_executable()  # skips (or fails under CI) without redis-server
    monkeypatch.syspath_prepend(str(BENCH))
    import redis_cluster

    return redis_cluster


def test_the_cluster_bench_runs_and_checks_what_it_measures(bench: ModuleType) -> None:
    cluster = bench.Cluster(1)
    try:
        fan_out = trio.run(
            lambda: bench.run_scenario(
                cluster, rooms=4, messages=40, publishers=4, watchers=3, wait_replicas=0
            )
        )
        assert fan_out["verified"]  # offsets 1..n per room, each node got every message
        assert fan_out["publishes_per_s"] > 0
        assert fan_out["node_deliveries_per_s"] > 0
        waited = trio.run(
            lambda: bench.run_scenario(
                cluster, rooms=2, messages=8, publishers=2, watchers=0, wait_replicas=1
            )
        )
        assert waited["verified"]
        memory = trio.run(bench.history_memory, cluster, 4, 5)
        assert memory["rooms"] == 4
        assert memory["bytes_per_room"] > 5 * 100  # at least the messages' own bytes
    finally:
        cluster.stop()
    assert all(node.process.poll() is not None for node in cluster.nodes)
