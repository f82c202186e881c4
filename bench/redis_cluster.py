"""Publish throughput and fan-out on Redis Cluster with 1 and 3 shards, side by side.

Two clusters run at once on 127.0.0.1, each shard a primary with one replica
(``appendonly yes``, ``appendfsync everysec``): ``1 shard`` (every slot on one
primary) and ``3 shards`` (the slots split in three). The scenarios, each
repeated and interleaved (A B C ... A B C ...):

* ``publish``: one node (a :class:`~chatcore.redis.RedisClusterBackplane` in
  this process) and P concurrent publishers sending K messages of about 100
  bytes over R rooms; no node watches them.
* ``fan-out x3``: the same, while three nodes watch every room (the
  publishing node among them), so each message reaches three nodes.
* ``publish, WAIT 1``: the ``publish`` scenario on 3 shards with
  ``wait_replicas=1``: the ``ok`` waits until the replica has the message.
* ``1 publisher`` (with and without ``WAIT 1``): one publisher awaiting each
  publish in turn (K/20 messages): the latency of one publish, unqueued.

Reported: publishes per second (this one Python process is the client, so on
a small machine this is bounded by the client), publish latency p50/p99, the
Redis primaries' CPU per publish (from ``/proc``), the busiest shard's CPU per
publish and from it *Redis-bound publishes/s*: the rate at which the busiest
shard would use one core (``1e6 / busiest µs``), which is what grows with
shards, and node deliveries per second. Every acknowledged offset is checked
(1..n per room, once) and in ``fan-out`` every node must get every message.

A last table measures Redis memory per room of history (``used_memory``
before and after filling R rooms with H messages each).

Run (from the repository root)::

    .venv/bin/python bench/redis_cluster.py --quick            # small sizes
    .venv/bin/python bench/redis_cluster.py --repeat 3         # the numbers in docs/capacity.md
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness as h
import trio

from chatcore import BackplaneEvent, Sequenced
from chatcore.redis import RedisBackplane, RedisClusterBackplane

SLOTS = 16_384
DATA = {"text": "x" * 90}

COLUMNS = [
    ("name", "scenario", "s"),
    ("publishes_per_s", "publishes/s", ",.0f"),
    ("publishes_per_s_spread", "spread", "s"),
    ("p50_ms", "p50 ms", ".2f"),
    ("p99_ms", "p99 ms", ".2f"),
    ("redis_us_per_publish", "Redis µs/publish", ".1f"),
    ("busiest_us_per_publish", "busiest shard µs/publish", ".1f"),
    ("redis_bound_per_s", "Redis-bound publishes/s", ",.0f"),
    ("redis_bound_per_s_spread", "spread", "s"),
    ("node_deliveries_per_s", "node deliveries/s", ",.0f"),
    ("verified", "all in order", "s"),
]
MEMORY_COLUMNS = [
    ("rooms", "rooms", "d"),
    ("messages", "messages/room", "d"),
    ("bytes_per_room", "bytes/room", ",.0f"),
    ("bytes_per_message", "bytes/message", ",.0f"),
]


class Node:
    """One redis-server of a bench cluster (stopped by PID)."""

    command = h.RedisProcess.command

    def __init__(self, directory: Path) -> None:
        ports = []
        for _ in range(2):
            with h.socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        self.port, self.bus_port = ports
        directory.mkdir(parents=True)
        argv = [shutil.which("redis-server") or "/usr/bin/redis-server"]
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory)]
        argv += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port)]
        argv += ["--cluster-require-full-coverage", "no", "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        self.pid = self.process.pid
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Cluster:
    """``shards`` primaries with one replica each, slots split evenly."""

    def __init__(self, shards: int) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="chatcore-bench-cluster-"))
        self.primaries: list[Node] = []
        self.replicas: list[Node] = []
        try:
            self.primaries = [Node(self.directory / f"p{i}") for i in range(shards)]
            self.replicas = [Node(self.directory / f"r{i}") for i in range(shards)]
            for i, node in enumerate(self.primaries):
                first, last = i * SLOTS // shards, (i + 1) * SLOTS // shards - 1
                node.command("CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
            for node in [*self.primaries[1:], *self.replicas]:
                self.primaries[0].command(
                    "CLUSTER", "MEET", "127.0.0.1", str(node.port), str(node.bus_port)
                )
            self._wait(lambda: all(self._knows_all(n) for n in self.nodes))
            for primary, replica in zip(self.primaries, self.replicas, strict=True):
                self._wait(lambda p=primary, r=replica: self._replicate(r, p))
            self._wait(self._healthy)
        except BaseException:
            self.stop()
            raise

    @property
    def nodes(self) -> list[Node]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.primaries)

    @staticmethod
    def _replicate(replica: Node, primary: Node) -> bool:
        try:
            replica.command("CLUSTER", "REPLICATE", primary.command("CLUSTER", "MYID"))
        except RuntimeError:  # the replica does not know the primary by its id yet
            return False
        return True

    def _knows_all(self, node: Node) -> bool:
        return str(node.command("CLUSTER", "NODES")).count("connected") == len(self.nodes)

    def _healthy(self) -> bool:
        return all(
            "cluster_state:ok" in str(n.command("CLUSTER", "INFO")) for n in self.nodes
        ) and all(
            "master_link_status:up" in str(r.command("INFO", "replication")) for r in self.replicas
        )

    @staticmethod
    def _wait(condition: Any) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError("the bench cluster did not become healthy")
            time.sleep(0.05)

    def cpu(self) -> list[float]:
        """CPU seconds of each primary."""
        return [h.proc_cpu_seconds(n.pid) for n in self.primaries]

    def used_memory(self) -> int:
        total = 0
        for node in self.primaries:
            info = str(node.command("INFO", "memory"))
            total += int(info.split("used_memory:", 1)[1].split()[0])
        return total

    def flush(self) -> None:
        for node in self.primaries:
            node.command("FLUSHALL")

    def stop(self) -> None:
        for node in [*self.primaries, *self.replicas]:
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class Watcher:
    """A sink counting each room's messages and checking their order."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.received = 0
        self.errors = 0
        self.changed = trio.Event()

    def backplane_event(self, event: BackplaneEvent) -> None:
        if isinstance(event, Sequenced):
            if event.offset != self.last.get(event.room, 0) + 1:
                self.errors += 1
            self.last[event.room] = event.offset
            self.received += 1
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while self.received < count:
            await self.changed.wait()


