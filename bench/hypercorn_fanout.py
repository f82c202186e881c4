"""Fan-out through ``chatcore serve`` (hypercorn) with and without permessage-deflate.

The question it answers: should ``chatcore serve`` accept permessage-deflate,
which every browser offers? It starts ``chatcore serve`` (a
:class:`~chatcore.Hub` behind :class:`~chatcore.asgi.ASGIApp`) once per setting,
connects ``--receivers`` WebSocket clients that all offer permessage-deflate
(like browsers) and join one room, then a publisher sends ``--messages``
chat-like messages (English-ish text, about 100 bytes encoded) and every
receiver must get all of them, in order. Measured on the server process:

* CPU per delivered message (``/proc/<pid>/stat``, utime + stime), and wall time;
* resident memory per connection, idle (after the handshakes) and after the
  messages (zlib contexts are created on first use and kept: context takeover);
* bytes on the wire per delivered message (what the receivers read).

Two publishing modes: ``burst`` (as fast as the publisher can; the server
batches what queues up into one frame per receiver) and ``paced`` (one message
every ``--interval`` seconds: one message per frame, the common chat case).

Usage::

    .venv/bin/python bench/hypercorn_fanout.py                  # both settings, both modes
    .venv/bin/python bench/hypercorn_fanout.py --receivers 200 --messages 100 --rounds 1

The server is ``chatcore serve chatcore_app:app`` started by the shared
harness (``_harness.start_server``); everything runs on 127.0.0.1 and the
server is stopped by PID. For chatcore side by side with other servers, see
``fanout.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import _harness as h
import trio
from chatcore_app import ROOM
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

_WORDS = [
    *("the", "a", "to", "and", "of", "you", "it", "is", "that", "in", "for", "on", "this"),
    *("we", "be", "have", "are", "with", "i", "not", "at", "can", "just", "so", "meeting"),
    *("deploy", "today", "tomorrow", "build", "review", "ship", "ok", "thanks", "yes", "no"),
    *("please", "check", "the", "logs", "again", "after", "lunch", "branch", "merge"),
    *("fixed", "broken", "test", "green"),
]


def chat_text(rng: random.Random) -> str:
    """A chat-like line of 8-16 words."""
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16)))


class Client:
    """A minimal WebSocket client: websockets' sans-I/O protocol over a trio stream."""

    def __init__(self, stream: trio.SocketStream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.lines: list[str] = []
        self.wire_bytes = 0
        self.response: Response | None = None

    @classmethod
    async def connect(cls, port: int, *, compression: bool = True) -> Client:
        protocol = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/ws"),
            extensions=[ClientPerMessageDeflateFactory()] if compression else None,
            max_size=None,
        )
        client = cls(await trio.open_tcp_stream("127.0.0.1", port), protocol)
        protocol.send_request(protocol.connect())
        await client.flush()
        while client.response is None:
            await client.pump()
        assert client.response.status_code == 101, client.response
        return client

    async def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                await self.stream.send_all(data)

    async def pump(self) -> None:
        data = await self.stream.receive_some(262_144)
        if not data:
            raise EOFError("server closed the connection")
        self.wire_bytes += len(data)
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                self.response = event
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.lines.extend(event.data.decode().split("\n"))
        await self.flush()

    async def receive(self) -> dict[str, Any]:
        while not self.lines:
            await self.pump()
        return json.loads(self.lines.pop(0))

    async def send(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        await self.flush()

    async def expect(self, type: str) -> dict[str, Any]:
        while True:
            message = await self.receive()
            if message["type"] == "ping":
                await self.send({"type": "pong"})
            elif message["type"] == type:
                return message


async def open_room(port: int, receivers: int) -> tuple[Client, list[Client]]:
    clients: list[Client] = []

    async def one() -> None:
        client = await Client.connect(port)
        await client.expect("hello")
        await client.send({"type": "join", "room": ROOM, "ref": 1})
        await client.expect("reply")
        clients.append(client)

    for start in range(0, receivers, 100):  # stay under the listen backlog
        async with trio.open_nursery() as nursery:
            for _ in range(min(100, receivers - start)):
                nursery.start_soon(one)
    publisher = await Client.connect(port)
    await publisher.expect("hello")
    await publisher.send({"type": "join", "room": ROOM, "ref": 1})
    await publisher.expect("reply")
    return publisher, clients


async def run_round(
    port: int, pid: int, *, receivers: int, messages: int, mode: str, interval: float
) -> dict[str, Any]:
    rss_before = h.proc_rss_bytes(pid)
    publisher, clients = await open_room(port, receivers)
    await trio.sleep(0.2)
    rss_idle = h.proc_rss_bytes(pid)
    negotiated = sum(1 for c in clients if c.protocol.extensions)
    rng = random.Random(7)
    texts = [chat_text(rng) for _ in range(messages)]
    for client in clients:
        client.wire_bytes = 0
    cpu0, t0 = h.proc_cpu_seconds(pid), time.perf_counter()

    async def receive_all(client: Client) -> None:
        offsets = []
        while len(offsets) < messages:
            message = await client.receive()
            if message["type"] == "message":
                offsets.append(message["offset"])
            elif message["type"] == "ping":
                await client.send({"type": "pong"})
        assert offsets == list(range(offsets[0], offsets[0] + messages)), "lost or reordered"

    async def publish() -> None:
        for index, text in enumerate(texts):
            await publisher.send({"type": "publish", "room": ROOM, "data": {"text": text}})
            if mode == "paced":
                await trio.sleep(interval)
            elif index % 50 == 49:
                await trio.lowlevel.checkpoint()

    async def drain_publisher() -> None:
        while True:
            await publisher.pump()
            publisher.lines.clear()

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_publisher)
            async with trio.open_nursery() as receiving:
                for client in clients:
                    receiving.start_soon(receive_all, client)
                await publish()
            nursery.cancel_scope.cancel()
    wall = time.perf_counter() - t0
    cpu = h.proc_cpu_seconds(pid) - cpu0
    rss_after = h.proc_rss_bytes(pid)
    delivered = receivers * messages
    wire = sum(c.wire_bytes for c in clients)
    for client in [publisher, *clients]:
        await client.stream.aclose()
    return {
        "mode": mode,
        "receivers": receivers,
        "messages": messages,
        "negotiated": negotiated,
        "cpu_us_per_delivery": 1e6 * cpu / delivered,
        "wall_s": wall,
        "wire_bytes_per_delivery": wire / delivered,
        "rss_idle_kib_per_conn": (rss_idle - rss_before) / 1024 / (receivers + 1),
        "rss_after_kib_per_conn": (rss_after - rss_before) / 1024 / (receivers + 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--receivers", type=int, default=500)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.02, help="paced mode: seconds")
    parser.add_argument("--rounds", type=int, default=3, help="median of this many rounds")
    parser.add_argument("--modes", default="burst,paced")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    h.raise_nofile_limit()
    rows: list[dict[str, Any]] = []
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for mode in args.modes.split(","):
        results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        # Alternate the settings round by round, so a neighbour's load skews both alike.
        for _ in range(args.rounds):
            for compression in (False, True):
                setting = "--compression" if compression else "--no-compression"
                with h.running_server("chatcore-serve", serve_args=[setting]) as server:
                    results[compression].append(
                        trio.run(
                            functools.partial(
                                run_round,
                                server.port,
                                server.process.pid,
                                receivers=args.receivers,
                                messages=args.messages,
                                mode=mode,
                                interval=args.interval,
                            )
                        )
                    )
        for compression in (False, True):
            runs = sorted(results[compression], key=lambda r: r["cpu_us_per_delivery"])
            row = {"compression": compression, **runs[len(runs) // 2]}
            rows.append(row)
            print(
                f"{mode:6} compression={'on ' if compression else 'off'} "
                f"negotiated={row['negotiated']}/{row['receivers']} "
                f"cpu/delivery={row['cpu_us_per_delivery']:6.1f} us "
                f"wall={row['wall_s']:5.2f} s "
                f"wire/delivery={row['wire_bytes_per_delivery']:6.1f} B "
                f"rss/conn idle={row['rss_idle_kib_per_conn']:6.1f} KiB "
                f"after={row['rss_after_kib_per_conn']:6.1f} KiB",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
