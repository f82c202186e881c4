"""Fan-out through the Redis backplane versus the in-process one, hubs in this process.

Scenarios (one run, same machine, same numbers of receivers and messages):

* ``local``: one :class:`~chatcore.Hub` on :class:`~chatcore.LocalBackplane`.
* ``redis x1``: one hub on :class:`~chatcore.redis.RedisBackplane`.
* ``redis x2``: two hubs in this process, each on its own RedisBackplane
  (two nodes as far as Redis is concerned), receivers split between them and
  publishes coming from both: every message crosses Redis to the other node.

M receivers (chatcore's in-memory transport, a cheap reader that checks
offsets 1..K in order) are in one room; P concurrent server-side publishers
send K messages of about 100 bytes (``hub.publish``). Reported: deliveries per
second, this process's CPU per delivery (hubs, backplane *and* the in-memory
clients, which cost the same in every row, so the difference between rows is
the backplane's) and Redis's own CPU per delivery (from ``/proc``).
``redis_workers.py`` measures real ``chatcore serve`` processes on Redis.

Run (from the repository root)::

    .venv/bin/python bench/redis_fanout.py --quick   # M=200, K=500
    .venv/bin/python bench/redis_fanout.py           # M=1000, K=2000
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time
from typing import Any

import _harness as h
import trio
import trio.testing
from chatcore_app import DATA, ROOM

from chatcore import Backplane, Config, Hub, HubConfig, LocalBackplane, serve_connection
from chatcore.redis import RedisBackplane
from chatcore.transports import MemoryClient, memory_stream_pair

_MESSAGE = re.compile(r'"type":"message","room":"[^"]*","offset":(\d+)')
CONFIG = Config(heartbeat_interval=3600.0, heartbeat_timeout=3600.0)
HUB_CONFIG = HubConfig(publish_rate=1e9, publish_burst=1_000_000_000)

COLUMNS = [
    ("scenario", "scenario", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("P", "P", "d"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    ("cpu_us_per_delivery", "process µs/delivery", ".2f"),
    ("redis_us_per_delivery", "Redis µs/delivery", ".3f"),
    ("verified", "all in order", "s"),
]


class Tally:
    """What the receivers got."""

    def __init__(self, clients: int, messages: int) -> None:
        self.clients = clients
        self.messages = messages
        self.finished = 0
        self.received = 0
        self.errors = 0
        self.all_done = trio.Event()


async def drain(client: MemoryClient, tally: Tally) -> None:
    """Receive until every message arrived, checking offsets 1..K in order."""
    last = 0
    while last < tally.messages:
        for raw in _MESSAGE.findall(await client.receive()):
            if int(raw) != last + 1:
                tally.errors += 1
            last = int(raw)
    tally.received += last
    tally.finished += 1
    if tally.finished == tally.clients:
        tally.all_done.set()


async def connect(hub: Hub, nursery: trio.Nursery) -> MemoryClient:
    """One in-memory client, joined to the room."""
    stream, client = memory_stream_pair()
    nursery.start_soon(lambda: serve_connection(stream, hub, config=CONFIG))
    await client.wait_accepted()
    while '"type":"hello"' not in await client.receive():
        pass
    await client.send(json.dumps({"type": "join", "room": ROOM, "ref": "j"}))
    while '"type":"reply"' not in await client.receive():
        pass
    return client


async def fan_out(
    name: str,
    backplanes: list[Backplane],
    receivers: int,
    messages: int,
    publishers: int,
    redis: h.RedisProcess | None,
) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        hubs = []
        for backplane in backplanes:
            hub = Hub(config=HUB_CONFIG, connection_config=CONFIG, backplane=backplane)
            await nursery.start(hub.run)
            if isinstance(backplane, RedisBackplane):
                await backplane.wait_connected()
            hubs.append(hub)
        clients = [await connect(hubs[i % len(hubs)], nursery) for i in range(receivers)]
        tally = Tally(receivers, messages)
        for client in clients:
            nursery.start_soon(drain, client, tally)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        redis0 = redis.cpu_seconds() if redis else 0.0
        cpu0, wall0 = time.process_time(), time.perf_counter()

        async def publish_many(hub: Hub, count: int) -> None:
            for _ in range(count):
                await hub.publish(ROOM, DATA)

        async with trio.open_nursery() as publishing:
            for i in range(publishers):
                count = messages // publishers + (1 if i < messages % publishers else 0)
                publishing.start_soon(publish_many, hubs[i % len(hubs)], count)
        await tally.all_done.wait()
        wall1, cpu1 = time.perf_counter(), time.process_time()
        redis1 = redis.cpu_seconds() if redis else 0.0
        for client in clients:
            client.vanish()
        nursery.cancel_scope.cancel()
    deliveries = receivers * messages
    return {
        "scenario": name,
        "M": receivers,
        "K": messages,
        "P": publishers,
        "deliveries_per_s": deliveries / (wall1 - wall0),
        "cpu_us_per_delivery": (cpu1 - cpu0) / deliveries * 1e6,
        "redis_us_per_delivery": (redis1 - redis0) / deliveries * 1e6 if redis else None,
        "verified": tally.received == deliveries and tally.errors == 0,
    }


async def scenarios(
    redis: h.RedisProcess, receivers: int, messages: int, publishers: int, bound: float
) -> list[dict[str, Any]]:
    rows = []
    with trio.fail_after(bound):
        rows.append(
            await fan_out("local", [LocalBackplane()], receivers, messages, publishers, None)
        )
    for name, nodes in (("redis x1", ["a"]), ("redis x2", ["a", "b"])):
        redis.command("FLUSHALL")
        backplanes: list[Backplane] = [RedisBackplane(redis.url, node_id=n) for n in nodes]
        with trio.fail_after(bound):
            rows.append(await fan_out(name, backplanes, receivers, messages, publishers, redis))
    return rows


def main() -> int:
    p = h.parser(__doc__.splitlines()[0])
    p.add_argument("--receivers", "-M", type=int, help="receivers (1000; quick 200)")
    p.add_argument("--messages", "-K", type=int, help="messages (2000; quick 500)")
    p.add_argument("--publishers", "-P", type=int, default=64, help="concurrent publishers (64)")
    args = p.parse_args()
    receivers = args.receivers or (200 if args.quick else 1000)
    messages = args.messages or (500 if args.quick else 2000)
    redis = h.RedisProcess()
    try:
        rows = trio.run(scenarios, redis, receivers, messages, args.publishers, args.timeout)
    finally:
        redis.stop()
    print(h.format_table(rows, COLUMNS))
    print("\nprocess CPU includes the in-memory clients (equal in every row).")
    path = h.write_json(args.json, "redis_fanout", {"rows": rows})
    if path:
        print(f"results written to {path}")
    return 0 if all(row["verified"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