async def run_scenario(
    cluster: Cluster,
    *,
    rooms: int,
    messages: int,
    publishers: int,
    watchers: int,
    wait_replicas: int,
) -> dict[str, Any]:
    cluster.flush()
    settings: dict[str, Any] = {"prefix": "bench", "wait_replicas": wait_replicas}
    names = [f"room-{i}" for i in range(rooms)]
    nodes: list[RedisClusterBackplane] = []
    sinks: list[Watcher] = []
    for i in range(max(watchers, 1)):
        node = RedisBackplane(cluster.url, node_id=f"n{i}", **settings)
        assert isinstance(node, RedisClusterBackplane)
        nodes.append(node)
        sinks.append(Watcher())
        node.attach(sinks[-1])
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        for node in nodes:
            await node.wait_connected()
        if watchers:
            for node in nodes:
                for room in names:
                    node.watch(room)
            for node in nodes:
                for room in names:
                    await node.position(room)
        publisher = nodes[0]
        acked: dict[str, list[int]] = {room: [] for room in names}
        latencies: list[float] = []
        per_task = messages // publishers

        async def publish_many(index: int) -> None:
            for j in range(per_task):
                room = names[(index + j * publishers) % rooms]
                started = time.perf_counter()
                position = await publisher.publish(room, "bench", DATA, None)
                latencies.append(time.perf_counter() - started)
                acked[room].append(position.offset)

        gc.collect()
        cpu0, wall0 = cluster.cpu(), time.perf_counter()
        async with trio.open_nursery() as publishing:
            for index in range(publishers):
                publishing.start_soon(publish_many, index)
        wall1 = time.perf_counter()
        total = per_task * publishers
        expected = total * watchers
        with trio.move_on_after(30):
            for sink in sinks[:watchers]:
                await sink.wait_for(total)
        wall2 = time.perf_counter()
        cpu1 = cluster.cpu()
        nursery.cancel_scope.cancel()
    used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    latencies.sort()
    in_order = all(
        sorted(offsets) == list(range(1, len(offsets) + 1)) for offsets in acked.values()
    )
    delivered = sum(s.received for s in sinks) if watchers else 0
    busiest = max(used) / total * 1e6
    return {
        "publishes_per_s": total / (wall1 - wall0),
        "p50_ms": h.percentile(latencies, 0.5) * 1000,
        "p99_ms": h.percentile(latencies, 0.99) * 1000,
        "redis_us_per_publish": sum(used) / total * 1e6,
        "busiest_us_per_publish": busiest,
        "redis_bound_per_s": 1e6 / busiest if busiest else None,
        "node_deliveries_per_s": delivered / (wall2 - wall0) if watchers else None,
        "verified": in_order
        and delivered == expected
        and not any(s.errors for s in sinks[: watchers or 0]),
    }


