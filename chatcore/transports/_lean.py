"""The lean transport: a WebSocket on a plain non-blocking socket, h11 + wsproto.

Theory of operation
-------------------

hypercorn and trio-websocket spend most of a frame's cost on the way to the
socket, not in the WebSocket protocol: a task switch to the task that owns
the socket, Trio's socket wrapper with its checkpoints, and (hypercorn) the
ASGI send path with its lock. A :class:`LeanStream` owns the socket itself (a
standard-library socket in non-blocking mode, waited on with
:func:`trio.lowlevel.wait_readable` / :func:`~trio.lowlevel.wait_writable`)
and speaks the protocol with the same libraries the others use: **h11** for
the HTTP handshake (and its refusals), **wsproto** for the frames it receives
and for control frames.

Rule 1 (writes): a frame is written with one non-blocking ``send()`` the moment
it is handed over. What the kernel does not take stays in the stream's output
buffer, in order, and every later write goes behind it; only then does a task
wait for the socket to become writable (:meth:`LeanStream.flush`). So
:meth:`LeanStream.send_nowait` lets the process's pacer write the batched
frames of every ready connection in one pass, with no task switch per
connection (see ``chatcore._connection``).

Rule 2 (text frames): the server's text frames are built here (FIN + opcode,
length, payload: a server never masks), not by wsproto, because nothing else
is negotiated (no extension: the lean engine declines compression) and
wsproto's general frame builder costs more than the rest of a write. Control
frames (close, pong) go through wsproto, which tracks the close handshake.

Rule 3 (reads): one ``recv()`` may hold many frames; all of them are parsed
and queued, and :meth:`LeanStream.receive` returns queued messages without
yielding. It yields once per socket read, so a client that never stops
sending cannot starve the run.

Rule 4 (faults): every OS error is :class:`~chatcore.PeerGone`; a framing fault
wsproto reports (bad UTF-8: 1007, a protocol error: 1002) is answered with that
close frame and reported as :class:`~chatcore.RemoteProtocolError`, and so is a
message larger than twice ``max_message_bytes`` (1009; the actor itself
closes anything over the limit with 1009, this bounds what is buffered).

Rule 5 (endings): only this stream closes its socket. A clean close (both close
frames exchanged, nothing left unsent) ends with a FIN; anything else (abort,
a broken write) with a RST, so the kernel drops what a stalled client never
read. A write cancelled with bytes still unsent marks the stream broken: the
wire may end in a partial frame, so nothing is written after it.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import cast

import h11
import trio
import wsproto.utilities
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from .._exceptions import LocalProtocolError, PeerGone, RemoteProtocolError
from .._frame_parser import untie_parser
from .._transport import MessageStream
from ..sansio import (
    HandshakeLimits,
    HandshakeRequest,
    check_request_head,
    check_websocket_key,
    handshake_status_for,
)

__all__ = [
    "HandshakeHead",
    "LeanStream",
    "drop_socket",
    "read_request_head",
]

logger = logging.getLogger("chatcore.transport")

#: Bytes asked of the kernel per read.
RECEIVE_SIZE = 65_536
# The longest close reason that fits a control frame (125 - 2 bytes of code).
_MAX_REASON_BYTES = 123
# SO_LINGER on, timeout 0: close() sends a RST and discards unsent data.
_LINGER_RST = struct.pack("ii", 1, 0)
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame (a server's frame, Rule 2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65_536:
        return _PACK_16(0x81, 126, size) + payload
    return _PACK_64(0x81, 127, size) + payload


# The text last framed by send_nowait, and its frame (see there).
_last_frame: tuple[str | None, bytes] = (None, b"")


def drop_socket(sock: socket.socket, *, graceful: bool) -> None:
    """Close ``sock`` now: with a FIN if ``graceful``, else with a RST. Never raises."""
    if sock.fileno() < 0:
        return
    try:
        if not graceful:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass  # already reset by the peer
    trio.lowlevel.notify_closing(sock)  # waiters get ClosedResourceError
    sock.close()


async def _receive_some(sock: socket.socket) -> bytes:
    """One read; ``b""`` at EOF. Yields once (Rule 3). Raises OSError, ClosedResourceError."""
    try:
        data = sock.recv(RECEIVE_SIZE)
    except BlockingIOError:
        await trio.lowlevel.wait_readable(sock)
        return sock.recv(RECEIVE_SIZE)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return data


class HandshakeHead:
    """A request head read by :func:`read_request_head`.

    Attributes:
        connection: The h11 connection it was read with (it answers the request).
        request: The h11 request (method, target, headers).
        client: The peer's ``(host, port)``, or ``None``.
    """

    __slots__ = ("client", "connection", "request", "started")

    def __init__(
        self,
        connection: h11.Connection,
        request: h11.Request,
        client: tuple[str, int] | None,
        started: float = 0.0,
    ) -> None:
        self.connection = connection
        self.request = request
        self.client = client
        #: When its first byte was awaited (``time.monotonic()``; for the access log).
        self.started = started

    def __repr__(self) -> str:
        return f"<HandshakeHead {self.request.method.decode()} {self.request.target[:80]!r}>"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase bytes), or ``None``."""
        for key, value in self.request.headers:
            if key == name:
                return value
        return None

    @property
    def websocket_upgrade(self) -> bool:
        """True if the request asks to switch to WebSocket (any version)."""
        upgrade = self.header(b"upgrade") or b""
        return b"websocket" in upgrade.lower()

    def handshake_fault(self) -> tuple[int, str] | None:
        """Why this upgrade request cannot be accepted (status, text), or ``None``."""
        if self.request.method != b"GET":
            return 400, "a WebSocket handshake must be a GET"
        if self.request.http_version != b"1.1":
            return 400, "a WebSocket handshake must be HTTP/1.1"
        tokens = (self.header(b"connection") or b"").lower().split(b",")
        if b"upgrade" not in (token.strip() for token in tokens):
            return 400, "missing Connection: Upgrade"
        if self.header(b"sec-websocket-version") != b"13":
            return 426, "unsupported WebSocket version (13 only)"
        refusal = check_websocket_key(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in self.request.headers
        )
        if refusal is not None:
            return refusal.status, refusal.body.decode("utf-8", "replace")
        return None

    def handshake_request(self) -> HandshakeRequest:
        """The request as chatcore sees it (path, query, headers, subprotocols)."""
        target = self.request.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in self.request.headers
        )
        subprotocols = tuple(
            token.strip()
            for name, value in headers
            if name == "sec-websocket-protocol"
            for token in value.split(",")
            if token.strip()
        )
        return HandshakeRequest(
            path=path or "/",
            query_string=query,
            headers=headers,
            client=self.client,
            subprotocols=subprotocols,
        )


