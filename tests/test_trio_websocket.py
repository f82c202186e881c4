"""The trio-websocket transport and ``serve_websocket`` on real loopback sockets.

Each trio-websocket trap listed in docs/design.md (plus the ones measured while
building the adapter) has a test here that fails without its handling; the
docstrings say which. Clients are :class:`chatcore.testing.WebSocketPeer`
(wsproto; it can misbehave on purpose) and, for interoperability, the
``websockets`` library's trio client. Everything runs on 127.0.0.1, port 0,
under ``trio.fail_after``; timings are small real-time values.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import attrs
import pytest
import trio
import trio.testing
import websockets.trio.client

import chatcore._server as server_module
from chatcore import (
    Accept,
    CloseCause,
    CloseRecord,
    Config,
    Connection,
    ConnectionHandler,
    HandshakeRejected,
    HandshakeRequest,
    LocalProtocolError,
    PeerGone,
    Reject,
    RemoteProtocolError,
    encode,
    serve_connection,
    serve_websocket,
)
from chatcore.testing import WebSocketPeer, open_trio_websocket_pair
from chatcore.transports import CloseFrame, TextFrame

HOST = "127.0.0.1"
#: Upper bound of every test (they take milliseconds to a second).
TIMEOUT = 10

BASE_CONFIG = Config(
    heartbeat_interval=3600.0,
    heartbeat_timeout=60.0,
    close_timeout=3.0,
    send_timeout=10.0,
    handshake_timeout=5.0,
)


def make_config(**changes: Any) -> Config:
    return attrs.evolve(BASE_CONFIG, **changes)


Handle = Callable[[Connection], Awaitable[None]]
Authenticate = Callable[[HandshakeRequest], Awaitable[Accept | Reject]]


class App(ConnectionHandler):
    """An echo application with a registry and a log of how connections ended."""

    def __init__(
        self, handle: Handle | None = None, authenticate: Authenticate | None = None
    ) -> None:
        self._handle = handle
        self._authenticate = authenticate
        self.requests: list[HandshakeRequest] = []
        self.registry: set[Connection] = set()
        self.records: list[CloseRecord] = []
        self._changed = trio.lowlevel.ParkingLot()

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        self.requests.append(request)
        if self._authenticate is not None:
            return await self._authenticate(request)
        await trio.lowlevel.checkpoint()
        return Accept()

    async def handle(self, connection: Connection) -> None:
        self.registry.add(connection)
        self._changed.unpark_all()
        if self._handle is not None:
            await self._handle(connection)
            return
        async for text in connection:
            await connection.send({"type": "echo", "text": text})

    def connection_closed(self, connection: Connection) -> None:
        self.registry.discard(connection)
        if connection.close_record is not None:
            self.records.append(connection.close_record)
        self._changed.unpark_all()

    async def wait_for(self, predicate: Callable[[], object]) -> None:
        while not predicate():
            await self._changed.park()

    def outcomes(self) -> list[tuple[int, CloseCause]]:
        return [(record.code, record.cause) for record in self.records]


@attrs.define
class Server:
    """A running ``serve_websocket`` that a test can shut down."""

    port: int
    scope: trio.CancelScope
    stopped: trio.Event

    async def shutdown(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
def start_server(nursery: trio.Nursery) -> StartServer:
    async def start(app: ConnectionHandler, config: Config = BASE_CONFIG) -> Server:
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
            try:
                with scope:
                    await serve_websocket(app, HOST, 0, config=config, task_status=task_status)
            finally:
                stopped.set()

        listeners: list[trio.SocketListener] = await nursery.start(run)
        return Server(listeners[0].socket.getsockname()[1], scope, stopped)

    return start


@pytest.fixture
async def peers() -> AsyncIterator[list[WebSocketPeer]]:
    opened: list[WebSocketPeer] = []
    yield opened
    for peer in opened:
        await peer.aclose()


Connect = Callable[..., Awaitable[WebSocketPeer]]


@pytest.fixture
def connect(peers: list[WebSocketPeer]) -> Connect:
    async def connect(
        port: int, target: str = "/", *, accepted: bool = True, **kw: Any
    ) -> WebSocketPeer:
        peer = await WebSocketPeer.connect(HOST, port, target, **kw)
        peers.append(peer)
        if accepted:
            await peer.wait_accepted()
        return peer

    return connect


async def idle(connection: Connection) -> None:
    await trio.sleep_forever()


async def echo(peer: WebSocketPeer, text: str) -> None:
    await peer.send_text(text)
    reply = json.loads(await peer.receive_text())
    assert reply == {"type": "echo", "text": text}


async def receive_messages(peer: WebSocketPeer) -> list[dict[str, Any]]:
    """The JSON messages of the next frame (the server batches them, one per line)."""
    return [json.loads(line) for line in (await peer.receive_text()).split("\n")]


async def read_until_gone(peer: WebSocketPeer) -> list[TextFrame | CloseFrame]:
    """Every frame until the link ends (a close frame is answered)."""
    frames: list[TextFrame | CloseFrame] = []
    while True:
        try:
            frame = await peer.receive_frame()
        except PeerGone:
            return frames
        assert isinstance(frame, TextFrame | CloseFrame), frame
        frames.append(frame)


async def raw_connection(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(HOST, port)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF; a reset counts as EOF."""
    data = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