async def history_memory(cluster: Cluster, rooms: int, messages: int) -> dict[str, Any]:
    cluster.flush()
    node = RedisBackplane(cluster.url, prefix="mem")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await node.wait_connected()
        before = cluster.used_memory()

        async def fill(start: int) -> None:
            for i in range(start, rooms, 32):
                for _ in range(messages):
                    await node.publish(f"room-{i}", "bench", DATA, None)

        async with trio.open_nursery() as filling:
            for start in range(32):
                filling.start_soon(fill, start)
        after = cluster.used_memory()
        nursery.cancel_scope.cancel()
    per_room = (after - before) / rooms
    return {
        "rooms": rooms,
        "messages": messages,
        "bytes_per_room": per_room,
        "bytes_per_message": per_room / messages,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = h.parser(__doc__.splitlines()[0])
    p.add_argument("--messages", "-K", type=int, help="messages per round (20000; quick 2000)")
    p.add_argument("--rooms", "-R", type=int, help="rooms (64; quick 16)")
    p.add_argument("--publishers", "-P", type=int, help="concurrent publishers (128; quick 32)")
    args = p.parse_args(argv)
    messages = args.messages or (2_000 if args.quick else 20_000)
    rooms = args.rooms or (16 if args.quick else 64)
    publishers = args.publishers or (32 if args.quick else 128)
    clusters: dict[int, Cluster] = {}
    try:
        for shards in (1, 3):
            clusters[shards] = Cluster(shards)

        def scenario(shards: int, watchers: int, wait: int, sequential: bool = False) -> Any:
            def thunk() -> dict[str, Any]:
                return trio.run(
                    lambda: run_scenario(
                        clusters[shards],
                        rooms=rooms,
                        messages=messages // 20 if sequential else messages,
                        publishers=1 if sequential else publishers,
                        watchers=watchers,
                        wait_replicas=wait,
                    )
                )

            return thunk

        rows = h.run_rounds(
            [
                ("1 shard, publish", scenario(1, 0, 0)),
                ("3 shards, publish", scenario(3, 0, 0)),
                ("1 shard, fan-out x3", scenario(1, 3, 0)),
                ("3 shards, fan-out x3", scenario(3, 3, 0)),
                ("3 shards, publish, WAIT 1", scenario(3, 0, 1)),
                ("3 shards, 1 publisher", scenario(3, 0, 0, sequential=True)),
                ("3 shards, 1 publisher, WAIT 1", scenario(3, 0, 1, sequential=True)),
            ],
            args.repeat,
            ["publishes_per_s", "redis_bound_per_s", "p99_ms"],
        )
        memory = [
            trio.run(history_memory, clusters[1], 100 if args.quick else 1_000, count)
            for count in (10, 100)
        ]
    finally:
        for cluster in clusters.values():
            cluster.stop()
    print(h.format_table(rows, COLUMNS))
    print()
    print(h.format_table(memory, MEMORY_COLUMNS))
    print(f"\nK={messages} messages, R={rooms} rooms, P={publishers} publishers per round")
    path = h.write_json(args.json, "redis_cluster", {"rows": rows, "memory": memory})
    if path:
        print(f"results written to {path}")
    return 0 if all(row["verified"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
