"""Fan-out through the Redis backplane versus the in-process one, and the backplane's own cost.

Scenarios (one run, same machine, same numbers of receivers and messages):

* ``local``: one :class:`~chatcore.Hub` on :class:`~chatcore.LocalBackplane`.
* ``redis x1``: one hub on :class:`~chatcore.redis.RedisBackplane`.
* ``redis x2``: two hubs in this process, each on its own RedisBackplane
  (two nodes as far as Redis is concerned), receivers split between them and
  publishes coming from both: every message crosses Redis to the other node.

M receivers (chatcore's in-memory transport, a cheap reader that counts
messages and checks their offsets 1..K in order) are in one room; P concurrent
server-side publishers send K messages of about 100 bytes (``hub.publish``).
A row is "verified" only if every receiver got every message in order.

Reported per scenario: deliveries per second (wall), this process's CPU per
delivery (hubs, backplane *and* the in-memory clients: the clients cost the
same in every row, so the difference between rows is the backplane's), and
Redis's own CPU per delivery (from ``/proc/<pid>/stat``).

``backplane only`` rows publish K messages straight into a backplane with no
hub (a null sink that counts deliveries), P concurrent callers: publish
throughput and CPU per message, of this process and of Redis.

Not yet measured here: two ``chatcore serve`` processes (the CLI's
``--redis-url`` wiring lands separately); in-process hubs exercise the same
backplane code, but share one core's worth of Python between two nodes.

Run::

    .venv/bin/python bench/redis_fanout.py --quick   # M=200, K=500: ~10 s
    .venv/bin/python bench/redis_fanout.py           # M=1000, K=2000
    .venv/bin/python bench/redis_fanout.py --redis-url redis://127.0.0.1:6379 --redis-pid 123
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import _harness as h
import trio
import trio.testing
from _harness import DATA, ROOM

from chatcore import Config, Hub, HubConfig, serve_connection
from chatcore._backplane import Backplane, BackplaneEvent, LocalBackplane, Sequenced
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
    ("messages_per_s", "messages/s", ",.0f"),
    ("cpu_us_per_message", "process µs/msg", ".1f"),
    ("redis_us_per_message", "Redis µs/msg", ".1f"),
    ("verified", "all received", "s"),
]


# -- Redis --------------------------------------------------------------------


class RedisProcess:
    """A throwaway redis-server on a free loopback port (stopped by PID)."""

    def __init__(self) -> None:
        executable = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.directory = tempfile.mkdtemp(prefix="chatcore-bench-redis-")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def redis_cpu(pid: int | None) -> float:
    return h.proc_cpu_seconds(pid) if pid else 0.0


async def flush(url: str) -> None:
    import coredis

    async with coredis.Redis.from_url(url) as client:
        await client.flushall()


# -- receivers ------------------------------------------------------------------------------


class Tally:
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
    find = _MESSAGE.findall
    while last < tally.messages:
        offsets = find(await client.receive())
        for raw in offsets:
            if int(raw) != last + 1:
                tally.errors += 1
            last = int(raw)
    tally.received += last
    tally.finished += 1
    if tally.finished == tally.clients:
        tally.all_done.set()


async def connect(hub: Hub, nursery: trio.Nursery) -> MemoryClient:
    stream, client = memory_stream_pair()
    nursery.start_soon(lambda: serve_connection(stream, hub, config=CONFIG))
    await client.wait_accepted()
    while '"type":"hello"' not in await client.receive():
        pass
    await client.send(json.dumps({"type": "join", "room": ROOM, "ref": "j"}))
    while '"type":"reply"' not in await client.receive():
        pass
    return client


async def publish_many(hub: Hub, count: int) -> None:
    for _ in range(count):
        await hub.publish(ROOM, DATA)


# -- scenarios ------------------------------------------------------------------------------


async def fan_out(
    name: str,
    backplanes: list[Backplane],
    receivers: int,
    messages: int,
    publishers: int,
    redis_pid: int | None,
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
        cpu0, redis0, wall0 = time.process_time(), redis_cpu(redis_pid), time.perf_counter()
        async with trio.open_nursery() as publishing:
            for i, count in enumerate(h.split_evenly(messages, publishers)):
                publishing.start_soon(publish_many, hubs[i % len(hubs)], count)
        await tally.all_done.wait()
        wall1, cpu1, redis1 = time.perf_counter(), time.process_time(), redis_cpu(redis_pid)
        for client in clients:
            client.vanish()
        nursery.cancel_scope.cancel()
    deliveries = receivers * messages
    return {
        "scenario": name,
        "M": receivers,
        "K": messages,
        "P": publishers,
        "deliveries": deliveries,
        "deliveries_per_s": deliveries / (wall1 - wall0),
        "cpu_us_per_delivery": (cpu1 - cpu0) / deliveries * 1e6,
        "redis_us_per_delivery": (redis1 - redis0) / deliveries * 1e6 if redis_pid else None,
        "wall_s": wall1 - wall0,
        "verified": tally.received == deliveries and tally.errors == 0,
    }


class NullSink:
    """Counts room deliveries; ignores the rest."""

    def __init__(self, expected: int) -> None:
        self.count = 0
        self.expected = expected
        self.done = trio.Event()

    def backplane_event(self, event: BackplaneEvent) -> None:
        if isinstance(event, Sequenced):
            self.count += 1
            if self.count >= self.expected:
                self.done.set()


async def backplane_only(
    name: str, backplane: Backplane, messages: int, publishers: int, redis_pid: int | None
) -> dict[str, Any]:
    sink = NullSink(messages)
    backplane.attach(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(backplane.run)
        if isinstance(backplane, RedisBackplane):
            await backplane.wait_connected()
        backplane.watch(ROOM)
        await backplane.position(ROOM)

        async def publish(count: int) -> None:
            for _ in range(count):
                await backplane.publish(ROOM, "bench", DATA, None)

        gc.collect()
        cpu0, redis0, wall0 = time.process_time(), redis_cpu(redis_pid), time.perf_counter()
        async with trio.open_nursery() as publishing:
            for count in h.split_evenly(messages, publishers):
                publishing.start_soon(publish, count)
        await sink.done.wait()
        wall1, cpu1, redis1 = time.perf_counter(), time.process_time(), redis_cpu(redis_pid)
        nursery.cancel_scope.cancel()
    return {
        "scenario": name,
        "K": messages,
        "P": publishers,
        "messages_per_s": messages / (wall1 - wall0),
        "cpu_us_per_message": (cpu1 - cpu0) / messages * 1e6,
        "redis_us_per_message": (redis1 - redis0) / messages * 1e6 if redis_pid else None,
        "verified": sink.count == messages,
    }


async def main_async(
    url: str, redis_pid: int | None, receivers: int, messages: int, publishers: int, bound: float
) -> list[dict[str, Any]]:
    with trio.fail_after(bound * 6):  # six scenarios
        return await scenarios(url, redis_pid, receivers, messages, publishers)


async def scenarios(
    url: str, redis_pid: int | None, receivers: int, messages: int, publishers: int
) -> list[dict[str, Any]]:
    def redis(node: str) -> RedisBackplane:
        return RedisBackplane(url, node_id=node)

    rows = []
    rows.append(await fan_out("local", [LocalBackplane()], receivers, messages, publishers, None))
    await flush(url)
    rows.append(await fan_out("redis x1", [redis("a")], receivers, messages, publishers, redis_pid))
    await flush(url)
    rows.append(
        await fan_out(
            "redis x2", [redis("a"), redis("b")], receivers, messages, publishers, redis_pid
        )
    )
    backplane_messages = messages * 10
    rows.append(
        await backplane_only(
            "backplane only: local", LocalBackplane(), backplane_messages, publishers, None
        )
    )
    for callers in (1, publishers):
        await flush(url)
        rows.append(
            await backplane_only(
                f"backplane only: redis, {callers} caller{'s' if callers > 1 else ''}",
                redis("a"),
                backplane_messages if callers > 1 else messages,
                callers,
                redis_pid,
            )
        )
    return rows


def main() -> int:
    p = h.parser(__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--redis-url", help="use this Redis instead of starting one (flushed!)")
    p.add_argument("--redis-pid", type=int, help="its PID, to read its CPU time")
    p.add_argument("--receivers", "-M", type=int)
    p.add_argument("--messages", "-K", type=int)
    p.add_argument("--publishers", "-P", type=int, default=64)
    args = p.parse_args()
    receivers = args.receivers or (200 if args.quick else 1000)
    messages = args.messages or (500 if args.quick else 2000)
    server = None
    if args.redis_url:
        url, pid = args.redis_url, args.redis_pid
    else:
        server = RedisProcess()
        url, pid = server.url, server.process.pid
    try:
        rows = trio.run(main_async, url, pid, receivers, messages, args.publishers, args.timeout)
    finally:
        if server is not None:
            server.stop()
    print(h.format_table(rows, COLUMNS))
    print(
        f"\n{os.cpu_count()} CPUs; Redis {'started here' if server else url}; "
        f"process CPU includes the in-memory clients (equal in every fan-out row)."
    )
    path = h.write_json(args.json, "redis_fanout", {"rows": rows})
    if path:
        print(f"wrote {path}")
    return 0 if all(row["verified"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