# -- the basics --------------------------------------------------------------------


async def test_handshake_request_and_echo(start_server: StartServer, connect: Connect) -> None:
    """The request is built at the edge: path/query split, lowercase headers, Host restored."""
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app)
        peer = await connect(
            server.port,
            "/chat?user=ann&room=a",
            headers=[("Origin", "http://example.test"), ("X-Extra", "1")],
            subprotocols=["chat.v1"],
        )
        await echo(peer, "héllo ✓")
        (request,) = app.requests
        assert request.path == "/chat"
        assert request.query == {"user": "ann", "room": "a"}
        assert request.origin == "http://example.test"
        assert request.header("x-extra") == "1"
        assert request.host == f"{HOST}:{server.port}"
        assert request.subprotocols == ("chat.v1",)
        assert request.client is not None
        assert request.client[0] == HOST
        assert all(name == name.lower() for name, _ in request.headers)
        await peer.close(1000)
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(1000, CloseCause.PEER)]
        assert not app.registry


async def test_websockets_trio_client_interoperates(start_server: StartServer) -> None:
    """An independent client implementation (websockets 17 on trio) talks to the server."""
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app)
        async with websockets.trio.client.connect(f"ws://{HOST}:{server.port}/ws") as ws:
            await ws.send("ping from websockets")
            reply = json.loads(await ws.recv())
            assert reply == {"type": "echo", "text": "ping from websockets"}
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(1000, CloseCause.PEER)]


async def test_clean_close_ends_with_fin_not_reset(
    start_server: StartServer, connect: Connect
) -> None:
    """After a completed close handshake the server closes TCP with a FIN."""
    with trio.fail_after(TIMEOUT):

        async def kick(connection: Connection) -> None:
            await connection.close(4002, "kicked")

        app = App(handle=kick)
        server = await start_server(app)
        peer = await connect(server.port)
        assert await peer.receive_frame() == CloseFrame(4002, "kicked")  # and answered
        assert await peer.stream.receive_some(100) == b""  # EOF, not ECONNRESET
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(4002, CloseCause.APP)]


# -- a client or a handler can never take the server down ----------------------------------


async def test_handler_exception_closes_1011_and_server_keeps_serving(
    start_server: StartServer, connect: Connect
) -> None:
    """Trap: an exception escaping a handler kills trio-websocket's server."""
    with trio.fail_after(TIMEOUT):
        calls = 0

        async def handle(connection: Connection) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("handler bug")
            async for text in connection:
                await connection.send({"type": "echo", "text": text})

        app = App(handle=handle)
        server = await start_server(app)
        first = await connect(server.port)
        assert await first.receive_frame() == CloseFrame(1011, "internal error")
        second = await connect(server.port)
        await echo(second, "still serving")
        assert app.outcomes()[0] == (1011, CloseCause.INTERNAL)


