"""Frame-level WebSocket peers: the client end of a transport under test.

These are for testing *transports*: the conformance suite
(:func:`~chatcore.testing.check_message_stream`) drives one end of a
connection through a :class:`TransportPeer`, and transport tests use a peer
where a client must misbehave on the wire (raw frames, a reset, a client that
stops reading). To test an *application*, use
:class:`~chatcore.testing.TestClient`, which runs on these peers.

* :class:`MemoryPeer`: the client end of the in-memory transport.
* :class:`WebSocketPeer`: a real WebSocket client (wsproto over a trio stream).
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Protocol

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
from wsproto.extensions import PerMessageDeflate

from .._exceptions import HandshakeRejected, PeerGone, RemoteProtocolError
from ..transports._memory import BinaryFrame, CloseFrame, MemoryClient, TextFrame

__all__ = ["Frame", "MemoryPeer", "TransportPeer", "WebSocketPeer"]

#: A frame as a peer sees it.
Frame = TextFrame | BinaryFrame | CloseFrame


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
        self.vanish_nowait()
        await trio.lowlevel.checkpoint()

    def vanish_nowait(self) -> None:
        """:meth:`vanish`, synchronously."""
        self.client.vanish()


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
        # Events parsed but not consumed yet, each with whether parsing it
        # changed the protocol state (a real close frame does; a parse
        # failure reported as a close event does not).
        self._pending: deque[tuple[Event, bool]] = deque()
        # Whether the event :meth:`_next_event` returned last changed the state.
        self._last_changed_state = False
        # Parts of a fragmented message being reassembled.
        self._parts: list[str | bytes] = []
        # The server's side ended (EOF or reset).
        self._eof = False
        # One writer at a time on the stream: a receive answering a ping or a
        # close may run beside a task that sends.
        self._send_lock = trio.StrictFIFOLock()
        # Extensions offered with the request, and the server's accepted ones.
        self._offered: list[PerMessageDeflate] = []
        #: The extensions the server accepted (``permessage-deflate``), known
        #: once :meth:`wait_accepted` returned.
        self.extensions: tuple[str, ...] = ()

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
        compression: bool = False,
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
            compression: Offer ``permessage-deflate``, as every browser does;
                :attr:`extensions` says whether the server took it.
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
        await peer.send_request(
            target, headers=headers, subprotocols=subprotocols, compression=compression
        )
        return peer

    async def send_request(
        self,
        target: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
        compression: bool = False,
    ) -> None:
        """Send the opening handshake (``compression``: offer ``permessage-deflate``)."""
        self._offered = [PerMessageDeflate()] if compression else []
        request = Request(
            host=self.host,
            target=target,
            extra_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            subprotocols=list(subprotocols),
            extensions=list(self._offered),
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
            async with self._send_lock:
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
            events = self._ws.events()
            while True:
                # wsproto moves its state as it yields each event, so the
                # state is compared around each one, not around the batch.
                before = self._ws.state
                event = next(events, None)
                if event is None:
                    break
                self._pending.append((event, self._ws.state is not before))
            if self._pending:
                event, self._last_changed_state = self._pending.popleft()
                return event
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
                self.extensions = tuple(extension.name for extension in event.extensions)
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
                headers = tuple(
                    (bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1"))
                    for name, value in event.headers
                )
                raise HandshakeRejected(event.status_code, bytes(body), headers)

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
            async with self._send_lock:
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
                if not self._last_changed_state:
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
        self.vanish_nowait()
        await trio.aclose_forcefully(self.stream)

    def vanish_nowait(self) -> None:
        """:meth:`vanish`, synchronously (a socket stream is reset at once).

        A task blocked reading or writing this peer wakes up with
        :class:`~chatcore.PeerGone`. A stream that is not a socket is only
        closed by :meth:`vanish` or :meth:`aclose`.
        """
        if isinstance(self.stream, trio.SocketStream):
            try:
                self.stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            except OSError:
                pass
            self.stream.socket.close()

    async def aclose(self) -> None:
        """Close the stream (no close frame). Idempotent."""
        await trio.aclose_forcefully(self.stream)
