"""In-process scenarios over chatcore's in-memory transport.

Server and clients run in the *same* Trio run, so ``time.process_time()``
counts both. To tell them apart, a second, instrumented pass times every task
step (:class:`TaskStepTimer`): steps of the client tasks (named
``bench-client*``), steps of every other task (the server: connection actors,
hub, publisher) and the rest (Trio's run loop, between steps, plus the
instrument's own cost). The server's share is then bounded: at least its task
steps, at most its task steps plus all of the unattributed run-loop time.

Servers:

``hub``   chatcore :class:`~chatcore.Hub`, clients join the room.
``core``  chatcore connection core with a trivial handler; the publisher
          calls ``Connection.offer`` on every connection.
``naive`` no chatcore actor: a reader and a writer task per connection on the
          same :class:`~chatcore.transports.MemoryStream`, the writer sending
          each message of a per-connection memory channel as its own frame.
"""

from __future__ import annotations

import gc
import json
import re
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing
from _harness import DATA, ROOM, GcTimer, Publisher, message_text, proc_rss_bytes

from chatcore import (
    Config,
    Connection,
    ConnectionHandler,
    Hub,
    HubConfig,
    MessageStream,
    PeerGone,
    encode,
    serve_connection,
)
from chatcore.transports import MemoryClient, memory_stream_pair

_MESSAGE = re.compile(r'"type":"message","room":"[^"]*","offset":(\d+)')
CONFIG = Config(heartbeat_interval=3600.0, heartbeat_timeout=3600.0)
HELLO = json.dumps({"type": "hello"}, separators=(",", ":"))
CLIENT = "bench-client"


class TaskStepTimer(trio.abc.Instrument):
    """Wall time of task steps, split into client tasks and all others.

    Wall time (``perf_counter``, cheap): in a single-threaded CPU-bound run a
    step's wall time is its CPU time plus any preemption, which stretches
    every part of the window alike, so only *shares* of the window are used.
    """

    def __init__(self) -> None:
        self.client_ns = 0
        self.server_ns = 0
        self._start = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._start = time.perf_counter_ns()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self._start:  # the step that added the instrument
            return
        elapsed = time.perf_counter_ns() - self._start
        self._start = 0
        if task.name.startswith(CLIENT):
            self.client_ns += elapsed
        else:
            self.server_ns += elapsed


# -- servers -----------------------------------------------------------------------


class _App(Publisher):
    """A server under test, fed in-memory streams."""

    join = False

    def start(self, nursery: trio.Nursery, stream: MessageStream) -> None:
        raise NotImplementedError


class _HubApp(_App):
    join = True

    def __init__(self) -> None:
        self.hub = Hub(
            config=HubConfig(publish_rate=1e9, publish_burst=1_000_000_000),
            connection_config=CONFIG,
        )

    def start(self, nursery: trio.Nursery, stream: MessageStream) -> None:
        nursery.start_soon(lambda: serve_connection(stream, self.hub, config=CONFIG))

    async def burst(self, first: int, count: int) -> None:
        # hub.publish is async (it goes through the backplane, which yields):
        # K concurrent publishers land in the same scheduler pass.
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(self.hub.publish, ROOM, DATA)

    async def paced(self, first: int, count: int) -> None:
        for _ in range(count):
            await self.hub.publish(ROOM, DATA)


class _CoreApp(_App, ConnectionHandler):
    def __init__(self) -> None:
        self.connections: set[Connection] = set()

    async def handle(self, connection: Connection) -> None:
        self.connections.add(connection)
        try:
            connection.send_nowait({"type": "hello"})
            async for _ in connection:
                pass
        finally:
            self.connections.discard(connection)

    def start(self, nursery: trio.Nursery, stream: MessageStream) -> None:
        nursery.start_soon(lambda: serve_connection(stream, self, config=CONFIG))

    def publish(self, offset: int) -> None:
        message = encode(json.loads(message_text(offset)))
        for connection in self.connections:
            connection.offer(message)