async def test_firewall_contains_an_unexpected_error(
    start_server: StartServer,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever escapes one client's task is logged; the server keeps serving."""
    failures = [RuntimeError("boom in the connection layer")]

    async def flaky(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        await serve_connection(*args, **kwargs)

    monkeypatch.setattr(server_module, "serve_connection", flaky)  # the per-client call
    with trio.fail_after(TIMEOUT):
        server = await start_server(App())
        first = await WebSocketPeer.connect(HOST, server.port)
        with pytest.raises(PeerGone):
            await first.wait_accepted()
        await first.aclose()
        second = await connect(server.port)
        await echo(second, "fine")
    assert any(
        r.name == "chatcore.server" and "boom in the connection layer" in str(r.exc_info)
        for r in caplog.records
    )


async def test_reject_then_accept_is_refused_and_server_survives(
    start_server: StartServer, connect: Connect
) -> None:
    """Trap: accept() after reject() kills trio-websocket's server."""
    with trio.fail_after(TIMEOUT):
        async with open_trio_websocket_pair() as (transport, client):
            await transport.reject(403, body=b"no")
            with pytest.raises(LocalProtocolError):
                await transport.accept()
            with pytest.raises(HandshakeRejected) as refused:
                await client.wait_accepted()
            assert (refused.value.status, refused.value.body) == (403, b"no")

        async def only_ann(request: HandshakeRequest) -> Accept | Reject:
            await trio.lowlevel.checkpoint()
            if request.query.get("user") == "ann":
                return Accept(identity="ann")
            return Reject(401, b"who are you?", headers=(("www-authenticate", "Token"),))

        app = App(authenticate=only_ann)
        server = await start_server(app)
        with pytest.raises(HandshakeRejected) as refused:
            await connect(server.port, "/?user=bob")
        assert (refused.value.status, refused.value.body) == (401, b"who are you?")
        peer = await connect(server.port, "/?user=ann")
        await echo(peer, "welcome")


async def test_tcp_is_closed_right_after_reject() -> None:
    """Trap: trio-websocket leaves TCP open after reject(); reject() itself closes it."""
    with trio.fail_after(TIMEOUT):
        async with open_trio_websocket_pair() as (transport, client):
            await transport.reject(429, body=b"slow down")
            with pytest.raises(HandshakeRejected):
                await client.wait_accepted()
            assert isinstance(client, WebSocketPeer)
            with trio.fail_after(1):  # nothing but reject() has run on the server
                assert await read_to_eof(client.stream) == b""


async def test_silent_client_is_dropped_after_handshake_timeout(start_server: StartServer) -> None:
    """Trap: trio-websocket waits 60 s for a handshake; we wait handshake_timeout."""
    with trio.fail_after(TIMEOUT):
        server = await start_server(App(), make_config(handshake_timeout=0.3))
        silent = await raw_connection(server.port)
        partial_request = await raw_connection(server.port)
        await partial_request.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        start = trio.current_time()
        assert await read_to_eof(silent) == b""
        assert await read_to_eof(partial_request) == b""
        assert 0.25 <= trio.current_time() - start < 3
        await silent.aclose()
        await partial_request.aclose()


async def test_client_leaving_before_its_handshake_is_dropped_at_once(
    start_server: StartServer, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    """No 30 s wait for a request that will never come: the wait ends with the link."""
    caplog.set_level(logging.DEBUG, logger="chatcore.server")
    with trio.fail_after(TIMEOUT):
        server = await start_server(App(), make_config(handshake_timeout=30))
        stream = await raw_connection(server.port)
        await stream.send_eof()
        with trio.fail_after(2):
            assert await read_to_eof(stream) == b""
            while not any("no WebSocket handshake" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.01)
        await stream.aclose()
        await echo(await connect(server.port), "next")


async def test_garbage_and_plain_http_do_not_hurt_the_server(
    start_server: StartServer, connect: Connect
) -> None:
    with trio.fail_after(TIMEOUT):
        server = await start_server(App())
        plain = await raw_connection(server.port)
        await plain.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_to_eof(plain)).startswith(b"HTTP/1.1 400 ")
        garbage = await raw_connection(server.port)
        await garbage.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 50)
        await read_to_eof(garbage)
        await echo(await connect(server.port), "unharmed")
        await plain.aclose()
        await garbage.aclose()


# -- sending to clients that do not read -----------------------------------------------------


def _flood(size: int) -> Handle:
    async def flood(connection: Connection) -> None:
        blob = "x" * size
        for i in range(100_000):
            await connection.send({"type": "blob", "n": i, "data": blob})

    return flood


def _assert_intact_blobs(frames: list[TextFrame | CloseFrame]) -> None:
    """Every text frame is whole JSON lines of consecutive blobs; no close frame."""
    expected = 0
    for frame in frames:
        assert isinstance(frame, TextFrame), f"a close frame after the stall: {frame}"
        for line in frame.text.split("\n"):
            message = json.loads(line)
            assert message["n"] == expected
            expected += 1


async def test_stalled_send_closes_4001_and_aborts(
    start_server: StartServer, connect: Connect
) -> None:
    """A client that stops reading: the send times out, 4001 is recorded, TCP is reset."""
    with trio.fail_after(TIMEOUT):
        app = App(handle=_flood(50_000))
        server = await start_server(app, make_config(send_timeout=0.3))
        stalled = await connect(server.port, receive_buffer=65_536)
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(4001, CloseCause.SLOW_CONSUMER)]
        assert not app.registry
        try:
            _assert_intact_blobs(await read_until_gone(stalled))
        except RemoteProtocolError as exc:
            raise AssertionError(f"corrupt stream: {exc}") from exc
        other = await connect(server.port)
        assert (await receive_messages(other))[0]["n"] == 0


