"""Connection churn: a closed connection leaves nothing for the cycle collector.

``chatcore serve`` (in process, on 127.0.0.1, either engine) serves
connections that are opened, joined to a room and then ended: reset (RST),
closed with a close frame, or plain HTTP requests. The cyclic garbage
collector is off meanwhile; once the server's tasks for those connections
have ended, the objects created since then that a ``gc.collect()`` frees
(watched through weak references) are what the connections left in
reference cycles. ``gc.collect()``'s own count would not do: it misses a
cycle that a generator's finalizer breaks, as wsproto's parser's does. The
clients are blocking sockets in a worker thread, so they add no cycles of
their own. The same churn against hypercorn's own ``TCPServer`` shows what
the measurement catches (see ``chatcore/_hypercorn_tcp.py`` and
``chatcore/_frame_parser.py``).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import logging
import os
import socket
import struct
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from types import SimpleNamespace
from typing import Any

import hypercorn.trio.run
import pytest
import trio
import trio.testing
from hypercorn.trio.tcp_server import TCPServer
from test_hypercorn import running_hypercorn
from wsproto.frame_protocol import FrameProtocol, Opcode

from chatcore import Hub, HubConfig
from chatcore._frame_parser import untie_parser
from chatcore._hypercorn_tcp import ReleasingTCPServer, release_closed_connections
from chatcore._lean_serve import serve_lean
from chatcore._serve import _release_closed_connections, create_listening_socket, serve
from chatcore.asgi import ASGIApp

pytestmark = pytest.mark.slow

RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST
#: Seconds any blocking client call may take.
CLIENT_TIMEOUT = 5.0


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (RFC 6455 section 5.2), payload under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65_536)
        if not chunk:
            raise AssertionError(f"the server closed before {marker!r}: {data!r}")
        data += chunk
    return data


def joined(port: int, count: int) -> list[socket.socket]:
    """``count`` WebSocket connections, each greeted and joined to room ``r``."""
    join = masked_frame(0x1, json.dumps({"type": "join", "room": "r", "ref": "j"}).encode())
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        socks.append(sock)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert read_until(sock, b'"hello"').startswith(b"HTTP/1.1 101 ")
        sock.sendall(join)
        assert b'"status":"ok"' in read_until(sock, b'"reply"')
    return socks


def reset(port: int, count: int) -> None:
    for sock in joined(port, count):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        sock.close()


def close_frame(port: int, count: int) -> None:
    socks = joined(port, count)
    for sock in socks:
        sock.sendall(masked_frame(0x8, (1000).to_bytes(2, "big")))
    for sock in socks:
        with sock:
            while sock.recv(65_536):  # the server's close frame, then the end
                pass


def http_requests(port: int, count: int) -> None:
    for target in ("/healthz", "/nowhere") * (count // 2):
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := sock.recv(65_536):
                response += chunk
            assert response.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 404 ")), response[:40]


CHURNS: dict[str, Callable[[int, int], None]] = {
    "reset": reset,
    "close_frame": close_frame,
    "http": http_requests,
}


def bound_server_class() -> object:
    """The class hypercorn's worker serves each connection with."""
    server_class: object = getattr(hypercorn.trio.run, "TCPServer")  # noqa: B009 (not exported)
    return server_class


def make_app() -> ASGIApp:
    return ASGIApp(Hub(config=HubConfig(max_connections_per_user=1_000)))


@asynccontextmanager
async def chatcore_serving(app: ASGIApp, engine: str = "hypercorn") -> AsyncIterator[int]:
    """``chatcore serve``'s runtime in process (either engine); yields its port."""
    sock = create_listening_socket("127.0.0.1", 0, tcp_user_timeout=2.0)
    run = serve_lean if engine == "lean" else serve
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(run, app, [sock], signals=(), access_log=False, drain_grace=1.0)
            )
            yield sock.getsockname()[1]
            server.request_shutdown()
    finally:
        sock.close()


async def freed_by_the_collector(churn: Callable[[int, int], None], port: int, count: int) -> int:
    """Run ``churn`` with the collector off; how many of the objects it left
    behind (those that take a weak reference) only a collection then frees."""
    await trio.to_thread.run_sync(churn, port, 2)  # first-use caches, the hub's shared tasks
    await trio.testing.wait_all_tasks_blocked(0.05)
    baseline = trio.lowlevel.current_statistics().tasks_living
    gc.collect()
    gc.disable()
    try:
        existing = gc.get_objects()  # held, so no new object takes one of their ids
        known = {id(obj) for obj in existing}
        await trio.to_thread.run_sync(churn, port, count)
        with trio.fail_after(10):
            # The server notices the ends through the kernel: wait until every
            # task it ran for these connections has ended.
            while trio.lowlevel.current_statistics().tasks_living > baseline:
                await trio.testing.wait_all_tasks_blocked(0.01)
        new = []
        for obj in gc.get_objects():
            if id(obj) not in known:
                with contextlib.suppress(TypeError):  # lists, dicts, tuples...
                    new.append(weakref.ref(obj))
        del existing, obj
        alive = sum(ref() is not None for ref in new)
        gc.collect()
        return alive - sum(ref() is not None for ref in new)
    finally:
        gc.enable()


@pytest.mark.parametrize("engine", ["hypercorn", "lean"])
@pytest.mark.parametrize("how", sorted(CHURNS))
async def test_a_closed_connection_leaves_no_cycles_through_chatcore_serve(
    engine: str, how: str
) -> None:
    previous = release_closed_connections(False)  # serve() itself must enable it
    try:
        with trio.fail_after(60):
            async with chatcore_serving(make_app(), engine) as port:
                if engine == "hypercorn":
                    assert bound_server_class() is ReleasingTCPServer
                left = [await freed_by_the_collector(CHURNS[how], port, n) for n in (10, 40)]
    finally:
        release_closed_connections(previous)
    assert left == [0, 0]