class _NaiveApp(_App):
    def __init__(self) -> None:
        self.channels: set[trio.MemorySendChannel[str]] = set()
        self.offset = 0

    def start(self, nursery: trio.Nursery, stream: MessageStream) -> None:
        nursery.start_soon(self._serve, stream)

    async def _serve(self, stream: MessageStream) -> None:
        await stream.accept()
        send, receive = trio.open_memory_channel[str](16_384)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, stream, receive)
            self.channels.add(send)
            send.send_nowait(HELLO)
            try:
                while True:
                    text = await stream.receive()
                    message = json.loads(text)
                    if message.get("type") == "publish":
                        self.offset += 1
                        self._broadcast(message_text(self.offset, message["data"]))
            except PeerGone:
                pass
            finally:
                self.channels.discard(send)
                nursery.cancel_scope.cancel()

    async def _writer(self, stream: MessageStream, receive: trio.MemoryReceiveChannel[str]) -> None:
        try:
            async for text in receive:
                await stream.send(text)
        except PeerGone:
            pass

    def _broadcast(self, text: str) -> None:
        for channel in self.channels:
            channel.send_nowait(text)

    def publish(self, offset: int) -> None:
        self.offset = offset
        self._broadcast(message_text(offset))


APPS: dict[str, Callable[[], _App]] = {"hub": _HubApp, "core": _CoreApp, "naive": _NaiveApp}


# -- clients -----------------------------------------------------------------------


async def _connect(app: _App, nursery: trio.Nursery, count: int) -> list[MemoryClient]:
    """Open ``count`` connections; each has seen its hello (and joined)."""
    clients = []
    join = json.dumps({"type": "join", "room": ROOM, "ref": "j"})
    for _ in range(count):
        stream, client = memory_stream_pair()
        app.start(nursery, stream)
        await client.wait_accepted()
        while '"type":"hello"' not in await client.receive():
            pass
        if app.join:
            await client.send(join)
            while '"type":"reply"' not in await client.receive():
                pass
        clients.append(client)
    return clients


class _Tally:
    def __init__(self, clients: int, messages: int) -> None:
        self.clients = clients
        self.messages = messages
        self.finished = 0
        self.received = 0
        self.frames = 0
        self.errors = 0
        self.all_done = trio.Event()


async def _drain(client: MemoryClient, tally: _Tally) -> None:
    """Receive until every message arrived, checking offsets 1..K in order."""
    last = 0
    frames = 0
    errors = 0
    find = _MESSAGE.findall
    while last < tally.messages:
        offsets = find(await client.receive())
        if not offsets:
            continue
        frames += 1
        expected = last + 1
        for raw in offsets:
            if int(raw) != expected:
                errors += 1
            expected += 1
        last = expected - 1
    tally.received += last
    tally.frames += frames
    tally.errors += errors
    tally.finished += 1
    if tally.finished == tally.clients:
        tally.all_done.set()


async def _publish_as_client(client: MemoryClient, messages: int) -> None:
    for i in range(messages):
        await client.send(json.dumps({"type": "publish", "room": ROOM, "data": DATA, "ref": i}))


# -- the fan-out scenario ----------------------------------------------------------


async def _fan_out(
    server: str, publish: str, receivers: int, messages: int, instrument: bool
) -> dict[str, Any]:
    app = APPS[server]()
    async with trio.open_nursery() as nursery:
        clients = await _connect(app, nursery, receivers)
        tally = _Tally(receivers, messages)
        for i, client in enumerate(clients):
            nursery.start_soon(_drain, client, tally, name=f"{CLIENT}-{i}")
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        timer = TaskStepTimer()
        if instrument:
            trio.lowlevel.add_instrument(timer)
        gc_timer = GcTimer()
        gc.callbacks.append(gc_timer)
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        if publish == "burst":
            await app.burst(1, messages)
        elif publish == "paced":
            await app.paced(1, messages)
        else:
            nursery.start_soon(_publish_as_client, clients[0], messages, name=f"{CLIENT}-pub")
        await tally.all_done.wait()
        wall1 = time.perf_counter()
        cpu1 = time.process_time()
        gc.callbacks.remove(gc_timer)
        if instrument:
            trio.lowlevel.remove_instrument(timer)
        for client in clients:
            client.vanish()
        nursery.cancel_scope.cancel()
    deliveries = receivers * messages
    cpu = cpu1 - cpu0
    row: dict[str, Any] = {
        "transport": "memory",
        "server": server,
        "publish": publish,
        "M": receivers,
        "K": messages,
        "deliveries": deliveries,
        "received": tally.received,
        "verified": tally.received == deliveries and tally.errors == 0,
        "cpu_us_per_delivery": cpu / deliveries * 1e6,
        "frames_per_message": tally.frames / deliveries,
        "deliveries_per_s": deliveries / (wall1 - wall0),
        "wall_s": wall1 - wall0,
        "gc_share": sum(gc_timer.seconds) / max(cpu, 1e-9),
    }
    if instrument:
        # Shares of the window's wall time: preemption by other processes
        # stretches steps and run loop alike, so the shares stay fair.
        wall = wall1 - wall0
        row["server_share"] = timer.server_ns / 1e9 / wall
        row["client_share"] = timer.client_ns / 1e9 / wall
    return row


