"""The benchmark servers other than ``chatcore serve``, one per process.

``python bench/_servers.py KIND`` listens on 127.0.0.1 (port 0), prints
``PORT <n>`` and serves until it is signalled. Every kind speaks the same
minimal protocol, so the same clients drive them all: the server sends
``{"type":"hello"}``; a client sends ``join`` (answered with a ``reply``) and
``publish`` messages; each publish becomes a ``message`` line with the next
offset, sent to every member. The lines are byte for byte what chatcore's hub
sends (:func:`message_text`).

Kinds:

``chatcore-trio-ws``
    chatcore's :class:`~chatcore.Hub` (``chatcore_app.make_hub``) on
    :func:`chatcore.serve_websocket`, the trio-websocket transport.
``websockets``
    websockets' asyncio server; a publish goes out with
    ``websockets.asyncio.server.broadcast()``.
``raw-trio-ws``
    trio-websocket without chatcore, written the way a broadcast server usually
    is: a bounded memory channel and a writer task per connection, one
    ``send_message`` per message.
``raw-hypercorn``
    a raw ASGI app on hypercorn's trio worker, the same loop with one
    ``websocket.send`` per message.

``websockets`` and ``raw-hypercorn`` also answer ``GET /burst?count=K``: the
server publishes K messages in one go (what ``chatcore_app`` does for
``chatcore serve``).
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

ROOM = "bench"
DATA = "x" * 16
HELLO = json.dumps({"type": "hello"}, separators=(",", ":"))
REPLY = json.dumps({"type": "reply", "ref": "j", "ok": True}, separators=(",", ":"))
#: Per-connection queue bound of the raw servers (chatcore's default outbox count).
QUEUE = 16_384


def message_text(offset: int, data: str) -> str:
    """A room message line, as chatcore's hub encodes it (key order included)."""
    return json.dumps(
        {
            "type": "message",
            "room": ROOM,
            "offset": offset,
            "epoch": "00000000",
            "from": None,
            "data": data,
        },
        separators=(",", ":"),
    )


def burst_count(target: str) -> int | None:
    """K of a ``/burst?count=K`` request target, else ``None``."""
    parts = urlsplit(target)
    if parts.path != "/burst":
        return None
    return int(parse_qs(parts.query).get("count", ["1"])[0])


class Broadcast:
    """The raw servers' fan-out: one bounded channel per member, never blocking."""

    def __init__(self) -> None:
        import trio

        self.members: dict[int, trio.MemorySendChannel[str]] = {}
        self.offset = 0

    def publish(self, data: str) -> None:
        import trio

        self.offset += 1
        text = message_text(self.offset, data)
        for channel in self.members.values():
            try:
                channel.send_nowait(text)
            except trio.WouldBlock:
                pass  # dropped: the receiver sees a gap

    def on_text(self, text: str, key: int, channel: Any) -> None:
        message = json.loads(text)
        kind = message.get("type")
        if kind == "join":
            self.members[key] = channel
            channel.send_nowait(REPLY)
        elif kind == "publish":
            self.publish(message["data"])


async def serve_chatcore_trio_ws() -> None:
    import trio
    from chatcore_app import make_hub

    from chatcore import Config, serve_websocket

    hub = make_hub()
    config = Config(heartbeat_interval=3600.0, heartbeat_timeout=3600.0)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(serve_websocket, hub, "127.0.0.1", 0, config=config)
        )
        print(f"PORT {listeners[0].socket.getsockname()[1]}", flush=True)


async def serve_raw_trio_ws() -> None:
    import trio
    import trio_websocket

    broadcast = Broadcast()

    async def writer(ws: Any, outbox: trio.MemoryReceiveChannel[str]) -> None:
        async for text in outbox:
            await ws.send_message(text)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        try:
            ws = await request.accept()
        except trio_websocket.ConnectionClosed:
            return
        channel, outbox = trio.open_memory_channel[str](QUEUE)
        key = id(channel)
        channel.send_nowait(HELLO)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, ws, outbox)
                try:
                    while True:
                        broadcast.on_text(await ws.get_message(), key, channel)
                finally:
                    broadcast.members.pop(key, None)
                    nursery.cancel_scope.cancel()
        except* trio_websocket.ConnectionClosed:
            pass  # the clients reset their connections at the end of a scenario

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(trio_websocket.serve_websocket, max_message_size=1 << 20),
            handler,
            "127.0.0.1",
            0,
            None,
        )
        print(f"PORT {server.port}", flush=True)


async def serve_raw_hypercorn() -> None:
    import trio
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    broadcast = Broadcast()

    async def writer(send: Any, outbox: trio.MemoryReceiveChannel[str]) -> None:
        async for text in outbox:
            await send({"type": "websocket.send", "text": text})

    async def websocket(receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        channel, outbox = trio.open_memory_channel[str](QUEUE)
        key = id(channel)
        channel.send_nowait(HELLO)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, send, outbox)
            try:
                while True:
                    event = await receive()
                    if event["type"] == "websocket.disconnect":
                        break
                    if event.get("text"):
                        broadcast.on_text(event["text"], key, channel)
            finally:
                broadcast.members.pop(key, None)
                nursery.cancel_scope.cancel()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await websocket(receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            target = scope["path"] + "?" + scope["query_string"].decode()
            count = burst_count(target)
            for _ in range(count or 0):
                broadcast.publish(DATA)
            status = 404 if count is None else 200
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"ok\n"})

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.backlog = 1024  # as chatcore serve's socket: 1,000 handshakes at once
    config.loglevel = "WARNING"
    config.websocket_max_message_size = 1 << 20
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, cast(Any, app), config))
        print(f"PORT {binds[0].rsplit(':', 1)[1]}", flush=True)


async def serve_websockets() -> None:
    import asyncio

    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.exceptions import ConnectionClosed
    from websockets.http11 import Request, Response

    members: set[ServerConnection] = set()
    offset = 0

    def publish(data: str) -> None:
        nonlocal offset
        offset += 1
        broadcast(members, message_text(offset, data))

    async def handler(ws: ServerConnection) -> None:
        await ws.send(HELLO)
        try:
            async for text in ws:
                message = json.loads(text)
                if message.get("type") == "join":
                    members.add(ws)
                    await ws.send(REPLY)
                elif message.get("type") == "publish":
                    publish(message["data"])
        except ConnectionClosed:
            pass  # the clients reset their connections at the end of a scenario
        finally:
            members.discard(ws)

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        count = burst_count(request.path)
        if count is None:
            return None
        for _ in range(count):
            publish(DATA)
        return connection.respond(200, "ok\n")

    async with serve(
        handler,
        "127.0.0.1",
        0,
        backlog=1024,
        compression=None,
        ping_interval=None,
        max_size=1 << 20,
        process_request=process_request,
    ) as server:
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()  # until signalled


KINDS = {
    "chatcore-trio-ws": serve_chatcore_trio_ws,
    "websockets": serve_websockets,
    "raw-trio-ws": serve_raw_trio_ws,
    "raw-hypercorn": serve_raw_hypercorn,
}


def main() -> None:
    kind = sys.argv[1]
    if kind == "websockets":
        import asyncio

        asyncio.run(serve_websockets())
    else:
        import trio

        trio.run(KINDS[kind])


if __name__ == "__main__":
    main()
