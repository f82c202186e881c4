"""The ASGI transport: one WebSocket of an ASGI server as a :class:`MessageStream`.

Written for, and measured on, hypercorn 0.18's trio worker; it only uses the
ASGI WebSocket spec (with the ``websocket.http.response`` extension for
refusals, falling back to a bare close where a server lacks it).

Theory of operation
-------------------

An ASGI server gives the application a ``receive`` and a ``send`` coroutine
per WebSocket and keeps the socket to itself. An :class:`ASGIStream` is one
``websocket`` scope as a :class:`~chatcore.MessageStream` (the scope's dicts
are converted into a :class:`~chatcore.sansio.HandshakeRequest` here, and
nothing past this module sees a dict); the server layer
(``chatcore._server.serve_asgi_websocket``) runs chatcore's connection actor
on it.

hypercorn's behaviour forces the following rules. Each is a trap we measured;
docs/deploy.md lists them for users with what chatcore does about each, and
docs/design.md maps every trap to the test that proves its handling.

Rule 1: **the application never returns while the client may still be
talking.** If the ASGI application finishes (returns, raises, even after
sending a close) while hypercorn's reader task is answering the client's close
frame, hypercorn's two tasks collide on the socket and ``trio.BusyResourceError``
crashes the *whole server* (every connection on it). So after the actor is
done, the server layer waits, bounded by ``linger``, until
``websocket.disconnect`` arrived, and nothing but :class:`trio.Cancelled`
ever leaves it.

Rule 2: **receive is never called after** ``websocket.disconnect``: hypercorn
never puts anything after it, so that call would block forever.
:class:`ASGIStream` remembers the disconnect and raises :class:`PeerGone`.

Rule 3: **every server error is "peer gone".** A send after the link closed is
sometimes a silent no-op, sometimes ``UnexpectedMessageError``; a second close
before accept raises ``AttributeError``; the socket layer can raise trio or OS
errors. The adapter translates any :class:`Exception` from ``send``/``receive``
into :class:`PeerGone` (the actor never sends after a close anyway: it gates
that itself).

Rule 4: **refusals are HTTP responses.** A close before accept becomes a bare
``403`` with the reason lost, so :meth:`ASGIStream.reject` uses the denial
response (``websocket.http.response.start`` + ``.body``): the client sees
401/403/429/503 with a body and headers such as ``Retry-After``.

Rule 5: **the client's close code is unknown.** hypercorn reports every
disconnect the application did not start as 1006, whatever the client sent,
so :class:`ASGIStream` reports it as a vanished peer (``PeerGone(None)``) and
the connection records ``1006 / transport``. A close the server started is
known from chatcore's own record.

What the adapter cannot do, the layers around it do: hypercorn checks no
pongs (chatcore's heartbeat detects dead peers), and it shields its socket
writes from cancellation, so a send to a client that stopped reading is only
bounded by the kernel: ``chatcore serve`` sets ``TCP_USER_TIMEOUT`` on its
listening sockets (see :mod:`chatcore._serve`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import trio

from .._exceptions import LocalProtocolError, PeerGone
from .._transport import MessageStream
from ..sansio import (
    HandshakeLimits,
    HandshakeRequest,
    Reject,
    check_request_head,
    check_websocket_key,
    handshake_status_for,
)

__all__ = [
    "LINGER",
    "ASGIMessage",
    "ASGIReceive",
    "ASGIScope",
    "ASGISend",
    "ASGIStream",
    "deny_websocket",
    "request_from_scope",
    "screen_request",
]

logger = logging.getLogger("chatcore.asgi")

#: An ASGI event (``{"type": "websocket.send", ...}``); only this module builds them.
ASGIMessage: TypeAlias = dict[str, Any]
#: The connection scope the server passes to the application.
ASGIScope: TypeAlias = Mapping[str, Any]
#: The server's ``receive`` callable.
ASGIReceive: TypeAlias = Callable[[], Awaitable[ASGIMessage]]
#: The server's ``send`` callable.
ASGISend: TypeAlias = Callable[[ASGIMessage], Awaitable[None]]

#: Seconds :func:`serve_asgi_websocket` waits for ``websocket.disconnect`` after
#: the connection ended without one (Rule 1). A live client answers a close
#: frame in milliseconds; one that has not after the close deadline plus this
#: is treated as gone, and the application returns anyway.
LINGER = 2.0

# The ASGI extension hypercorn (and uvicorn >= 0.30) offer for HTTP refusals.
_DENIAL_EXTENSION = "websocket.http.response"

# Close reasons longer than this do not fit a control frame (RFC 6455 5.5).
_MAX_REASON_BYTES = 123


def request_from_scope(scope: ASGIScope) -> HandshakeRequest:
    """Convert an ASGI ``websocket`` scope into a :class:`HandshakeRequest`.

    Header names are lowercased and, like values, decoded as Latin-1 (what
    HTTP allows on the wire); the query string is the raw, still
    percent-encoded string; ``scheme`` is ``"ws"`` or ``"wss"``.

    Raises:
        ValueError: the scope is not a WebSocket scope or is malformed.
    """
    if scope.get("type") != "websocket":
        raise ValueError(f"not a websocket scope: {scope.get('type')!r}")
    try:
        headers = tuple(
            (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
            for name, value in scope.get("headers", ())
        )
        raw_client = scope.get("client")
        client = (str(raw_client[0]), int(raw_client[1])) if raw_client else None
        scheme = str(scope.get("scheme", "ws"))
        return HandshakeRequest(
            path=str(scope["path"]),
            query_string=bytes(scope.get("query_string", b"")).decode("latin-1"),
            headers=headers,
            client=client,
            subprotocols=tuple(str(p) for p in scope.get("subprotocols", ())),
            scheme="wss" if scheme in ("wss", "https") else "ws",
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"malformed websocket scope: {exc}") from exc


def screen_request(scope: ASGIScope, limits: HandshakeLimits) -> Reject | None:
    """The refusal an ``http`` or ``websocket`` scope deserves before anything else, or None.

    The ASGI server parsed the request head already (hypercorn bounds only a
    head that is still incomplete, by ``h11_max_incomplete_size``); this
    applies :class:`~chatcore.HandshakeLimits` to what it parsed (414 for the
    request line, 431 for the headers). A WebSocket handshake must also carry
    exactly one valid ``Sec-WebSocket-Key`` (400); HTTP/2 WebSockets
    (RFC 8441) carry none.

    Args:
        scope: The ``http`` or ``websocket`` scope.
        limits: The bounds (``Config.handshake_limits``).

    Returns:
        The :class:`~chatcore.Reject` to answer with, or ``None``.
    """
    try:
        raw_headers = [(bytes(name), bytes(value)) for name, value in scope.get("headers", ())]
        target = bytes(scope.get("raw_path") or str(scope.get("path", "/")).encode())
        query = bytes(scope.get("query_string", b""))
    except (TypeError, ValueError):
        return Reject(400, b"malformed request\n")
    if query:
        target += b"?" + query
    refusal = check_request_head(target, raw_headers, limits)
    if (
        refusal is None
        and scope.get("type") == "websocket"
        and str(scope.get("http_version", "1.1")) in ("1.0", "1.1")
    ):
        refusal = check_websocket_key(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in raw_headers
        )
    return refusal


def _encode_headers(headers: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def deny_websocket(
    scope: ASGIScope,
    send: ASGISend,
    status: int,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    """Refuse a WebSocket handshake with an HTTP response (Rule 4).

    Uses the ASGI denial response when the server offers it, so the client
    sees ``status``, ``headers`` and ``body``; otherwise closes before accept
    (the server then answers 403). Call it at most once, before any accept.

    Raises:
        Exception: whatever the server's ``send`` raises (callers translate it).
    """
    if _DENIAL_EXTENSION in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *_encode_headers(headers),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1008})


class ASGIStream(MessageStream):
    """The server side of one ASGI WebSocket, as a :class:`MessageStream`.

    Created by :func:`serve_asgi_websocket` after ``websocket.connect`` was
    received; you only need it to write your own ASGI integration.

    Args:
        scope: The ``websocket`` scope.
        receive: The server's ``receive`` callable.
        send: The server's ``send`` callable.

    Raises:
        ValueError: the scope is malformed (see :func:`request_from_scope`).
    """

    __slots__ = (
        "_accepted",
        "_answered",
        "_broken",
        "_close_sent",
        "_disconnected",
        "_peer_close",
        "_receive",
        "_receiving",
        "_released",
        "_released_event",
        "_scope",
        "_send",
        "_server_stopping",
        "request",
    )

    def __init__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        #: The client's handshake.
        self.request = request_from_scope(scope)
        self._scope = scope
        self._receive = receive
        self._send = send
        # accept() or reject() was called (exactly one may be, once).
        self._answered = False
        # The handshake was accepted (the server switched protocols).
        self._accepted = False
        # websocket.disconnect arrived: the server will never deliver anything
        # again, so receive must not be called (Rule 2).
        self._disconnected = False
        # Our websocket.close went out: nothing may be sent after it.
        self._close_sent = False
        # A send failed or was cancelled midway: the link is unusable.
        self._broken = False
        # Set by reject() and abort(): the application may return now, which
        # is how an ASGI server is told to drop the link. The event is made
        # for a waiter (wait_released), which most streams never have.
        self._released = False
        self._released_event: trio.Event | None = None
        # The close code and reason of websocket.disconnect, when the server
        # reported a real one (hypercorn never does: Rule 5).
        self._peer_close: tuple[int, str] | None = None
        # The scope of the receive call in flight; abort() cancels it.
        self._receiving: trio.CancelScope | None = None
        # The server cancelled this connection's task (it is stopping): its
        # reader is cancelled too, so no disconnect will ever come.
        self._server_stopping = False

    def __repr__(self) -> str:
        state = (
            "disconnected"
            if self._disconnected
            else "broken"
            if self._broken
            else "closing"
            if self._close_sent
            else "open"
            if self._accepted
            else "handshake"
        )
        return f"<ASGIStream {self.request.path!r} {state}>"

    @property
    def answered(self) -> bool:
        """True once the handshake was accepted or refused."""
        return self._answered

    @property
    def accepted(self) -> bool:
        """True once the handshake was accepted."""
        return self._accepted

    @property
    def disconnected(self) -> bool:
        """True once the server reported ``websocket.disconnect`` (the link is gone)."""
        return self._disconnected

    async def _send_event(self, message: ASGIMessage) -> None:
        """Send one ASGI event; any server error means the link is gone (Rule 3)."""
        done = False
        try:
            await self._send(message)
            # hypercorn shields its socket write, so a deadline that passed
            # during it is only noticed here; the caller must learn that the
            # send overran (for the writer: a stalled client).
            await trio.lowlevel.checkpoint_if_cancelled()
            done = True
        except Exception as exc:
            logger.debug("%r: %s failed: %r", self, message["type"], exc)
            raise PeerGone(None) from exc
        finally:
            if not done:
                # Failed or cancelled midway: the server may have written part
                # of a frame or moved on to another state. Never use it again.
                self._broken = True

    def _gone(self) -> PeerGone:
        if self._peer_close is not None:
            return PeerGone(*self._peer_close)
        return PeerGone(None)

    async def _receive_event(self) -> ASGIMessage:
        """The next ASGI event; never called again after a disconnect (Rule 2)."""
        if self._disconnected:
            raise self._gone()
        if self._server_stopping:
            raise PeerGone(None)
        # One receive at a time (the actor's reader, later its close).
        scope = self._receiving = trio.CancelScope()
        try:
            with scope:
                message = await self._receive()
        except Exception as exc:
            self._disconnected = True
            raise PeerGone(None) from exc
        finally:
            self._receiving = None
        if scope.cancelled_caught:  # abort() or the server stopping ended it
            raise PeerGone(None)
        if message.get("type") == "websocket.disconnect":
            self._disconnected = True
            code = message.get("code")
            # 1005/1006 mean "no code" (and hypercorn sends 1006 for everything).
            if isinstance(code, int) and code not in (1005, 1006) and not self._close_sent:
                self._peer_close = (code, str(message.get("reason") or ""))
        return message

    async def accept(
        self, *, subprotocol: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """See :meth:`MessageStream.accept`.

        Raises:
            PeerGone: the client is gone or the server refused the accept.
            LocalProtocolError: the handshake was already answered, or the
                subprotocol was not offered, or a header is one the WebSocket
                handshake owns (hypercorn would leave the connection in a state
                that crashes it later, so this is checked before asking it).
        """
        if subprotocol is not None and subprotocol not in self.request.subprotocols:
            raise LocalProtocolError(f"subprotocol {subprotocol!r} was not offered by the client")
        for name, _ in headers:
            if name.lower().startswith((":", "sec-websocket-")):
                raise LocalProtocolError(f"header {name!r} cannot be set on accept")
        self._answer()
        if self._disconnected:
            raise PeerGone(None)
        await self._send_event(
            {
                "type": "websocket.accept",
                "subprotocol": subprotocol,
                "headers": _encode_headers(headers),
            }
        )
        self._accepted = True

    async def reject(
        self, status: int, *, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """See :meth:`MessageStream.reject` (sent as an ASGI denial response, Rule 4)."""
        self._answer()
        if self._disconnected:
            self._release()
            await trio.lowlevel.checkpoint()
            return
        try:
            await deny_websocket(self._scope, self._send, status, body, headers)
        except Exception as exc:  # the client left: the refusal is moot
            logger.debug("%r: refusal not delivered: %r", self, exc)
            self._broken = True
        finally:
            self._release()

    async def receive(self) -> str | bytes:
        """See :meth:`MessageStream.receive`.

        Raises:
            PeerGone: the client closed or vanished. Under hypercorn the code
                is always ``None``: it does not forward the client's close code
                (Rule 5), so chatcore records 1006. A server that reports a
                real code in ``websocket.disconnect`` gets it forwarded.
        """
        while True:
            message = await self._receive_event()
            kind = message.get("type")
            if kind == "websocket.receive":
                text = message.get("text")
                if text is not None:
                    return str(text)
                data = message.get("bytes")
                if data is not None:
                    return bytes(data)
            elif kind == "websocket.disconnect":
                raise self._gone()
            # Anything else (a stray websocket.connect) carries no message.

    async def send(self, text: str) -> None:
        """See :meth:`MessageStream.send`.

        hypercorn writes the frame shielded from cancellation, so a send to a
        client that stopped reading only ends when the kernel gives up on the
        socket (``TCP_USER_TIMEOUT``) or the client reads again.

        Raises:
            PeerGone: the link is gone, broken, or closing.
        """
        if self._close_sent or self._broken or self._disconnected or not self._accepted:
            raise PeerGone(None)
        await self._send_event({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str = "") -> None:
        """See :meth:`MessageStream.close`.

        Sends ``websocket.close`` and waits for ``websocket.disconnect``, which
        hypercorn delivers once the client answered (data messages that arrive
        meanwhile are discarded). Before the handshake was accepted, the client
        gets an HTTP refusal instead (the status :func:`handshake_status_for`
        gives for ``code``), never a bare 403.

        Raises:
            PeerGone: the link was already gone or broke.
        """
        if self._broken or self._disconnected:
            raise PeerGone(None)
        if not self._accepted:
            if not self._answered:
                await self.reject(handshake_status_for(code), body=reason.encode())
            await trio.lowlevel.checkpoint()
            return
        if not self._close_sent:
            self._close_sent = True
            encoded = reason.encode()[:_MAX_REASON_BYTES].decode("utf-8", "ignore")
            await self._send_event({"type": "websocket.close", "code": code, "reason": encoded})
        while not self._disconnected:
            await self._receive_event()

    async def abort(self) -> None:
        """See :meth:`MessageStream.abort`.

        ASGI gives the application no way to drop a socket: the server does it
        when the application returns, which :func:`serve_asgi_websocket` does
        right after the connection actor finished (after its bounded linger).
        This marks the stream unusable and releases it (:meth:`wait_released`).
        Under hypercorn the client then sees a 1011 close frame if no close was
        sent yet (hypercorn sends it for an application that returns while
        connected; chatcore only aborts an open stream after a failed send), or
        HTTP 500 if the handshake was never answered. Idempotent; never raises.
        """
        self._broken = True
        self._release()
        if self._receiving is not None:
            self._receiving.cancel()
        await trio.lowlevel.checkpoint_if_cancelled()

    def server_stopping(self) -> None:
        """The server is cancelling this connection: stop waiting for its disconnect.

        hypercorn cancels the application and its own reader task together
        (graceful timeout expired), so the client's answer to a close frame
        will never be read. The close frame itself still goes out (the
        actor's shielded close); waiting for an answer would only delay
        the server's exit by the close timeout, and with the reader gone
        returning early cannot race it (Rule 1).
        """
        self._server_stopping = True
        if self._receiving is not None:
            self._receiving.cancel()

    async def wait_released(self) -> None:
        """Wait until :meth:`reject` or :meth:`abort` was called.

        An ASGI server drops the link when the application returns, so an
        application driving an :class:`ASGIStream` by hand returns after this
        (and after :meth:`linger` if the stream was accepted).
        """
        if self._released:
            await trio.lowlevel.checkpoint()
            return
        if self._released_event is None:
            self._released_event = trio.Event()
        await self._released_event.wait()

    def _release(self) -> None:
        self._released = True
        if self._released_event is not None:
            self._released_event.set()

    async def linger(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``websocket.disconnect`` (Rule 1).

        Messages that arrive meanwhile are discarded (this also empties the
        server's bounded queue, which it would otherwise block on). Never
        raises except :class:`trio.Cancelled`.

        Returns:
            True if the disconnect arrived (now or before).
        """
        with trio.move_on_after(seconds):
            while not self._disconnected:
                try:
                    await self._receive_event()
                except PeerGone:
                    break
        return self._disconnected
