"""The server process of the loopback benchmarks.

Modes (``--mode``):

``hub``
    chatcore's :class:`~chatcore.Hub` on chatcore's trio-websocket transport.
    Clients join the room; messages go out through ``hub.publish`` (server
    side) or a client's ``publish`` (rate limit raised out of the way).
``core``
    chatcore's connection core with a trivial handler: the server offers each
    encoded message to every connection (``Connection.offer``), no hub.
``raw``
    trio-websocket *without* chatcore, written the way a broadcast server
    usually is: one task per connection sends from a per-connection memory
    channel, ``await ws.send_message(text)`` once per message per connection.

It prints ``PORT <n>`` once listening on 127.0.0.1 (port 0), then obeys
commands on stdin, one per line, answering on stdout::

    PUBLISH burst|paced K  ->  PUBLISHED <seconds>   (after the publishing loop)
    CPU                    ->  CPU <process_time>
    PROFILE start          ->  PROFILE ok            (cProfile on)
    PROFILE stop PATH      ->  PROFILE ok            (cProfile off, stats dumped)
    GC                     ->  GC {"seconds":…, "collections":[…], …}
    STATS                  ->  STATS {"connections":…, "frames":…, "dropped":…}

and exits at end of input (or on SIGTERM).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import logging
import os
import sys
import time
from typing import Any

import trio
import trio_websocket
from _harness import DATA, ROOM, GcTimer, Publisher, message_text, raise_nofile_limit

from chatcore import Config, Connection, ConnectionHandler, Hub, HubConfig, encode

#: Heartbeats off for the measurement window (an idle client answers no ping).
CONFIG = Config(heartbeat_interval=3600.0, heartbeat_timeout=3600.0)
HELLO = json.dumps({"type": "hello"}, separators=(",", ":"))


class App(Publisher):
    """What the control loop needs from each mode."""

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError


async def _serve_chatcore(handler: ConnectionHandler, task_status: trio.TaskStatus[int]) -> None:
    from chatcore import serve_websocket

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve_websocket(
                handler, "127.0.0.1", 0, config=CONFIG, task_status=task_status
            )
        )
        task_status.started(listeners[0].socket.getsockname()[1])


class HubApp(App):
    def __init__(self) -> None:
        self.hub = Hub(
            config=HubConfig(publish_rate=1e9, publish_burst=1_000_000_000),
            connection_config=CONFIG,
        )

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        await _serve_chatcore(self.hub, task_status)

    async def burst(self, first: int, count: int) -> None:
        # hub.publish is async (it goes through the backplane, which yields):
        # K concurrent publishers land in the same scheduler pass.
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(self.hub.publish, ROOM, DATA)

    async def paced(self, first: int, count: int) -> None:
        for _ in range(count):
            await self.hub.publish(ROOM, DATA)

    def stats(self) -> dict[str, Any]:
        connections = [s.connection.statistics() for s in self.hub.sessions()]
        hub = self.hub.statistics()
        return {
            "connections": len(connections),
            "frames": sum(c.frames_sent for c in connections),
            "dropped": hub.dropped + hub.slow_consumer_disconnects,
        }


class CoreApp(App, ConnectionHandler):
    """A trivial handler: register, say hello, read until closed."""

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

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        await _serve_chatcore(self, task_status)

    def publish(self, offset: int) -> None:
        message = encode(json.loads(message_text(offset)))
        for connection in self.connections:
            connection.offer(message)

    def stats(self) -> dict[str, Any]:
        connections = [c.statistics() for c in self.connections]
        return {
            "connections": len(connections),
            "frames": sum(c.frames_sent for c in connections),
            "dropped": sum(c.dropped for c in connections),
        }


class RawApp(App):
    """The naive trio-websocket broadcast server (no chatcore)."""

    QUEUE = 16_384  # per-connection channel bound (chatcore's default outbox count)

    def __init__(self) -> None:
        self.channels: set[trio.MemorySendChannel[str]] = set()
        self.offset = 0
        self.frames = 0
        self.dropped = 0

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, self.handler, "127.0.0.1", 0, None
            )
            task_status.started(server.port)

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        try:
            ws = await request.accept()
        except trio_websocket.ConnectionClosed:
            return
        send, receive = trio.open_memory_channel[str](self.QUEUE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.writer, ws, receive)
            self.channels.add(send)
            send.send_nowait(HELLO)
            try:
                while True:
                    text = await ws.get_message()
                    message = json.loads(text)
                    if message.get("type") == "publish":
                        self.offset += 1
                        self.broadcast(message_text(self.offset, message["data"]))
            except trio_websocket.ConnectionClosed:
                pass
            finally:
                self.channels.discard(send)
                nursery.cancel_scope.cancel()

    async def writer(
        self, ws: trio_websocket.WebSocketConnection, receive: trio.MemoryReceiveChannel[str]
    ) -> None:
        try:
            async for text in receive:
                await ws.send_message(text)
                self.frames += 1
        except trio_websocket.ConnectionClosed:
            pass

    def broadcast(self, text: str) -> None:
        for channel in self.channels:
            try:
                channel.send_nowait(text)
            except trio.WouldBlock:
                self.dropped += 1

    def publish(self, offset: int) -> None:
        self.offset = offset
        self.broadcast(message_text(offset))

    def stats(self) -> dict[str, Any]:
        return {"connections": len(self.channels), "frames": self.frames, "dropped": self.dropped}


class IdleTimer(trio.abc.Instrument):
    """Wall time Trio spends blocked waiting for I/O with nothing to run."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.waits = 0
        self._start = 0.0

    def before_io_wait(self, timeout: float) -> None:
        self._start = time.perf_counter() if timeout > 0 else 0.0

    def after_io_wait(self, timeout: float) -> None:
        if self._start:
            self.seconds += time.perf_counter() - self._start
            self.waits += 1


