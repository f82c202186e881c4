"""The transport conformance suite: one contract, checked the same way everywhere.

A transport is correct when :func:`check_message_stream` passes for it. The
suite drives a server-side :class:`~chatcore.MessageStream` against a client
that speaks the :class:`TransportPeer` protocol, and checks what the
connection actor relies on: messages both ways and in order, close frames
exactly once with the right code, one ``PeerGone`` signal for every way a
peer can go, single-shot handshake answers, and that an interrupted send
never leaves a corrupt stream behind.

Two pair factories come with it: :func:`open_memory_pair` (the in-memory
transport) and :func:`open_trio_websocket_pair` (trio-websocket on a loopback
socket, with :class:`WebSocketPeer`, a wsproto client, on the other end).
``docs/transports.md`` shows how to run the suite on a new transport.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, TypeVar

import trio
import wsproto.utilities
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState as WsState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from .._config import Config
from .._exceptions import HandshakeRejected, LocalProtocolError, PeerGone, RemoteProtocolError
from .._transport import MessageStream
from ..sansio import HandshakeRequest
from ..transports._memory import (
    BinaryFrame,
    CloseFrame,
    MemoryClient,
    TextFrame,
    memory_stream_pair,
)
from ..transports._trio_websocket import open_trio_websocket_stream

__all__ = [
    "MESSAGE_STREAM_CHECKS",
    "MemoryPeer",
    "PairFactory",
    "TransportPeer",
    "WebSocketPeer",
    "check_message_stream",
    "open_memory_pair",
    "open_trio_websocket_pair",
]

Frame = TextFrame | BinaryFrame | CloseFrame

# -- the client side ---------------------------------------------------------------


class TransportPeer(Protocol):
    """The client end of a transport under test, as the suite drives it.

    It behaves like a browser: it answers a close frame with a close frame
    and a ping with a pong, on its own, inside :meth:`receive_frame`.
    """

    @property
    def frames(self) -> Sequence[Frame]:
        """Every frame received so far, in order (the wire log)."""
        ...

    async def wait_accepted(self) -> str | None:
        """Wait for the answer to the handshake.

        Returns:
            The subprotocol the server selected.

        Raises:
            HandshakeRejected: the server refused, with its HTTP status and body.
            PeerGone: the link dropped without an answer.
        """
        ...

    async def send_text(self, text: str) -> None:
        """Send a text frame. Raises PeerGone if the link is gone or closing."""
        ...

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame. Raises PeerGone if the link is gone or closing."""
        ...

    async def receive_frame(self) -> Frame:
        """The next frame from the server.

        Raises:
            PeerGone: the link dropped (EOF or reset) with no frame pending.
        """
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (the server should answer it)."""
        ...

    async def vanish(self) -> None:
        """Drop the link without a close frame (a crashed browser, a TCP reset)."""
        ...


class PairFactory(Protocol):
    """What :func:`check_message_stream` needs: a way to make connected pairs.

    Called with a request target, headers and offered subprotocols, it returns
    an async context manager that yields ``(server, client)``: the server's
    :class:`~chatcore.MessageStream` with the handshake received and not yet
    answered, and the client. Leaving the context releases both.
    """

    def __call__(
        self,
        *,
        target: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
    ) -> AbstractAsyncContextManager[tuple[MessageStream, TransportPeer]]: ...


class MemoryPeer:
    """:class:`TransportPeer` over a :class:`~chatcore.transports.MemoryClient`."""

    def __init__(self, client: MemoryClient) -> None:
        #: The wrapped client.
        self.client = client

    @property
    def frames(self) -> Sequence[Frame]:
        """Every frame received so far, in order."""
        return self.client.frames

    async def wait_accepted(self) -> str | None:
        """See :meth:`TransportPeer.wait_accepted`."""
        return await self.client.wait_accepted()

    async def send_text(self, text: str) -> None:
        """See :meth:`TransportPeer.send_text`."""
        await self.client.send(text)

    async def send_bytes(self, data: bytes) -> None:
        """See :meth:`TransportPeer.send_bytes`."""
        await self.client.send_bytes(data)

    async def receive_frame(self) -> Frame:
        """See :meth:`TransportPeer.receive_frame`."""
        return await self.client.receive_frame()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """See :meth:`TransportPeer.close`."""
        await self.client.close(code, reason)

    async def vanish(self) -> None:
        """See :meth:`TransportPeer.vanish`."""
        self.client.vanish()
        await trio.lowlevel.checkpoint()


class WebSocketPeer:
    """A WebSocket client for tests: wsproto over a trio stream, no background task.

    Everything happens inside the awaited call: :meth:`receive_frame` reads
    the socket until a frame is complete, answering pings and close frames
    like a browser. It can also misbehave on purpose: write raw frames
    (:meth:`send_raw_frame`), half-close without a close frame
    (:meth:`send_eof`), or reset the connection (:meth:`vanish`).

    Args:
        stream: A connected stream to the server.
        host: The ``Host`` header to send.
    """

    def __init__(self, stream: trio.abc.Stream, *, host: str = "localhost") -> None:
        #: The underlying stream.
        self.stream = stream
        #: The ``Host`` header sent with the request.
        self.host = host
        #: Every frame received so far, in order (the wire log).
        self.frames: list[Frame] = []
        # The client side of the protocol (sans-I/O).
        self._ws = WSConnection(ConnectionType.CLIENT)
        # Events parsed but not consumed yet.
        self._pending: deque[Event] = deque()
        # Parts of a fragmented message being reassembled.
        self._parts: list[str | bytes] = []
        # The server's side ended (EOF or reset).
        self._eof = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        target: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
        receive_buffer: int | None = None,
    ) -> WebSocketPeer:
        """Connect over TCP and send the opening handshake (without waiting for the answer).

        Args:
            host: Server address (an IP address; tests use ``"127.0.0.1"``).
            port: Server port.
            target: Request target: path and query string.
            headers: Extra request headers.
            subprotocols: Subprotocols to offer.
            receive_buffer: If set, ``SO_RCVBUF`` before connecting: a small
                value makes a client that stops reading stall the server
                quickly (the kernel otherwise buffers megabytes on loopback).
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        peer = cls(trio.SocketStream(sock), host=f"{host}:{port}")
        await peer.send_request(target, headers=headers, subprotocols=subprotocols)
        return peer

    async def send_request(
        self,
        target: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
    ) -> None:
        """Send the opening handshake."""
        request = Request(
            host=self.host,
            target=target,
            extra_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            subprotocols=list(subprotocols),
        )
        await self._send(request)

    @property
    def state(self) -> WsState:
        """The client's protocol state (wsproto's)."""
        return self._ws.state

    @property
    def received_close(self) -> CloseFrame | None:
        """The close frame received so far, if any."""
        for frame in self.frames:
            if isinstance(frame, CloseFrame):
                return frame
        return None

    async def _send(self, event: Event) -> None:
        try:
            data = self._ws.send(event)
            await self.stream.send_all(data)
        except (
            wsproto.utilities.LocalProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            raise PeerGone(None) from exc

    async def _next_event(self) -> Event:
        while True:
            self._pending.extend(self._ws.events())
            if self._pending:
                return self._pending.popleft()
            if self._eof:
                raise PeerGone(None)
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._eof = True
                raise PeerGone(None) from exc
            if data:
                self._ws.receive_data(bytes(data))
                continue
            self._eof = True
            # Like browsers: once the server closed TCP, close our side too.
            await self._half_close()
            if self._ws.state in (WsState.CONNECTING, WsState.REJECTING):
                # Lets the HTTP parser finish a response body read until EOF.
                # (On an open connection wsproto would invent a 1006 close
                # event; EOF is reported as PeerGone instead.)
                try:
                    self._ws.receive_data(None)
                except wsproto.utilities.ProtocolError:
                    pass

    async def wait_accepted(self) -> str | None:
        """See :meth:`TransportPeer.wait_accepted`."""
        while True:
            event = await self._next_event()
            if isinstance(event, AcceptConnection):
                return event.subprotocol
            if isinstance(event, RejectConnection):
                body = bytearray()
                while event.has_body:
                    try:
                        data = await self._next_event()
                    except PeerGone:
                        break
                    if isinstance(data, RejectData):
                        body += data.data
                        if data.body_finished:
                            break
                raise HandshakeRejected(event.status_code, bytes(body))

    async def send_text(self, text: str) -> None:
        """See :meth:`TransportPeer.send_text`."""
        await self._send(TextMessage(data=text))

    async def send_bytes(self, data: bytes) -> None:
        """See :meth:`TransportPeer.send_bytes`."""
        await self._send(BytesMessage(data=data))

    async def send_raw_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """Write one masked frame as is, bypassing validation (e.g. invalid UTF-8).

        Args:
            opcode: The frame opcode (0x1 text, 0x2 binary, 0x8 close...).
            payload: The unmasked payload.
            fin: The FIN bit.
        """
        head = bytearray([(0x80 if fin else 0) | opcode])
        size = len(payload)
        if size < 126:
            head.append(0x80 | size)
        elif size < 1 << 16:
            head.append(0x80 | 126)
            head += struct.pack("!H", size)
        else:
            head.append(0x80 | 127)
            head += struct.pack("!Q", size)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        try:
            await self.stream.send_all(bytes(head) + mask + masked)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone(None) from exc

    async def receive_frame(self) -> Frame:
        """See :meth:`TransportPeer.receive_frame`.

        Raises:
            PeerGone: the link dropped with no frame pending.
            RemoteProtocolError: the server's bytes are not valid WebSocket
                framing (a corrupt stream); ``code`` is what wsproto would answer.
        """
        while True:
            before = self._ws.state
            event = await self._next_event()
            if isinstance(event, TextMessage | BytesMessage):
                self._parts.append(event.data if isinstance(event.data, str) else bytes(event.data))
                if not event.message_finished:
                    continue
                frame: Frame
                if isinstance(event, TextMessage):
                    frame = TextFrame("".join(p for p in self._parts if isinstance(p, str)))
                else:
                    frame = BinaryFrame(b"".join(p for p in self._parts if isinstance(p, bytes)))
                self._parts = []
                self.frames.append(frame)
                return frame
            if isinstance(event, Ping):
                try:
                    await self._send(event.response())
                except PeerGone:
                    pass
                continue
            if isinstance(event, CloseConnection):
                if self._ws.state is before:
                    # wsproto turns a parse failure into a close event without
                    # a frame having arrived: the server's stream is corrupt.
                    raise RemoteProtocolError(
                        f"invalid framing from the server: {event.reason}", code=event.code
                    )
                frame = CloseFrame(event.code, event.reason or "")
                self.frames.append(frame)
                if self._ws.state is WsState.REMOTE_CLOSING:
                    try:
                        await self._send(event.response())
                    except PeerGone:
                        pass
                return frame
            # Pong and anything else: not a frame the suite looks at.

    async def receive_text(self) -> str:
        """The next text frame's text.

        Raises:
            PeerGone: a close frame arrived (``code`` set) or the link dropped.
            AssertionError: a binary frame arrived.
        """
        frame = await self.receive_frame()
        if isinstance(frame, CloseFrame):
            raise PeerGone(frame.code, frame.reason)
        if not isinstance(frame, TextFrame):
            raise AssertionError(f"expected a text frame, got {frame!r}")
        return frame.text

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """See :meth:`TransportPeer.close`."""
        await self._send(CloseConnection(code=code, reason=reason or None))

    async def send_eof(self) -> None:
        """Half-close TCP (FIN) without a close frame."""
        if not await self._half_close():
            raise PeerGone(None)

    async def _half_close(self) -> bool:
        if not isinstance(self.stream, trio.abc.HalfCloseableStream):
            await trio.lowlevel.checkpoint()
            return False
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        return True

    async def vanish(self) -> None:
        """Reset the TCP connection (``SO_LINGER`` 0): no close frame, no FIN."""
        if isinstance(self.stream, trio.SocketStream):
            try:
                self.stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            except OSError:
                pass
        await trio.aclose_forcefully(self.stream)

    async def aclose(self) -> None:
        """Close the stream (no close frame). Idempotent."""
        await trio.aclose_forcefully(self.stream)


# -- pair factories ------------------------------------------------------------------


@asynccontextmanager
async def open_memory_pair(
    *,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    capacity: int = 64,
) -> AsyncIterator[tuple[MessageStream, TransportPeer]]:
    """A :class:`PairFactory` for the in-memory transport.

    Args:
        target: Path and query string of the handshake.
        headers: Handshake headers (names are lowercased, as transports do).
        subprotocols: Offered subprotocols.
        capacity: Frames buffered per direction.
    """
    path, _, query = target.partition("?")
    request = HandshakeRequest(
        path=path,
        query_string=query,
        headers=tuple((name.lower(), value) for name, value in headers),
        client=("127.0.0.1", 1),
        subprotocols=tuple(subprotocols),
    )
    server, client = memory_stream_pair(request, capacity=capacity)
    try:
        yield server, MemoryPeer(client)
    finally:
        await server.abort()


@asynccontextmanager
async def open_trio_websocket_pair(
    *,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    config: Config | None = None,
    buffer_size: int | None = 65_536,
) -> AsyncIterator[tuple[MessageStream, TransportPeer]]:
    """A :class:`PairFactory` for trio-websocket over a loopback TCP connection.

    The server side comes from :func:`~chatcore.transports.open_trio_websocket_stream`;
    the client is a :class:`WebSocketPeer`.

    Args:
        target: Path and query string of the handshake.
        headers: Extra handshake headers.
        subprotocols: Offered subprotocols.
        config: The server's bounds (default :class:`~chatcore.Config` ``()``).
        buffer_size: Kernel buffer sizes (client receive, server send), so a
            client that stops reading stalls the server after little data;
            ``None`` keeps the kernel's defaults.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        peer = await WebSocketPeer.connect(
            "127.0.0.1",
            port,
            target,
            headers=headers,
            subprotocols=subprotocols,
            receive_buffer=buffer_size,
        )
        server_stream = await listeners[0].accept()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
    if buffer_size is not None:
        server_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
    try:
        async with open_trio_websocket_stream(server_stream, config=config) as server:
            yield server, peer
    finally:
        await peer.aclose()


# -- the checks ----------------------------------------------------------------------

_E = TypeVar("_E", bound=BaseException)
_Check = Callable[[PairFactory], Awaitable[None]]
_CHECKS: dict[str, _Check] = {}


def _check(fn: _Check) -> _Check:
    _CHECKS[fn.__name__.removeprefix("_check_")] = fn
    return fn


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


async def _raises(kind: type[_E], what: str, call: Callable[[], Awaitable[object]]) -> _E:
    """Await ``call()`` and return the ``kind`` exception it must raise."""
    try:
        await call()
    except kind as exc:
        return exc
    except Exception as exc:
        raise AssertionError(f"{what}: expected {kind.__name__}, got {exc!r}") from exc
    raise AssertionError(f"{what}: expected {kind.__name__}, nothing was raised")


async def _returns_or_peer_gone(what: str, call: Callable[[], Awaitable[object]]) -> None:
    try:
        await call()
    except PeerGone:
        pass
    except Exception as exc:
        raise AssertionError(f"{what}: may only raise PeerGone, raised {exc!r}") from exc


async def _no_raise(what: str, call: Callable[[], Awaitable[object]]) -> None:
    try:
        await call()
    except Exception as exc:
        raise AssertionError(f"{what}: must never raise, raised {exc!r}") from exc


async def _accepted(server: MessageStream, client: TransportPeer) -> None:
    await server.accept()
    _expect(await client.wait_accepted() is None, "no subprotocol was selected")


async def _expect_link_dropped(client: TransportPeer, what: str) -> None:
    """The client reads to the end: complete text frames at most, then PeerGone."""
    while True:
        try:
            frame = await client.receive_frame()
        except PeerGone:
            return
        _expect(not isinstance(frame, CloseFrame), f"{what}: unexpected close frame {frame}")


def _close_frames(client: TransportPeer) -> list[CloseFrame]:
    return [f for f in client.frames if isinstance(f, CloseFrame)]


@_check
async def _check_handshake_request(make_pair: PairFactory) -> None:
    """Path, query, headers and subprotocols reach the request; the choice reaches the client."""
    async with make_pair(
        target="/chat/room?user=ann&x=1",
        headers=[("X-Chatcore-Test", "yes"), ("Origin", "http://example.test")],
        subprotocols=["chat.v1", "chat.v2"],
    ) as (server, client):
        request = server.request
        _expect(request.path == "/chat/room", f"path: {request.path!r}")
        _expect(request.query_string == "user=ann&x=1", f"query: {request.query_string!r}")
        _expect(request.query == {"user": "ann", "x": "1"}, f"query: {request.query!r}")
        _expect(request.header("x-chatcore-test") == "yes", f"headers: {request.headers!r}")
        _expect(request.origin == "http://example.test", f"origin: {request.origin!r}")
        _expect(
            all(name == name.lower() for name, _ in request.headers),
            f"header names must be lowercase: {request.headers!r}",
        )
        _expect(
            request.subprotocols == ("chat.v1", "chat.v2"),
            f"subprotocols: {request.subprotocols!r}",
        )
        await server.accept(subprotocol="chat.v2")
        selected = await client.wait_accepted()
        _expect(selected == "chat.v2", f"selected subprotocol: {selected!r}")


@_check
async def _check_text_both_ways(make_pair: PairFactory) -> None:
    """A text message each way arrives unchanged (non-ASCII included)."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await client.send_text("héllo ✓ 🙂")
        got = await server.receive()
        _expect(got == "héllo ✓ 🙂", f"server received {got!r}")
        await server.send("wörld ✓ 🙂")
        frame = await client.receive_frame()
        _expect(frame == TextFrame("wörld ✓ 🙂"), f"client received {frame!r}")


@_check
async def _check_binary_in(make_pair: PairFactory) -> None:
    """A binary frame is received as ``bytes`` (the actor closes with 1003)."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await client.send_bytes(b"\x00\x01\xfe\xff")
        got = await server.receive()
        _expect(got == b"\x00\x01\xfe\xff", f"server received {got!r}")


@_check
async def _check_order(make_pair: PairFactory) -> None:
    """Many messages each way, sent concurrently, arrive complete and in order."""
    count = 300
    async with make_pair() as (server, client):
        await _accepted(server, client)
        received_by_server: list[str | bytes] = []
        received_by_client: list[Frame] = []

        async def server_sends() -> None:
            for i in range(count):
                await server.send(f"s{i}")

        async def client_sends() -> None:
            for i in range(count):
                await client.send_text(f"c{i}")

        async def server_receives() -> None:
            for _ in range(count):
                received_by_server.append(await server.receive())

        async def client_receives() -> None:
            for _ in range(count):
                received_by_client.append(await client.receive_frame())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_sends)
            nursery.start_soon(client_sends)
            nursery.start_soon(server_receives)
            nursery.start_soon(client_receives)
        _expect(received_by_server == [f"c{i}" for i in range(count)], "client->server order")
        _expect(
            received_by_client == [TextFrame(f"s{i}") for i in range(count)],
            "server->client order",
        )


@_check
async def _check_large_messages(make_pair: PairFactory) -> None:
    """Messages of tens of KiB (under the default 64 KiB limit) go both ways."""
    inbound = "ü" * 20_000 + "x" * 20_000  # 60,000 UTF-8 bytes
    outbound = "y" * 200_000
    async with make_pair() as (server, client):
        await _accepted(server, client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_text, inbound)
            got = await server.receive()
        _expect(got == inbound, f"server received {len(got)} chars, not the message")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send, outbound)
            frame = await client.receive_frame()
        _expect(frame == TextFrame(outbound), "client did not receive the large message")


@_check
async def _check_server_close(make_pair: PairFactory) -> None:
    """close(code, reason): the client sees that close frame once; then the stream is done."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.close, 4002, "kicked")
            frame = await client.receive_frame()
        _expect(frame == CloseFrame(4002, "kicked"), f"client received {frame!r}")
        await _raises(PeerGone, "client receive after the close", client.receive_frame)
        _expect(len(_close_frames(client)) == 1, f"close frames: {client.frames!r}")
        await _raises(PeerGone, "send after close", lambda: server.send("late"))
        await _raises(PeerGone, "receive after close", server.receive)
        await _returns_or_peer_gone("second close", lambda: server.close(1000))
        await _no_raise("abort after close", server.abort)
        await _no_raise("second abort", server.abort)
        _expect(len(_close_frames(client)) == 1, "a second close frame was sent")


@_check
async def _check_peer_close(make_pair: PairFactory) -> None:
    """The peer's close: PeerGone with its code and reason, answered with one close frame."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await client.close(4100, "bye")
        gone = await _raises(PeerGone, "receive after the peer's close", server.receive)
        _expect((gone.code, gone.reason) == (4100, "bye"), f"PeerGone{(gone.code, gone.reason)}")
        again = await _raises(PeerGone, "second receive", server.receive)
        _expect(again.code == 4100, f"second PeerGone code {again.code}")
        frame = await client.receive_frame()
        _expect(frame == CloseFrame(4100, "bye"), f"the close answer was {frame!r}")
        await _raises(PeerGone, "client receive after the close handshake", client.receive_frame)
        await _raises(PeerGone, "send after the peer's close", lambda: server.send("late"))
        await _returns_or_peer_gone("close after the peer's close", lambda: server.close(1000))
        await _no_raise("abort", server.abort)
        _expect(len(_close_frames(client)) == 1, f"close frames: {client.frames!r}")


@_check
async def _check_crossing_closes(make_pair: PairFactory) -> None:
    """Both sides close at once: the server's close ends, the client sees one close frame."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await client.close(4004, "client")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_returns_or_peer_gone, "crossing close", lambda: server.close(4003))
            frame = await client.receive_frame()
        _expect(
            isinstance(frame, CloseFrame) and frame.code in (4003, 4004),
            f"client received {frame!r}",
        )
        await _raises(PeerGone, "client receive after the close", client.receive_frame)
        _expect(len(_close_frames(client)) == 1, f"close frames: {client.frames!r}")
        await _no_raise("abort", server.abort)


@_check
async def _check_peer_vanishes(make_pair: PairFactory) -> None:
    """A peer that drops the link: PeerGone(None) from a pending receive, send and close."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        gone: list[PeerGone] = []

        async def receive() -> None:
            gone.append(await _raises(PeerGone, "receive after vanish", server.receive))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await client.vanish()
        _expect(gone[0].code is None, f"vanish gave code {gone[0].code}")
        sent = await _raises(PeerGone, "send after vanish", lambda: server.send("x"))
        _expect(sent.code is None, f"send after vanish gave code {sent.code}")
        await _raises(PeerGone, "close after vanish", lambda: server.close(1000))
        await _no_raise("abort after vanish", server.abort)


@_check
async def _check_abort(make_pair: PairFactory) -> None:
    """abort() drops the link at once: a pending receive ends, the client sees no close."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await server.send("before")
        gone: list[PeerGone] = []

        async def receive() -> None:
            gone.append(await _raises(PeerGone, "receive during abort", server.receive))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await _no_raise("abort", server.abort)
        _expect(gone[0].code is None, f"receive during abort gave code {gone[0].code}")
        await _no_raise("second abort", server.abort)
        await _expect_link_dropped(client, "after abort")
        await _raises(PeerGone, "send after abort", lambda: server.send("x"))
        await _raises(PeerGone, "close after abort", lambda: server.close(1000))


@_check
async def _check_answer_once(make_pair: PairFactory) -> None:
    """A handshake is answered once: accept twice, or reject after accept, is refused."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await _raises(LocalProtocolError, "second accept", server.accept)
        await _raises(LocalProtocolError, "reject after accept", lambda: server.reject(403))
        await client.send_text("still open")
        got = await server.receive()
        _expect(got == "still open", f"server received {got!r}")


@_check
async def _check_reject(make_pair: PairFactory) -> None:
    """reject(status, body): the client sees the status and body, then the link closes."""
    async with make_pair() as (server, client):
        await server.reject(403, body=b"origin not allowed")
        refusal = await _raises(HandshakeRejected, "wait_accepted", client.wait_accepted)
        _expect(refusal.status == 403, f"status {refusal.status}")
        _expect(refusal.body == b"origin not allowed", f"body {refusal.body!r}")
        await _raises(LocalProtocolError, "accept after reject", server.accept)
        await _raises(LocalProtocolError, "second reject", lambda: server.reject(403))
        # The link is closed by reject() itself, before abort().
        await _expect_link_dropped(client, "after reject")
        await _no_raise("abort after reject", server.abort)


@_check
async def _check_reject_without_body(make_pair: PairFactory) -> None:
    """A refusal with headers and no body."""
    async with make_pair() as (server, client):
        await server.reject(503, headers=(("retry-after", "5"),))
        refusal = await _raises(HandshakeRejected, "wait_accepted", client.wait_accepted)
        _expect((refusal.status, refusal.body) == (503, b""), f"refusal {refusal!r}")


@_check
async def _check_abort_before_answer(make_pair: PairFactory) -> None:
    """abort() during the handshake: the client learns the link is gone."""
    async with make_pair() as (server, client):
        await _no_raise("abort", server.abort)
        await _raises(PeerGone, "wait_accepted after abort", client.wait_accepted)


@_check
async def _check_peer_leaves_during_handshake(make_pair: PairFactory) -> None:
    """The client vanishes before the answer: accept raises PeerGone, or receive does."""
    async with make_pair() as (server, client):
        await client.vanish()
        try:
            await server.accept()
        except PeerGone:
            pass
        else:
            gone = await _raises(PeerGone, "receive after the client left", server.receive)
            _expect(gone.code is None, f"code {gone.code}")
        await _no_raise("abort", server.abort)


@_check
async def _check_interrupted_send(make_pair: PairFactory) -> None:
    """A send cut short by a timeout never leaves a corrupt stream behind.

    The client stops reading; the server sends until a send blocks (buffering
    must be bounded), and the blocked send is cancelled. The transport may
    then be broken (the next send and close raise PeerGone and the link
    drops) or intact (a cancelled send sent nothing); either way the client
    reads only whole frames, and never a close frame after a partial one.
    """
    chunk = "z" * 65_536
    sent = 0
    async with make_pair() as (server, client):
        await _accepted(server, client)
        with trio.move_on_after(0.5) as stall:
            while sent < 4096:  # 256 MiB: more than any sane buffering
                await server.send(chunk)
                sent += 1
        _expect(stall.cancelled_caught, f"{sent} sends of 64 KiB never blocked")
        outcome: list[str] = []

        async def server_carries_on() -> None:
            try:
                await server.send("after")
                await server.close(1000, "done")
                outcome.append("closed")
            except PeerGone:
                outcome.append("broken")

        received: list[Frame] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_carries_on)
            while True:
                try:
                    frame = await client.receive_frame()
                except PeerGone:
                    break
                except RemoteProtocolError as exc:
                    raise AssertionError(f"the client got a corrupt stream: {exc}") from exc
                received.append(frame)
                if isinstance(frame, CloseFrame):
                    break
        if outcome == ["closed"]:
            # Intact: every chunk that was accepted, "after", then the close.
            _expect(
                received
                == [TextFrame(chunk)] * sent + [TextFrame("after"), CloseFrame(1000, "done")],
                f"an intact stream delivered {len(received)} frames, ending {received[-2:]!r:.200}",
            )
            await _raises(PeerGone, "client receive after the close", client.receive_frame)
        else:
            # Broken: whole chunks only (the partial one never completes), no close.
            intact = [TextFrame(chunk)] * len(received)
            _expect(received == intact, f"a broken stream delivered {received[-1:]!r:.200}")
            _expect(len(received) <= sent, f"client received {len(received)} of {sent} sent")
        await _no_raise("abort", server.abort)


@_check
async def _check_cancelled_close(make_pair: PairFactory) -> None:
    """close() waits for the peer's answer; cancelled, abort() still cleans up."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        with trio.move_on_after(0.2) as waited:
            await server.close(1000, "bye")
        _expect(waited.cancelled_caught, "close returned without the peer's close frame")
        await _no_raise("abort", server.abort)
        await _raises(PeerGone, "send after abort", lambda: server.send("x"))
        while True:
            try:
                await client.receive_frame()
            except PeerGone:
                break
        _expect(len(_close_frames(client)) <= 1, f"close frames: {client.frames!r}")


#: Names of the checks :func:`check_message_stream` runs, in order.
MESSAGE_STREAM_CHECKS: tuple[str, ...] = tuple(_CHECKS)


async def check_message_stream(
    make_pair: PairFactory,
    *,
    checks: Iterable[str] | None = None,
    check_timeout: float = 10.0,
) -> None:
    """Check that a transport keeps the :class:`~chatcore.MessageStream` contract.

    Each check opens a fresh pair with ``make_pair`` and drives both ends.
    Run it from a test; to see each check as its own test, parametrize over
    :data:`MESSAGE_STREAM_CHECKS`::

        @pytest.mark.parametrize("check", MESSAGE_STREAM_CHECKS)
        async def test_my_transport(check):
            await check_message_stream(open_my_pair, checks=[check])

    Some checks wait on real time (a send that must block, a close the peer
    never answers, up to about a second each), so a socket transport needs a
    few seconds for the whole suite; on ``autojump_clock`` the memory
    transport takes none.

    Args:
        make_pair: Makes ``(server stream, client peer)`` pairs (see :class:`PairFactory`).
        checks: Names from :data:`MESSAGE_STREAM_CHECKS` to run (default: all).
        check_timeout: Seconds each check may take.

    Raises:
        AssertionError: a check failed (the message names the check).
        KeyError: an unknown check name.
    """
    names = list(MESSAGE_STREAM_CHECKS if checks is None else checks)
    for name in names:
        if name not in _CHECKS:
            raise KeyError(f"unknown check {name!r}; known: {', '.join(MESSAGE_STREAM_CHECKS)}")
    for name in names:
        try:
            with trio.fail_after(check_timeout):
                await _CHECKS[name](make_pair)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        except trio.TooSlowError as exc:
            raise AssertionError(f"{name}: did not finish within {check_timeout} s") from exc
        except Exception as exc:
            raise AssertionError(f"{name}: raised {exc!r}") from exc