def fan_out(
    server: str, publish: str, receivers: int, messages: int, *, timeout: float, split: bool = True
) -> dict[str, Any]:
    """One in-memory fan-out, measured twice: plain (totals), then instrumented (split).

    With ``split=False`` only the plain pass runs (no server/client split).

    The row's ``server_us_low`` / ``server_us_high`` bound the server's CPU per
    delivery: the plain pass's total times the instrumented pass's share of
    server task steps, without / with all of the unattributed run-loop share.
    """

    async def run(instrument: bool) -> dict[str, Any]:
        with trio.fail_after(timeout):
            return await _fan_out(server, publish, receivers, messages, instrument)

    plain = trio.run(run, False)
    if not split:
        return plain
    shares = trio.run(run, True)
    total = plain["cpu_us_per_delivery"]
    loop_share = max(0.0, 1.0 - shares["server_share"] - shares["client_share"])
    plain["server_us_low"] = total * shares["server_share"]
    plain["server_us_high"] = total * (shares["server_share"] + loop_share)
    plain["client_us"] = total * shares["client_share"]
    plain["verified"] = plain["verified"] and shares["verified"]
    return plain


# -- idle memory -------------------------------------------------------------------


def _group(filename: str) -> str:
    path = filename.replace("\\", "/")
    if path.startswith("<attrs generated"):  # attrs classes' __init__: owner's module
        owner = path.split()[-1]
        path = "/chatcore/" if owner.startswith("chatcore") else f"/{owner.split('.')[0]}/"
    if "/chatcore/transports/" in path:
        return "transport (in-memory pair)"
    if "/chatcore/" in path:
        return "chatcore"
    if "/trio/" in path:
        return "trio"
    if "/bench/" in path:
        return "bench"
    return "other"


async def _idle(server: str, count: int, measure: Callable[[], Awaitable[None]]) -> None:
    app = APPS[server]()
    async with trio.open_nursery() as nursery:
        clients = await _connect(app, nursery, count)
        await trio.testing.wait_all_tasks_blocked()
        await measure()
        for client in clients:
            client.vanish()
        nursery.cancel_scope.cancel()


def idle_memory(server: str, count: int, *, timeout: float) -> dict[str, Any]:
    """Bytes per idle open connection: RSS delta, then a tracemalloc diff.

    Run the RSS pass first in a fresh process: freed memory is kept by the
    allocator and would hide later growth.
    """
    rss: dict[str, int] = {}
    snapshots: list[tracemalloc.Snapshot] = []

    async def rss_pass() -> None:
        async def measure() -> None:
            gc.collect()
            rss["after"] = proc_rss_bytes()

        with trio.fail_after(timeout):
            gc.collect()
            rss["before"] = proc_rss_bytes()
            await _idle(server, count, measure)

    async def tracemalloc_pass() -> None:
        async def measure() -> None:
            gc.collect()
            snapshots.append(tracemalloc.take_snapshot())

        with trio.fail_after(timeout):
            gc.collect()
            snapshots.append(tracemalloc.take_snapshot())
            await _idle(server, count, measure)

    trio.run(rss_pass)
    tracemalloc.start()
    try:
        trio.run(tracemalloc_pass)
    finally:
        tracemalloc.stop()
    before, after = snapshots
    groups: dict[str, int] = {}
    for stat in after.compare_to(before, "filename"):
        name = _group(stat.traceback[0].filename)
        groups[name] = groups.get(name, 0) + stat.size_diff
    total = sum(groups.values())
    return {
        "server": server,
        "N": count,
        "traced_bytes_per_connection": total / count,
        "rss_bytes_per_connection": (rss["after"] - rss["before"]) / count,
        **{f"traced[{name}]": size / count for name, size in sorted(groups.items())},
    }