GC_TIMER = GcTimer()
IDLE_TIMER = IdleTimer()
gc.callbacks.append(GC_TIMER)


def _answer(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def control(app: App) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    published = 0
    profiler: cProfile.Profile | None = None
    async with trio.open_nursery() as nursery:
        while True:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                nursery.cancel_scope.cancel()
                return
            buffer += chunk
            while b"\n" in buffer:
                raw, _, buffer = buffer.partition(b"\n")
                words = raw.decode().split()
                if not words:
                    continue
                if words[0] == "CPU":
                    _answer(f"CPU {time.process_time():.9f}")
                elif words[0] == "GC":
                    _answer(
                        "GC "
                        + json.dumps(
                            {
                                **GC_TIMER.snapshot(),
                                "idle_s": IDLE_TIMER.seconds,
                                "idle_waits": IDLE_TIMER.waits,
                            }
                        )
                    )
                elif words[0] == "STATS":
                    _answer("STATS " + json.dumps(app.stats()))
                elif words[0] == "PROFILE":  # PROFILE start | PROFILE stop PATH
                    if words[1] == "start":
                        profiler = cProfile.Profile()
                        profiler.enable()
                    elif profiler is not None:
                        profiler.disable()
                        profiler.dump_stats(words[2])
                        profiler = None
                    _answer("PROFILE ok")
                elif words[0] == "PUBLISH":
                    count = int(words[2])
                    nursery.start_soon(publish, app, words[1], published, count)
                    published += count
                else:
                    _answer(f"ERROR unknown command {raw!r}")


async def publish(app: App, how: str, first: int, count: int) -> None:
    """Publish ``count`` messages: in one scheduler pass (``burst``) or one per pass."""
    start = time.perf_counter()
    if how == "burst":
        await app.burst(first + 1, count)
    else:
        await app.paced(first + 1, count)
    _answer(f"PUBLISHED {time.perf_counter() - start:.6f}")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=("hub", "core", "raw"), required=True)
    p.add_argument(
        "--gc-threshold",
        default="",
        help="gc.set_threshold arguments, comma-separated (default: Python's own)",
    )
    args = p.parse_args()
    if args.gc_threshold:
        gc.set_threshold(*(int(t) for t in args.gc_threshold.split(",")))
    raise_nofile_limit()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app: App = {"hub": HubApp, "core": CoreApp, "raw": RawApp}[args.mode]()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.serve)
        _answer(f"PORT {port}")
        await control(app)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, instruments=[IDLE_TIMER])