async def test_shutdown_during_a_stalled_send_aborts_instead_of_corrupting(
    start_server: StartServer, connect: Connect
) -> None:
    """Trap: a cancelled send_message leaves a partial frame and the connection looks alive.

    Shutdown cancels the writer in the middle of a frame. Without the
    adapter's broken-stream handling, the close sequence would write the rest
    of the outbox and a 1012 close frame behind the partial frame (a corrupt
    stream) and keep the shutdown waiting for the full close timeout.
    """
    with trio.fail_after(TIMEOUT):
        app = App(handle=_flood(50_000))
        server = await start_server(app, make_config(send_timeout=30, close_timeout=3))
        stalled = await connect(server.port, receive_buffer=65_536)
        await app.wait_for(lambda: app.registry)
        (connection,) = app.registry
        while connection.statistics().outbox_bytes == 0:
            await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        start = trio.current_time()
        server.scope.cancel()
        try:
            frames = await read_until_gone(stalled)  # reads while the server shuts down
        except RemoteProtocolError as exc:
            raise AssertionError(f"corrupt stream: {exc}") from exc
        _assert_intact_blobs(frames)
        await server.stopped.wait()
        assert trio.current_time() - start < 1.5, "shutdown waited for the close timeout"
        assert app.outcomes() == [(1012, CloseCause.SHUTDOWN)]


