"""The server process of ``hypercorn_vs_raw.py``: an ASGI app on hypercorn's trio worker.

Apps (``--app``):

``chatcore``
    What ``chatcore serve`` runs for a hub, set up the way
    :func:`chatcore._serve.run_until_shutdown` does it: a
    :class:`~chatcore.Hub` behind :class:`~chatcore.asgi.ASGIApp`, the
    listening socket from :func:`~chatcore._serve.create_listening_socket`
    (``TCP_USER_TIMEOUT``), permessage-deflate declined
    (:func:`~chatcore._serve.set_compression`), hypercorn configured by
    :func:`~chatcore._serve.hypercorn_config` and run by
    :func:`~chatcore._serve.serve`, then :func:`~chatcore._serve.tune_gc`
    once listening (unless ``--no-gc-tuning``). Two settings differ from the
    defaults, both out of the measurement's way: the hub's publish rate limit
    is raised (one client publishes everything) and heartbeats are 1 h apart
    (the bench clients answer no ping). No access log (handshakes are outside
    the measured window anyway).
``raw``
    A raw ASGI application on plain ``hypercorn.trio.serve`` with hypercorn's
    default configuration (except a listen backlog of 1024, as chatcore's
    socket has, so 1,000 simultaneous handshakes are not dropped and
    retried) and Python's default GC thresholds (``--gc-tuning`` applies
    chatcore's tuning for comparison). It is the naive broadcast: a dict of
    connections, each with a bounded memory channel drained by its own
    writer task doing one ``await send({"type": "websocket.send", "text":
    ...})`` per message; a broadcast JSON-encodes the message once and
    ``send_nowait``\\s it into every channel.

Both send the same ~100-byte ``message`` lines (``_harness.message_text``), so
the clients verify offsets the same way. The control protocol on stdin/stdout
is ``_server.py``'s (``PORT``, then ``CPU``, ``GC``, ``STATS``, ``PROFILE``,
``PUBLISH burst|paced K``); the process exits at end of input (cancelling
hypercorn, which closes every connection) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from typing import Any, cast

import trio
from _harness import DATA, ROOM, message_text, raise_nofile_limit
from _server import HELLO, IDLE_TIMER, App, control

from chatcore import Config, Hub, HubConfig
from chatcore import _serve as serve_module
from chatcore.asgi import ASGIApp

#: Heartbeats out of the way (the bench clients answer no ping); the rest is Config().
CONFIG = Config(heartbeat_interval=3600.0, heartbeat_timeout=3600.0)


class ChatcoreApp(App):
    """The hub behind ASGIApp, served like ``chatcore serve`` serves it."""

    def __init__(self, gc_tuning: bool) -> None:
        self.hub = Hub(
            config=HubConfig(publish_rate=1e9, publish_burst=1_000_000_000),
            connection_config=CONFIG,
        )
        self.app = ASGIApp(self.hub)
        self.gc_tuning = gc_tuning

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        serve_module.set_compression(False)
        sock = serve_module.create_listening_socket("127.0.0.1", 0)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    serve_module.serve, self.app, [sock], access_log=False, signals=()
                )
            )
            if self.gc_tuning:
                serve_module.tune_gc()
            task_status.started(sock.getsockname()[1])

    async def burst(self, first: int, count: int) -> None:
        # hub.publish is async: K concurrent publishers land in one scheduler pass.
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


class RawApp(App):
    """The naive ASGI broadcast server (no chatcore) on plain hypercorn."""

    QUEUE = 16_384  # per-connection channel bound (chatcore's default outbox count)

    def __init__(self, gc_tuning: bool) -> None:
        self.connections: dict[int, trio.MemorySendChannel[str]] = {}
        self.offset = 0
        self.frames = 0
        self.dropped = 0
        self.gc_tuning = gc_tuning

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        from hypercorn.config import Config as HypercornConfig
        from hypercorn.trio import serve

        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.backlog = 1024
        config.loglevel = "WARNING"  # not the "Running on ..." line
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, cast(Any, self), config))
            if self.gc_tuning:
                serve_module.tune_gc()
            task_status.started(int(binds[0].rsplit(":", 1)[1]))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self.websocket(receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async def websocket(self, receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        channel, outbox = trio.open_memory_channel[str](self.QUEUE)
        key = id(channel)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.writer, send, outbox)
            self.connections[key] = channel
            channel.send_nowait(HELLO)
            try:
                while True:
                    event = await receive()
                    if event["type"] == "websocket.disconnect":
                        break
                    text = event.get("text")
                    if text:
                        message = json.loads(text)
                        if message.get("type") == "publish":
                            self.offset += 1
                            self.broadcast(message_text(self.offset, message["data"]))
            finally:
                del self.connections[key]
                nursery.cancel_scope.cancel()

    async def writer(self, send: Any, outbox: trio.MemoryReceiveChannel[str]) -> None:
        async for text in outbox:
            await send({"type": "websocket.send", "text": text})
            self.frames += 1

    def broadcast(self, text: str) -> None:
        for channel in self.connections.values():
            try:
                channel.send_nowait(text)
            except trio.WouldBlock:
                self.dropped += 1

    def publish(self, offset: int) -> None:
        self.offset = offset
        self.broadcast(message_text(offset))

    def stats(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "frames": self.frames,
            "dropped": self.dropped,
        }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--app", choices=("chatcore", "raw"), required=True)
    p.add_argument(
        "--gc-tuning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="chatcore serve's gc.freeze + thresholds (default: on for chatcore, off for raw)",
    )
    args = p.parse_args()
    gc_tuning = args.gc_tuning if args.gc_tuning is not None else args.app == "chatcore"
    raise_nofile_limit()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app: App = (ChatcoreApp if args.app == "chatcore" else RawApp)(gc_tuning)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.serve)
        sys.stdout.write(f"PORT {port}\n")
        sys.stdout.flush()
        await control(app)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, instruments=[IDLE_TIMER])
