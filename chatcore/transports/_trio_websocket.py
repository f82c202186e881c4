"""The trio-websocket transport: a trio-websocket connection as a :class:`MessageStream`.

Theory of operation
-------------------

trio-websocket 0.12.2 does the WebSocket framing (through wsproto) and runs a
background *reader task* per connection that parses input, answers pings and
close frames, and queues whole messages. We use it only through
:func:`trio_websocket.wrap_server_stream`, never through its server, and we
hand it a stream of our own (:class:`_OwnedStream`) in front of the TCP
socket, because the library's own lifecycle handling has traps (measured;
see ``docs/transports.md``). Each trap and the piece that handles it:

* **An exception in a handler, or ``accept()`` after ``reject()``, kills
  trio-websocket's ``serve_websocket`` and every connection on it.** We do not
  use that server: :func:`chatcore.serve_websocket` runs each client behind its own
  exception firewall, and :class:`TrioWebSocketStream` answers a handshake at
  most once (a second answer raises :class:`~chatcore.LocalProtocolError`
  before the library is touched).
* **A cancelled ``send_message`` leaves a partial frame on the wire and the
  connection looks alive.** :class:`_OwnedStream` marks itself *broken* when a
  write does not complete and refuses every later write (the library's pongs
  and close frames included); :meth:`TrioWebSocketStream.send` then resets the
  TCP connection at once. Later sends and closes raise
  :class:`~chatcore.PeerGone`.
* **After ``reject()`` the TCP connection stays open, and the handshake
  timeout defaults to 60 s.** :meth:`~TrioWebSocketStream.reject` closes TCP
  itself; :func:`open_trio_websocket_stream` bounds the handshake read by
  :attr:`Config.handshake_timeout <chatcore.Config.handshake_timeout>` and
  cuts it short when the client leaves.
* **Concurrent ``aclose()`` calls race on which code goes out.**
  :meth:`~TrioWebSocketStream.close` is single-flight: the first call's code is
  sent, later calls wait for it.
* **``ws.closed`` is not a liveness signal; pongs stop while nobody reads.**
  We never use ``closed`` to decide liveness; the connection actor's reader
  calls :meth:`~TrioWebSocketStream.receive` continuously.
* **On a framing error (e.g. invalid UTF-8) trio-websocket drops TCP without
  a close frame** (measured: the client sees 1006, not 1007). Our stream only
  takes note when the library closes it, so :meth:`~TrioWebSocketStream.close`
  can still send the 1007 close frame.
* **On an oversize message trio-websocket sends the 1009 close frame
  itself** and stops reading. :meth:`~TrioWebSocketStream.receive` reports it
  as :class:`~chatcore.RemoteProtocolError` (code 1009), and ``close`` does not
  send a second close frame. Unread input would turn our close into a RST
  that can destroy that frame, so ``close`` half-closes and reads until the
  client closes its side.
* **After parsing the peer's close frame the library refuses sends before it
  has answered it.** Whoever sees the peer's close first waits until the
  library is done with the link before TCP is closed, so the answer is not
  cut off; :meth:`~TrioWebSocketStream.send` raises
  :class:`~chatcore.PeerGone` with the peer's code.

* **The library's HTTP parser takes any request line and up to 16 KiB of
  headers, and any** ``Sec-WebSocket-Key``. :class:`_OwnedStream` feeds what
  the library reads to a :class:`~chatcore.sansio.RequestHeadScanner` first:
  a head over :attr:`Config.handshake_limits <chatcore.Config.handshake_limits>`
  is answered with 414 or 431 here (the library sees only EOF), and
  :func:`open_trio_websocket_stream` refuses a missing, repeated or malformed
  key with 400 before anyone can accept it.
* **wsproto answers protocol errors with no close frame** (unmasked frames,
  reserved bits, unknown opcodes, control frames over 125 bytes, bad close
  codes): as for invalid UTF-8, :meth:`~TrioWebSocketStream.receive` raises
  :class:`~chatcore.RemoteProtocolError` with wsproto's code and reason
  (1002, 1007) and :meth:`~TrioWebSocketStream.close` sends that close frame.

What an idle connection holds: four tasks (the actor's three and the
library's reader) and no more, because :func:`chatcore.serve_websocket` holds
thousands of them. The library's reader runs in a nursery the caller already
has (:class:`_LibraryNursery`), shielded by a scope of the link's, not in a
host task with a nursery of its own; it waits for input in
:meth:`_OwnedStream.receive_some`'s frame, not in trio's socket layers; the
handshake's state (the library's request, wsproto's h11 handshake) is let go
once the connection is open (:func:`_forget_handshake`); and the link's
events are flags until someone waits (:class:`_Flag`). See
``docs/performance.md`` for what each of these saved and for the floor
(trio-websocket's own connection and reader task: about 10 KiB).

Ownership of the socket: only this module closes it. A clean close (both
close frames exchanged) ends with a FIN; everything else (abort, a broken
send, a missed deadline) with a RST (``SO_LINGER`` 0), so the kernel discards
whatever is queued for a client that stopped reading.
"""