class HeadRefused(Exception):
    """The request head is unusable; answer ``status`` and drop the link."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        #: The HTTP status to answer with.
        self.status = status


async def read_request_head(
    sock: socket.socket, limits: HandshakeLimits | None = None
) -> HandshakeHead:
    """Read one HTTP request head from ``sock`` (the caller bounds the time).

    Args:
        sock: The connected socket, non-blocking.
        limits: Bounds on the head (default :class:`~chatcore.sansio.HandshakeLimits` ``()``).

    Raises:
        PeerGone: the client left (or reset) before a whole head arrived.
        HeadRefused: the head is malformed (400) or passes a bound (414, 431).
    """
    limits = limits or HandshakeLimits()
    started = time.monotonic()
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
    try:
        address = sock.getpeername()
        client = (str(address[0]), int(address[1]))
    except (OSError, IndexError, TypeError):
        client = None
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise HeadRefused(exc.error_status_hint, "malformed request") from exc
        if event is h11.NEED_DATA:
            try:
                data = await _receive_some(sock)
            except (OSError, trio.ClosedResourceError) as exc:
                raise PeerGone(None) from exc
            if not data:
                raise PeerGone(None)
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            # h11 bounds a head still arriving; every bound is applied to
            # the parsed head (a whole head can arrive in one read).
            refusal = check_request_head(event.target, event.headers, limits)
            if refusal is not None:
                raise HeadRefused(
                    refusal.status, refusal.body.decode("utf-8", "replace").rstrip("\n")
                )
            return HandshakeHead(connection, event, client, started)
        raise PeerGone(None)  # ConnectionClosed: EOF before a request


def _latin1_headers(headers: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


class LeanStream(MessageStream):
    """The server side of one WebSocket on a socket this stream owns (see module docs).

    Made by the lean engine (``chatcore serve --engine lean``) from a
    :class:`HandshakeHead` that asks for a WebSocket; you only need it to
    serve chatcore from your own listener.

    Args:
        sock: The connected socket, non-blocking; owned from here on.
        head: Its request head (:func:`read_request_head`).
        max_message_bytes: The most the stream buffers of one incoming message
            is twice this; beyond it the client gets 1009.
    """

    #: Writes go to the socket without a task switch (Rule 1).
    direct_send = True

    __slots__ = (
        "_accepted",
        "_answered",
        "_close_received",
        "_close_sent",
        "_closed",
        "_failure",
        "_flush_lot",
        "_flushing",
        "_fragments",
        "_fragments_size",
        "_head",
        "_inbound",
        "_max_buffered",
        "_out",
        "_proto",
        "_proto_failed",
        "_sock",
        "request",
    )

    def __init__(self, sock: socket.socket, head: HandshakeHead, max_message_bytes: int) -> None:
        #: The client's handshake.
        self.request = head.handshake_request()
        self._sock = sock
        # The h11 side answers the handshake; dropped once it is answered.
        self._head: HandshakeHead | None = head
        # wsproto's frame protocol once accepted (the close handshake is
        # tracked here: wsproto's Connection adds an event queue per link).
        self._proto: FrameProtocol | None = None
        # The parser failed (a framing fault): nothing more can be parsed.
        self._proto_failed = False
        self._answered = False
        self._accepted = False
        # Bytes handed over but not yet taken by the kernel (Rule 1).
        self._out = bytearray()
        # A task waits for writability (one at a time; others park here).
        self._flushing = False
        self._flush_lot: trio.lowlevel.ParkingLot | None = None
        # Whole messages parsed and not yet received (Rule 3); a list, not a
        # deque: it holds a few messages at most, and an empty deque costs
        # ~0.8 KiB per connection.
        self._inbound: list[str | bytes] = []
        # The message being reassembled from fragments (made for the first
        # fragmented message), and its size so far.
        self._fragments: list[str | bytes] | None = None
        self._fragments_size = 0
        self._max_buffered = 2 * max_message_bytes
        # What every later receive raises once the link ended or failed.
        self._failure: PeerGone | RemoteProtocolError | None = None
        # Our close frame went out (handed over; nothing may follow it).
        self._close_sent = False
        # The peer's close frame arrived.
        self._close_received = False
        # The socket is closed (abort, reject, or a finished close).
        self._closed = False

    def __repr__(self) -> str:
        state = (
            "closed"
            if self._closed
            else "closing"
            if self._close_sent
            else "open"
            if self._accepted
            else "handshake"
        )
        return (
            f"<LeanStream {self.request.path!r} {state} client={self.request.client} "
            f"unsent={len(self._out)}B>"
        )

    # -- the socket ------------------------------------------------------------

    def _lost(self) -> PeerGone:
        """The link failed: close it (RST) and remember why."""
        if self._failure is None:
            self._failure = PeerGone(None)
        self._close_socket(graceful=False)
        return PeerGone(None)

    def _close_socket(self, *, graceful: bool) -> None:
        if not self._closed:
            self._closed = True
            self._out.clear()
            drop_socket(self._sock, graceful=graceful)

    def _write_nowait(self, data: bytes | bytearray) -> bool:
        """Rule 1: write now, or queue behind what is waiting. True if all went out."""
        out = self._out
        if out:
            out += data
            return False
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise self._lost() from exc
        if sent == len(data):
            return True
        out += memoryview(data)[sent:]
        return False

    async def flush(self) -> None:
        """Wait until every byte handed over is written (Rule 1).

        Raises:
            PeerGone: the link failed meanwhile.

        Cancellation: with bytes still unsent the stream is broken (the wire
        may end in a partial frame); later writes raise :class:`PeerGone`.
        """
        while self._flushing:
            if self._flush_lot is None:
                self._flush_lot = trio.lowlevel.ParkingLot()
            await self._flush_lot.park()
        out = self._out
        if not out:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        self._flushing = True
        done = False
        try:
            while out:
                await trio.lowlevel.wait_writable(self._sock)
                try:
                    sent = self._sock.send(out)
                except BlockingIOError:
                    continue
                del out[:sent]
            done = True
        except (OSError, trio.ClosedResourceError) as exc:
            raise self._lost() from exc
        finally:
            self._flushing = False
            if self._flush_lot:
                self._flush_lot.unpark_all()
            if not done and not self._closed:
                # Cancelled midway: the wire may hold part of a frame, and
                # nothing may follow it. Reset the link now (Rule 5).
                self._lost()

    def _check_writable(self) -> None:
        failure = self._failure
        if failure is not None:
            raise PeerGone(failure.code if isinstance(failure, PeerGone) else None)
        if self._closed or self._close_sent or self._proto is None:
            raise PeerGone(None)

    # -- the handshake -----------------------------------------------------------

    async def accept(
        self, *, subprotocol: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """See :meth:`MessageStream.accept` (an h11 ``101 Switching Protocols``).

        Raises:
            PeerGone: the client left during the handshake.
            LocalProtocolError: answered already, a subprotocol the client did
                not offer, or a header the handshake owns.
        """
        if subprotocol is not None and subprotocol not in self.request.subprotocols:
            raise LocalProtocolError(f"subprotocol {subprotocol!r} was not offered by the client")
        for name, _ in headers:
            if name.lower().startswith("sec-websocket-") or name.lower() in (
                "upgrade",
                "connection",
            ):
                raise LocalProtocolError(f"header {name!r} cannot be set on accept")
        self._answer()
        head = self._head
        assert head is not None
        self._head = None
        if self._closed:
            raise PeerGone(None)
        key = head.header(b"sec-websocket-key") or b""
        response = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", wsproto.utilities.generate_accept_token(key.strip())),
        ]
        if subprotocol is not None:
            response.append((b"sec-websocket-protocol", subprotocol.encode("latin-1")))
        response += _latin1_headers(headers)
        h11_connection = head.connection
        data = h11_connection.send(h11.InformationalResponse(status_code=101, headers=response))
        trailing, _ = h11_connection.trailing_data
        assert data is not None
        # Freed with the connection, not by the cycle collector (chatcore._frame_parser).
        self._proto = untie_parser(FrameProtocol(False, []))
        self._accepted = True
        if trailing:
            self._feed(bytes(trailing))
        if not self._write_nowait(data):
            await self.flush()
        else:
            await trio.lowlevel.checkpoint()

    async def reject(
        self, status: int, *, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """See :meth:`MessageStream.reject` (an h11 response, then a FIN)."""
        self._answer()
        head, self._head = self._head, None
        if self._closed or head is None:
            await trio.lowlevel.checkpoint()
            return
        await respond(self._sock, head.connection, status, body, _latin1_headers(headers))
        self._close_socket(graceful=True)

    # -- messages --------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse ``data``; queue messages, answer pings and the peer's close (Rule 3, 4)."""
        proto = self._proto
        assert proto is not None
        proto.receive_bytes(data)
        try:
            for frame in proto.received_frames():
                opcode = frame.opcode
                if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                    payload = cast("str | bytes", frame.payload)
                    fragments = self._fragments
                    if frame.message_finished and fragments is None:
                        if len(payload) > self._max_buffered:
                            self._fail(RemoteProtocolError("message too big", code=1009))
                            return
                        self._inbound.append(
                            payload if isinstance(payload, str) else bytes(payload)
                        )
                        continue
                    if fragments is None:
                        fragments = self._fragments = []
                        self._fragments_size = 0
                    fragments.append(payload)
                    self._fragments_size += len(payload)
                    if self._fragments_size > self._max_buffered:
                        self._fail(RemoteProtocolError("message too big", code=1009))
                        return
                    if frame.message_finished:
                        self._fragments = None
                        if opcode is Opcode.TEXT:
                            self._inbound.append("".join(cast("list[str]", fragments)))
                        else:
                            self._inbound.append(b"".join(cast("list[bytes]", fragments)))
                elif opcode is Opcode.PING:
                    if not self._close_sent and not self._closed:
                        self._write_nowait(proto.pong(cast(bytes, frame.payload)))
                elif opcode is Opcode.CLOSE:
                    code, reason = cast("tuple[int, str]", frame.payload)
                    self._close_received = True
                    if not self._close_sent and not self._closed:
                        self._close_sent = True
                        self._write_nowait(proto.close(code, reason))  # answered once
                    self._failure = self._failure or PeerGone(int(code), reason or "")
                    return
        except ParseFailed as exc:
            self._proto_failed = True
            self._fail(RemoteProtocolError(str(exc), code=exc.code))

    def _fail(self, failure: RemoteProtocolError) -> None:
        """A fault of the peer: answer with its close frame, stop reading (Rule 4)."""
        self._failure = self._failure or failure
        proto = self._proto
        if not self._close_sent and proto is not None and not self._closed:
            self._close_sent = True
            try:
                self._write_nowait(proto.close(failure.code, str(failure)))
            except PeerGone:
                pass

    async def receive(self) -> str | bytes:
        """See :meth:`MessageStream.receive`.

        Returns a message already parsed without yielding; reads the socket
        (and yields) only when none is queued (Rule 3).

        Raises:
            PeerGone: the peer closed (its code) or vanished (``None``).
            RemoteProtocolError: the peer broke framing; its close frame was sent.
        """
        inbound = self._inbound
        while not inbound:
            if self._failure is not None:
                await trio.lowlevel.checkpoint()
                raise _copy(self._failure)
            if self._proto is None or self._closed:
                await trio.lowlevel.checkpoint()
                raise PeerGone(None)
            try:
                data = await _receive_some(self._sock)
            except (OSError, trio.ClosedResourceError) as exc:
                raise self._lost() from exc
            if not data:
                self._failure = self._failure or PeerGone(None)
                continue
            self._feed(data)
            if self._out and not self._flushing:
                await self.flush()  # a pong or a close answer the kernel did not take
            if self._close_received and self._close_sent and not self._out:
                # Both close frames exchanged: the server ends TCP (RFC 6455, 7.1.1).
                self._close_socket(graceful=True)
        return inbound.pop(0)

    def send_nowait(self, text: str) -> bool:
        """See :meth:`MessageStream.send_nowait` (Rule 1, Rule 2)."""
        self._check_writable()
        global _last_frame
        # A fan-out hands the same text object to every member in one pass:
        # encode and frame it once (one entry, compared by identity).
        last_text, frame = _last_frame
        if text is not last_text:
            frame = text_frame(text.encode())
            _last_frame = (text, frame)
        return self._write_nowait(frame)

    async def send(self, text: str) -> None:
        """See :meth:`MessageStream.send`. Yields only if the socket is full.

        Raises:
            PeerGone: the link is gone, broken or closing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self.send_nowait(text):
            await self.flush()

    async def close(self, code: int, reason: str = "") -> None:
        """See :meth:`MessageStream.close`: flush, close frame, the peer's answer, FIN.

        Before the handshake was answered the client gets an HTTP refusal
        instead (:func:`~chatcore.sansio.handshake_status_for`).

        Raises:
            PeerGone: the link was already gone or broke.
        """
        if not self._accepted:
            if not self._answered:
                await self.reject(handshake_status_for(code), body=reason.encode())
            await trio.lowlevel.checkpoint()
            return
        proto = self._proto
        assert proto is not None
        if self._closed:
            raise _copy(self._failure) if self._failure else PeerGone(None)
        if not self._close_sent:
            if self._failure is not None and isinstance(self._failure, PeerGone):
                raise _copy(self._failure)
            encoded = reason.encode()[:_MAX_REASON_BYTES].decode("utf-8", "ignore")
            self._close_sent = True
            self._write_nowait(proto.close(code, encoded))
        await self.flush()
        # The peer's answer (or EOF); messages that arrive meanwhile are dropped.
        while not self._close_received and not self._proto_failed:
            try:
                data = await _receive_some(self._sock)
            except (OSError, trio.ClosedResourceError) as exc:
                raise self._lost() from exc
            if not data:
                break
            self._fragments = None  # not reassembled any more: only the close counts
            self._feed(data)
            self._inbound.clear()
        await self.flush()
        self._close_socket(graceful=True)

    async def abort(self) -> None:
        """See :meth:`MessageStream.abort`: a RST unless the close was clean (Rule 5)."""
        clean = self._close_sent and self._close_received and not self._out
        if self._failure is None:
            self._failure = PeerGone(None)
        self._close_socket(graceful=clean)
        await trio.lowlevel.checkpoint_if_cancelled()


def _copy(failure: PeerGone | RemoteProtocolError) -> PeerGone | RemoteProtocolError:
    """A fresh exception like ``failure`` (re-raising one object chains tracebacks)."""
    if isinstance(failure, PeerGone):
        return PeerGone(failure.code, failure.reason)
    return RemoteProtocolError(str(failure), code=failure.code)


async def respond(
    sock: socket.socket,
    connection: h11.Connection,
    status: int,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send one whole HTTP response on ``sock`` with ``Connection: close``. Never raises
    because the client is gone.
    """
    head = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *(headers or []),
    ]
    try:
        data = connection.send(h11.Response(status_code=status, headers=head))
        assert data is not None
        if body and connection.our_state is h11.SEND_BODY:
            data += connection.send(h11.Data(data=body)) or b""
        data += connection.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError as exc:
        logger.debug("response %d not sent: %s", status, exc)
        return
    await write_all(sock, data)


async def write_all(sock: socket.socket, data: bytes) -> bool:
    """Write ``data`` (waiting for the socket as needed). False if the link failed."""
    view = memoryview(data)
    try:
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            view = view[sent:]
    except (OSError, trio.ClosedResourceError) as exc:
        logger.debug("write failed: %r", exc)
        return False
    await trio.lowlevel.checkpoint_if_cancelled()
    return True