async def test_slow_reader_is_bounded_and_does_not_stall_others(
    start_server: StartServer, connect: Connect, nursery: trio.Nursery
) -> None:
    """Fan-out never waits on a client: the one that stops reading is cut off (4001).

    Its 4001 close frame is queued behind what it had not read; it never
    reads, so the close deadline resets the connection instead.
    """
    with trio.fail_after(TIMEOUT):
        app = App(handle=idle)
        cfg = make_config(outbox_max_bytes=65_536, batch_max_bytes=16_384, close_timeout=0.5)
        server = await start_server(app, cfg)
        slow = await connect(server.port, receive_buffer=16_384)
        await app.wait_for(lambda: len(app.registry) == 1)
        (slow_connection,) = app.registry
        fast = await connect(server.port)
        await app.wait_for(lambda: len(app.registry) == 2)

        async def broadcast() -> NoReturn:
            n = 0
            while True:
                for connection in list(app.registry):
                    connection.offer(encode({"type": "tick", "n": n, "pad": "p" * 1000}))
                n += 1
                await trio.sleep(0.001)

        nursery.start_soon(broadcast)
        received = 0
        while slow_connection.close_record is None:
            for message in await receive_messages(fast):
                assert message["n"] == received
                received += 1
        assert slow_connection.close_record.code == 4001
        assert slow_connection.close_record.cause is CloseCause.SLOW_CONSUMER
        closed_at = received
        while received < closed_at + 100:  # the fast client keeps receiving, in order
            for message in await receive_messages(fast):
                assert message["n"] == received
                received += 1
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(4001, CloseCause.SLOW_CONSUMER)]
        assert slow_connection not in app.registry
        frames = await read_until_gone(slow)
        # A frame carries one or more messages, one per line.
        ticks = [
            json.loads(line)["n"]
            for f in frames
            if isinstance(f, TextFrame)
            for line in f.text.split("\n")
        ]
        assert ticks == list(range(len(ticks)))
        assert [f for f in frames if isinstance(f, CloseFrame)] in ([], [frames[-1]])


# -- closing -------------------------------------------------------------------------


async def test_concurrent_closes_send_one_close_frame_with_the_first_code(
    start_server: StartServer, connect: Connect
) -> None:
    """Trap: concurrent aclose() calls race on which code goes out."""
    with trio.fail_after(TIMEOUT):

        async def close_from_everywhere(connection: Connection) -> None:
            connection.close_nowait(4002, "first")
            async with trio.open_nursery() as nursery:
                for code in (4003, 1000, 4004):
                    nursery.start_soon(connection.close, code)

        app = App(handle=close_from_everywhere)
        server = await start_server(app)
        peer = await connect(server.port)
        assert await read_until_gone(peer) == [CloseFrame(4002, "first")]
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(4002, CloseCause.APP)]

        # The transport itself is single-flight: the first code goes out, and
        # a second call waits for the first instead of tearing the link down.
        async with open_trio_websocket_pair() as (transport, client):
            await transport.accept()
            await client.wait_accepted()
            returned: list[int] = []

            async def close(code: int) -> None:
                await transport.close(code)
                returned.append(code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close, 4005)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(close, 4006)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert returned == []  # both wait for the client's answer
                assert await client.receive_frame() == CloseFrame(4005, "")  # answered
            assert sorted(returned) == [4005, 4006]
            assert [f for f in client.frames if isinstance(f, CloseFrame)] == [CloseFrame(4005, "")]
            assert isinstance(client, WebSocketPeer)
            assert await client.stream.receive_some(100) == b""  # a clean end, no reset


async def test_peer_close_during_a_send_is_recorded_as_the_peers(
    start_server: StartServer, connect: Connect
) -> None:
    """The writer can see the peer's close before the reader; either way it is the peer's.

    trio-websocket refuses sends as soon as the peer's close frame is parsed,
    so a busy writer often learns of the close first (about half the time).
    """
    with trio.fail_after(TIMEOUT):

        async def stream(connection: Connection) -> None:
            for i in range(1_000_000):
                await connection.send({"type": "tick", "n": i})

        app = App(handle=stream)
        server = await start_server(app)
        for _ in range(20):
            peer = await connect(server.port)
            await peer.receive_frame()
            await peer.close(4100, "bye")
            await read_until_gone(peer)
        await app.wait_for(lambda: len(app.records) == 20)
        assert app.outcomes() == [(4100, CloseCause.PEER)] * 20


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_vanishing_client_is_recorded_1006_and_removed(
    start_server: StartServer, connect: Connect, how: str
) -> None:
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app)
        peer = await connect(server.port)
        await echo(peer, "here")
        if how == "reset":
            await peer.vanish()
        else:
            await peer.send_eof()
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(1006, CloseCause.TRANSPORT)]
        assert not app.registry