async def test_hypercorns_own_server_leaves_cycles_the_measurement_sees() -> None:
    """The control: what ``chatcore serve`` avoids (about 25 objects per
    connection that take a weak reference, 30 in all)."""
    previous = release_closed_connections(False)
    try:
        with trio.fail_after(60):
            async with running_hypercorn(make_app()) as running:
                left = [await freed_by_the_collector(reset, running.port, n) for n in (10, 40)]
    finally:
        release_closed_connections(previous)
    assert left[0] >= 20 * 10
    assert left[1] >= 20 * 40


async def test_a_connection_is_freed_the_moment_it_ends() -> None:
    """While a connection is open its server holds its protocol; once it has
    ended, reference counting alone frees the server."""
    with trio.fail_after(30):
        async with chatcore_serving(make_app()) as port:
            (sock,) = await trio.to_thread.run_sync(joined, port, 1)
            with sock:
                (server,) = [o for o in gc.get_objects() if isinstance(o, ReleasingTCPServer)]
                assert repr(server).endswith(" serving>")
                freed = weakref.ref(server)
                del server
                gc.disable()
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                    sock.close()
                    while freed() is not None:
                        await trio.testing.wait_all_tasks_blocked(0.01)
                finally:
                    gc.enable()


def test_repr_says_whether_it_serves() -> None:
    server = ReleasingTCPServer(*[None] * 5)  # type: ignore[arg-type]
    assert repr(server) == f"<ReleasingTCPServer {id(server):#x} closed>"


def test_release_refuses_when_hypercorn_moves_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """hypercorn 0.18 looks ``TCPServer`` up in ``hypercorn.trio.run`` each time
    it starts serving; if that changes, chatcore says so instead of guessing."""
    module = hypercorn.trio.run
    assert "TCPServer" in module.worker_serve.__code__.co_names  # the name 0.18 uses
    assert bound_server_class() in (TCPServer, ReleasingTCPServer)
    release_closed_connections(True)
    assert release_closed_connections(True) is True
    assert release_closed_connections(False) is True
    assert bound_server_class() is TCPServer
    assert release_closed_connections(True) is False
    assert bound_server_class() is ReleasingTCPServer

    monkeypatch.setattr(module, "TCPServer", object)
    with pytest.raises(RuntimeError, match="free closed connections"):
        release_closed_connections(True)
    assert bound_server_class() is object  # nothing changed
    monkeypatch.delattr(module, "TCPServer")
    with pytest.raises(RuntimeError):
        release_closed_connections(True)
    monkeypatch.setattr(module, "TCPServer", TCPServer, raising=False)

    async def moved(*args: Any) -> None:  # a worker that no longer uses the name
        SimpleNamespace(args=args)

    monkeypatch.setattr(module, "worker_serve", moved)
    with pytest.raises(RuntimeError):
        release_closed_connections(True)
    assert bound_server_class() is TCPServer


def test_serve_warns_and_goes_on_when_it_cannot_release(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", object)
    with caplog.at_level(logging.WARNING, "chatcore.serve"):
        _release_closed_connections()
    assert [record.getMessage() for record in caplog.records] == [
        "cannot make this hypercorn version free closed connections at once; "
        "closed connections are freed by the garbage collector"
    ]


# -- wsproto's parser ---------------------------------------------------------------


def parsed(proto: FrameProtocol, data: bytes) -> list[tuple[Opcode, object]]:
    proto.receive_bytes(data)
    return [(frame.opcode, frame.payload) for frame in proto.received_frames()]


def freed_at_once(holder: list[FrameProtocol]) -> bool:
    """Whether dropping the last reference (``holder``'s) frees the parser, the collector off."""
    ref = weakref.ref(holder[0])
    gc.disable()
    try:
        holder.clear()
        return ref() is None
    finally:
        gc.enable()
        gc.collect()


def test_wsprotos_parser_is_a_reference_cycle_and_an_untied_one_is_not() -> None:
    assert not freed_at_once([FrameProtocol(False, [])])  # wsproto 1.3: what untie_parser fixes
    assert freed_at_once([untie_parser(FrameProtocol(False, []))])


def test_an_untied_parser_parses_the_same_frames() -> None:
    data = (
        masked_frame(0x1, b"hello")
        + masked_frame(0x9, b"ping")
        + masked_frame(0x8, (1000).to_bytes(2, "big") + b"bye")
    )
    untied = [untie_parser(FrameProtocol(False, []))]
    expected = parsed(FrameProtocol(False, []), data)
    assert parsed(untied[0], data[:3]) == []  # a partial frame waits for more
    assert parsed(untied[0], data[3:]) == expected
    assert [opcode for opcode, _ in expected] == [Opcode.TEXT, Opcode.PING, Opcode.CLOSE]
    assert freed_at_once(untied)


def test_untie_leaves_a_parser_it_cannot_safely_change(monkeypatch: pytest.MonkeyPatch) -> None:
    started = [FrameProtocol(False, [])]
    parsed(started[0], masked_frame(0x1, b"x"))  # its generator is running: left alone
    generator = started[0]._parse_more
    assert untie_parser(started[0]) is started[0]
    assert started[0]._parse_more is generator
    del generator
    assert not freed_at_once(started)

    monkeypatch.delattr(FrameProtocol, "_parse_more_gen")  # a wsproto that parses otherwise
    fresh = FrameProtocol.__new__(FrameProtocol)
    assert untie_parser(fresh) is fresh
    assert not hasattr(fresh, "_parse_more")