from __future__ import annotations

import http
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast

import attrs
import trio
import trio_websocket
import wsproto.utilities
from wsproto.connection import ConnectionState as WsState
from wsproto.connection import ConnectionType
from wsproto.frame_protocol import FrameProtocol
from wsproto.handshake import H11Handshake

from .._config import Config
from .._exceptions import ChatcoreError, LocalProtocolError, PeerGone, RemoteProtocolError
from .._transport import MessageStream
from ..sansio import HandshakeRequest, Reject, RequestHeadScanner, check_websocket_key

__all__ = ["TrioWebSocketStream", "open_trio_websocket_stream"]

logger = logging.getLogger("chatcore.transport")

#: Every exception trio-websocket, wsproto, trio streams or the OS may raise
#: for a link that failed. All of them become :class:`PeerGone`.
_LINK_ERRORS: tuple[type[Exception], ...] = (
    trio_websocket.ConnectionClosed,
    trio_websocket.HandshakeError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    wsproto.utilities.ProtocolError,
    OSError,
)

# Reading what a client sends after trio-websocket stopped reading: the
# library's reader is gone, but if it is not, the read is refused (busy).
_DRAIN_ERRORS: tuple[type[Exception], ...] = (*_LINK_ERRORS, trio.BusyResourceError)


# SO_LINGER on, timeout 0: close() sends a RST and discards unsent data.
_LINGER_RST = struct.pack("ii", 1, 0)

#: Seconds a refused handshake's answer may take, with the client's remaining
#: input read and discarded (so that closing does not reset the connection).
_REFUSAL_LINGER = 1.0

# First byte of an unfragmented close frame (FIN + opcode 0x8). wsproto turns
# each event into exactly one frame and trio-websocket writes each with one
# send_all, so a write that starts with it is a close frame.
_CLOSE_FRAME_START = 0x88


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    if isinstance(stream, trio.SSLStream) and isinstance(
        stream.transport_stream, trio.SocketStream
    ):
        return stream.transport_stream.socket
    return None


class _Flag:
    """A set-once flag with :class:`trio.Event`'s ``set`` / ``is_set`` / ``wait``.

    An idle connection holds several of these and most are never waited
    for, so the event (and its set of waiters) is made for the first waiter.
    """

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<_Flag {'set' if self._set else 'unset'}>"

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            if self._event is not None:
                self._event.set()

    async def wait(self) -> None:
        if self._set:
            await trio.lowlevel.checkpoint()
            return
        event = self._event
        if event is None:
            event = self._event = trio.Event()
        try:
            await event.wait()
        finally:
            # A waiter cut short (the handshake's wait on ``lost``) must not
            # leave its event behind for the rest of the connection.
            if not self._set and not event.statistics().tasks_waiting:
                self._event = None


#: Bytes one read asks for when the library gives no size (trio's default).
_RECEIVE_SIZE = 65536