async def test_server_shutdown_closes_every_connection_with_1012_promptly(
    start_server: StartServer, connect: Connect
) -> None:
    """The actor's shielded close needs trio-websocket's reader to hear the answers.

    The library's reader is shielded until the link is released, so each
    connection finishes its close handshake at once instead of waiting out
    the close timeout.
    """
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app, make_config(close_timeout=3))
        clients = [await connect(server.port) for _ in range(3)]
        for client in clients:
            await echo(client, "hi")
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.shutdown)
            for client in clients:
                assert await client.receive_frame() == CloseFrame(1012, "server shutting down")
        assert trio.current_time() - start < 1.5
        assert app.outcomes() == [(1012, CloseCause.SHUTDOWN)] * 3
        assert not app.registry
        for client in clients:
            assert await client.stream.receive_some(100) == b""


# -- protocol faults -----------------------------------------------------------------------


async def test_oversize_ascii_message_closes_1009(
    start_server: StartServer, connect: Connect
) -> None:
    """trio-websocket closes with 1009 itself; it is recorded as the client's protocol fault."""
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app)
        peer = await connect(server.port)
        await echo(peer, "a" * 65_536)  # exactly the limit is fine
        await peer.send_text("a" * 70_000)
        frames = await read_until_gone(peer)
        assert [f.code for f in frames if isinstance(f, CloseFrame)] == [1009]
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(1009, CloseCause.PROTOCOL)]
        await echo(await connect(server.port), "server fine")


async def test_oversize_multibyte_message_closes_1009(
    start_server: StartServer, connect: Connect
) -> None:
    """40,000 characters (under trio-websocket's count) but 80,000 UTF-8 bytes."""
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app)
        peer = await connect(server.port)
        await peer.send_text("é" * 40_000)
        assert await read_until_gone(peer) == [CloseFrame(1009, "message too big")]
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(1009, CloseCause.PROTOCOL)]


async def test_oversize_message_in_a_burst_still_gets_its_close_frame(
    start_server: StartServer, connect: Connect
) -> None:
    """Unread input must not turn the close into a RST that destroys the 1009 frame."""
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app)
        peer = await connect(server.port)
        await peer.send_text("b" * 300_000)
        for _ in range(20):
            await peer.send_text("more")
        frames = await read_until_gone(peer)
        assert [f.code for f in frames if isinstance(f, CloseFrame)] == [1009]
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(1009, CloseCause.PROTOCOL)]


async def test_invalid_utf8_closes_1007(start_server: StartServer, connect: Connect) -> None:
    """Measured: trio-websocket drops TCP without a close frame; the adapter sends 1007."""
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app)
        peer = await connect(server.port)
        await peer.send_raw_frame(0x1, b"ok \xff\xfe not utf-8")
        frames = await read_until_gone(peer)
        assert [f.code for f in frames if isinstance(f, CloseFrame)] == [1007]
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(1007, CloseCause.PROTOCOL)]
        await echo(await connect(server.port), "server fine")


async def test_binary_frame_closes_1003(start_server: StartServer, connect: Connect) -> None:
    with trio.fail_after(TIMEOUT):
        app = App()
        server = await start_server(app)
        peer = await connect(server.port)
        await peer.send_bytes(b"\x00\x01")
        assert await read_until_gone(peer) == [CloseFrame(1003, "binary frames are not supported")]
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(1003, CloseCause.PROTOCOL)]


async def test_silent_client_is_closed_by_the_heartbeat(
    start_server: StartServer, connect: Connect
) -> None:
    with trio.fail_after(TIMEOUT):
        app = App(handle=idle)
        server = await start_server(app, make_config(heartbeat_interval=0.1, heartbeat_timeout=0.1))
        peer = await connect(server.port)
        frames = await read_until_gone(peer)  # reads, never answers the pings
        assert isinstance(frames[0], TextFrame)
        assert json.loads(frames[0].text) == {"type": "ping"}
        assert frames[-1] == CloseFrame(4000, "heartbeat timeout")
        await app.wait_for(lambda: app.records)
        assert app.outcomes() == [(4000, CloseCause.HEARTBEAT)]


# -- the adapter on its own ----------------------------------------------------------------


async def test_abort_resets_the_connection() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_trio_websocket_pair() as (transport, client):
            await transport.accept()
            await client.wait_accepted()
            await transport.abort()
            assert isinstance(client, WebSocketPeer)
            with pytest.raises(trio.BrokenResourceError):
                await client.stream.receive_some(100)


async def test_accept_with_an_unoffered_subprotocol_is_a_local_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_trio_websocket_pair(subprotocols=["a"]) as (transport, client):
            with pytest.raises(LocalProtocolError):
                await transport.accept(subprotocol="b")
            await transport.accept(subprotocol="a")
            assert await client.wait_accepted() == "a"


async def test_repr_shows_client_path_and_state() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_trio_websocket_pair(target="/room/1") as (transport, _client):
            assert "/room/1 HANDSHAKE>" in repr(transport)
            await transport.accept()
            assert repr(transport).endswith("/room/1 OPEN>")
            await transport.abort()
            assert repr(transport).endswith("RELEASED>")


async def test_serve_websocket_is_exported_at_the_top() -> None:
    import chatcore
    import chatcore._server

    assert chatcore.serve_websocket is serve_websocket
    assert chatcore._server.serve_websocket is serve_websocket


# -- what an idle connection costs ---------------------------------------------------------

#: Joined, idle connections the memory test opens (tracing every allocation
#: is slow, so few; the bound leaves room for one-off growth of a set or dict).
IDLE_CONNECTIONS = 10
#: Python heap per idle joined connection on ``serve_websocket`` with a
#: :class:`chatcore.Hub`, traced by ``tracemalloc``. Measured on CPython 3.11:
#: 26-28 KiB (37 KiB before the transport shed a task, a nursery, the
#: handshake state and trio's socket frames; see docs/performance.md).
IDLE_TRACED_BOUND = 32 * 1024


def _current_coverage() -> Any:
    """The running ``coverage.Coverage`` (pytest-cov's), if any."""
    try:
        import coverage
    except ImportError:  # pragma: no cover  (a dev dependency)
        return None
    return coverage.Coverage.current()


def _tasks_under(task: trio.lowlevel.Task) -> int:
    """``task`` and every task below it."""
    return 1 + sum(
        _tasks_under(child) for nursery in task.child_nurseries for child in nursery.child_tasks
    )


async def _open_joined_peers(port: int, count: int, peers: list[WebSocketPeer]) -> None:
    for _ in range(count):
        peer = await WebSocketPeer.connect(HOST, port, "/")
        peers.append(peer)
        await peer.wait_accepted()
        assert json.loads(await peer.receive_text())["type"] == "hello"
        await peer.send_text(json.dumps({"type": "join", "room": "idle", "ref": "j"}))
        reply = json.loads(await peer.receive_text())
        assert reply["type"] == "reply", reply
        assert "error" not in reply, reply