def _read_nowait(sock: trio.socket.SocketType, max_bytes: int) -> bytes | OSError | None:
    """What the socket has now: bytes (``b""`` at EOF), its error, or None (nothing yet).

    The errors are returned, not raised: an exception raised in the reading
    coroutine's frame would give that frame a frame object for the rest of
    the connection (about 0.5 KiB per idle connection).
    """
    try:
        return os.read(sock.fileno(), max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        return exc


class _OwnedStream(trio.abc.Stream):
    """The TCP stream as trio-websocket sees it; chatcore keeps the socket.

    trio-websocket reads and writes through this object, but its ``aclose()``
    only takes note: the adapter decides when the socket closes and how (FIN
    or RST), because trio-websocket closes it at moments that lose data
    (before a 1007 close frame could go out) or never (after a refusal).
    """

    def __init__(self, inner: trio.abc.Stream, scanner: RequestHeadScanner | None = None) -> None:
        #: The real stream. Only this class and the adapter's close paths use it.
        self.inner = inner
        # Checks the request head against the handshake limits while the
        # library reads it; dropped once the head is complete.
        self.scanner = scanner
        # Set when the head broke a limit: the library got EOF instead of the
        # offending bytes, and the adapter answers with this refusal.
        self.refusal: Reject | None = None
        # Set by the adapter once the handshake is accepted: from then on every
        # write is one WebSocket frame (before it, a rejection body could start
        # with any byte).
        self.framing = False
        # A complete close frame went out (written by the library or by us).
        self.close_sent = False
        # A write did not complete (cancelled, timed out, failed): the wire may
        # hold a partial frame, so nothing may be written after it.
        self.broken = False
        # trio-websocket called aclose() (it gave up on the connection).
        self.closed_by_library = False
        # trio-websocket will write nothing more: it called aclose(), a write
        # failed, or we released the socket. (After a peer's close frame the
        # library answers it and then calls aclose(); releasing before that
        # would cut the answer off.)
        self.library_done = _Flag()
        # The socket was closed by us; set once, never cleared.
        self.released = _Flag()
        # Nothing more will come from the client (EOF, reset, the library gave
        # up, or we released the socket); cuts a handshake wait short.
        self.lost = _Flag()
        # Where trio-websocket's reader task runs: shielded, because the
        # connection actor's bounded close after a server shutdown needs the
        # reader (the peer's answer comes through it); cancelled when the
        # socket is released, which ends the reader on any stream.
        self.library_scope = trio.CancelScope(shield=True)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken or self.released.is_set():
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("the link is broken or was released")
        is_close = self.framing and len(data) > 0 and data[0] == _CLOSE_FRAME_START
        done = False
        try:
            await self.inner.send_all(data)
            done = True
        finally:
            if not done:
                self.broken = True
                self.library_done.set()
        if is_close:
            self.close_sent = True

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.released.is_set():
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the link was released")
        data: bytes | bytearray
        try:
            if self.framing and isinstance(self.inner, trio.SocketStream):
                # trio's stream would wait for input four calls deep (stream,
                # socket, non-blocking helper, wait_readable): an idle
                # connection's reader parked there costs about 1.5 KiB more.
                # So this frame does what trio does, with the wait here: a
                # cancellation point, a read that does not block, a wait only
                # when there is nothing to read, a checkpoint after that cannot
                # lose the data; OS errors become BrokenResourceError.
                # Nothing is raised in this frame while it reads (see
                # _read_nowait).
                sock = self.inner.socket
                await trio.lowlevel.checkpoint_if_cancelled()
                while (got := _read_nowait(sock, max_bytes or _RECEIVE_SIZE)) is None:
                    await trio.lowlevel.wait_readable(sock)
                await trio.lowlevel.cancel_shielded_checkpoint()
                if isinstance(got, OSError):
                    raise trio.BrokenResourceError from got
                data = got
            else:
                data = await self.inner.receive_some(max_bytes)
        except Exception:
            self.lost.set()
            raise
        if not data:
            self.lost.set()
        elif self.scanner is not None:
            if self.scanner.feed(data) is not None:
                # The library sees the end of the stream, never the excess.
                self.refusal = self.scanner.refusal
                self.scanner = None
                self.lost.set()
                return b""
            if self.scanner.complete:
                self.scanner = None
        return data

    async def aclose(self) -> None:
        # Called by trio-websocket only.
        self.closed_by_library = True
        self.library_done.set()
        self.lost.set()
        if not self.framing:
            # Before the WebSocket opened (a 400 for a request that is not a
            # WebSocket handshake): the response is out, nothing else to say.
            await self.release(graceful=True)
        else:
            await trio.lowlevel.checkpoint()

    def drop(self, *, graceful: bool) -> None:
        """Close the socket now: a RST unless ``graceful``. Idempotent; never raises.

        Synchronous, so it also works while the calling task is being
        cancelled. A non-socket stream is only marked released here;
        :meth:`release` closes it.
        """
        if self.released.is_set():
            return
        self.released.set()
        self.library_done.set()
        self.lost.set()
        self.library_scope.cancel()
        sock = _socket_of(self.inner)
        if sock is None:
            return
        try:
            if not graceful:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:  # pragma: no cover  (close of a valid fd does not fail)
            pass

    async def release(self, *, graceful: bool) -> None:
        """:meth:`drop`, then close the stream object too. Never raises but Cancelled."""
        self.drop(graceful=graceful)
        try:
            await trio.aclose_forcefully(self.inner)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


@attrs.frozen
class _Gone:
    """How the library's side of a connection ended (see ``_classify``)."""

    # The close code: the peer's, or the one trio-websocket failed the
    # connection with; None if the link just vanished.
    code: int | None
    reason: str
    # True if trio-websocket failed the connection on a fault of the peer
    # (1007 invalid UTF-8, 1002 bad framing, 1009 too big): the peer sent no
    # close frame, and ``code`` is the answer it should get.
    protocol_error: bool

    def error(self) -> ChatcoreError:
        if self.protocol_error:
            assert self.code is not None
            return RemoteProtocolError(self.reason or "protocol error", code=self.code)
        return PeerGone(self.code, self.reason)


_VANISHED = _Gone(None, "", protocol_error=False)


def _wsproto_state(ws: trio_websocket.WebSocketConnection) -> WsState | None:
    # trio-websocket does not say who started a close; the state of its
    # wsproto connection does. ``_wsproto`` is private, so read it
    # defensively: if a future version renames it, a close falls back to
    # "the peer closed" (still a correct close, only less precisely recorded).
    state = getattr(getattr(ws, "_wsproto", None), "state", None)
    return state if isinstance(state, WsState) else None


#: What an open connection's wsproto keeps in place of its own HTTP handshake
#: (see :func:`_forget_handshake`): one shared handshake that is never fed,
#: so it never has events.
_FINISHED_HANDSHAKE = H11Handshake(ConnectionType.SERVER)


def _forget_handshake(ws: trio_websocket.WebSocketConnection) -> bool:
    """Let an open connection's HTTP/1.1 handshake state go; True if it went.

    Once the WebSocket is open, wsproto's ``WSConnection`` uses its
    ``handshake`` only to ask it for events (there are none after the
    request was taken), yet it keeps the h11 connection that parsed the
    request, its receive buffer and an event queue: about 3 KiB per idle
    connection. Swapping in :data:`_FINISHED_HANDSHAKE` frees them.
    trio-websocket's ``_wsproto`` is private, so it is read defensively: if a
    future version renames it, nothing is freed and nothing else changes.
    """
    protocol = getattr(ws, "_wsproto", None)
    if (
        isinstance(protocol, wsproto.WSConnection)
        and protocol.connection is not None
        and isinstance(protocol.handshake, H11Handshake)
    ):
        protocol.handshake = _FINISHED_HANDSHAKE
        return True
    return False


def _encode_headers(headers: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


class TrioWebSocketStream(MessageStream):
    """One trio-websocket server connection as a :class:`~chatcore.MessageStream`.

    Made by :func:`open_trio_websocket_stream` (and so by
    :func:`serve_websocket`) with the client's handshake read and not yet
    answered; the connection actor drives it from there. Every library and OS
    error is translated here: methods raise only :class:`~chatcore.PeerGone`,
    :class:`~chatcore.RemoteProtocolError` (from :meth:`receive`),
    :class:`~chatcore.LocalProtocolError` (a caller bug) and
    :class:`trio.Cancelled`.

    Attributes:
        request: The client's handshake, built at the edge from wsproto's
            request (path and query split, header names lowercased, the
            ``Host`` header restored, client address from the socket).
    """

    def __init__(
        self,
        library_request: trio_websocket.WebSocketRequest,
        link: _OwnedStream,
        request: HandshakeRequest,
    ) -> None:
        #: The client's handshake.
        self.request = request
        # trio-websocket's handshake object; used once, to accept or reject,
        # then dropped (it holds the parsed request).
        self._library_request: trio_websocket.WebSocketRequest | None = library_request
        # Our stream in front of the socket (the library reads/writes it).
        self._link = link
        # The library's connection, once accepted.
        self._ws: trio_websocket.WebSocketConnection | None = None
        # The handshake was answered (accept or reject); a second answer is a bug.
        self._answered = False
        # close() was called; later calls wait for the first one.
        self._close_started = False
        # Set when the first close() call finished (however it ended).
        self._close_done = _Flag()
        # The first close() call completed the close handshake.
        self._close_clean = False
        # How the library's side ended, decided once (receive, send and close
        # must agree on it).
        self._gone: _Gone | None = None

    def __repr__(self) -> str:
        client = (
            f"{self.request.client[0]}:{self.request.client[1]}" if self.request.client else "?"
        )
        if self._link.released.is_set():
            state = "RELEASED"
        elif self._ws is not None:
            state = "OPEN"
        else:
            state = "ANSWERED" if self._answered else "HANDSHAKE"
        return f"<TrioWebSocketStream {client} {self.request.path} {state}>"

    # -- handshake -------------------------------------------------------------

    async def accept(
        self, *, subprotocol: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Accept the handshake (send the 101 response).

        Args:
            subprotocol: The subprotocol to select; must be one the client offered.
            headers: Extra response headers (latin-1 encodable).

        Raises:
            LocalProtocolError: the handshake was already answered, or
                ``subprotocol`` was not offered.
            PeerGone: the client went away during the handshake.

        Cancellation: the response may be half written, so the TCP connection
        is reset.
        """
        extra = _encode_headers(headers)
        if subprotocol is not None and subprotocol not in self.request.subprotocols:
            raise LocalProtocolError(f"subprotocol {subprotocol!r} was not offered by the client")
        self._answer()
        assert self._library_request is not None  # _answer() let us through once
        library_request, self._library_request = self._library_request, None
        self._link.framing = True
        try:
            self._ws = await library_request.accept(subprotocol=subprotocol, extra_headers=extra)
        except _LINK_ERRORS as exc:
            await self._link.release(graceful=False)
            raise PeerGone(None) from exc
        except BaseException:
            self._link.drop(graceful=False)
            raise
        if self._link.broken:
            await self._link.release(graceful=False)
            raise PeerGone(None)
        # The handshake is over: what parsed it need not stay with an idle connection.
        _forget_handshake(self._ws)

    async def reject(
        self, status: int, *, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Refuse the handshake with an HTTP response, then close TCP.

        trio-websocket leaves the TCP connection open after a refusal; this
        closes it (gracefully, so the response is delivered).

        Args:
            status: The HTTP status (400-599).
            body: The response body (sent with a ``Content-Length``).
            headers: Extra response headers (latin-1 encodable).

        Raises:
            LocalProtocolError: the handshake was already answered.

        Never raises because the client is gone. Cancellation resets the TCP
        connection.
        """
        extra = _encode_headers(headers)
        self._answer()
        assert self._library_request is not None  # _answer() let us through once
        library_request, self._library_request = self._library_request, None
        try:
            await library_request.reject(status, extra_headers=extra, body=body or None)
        except _LINK_ERRORS:
            logger.debug("client %s left before the refusal was sent", self.request.client)
        except BaseException:
            self._link.drop(graceful=False)
            raise
        await self._link.release(graceful=not self._link.broken)

    # -- messages ----------------------------------------------------------------

    def _open_connection(self) -> trio_websocket.WebSocketConnection:
        if self._ws is None:
            raise LocalProtocolError("the handshake was not accepted")
        return self._ws

    def _classify(self, ws: trio_websocket.WebSocketConnection) -> _Gone:
        """Decide once how the library's side ended (the library's ``closed`` is set)."""
        if self._gone is not None:
            return self._gone
        reason = ws.closed
        if reason is None or reason.code == 1006:
            gone = _VANISHED
        elif _wsproto_state(ws) in (WsState.OPEN, WsState.LOCAL_CLOSING):
            # Our own close goes through ws.aclose() and never gets here, so
            # the library started this one: wsproto's synthetic close after a
            # parse failure leaves the state OPEN; trio-websocket's own 1009
            # makes it LOCAL_CLOSING. Either way the peer sent no close frame.
            gone = _Gone(reason.code, reason.reason or "", protocol_error=True)
        else:
            gone = _Gone(reason.code, reason.reason or "", protocol_error=False)
        self._gone = gone
        return gone

    async def _settle(self, ws: trio_websocket.WebSocketConnection) -> _Gone:
        """Classify the library's close; release TCP once the close handshake is done."""
        gone = self._classify(ws)
        link = self._link
        if gone.code is not None and not gone.protocol_error:
            if _wsproto_state(ws) is not None:
                # The library may still be writing its answer to the peer's
                # close frame (e.g. queued behind one of our sends).
                await link.library_done.wait()
            if link.close_sent and not link.broken:
                # The close handshake is over, and a server closes TCP right
                # away (RFC 6455, section 7.1.1).
                await link.release(graceful=True)
        return gone

    async def receive(self) -> str | bytes:
        """The next whole message: ``str`` for a text frame, ``bytes`` for binary.

        Raises:
            PeerGone: the peer closed (``code`` set) or vanished (``code``
                None); raised again on every later call.
            RemoteProtocolError: the peer broke framing and trio-websocket
                failed the connection: ``code`` 1009 (too big; the library
                already sent that close frame), 1007 (invalid UTF-8) or 1002.
            LocalProtocolError: the handshake was not accepted.

        Cancellation: nothing is lost; the next call returns the next message.
        """
        ws = self._open_connection()
        if self._gone is not None:
            await trio.lowlevel.checkpoint()
            raise self._gone.error()
        try:
            return await ws.get_message()
        except _LINK_ERRORS as exc:
            if self._close_started or ws.closed is None:
                raise PeerGone(None) from exc
            gone = await self._settle(ws)
            raise gone.error() from None

    async def send(self, text: str) -> None:
        """Send one text frame.

        After the peer broke the protocol (see :meth:`receive`), the text is
        discarded: only the close frame that answers the fault may follow.

        Raises:
            PeerGone: the link is gone, closing, or broken by an earlier
                interrupted send.
            LocalProtocolError: the handshake was not accepted.

        Cancellation: part of the frame may already be on the wire, so the
        stream marks itself broken and resets the TCP connection at once; the
        client sees the connection drop, never a corrupt or continuing stream.
        """
        ws = self._open_connection()
        link = self._link
        if link.broken or link.released.is_set() or self._close_started:
            await trio.lowlevel.checkpoint()
            raise PeerGone(None)
        done = False
        try:
            await ws.send_message(text)
            done = True
        except _LINK_ERRORS as exc:
            done = True
            if link.broken:
                link.drop(graceful=False)
                raise PeerGone(None) from exc
            if self._close_started or ws.closed is None:
                # Our own close started while this send was in flight.
                raise PeerGone(None) from exc
            gone = await self._settle(ws)
            if gone.protocol_error:
                # The library failed the connection on the peer's fault and
                # takes no more data; the link is still good for the close
                # frame that answers the fault, which close() sends next (the
                # actor closes once its reader sees the RemoteProtocolError).
                # Raising here would make that close look like a lost link.
                return
            raise PeerGone(gone.code, gone.reason) from None
        finally:
            if not done:
                # Interrupted midway: never write after a partial frame.
                link.broken = True
                link.drop(graceful=False)

    # -- closing ---------------------------------------------------------------

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame, wait for the peer's, then close TCP.

        The first call decides the code; a later call waits for the first to
        finish. If trio-websocket already failed the connection on a peer's
        framing fault, this sends the close frame the library did not send
        (1007) or does not repeat the one it sent (1009), then half-closes TCP
        and reads until the client closes its side, so that unread input does
        not turn our close into a RST that destroys the close frame.

        Unbounded: the caller puts a deadline around it and calls
        :meth:`abort` when it passes.

        Args:
            code: The close code (wsproto replaces codes that may not be sent,
                e.g. 1006, by 1000).
            reason: The close reason (truncated to fit a control frame).

        Raises:
            PeerGone: the link was already gone or broken, or the peer had
                closed first (with its code).
        """
        if self._close_started:
            await self._close_done.wait()
            if not self._close_clean:
                raise PeerGone(None)
            return
        self._close_started = True
        try:
            await self._close(code, reason)
            self._close_clean = True
        finally:
            self._close_done.set()

    async def _close(self, code: int, reason: str) -> None:
        link = self._link
        ws = self._ws
        if ws is None or link.broken or link.released.is_set():
            await trio.lowlevel.checkpoint()
            if self._gone is not None and not self._gone.protocol_error:
                raise PeerGone(self._gone.code, self._gone.reason)
            raise PeerGone(None)
        if ws.closed is None:
            # The usual case: the library sends our close frame, its reader
            # gets the peer's answer, and we close TCP.
            try:
                await ws.aclose(code, reason)
            except _LINK_ERRORS as exc:
                await link.release(graceful=False)
                raise PeerGone(None) from exc
            if link.broken or not link.close_sent:
                # The close frame could not be written: the peer is gone.
                await link.release(graceful=False)
                raise PeerGone(None)
            await link.release(graceful=True)
            return
        gone = await self._settle(ws)
        if not gone.protocol_error:
            await link.release(graceful=False)
            raise PeerGone(gone.code, gone.reason)
        # trio-websocket failed the connection itself and stopped reading.
        try:
            if not link.close_sent:
                frame = FrameProtocol(client=False, extensions=[]).close(code, reason)
                await link.send_all(frame)
            inner = link.inner
            if isinstance(inner, trio.abc.HalfCloseableStream):
                await inner.send_eof()
            while await inner.receive_some(65536):
                pass
        except _DRAIN_ERRORS as exc:
            await link.release(graceful=False)
            if not link.close_sent:
                raise PeerGone(None) from exc
            return
        await link.release(graceful=True)

    async def abort(self) -> None:
        """Reset the TCP connection (``SO_LINGER`` 0), unless already closed.

        Idempotent; never raises (but is a checkpoint). Also ends
        trio-websocket's reader task. A pending :meth:`receive` raises
        :class:`~chatcore.PeerGone`.
        """
        await self._link.release(graceful=False)


async def _cancel_when_set(event: _Flag, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class _LibraryNursery:
    """The nursery trio-websocket gets: its tasks run in the connection's nursery.

    :func:`trio_websocket.wrap_server_stream` starts its reader task with
    ``nursery.start_soon``, the only nursery method it calls. Each task runs
    inside the link's shielded :attr:`_OwnedStream.library_scope` and behind
    a firewall (:func:`_run_library_task`), with no nursery or host task of
    its own: an idle connection is one task lighter.
    """

    __slots__ = ("_link", "_nursery")

    def __init__(self, nursery: trio.Nursery, link: _OwnedStream) -> None:
        self._nursery = nursery
        self._link = link

    def start_soon(
        self,
        async_fn: Callable[..., Awaitable[object]],
        *args: object,
        name: object = None,
    ) -> None:
        self._nursery.start_soon(
            _run_library_task, self._link, async_fn, *args, name=name or async_fn
        )


async def _run_library_task(
    link: _OwnedStream, async_fn: Callable[..., Awaitable[object]], *args: object
) -> None:
    """Run one of trio-websocket's tasks (its reader) until the link is released.

    Shielded, because when the server shuts down the connection actor still
    needs the reader for its bounded 1012 close (the peer's answer arrives
    through it). The link is always released after that (the actor aborts;
    leaving :func:`open_trio_websocket_stream` drops it), which cancels
    :attr:`_OwnedStream.library_scope` and ends this. A crash of the task is
    logged and drops the link, so the adapter reports the peer as gone
    instead of the error spreading.
    """
    try:
        with link.library_scope:
            await async_fn(*args)
    except Exception:
        logger.debug("trio-websocket's reader task failed; dropping the link", exc_info=True)
        link.drop(graceful=False)


def _describe_peer(stream: trio.abc.Stream) -> tuple[tuple[str, int] | None, str]:
    sock = _socket_of(stream)
    scheme = "wss" if isinstance(stream, trio.SSLStream) else "ws"
    if sock is None:
        return None, scheme
    try:
        address = sock.getpeername()
    except OSError:
        return None, scheme
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1])), scheme
    return None, scheme


def _handshake_request(
    library_request: trio_websocket.WebSocketRequest, stream: trio.abc.Stream
) -> HandshakeRequest:
    path, _, query = library_request.path.partition("?")
    headers = [
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in library_request.headers
    ]
    # wsproto moves the Host header out of the headers and into its Request
    # event, which trio-websocket keeps privately; read it defensively (if it
    # moves in a future version, the request just has no Host header).
    host = getattr(getattr(library_request, "_event", None), "host", None)
    if isinstance(host, str) and host:
        headers.insert(0, ("host", host))
    client, scheme = _describe_peer(stream)
    return HandshakeRequest(
        path=path or "/",
        query_string=query,
        headers=tuple(headers),
        client=client,
        subprotocols=tuple(library_request.proposed_subprotocols),
        scheme=scheme,
    )


async def _read_handshake(
    library_nursery: _LibraryNursery, link: _OwnedStream, config: Config
) -> trio_websocket.WebSocketRequest:
    library_request: trio_websocket.WebSocketRequest | None = None
    with trio.move_on_after(config.handshake_timeout):
        async with trio.open_nursery() as race:
            # The library waits for a request forever if the client leaves or
            # sends garbage first; stop waiting when the link is lost.
            race.start_soon(_cancel_when_set, link.lost, race.cancel_scope)
            library_request = await trio_websocket.wrap_server_stream(
                cast(trio.Nursery, library_nursery),
                link,
                max_message_size=config.max_message_bytes,
            )
            race.cancel_scope.cancel()
    if link.refusal is not None:
        await _send_refusal(link, link.refusal)
    if library_request is None:
        raise PeerGone(None)
    return library_request


async def _send_refusal(link: _OwnedStream, refusal: Reject) -> None:
    """Answer a request head over a handshake limit (414/431), then close TCP.

    The library never saw the excess (it got EOF), so the answer is written
    here. Then the stream is half-closed and what the client still sends is
    read and discarded for up to :data:`_REFUSAL_LINGER` seconds: closing
    with unread input would reset the connection and could destroy the answer.
    """
    phrase = http.HTTPStatus(refusal.status).phrase
    head = (
        f"HTTP/1.1 {refusal.status} {phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(refusal.body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    inner = link.inner
    graceful = False
    with trio.move_on_after(_REFUSAL_LINGER):
        try:
            await inner.send_all(head + refusal.body)
            if isinstance(inner, trio.abc.HalfCloseableStream):
                await inner.send_eof()
            while await inner.receive_some(65536):
                pass
            graceful = True
        except _DRAIN_ERRORS:
            pass
    await link.release(graceful=graceful)


@asynccontextmanager
async def open_trio_websocket_stream(
    stream: trio.abc.Stream, *, config: Config | None = None
) -> AsyncIterator[TrioWebSocketStream]:
    """Read a client's WebSocket handshake from ``stream`` and wrap the connection.

    Use it to serve WebSocket clients from your own listener (TLS, a Unix
    socket, a test pair); :func:`serve_websocket` uses it for each client::

        async with open_trio_websocket_stream(stream, config=config) as transport:
            await chatcore.serve_connection(transport, handler, config=config)

    The stream is owned from here on: on exit the TCP connection is reset if
    it was not closed cleanly, and trio-websocket's reader task is ended.

    Args:
        stream: A freshly accepted stream (a :class:`trio.SocketStream`, or a
            :class:`trio.SSLStream` over one).
        config: Bounds; ``handshake_timeout`` limits reading the handshake,
            ``handshake_limits`` its request line and headers, and
            ``max_message_bytes`` is trio-websocket's message limit
            (default :class:`~chatcore.Config` ``()``).

    Yields:
        The connection, handshake read and not answered.

    Raises:
        PeerGone: the client sent no complete WebSocket handshake within
            ``handshake_timeout``, left, or sent something else (a plain HTTP
            request gets a 400 from wsproto). A head over
            ``handshake_limits`` got 414 or 431, and a missing, repeated or
            malformed ``Sec-WebSocket-Key`` got 400 (see docs/security.md).
            The stream is closed.

    Cancellation: while reading the handshake, the stream is reset and the
    cancellation propagates.
    """
    cfg = config or Config()
    link = _OwnedStream(stream, RequestHeadScanner(cfg.handshake_limits))
    # Exceptions from the body (and our own) are raised after the nursery has
    # closed, so they come out as themselves, not wrapped in an ExceptionGroup.
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield await _handshake(link, cfg, nursery)
        except BaseException as exc:
            failure = exc
        finally:
            link.drop(graceful=False)
    await link.release(graceful=False)
    if failure is not None:
        raise failure


async def serve_trio_websocket_stream(
    stream: trio.abc.Stream,
    serve: Callable[[TrioWebSocketStream], Awaitable[None]],
    *,
    config: Config,
    library_nursery: trio.Nursery,
) -> None:
    """:func:`open_trio_websocket_stream` for a server: ``await serve(transport)`` inside.

    What :func:`chatcore.serve_websocket` runs for each client. It costs an
    idle connection less than the context manager: no nursery of its own
    (trio-websocket's reader runs in ``library_nursery``, a nursery that
    outlives the connection, still shielded and cancelled when the socket
    is released) and no generator frame around ``serve``.

    Args:
        stream: A freshly accepted stream, owned from here on.
        serve: Runs the connection (e.g. :func:`chatcore.serve_connection`
            with its handler bound).
        config: Bounds, as for :func:`open_trio_websocket_stream`.
        library_nursery: Where trio-websocket's reader task runs.

    Raises:
        PeerGone: as :func:`open_trio_websocket_stream`; and whatever
            ``serve`` raises.

    Cancellation: as :func:`open_trio_websocket_stream`; the socket is reset
    unless it was closed cleanly, which also ends the reader task.
    """
    link = _OwnedStream(stream, RequestHeadScanner(config.handshake_limits))
    try:
        await serve(await _handshake(link, config, library_nursery))
    finally:
        link.drop(graceful=False)
        await link.release(graceful=False)


async def _handshake(
    link: _OwnedStream, config: Config, nursery: trio.Nursery
) -> TrioWebSocketStream:
    """Read the handshake on ``link``; the library's tasks go to ``nursery``.

    Raises PeerGone (the client answered, if it deserves an answer); the
    caller drops the link.
    """
    library_request = await _read_handshake(_LibraryNursery(nursery, link), link, config)
    transport = TrioWebSocketStream(
        library_request, link, _handshake_request(library_request, link.inner)
    )
    # The transport drops the library's request once answered; nothing
    # else may keep it.
    del library_request
    refusal = check_websocket_key(transport.request.headers)
    if refusal is not None:
        await transport.reject(refusal.status, body=refusal.body)
        raise PeerGone(None)
    return transport