@pytest.fixture
async def hub_server(nursery: trio.Nursery) -> AsyncIterator[tuple[int, trio.lowlevel.Task]]:
    """``serve_websocket`` with a Hub; yields its port and the task it runs in."""
    from chatcore import Hub

    server_task: list[trio.lowlevel.Task] = []

    async def run(*, task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        server_task.append(trio.lowlevel.current_task())
        await serve_websocket(Hub(), HOST, 0, config=BASE_CONFIG, task_status=task_status)

    listeners: list[trio.SocketListener] = await nursery.start(run)
    yield listeners[0].socket.getsockname()[1], server_task[0]
    nursery.cancel_scope.cancel()


async def test_an_idle_joined_connection_runs_four_tasks(
    hub_server: tuple[int, trio.lowlevel.Task], peers: list[WebSocketPeer]
) -> None:
    """The client's task (the actor), its reader and writer, trio-websocket's reader.

    Fails if trio-websocket's reader gets a host task or nursery of its own
    again, or if ``wrap_server_stream`` starts using more of the nursery than
    ``start_soon`` (the handshake would fail).
    """
    port, server_task = hub_server
    with trio.fail_after(TIMEOUT):
        await _open_joined_peers(port, 2, peers)
        await trio.testing.wait_all_tasks_blocked()
        before = _tasks_under(server_task)
        await _open_joined_peers(port, 5, peers)
        await trio.testing.wait_all_tasks_blocked()
        assert _tasks_under(server_task) - before == 5 * 4


async def test_an_idle_joined_connection_stays_within_its_memory_bound(
    hub_server: tuple[int, trio.lowlevel.Task], peers: list[WebSocketPeer]
) -> None:
    """Python heap per connection over many connections, the clients' own excluded.

    The clients run in this test's task, so every allocation of theirs has
    this file in its traceback; the server's tasks never do.
    """
    import gc
    import tracemalloc

    port, _ = hub_server
    own = tracemalloc.Filter(False, __file__, all_frames=True)
    with trio.fail_after(TIMEOUT * 3):
        await _open_joined_peers(port, 5, peers)  # one-off allocations happen here
        await trio.testing.wait_all_tasks_blocked()
        was_tracing = tracemalloc.is_tracing()
        # Coverage measurement, when on, allocates per traced frame: pause it.
        coverage = _current_coverage()
        if coverage is not None:
            coverage.stop()
        tracemalloc.start(32)
        try:
            gc.collect()
            before = tracemalloc.take_snapshot().filter_traces([own])
            await _open_joined_peers(port, IDLE_CONNECTIONS, peers)
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            after = tracemalloc.take_snapshot().filter_traces([own])
        finally:
            if not was_tracing:
                tracemalloc.stop()
            if coverage is not None:
                coverage.start()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_connection = growth / IDLE_CONNECTIONS
    assert per_connection <= IDLE_TRACED_BOUND, f"{per_connection / 1024:.1f} KiB per connection"
    # Not vacuous: a connection's own state is counted (trio's task, the
    # library's connection and buffers, the hub's session).
    assert per_connection >= 10 * 1024, f"{per_connection / 1024:.1f} KiB per connection"


async def test_an_open_connection_lets_go_of_its_handshake_state() -> None:
    """trio-websocket's private ``_wsproto`` still holds wsproto's ``WSConnection``.

    Fails loudly if a trio-websocket upgrade renames it (the transport would
    then silently keep the h11 handshake state, about 3 KiB per connection).
    """
    import wsproto

    from chatcore.transports import _trio_websocket as adapter

    with trio.fail_after(TIMEOUT):
        async with open_trio_websocket_pair() as (transport, client):
            await transport.accept()
            await client.wait_accepted()
            assert isinstance(transport, adapter.TrioWebSocketStream)
            assert isinstance(client, WebSocketPeer)
            ws = transport._ws
            protocol = getattr(ws, "_wsproto", None)
            assert isinstance(protocol, wsproto.WSConnection)
            assert protocol.handshake is adapter._FINISHED_HANDSHAKE
            assert transport._library_request is None
            # The connection still works without it.
            await client.send_text("ping")
            assert await transport.receive() == "ping"
            await transport.send("pong")
            assert await client.receive_text() == "pong"


async def test_a_read_without_waiting_returns_nothing_data_eof_or_the_error() -> None:
    # The open link's reads (_OwnedStream.receive_some) try the socket first
    # and wait only when it has nothing; errors come back as values.
    from chatcore.transports._trio_websocket import _read_nowait

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    sock = trio.socket.from_stdlib_socket(ours)
    try:
        assert _read_nowait(sock, 10) is None  # nothing yet: the caller waits
        theirs.sendall(b"hello")
        assert _read_nowait(sock, 3) == b"hel"
        assert _read_nowait(sock, 10) == b"lo"
        theirs.close()
        assert _read_nowait(sock, 10) == b""  # end of stream
    finally:
        sock.close()
    assert isinstance(_read_nowait(sock, 10), OSError)  # closed: the error, not a raise
