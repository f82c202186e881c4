"""The lean engine: ``chatcore serve --engine lean``, an ASGIApp served without hypercorn.

Theory of operation
-------------------

hypercorn is ``chatcore serve``'s default engine. Through it every frame
costs a task switch to hypercorn's connection task, Trio's socket wrapper
and hypercorn's ASGI send path; under a steady fan-out load (hundreds of
receivers, a hundred messages a second) that per-frame cost, not chatcore,
saturates a core. The lean engine serves the same :class:`~chatcore.asgi.ASGIApp`
on the same protocol libraries (h11 for HTTP, wsproto for frames) with the
socket owned by the connection's transport (:class:`~chatcore.transports.LeanStream`):
the pacer writes the batched frames of every ready connection in one pass
with a non-blocking ``send()`` each, and a task waits for the socket only
when the kernel's buffer is full.

What it serves, per accepted TCP connection (one task, which becomes the
connection's actor):

* a WebSocket handshake on ``app.path``: a chatcore connection (the app's
  handler and :attr:`ASGIApp.config <chatcore.asgi.ASGIApp.config>`); on
  another path 404, while draining 503 with ``Retry-After``, a malformed
  handshake 400 (426 for a WebSocket version other than 13);
* any other HTTP request: one ASGI ``http`` call of the app (``/healthz``,
  ``/chatcore.js``, the app's ``http_app``), the body read first (at most
  :data:`MAX_BODY_BYTES`), one request per connection (``Connection: close``).

It keeps what ``chatcore serve`` promises on hypercorn: the handler's
background work runs for the server's life (what the ASGI lifespan does
there); SIGTERM/SIGINT refuse new handshakes with 503 and drain within the
grace (:meth:`ASGIApp.drain <chatcore.asgi.ASGIApp.drain>`), then stop
accepting, give HTTP requests in flight :data:`~chatcore._serve.SHUTDOWN_GRACE`
and cancel what is left (each connection still closes with 1012, shielded and
bounded); a second signal skips the waiting. Workers, the listening socket
(with ``TCP_USER_TIMEOUT``) and the GC tuning are ``chatcore serve``'s own.
What it does not do: TLS, HTTP/2, keep-alive for plain HTTP, permessage-deflate
(never negotiated).
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from collections.abc import Sequence
from urllib.parse import unquote

import attrs
import h11
import trio

from ._connection import serve_connection
from ._exceptions import PeerGone
from ._logs import log_request
from ._server import _firewall, _ServerControl
from .asgi import ASGIApp
from .metrics import handshake_refused, metrics_started
from .transports._asgi_stream import ASGIMessage
from .transports._lean import (
    HandshakeHead,
    HeadRefused,
    LeanStream,
    drop_socket,
    read_request_head,
    respond,
    write_all,
)

__all__ = ["MAX_BODY_BYTES", "LeanServer", "serve_lean"]

logger = logging.getLogger("chatcore.serve")

#: Largest HTTP request body read for the app (larger: 413).
MAX_BODY_BYTES = 1 << 20
#: Seconds a plain HTTP request may take to arrive whole, and to be answered.
HTTP_TIMEOUT = 30.0
#: Seconds after the response to read what the client still sends before the
#: socket closes (closing with unread input would reset the response away).
LINGER_SECONDS = 1.0
# accept() errors that mean "out of resources now": wait and retry, as trio does.
_ACCEPT_PAUSE_ERRNOS = frozenset(
    code
    for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")
    if (code := getattr(errno, name, None)) is not None
)
_ACCEPT_BATCH = 64
_BAD_HEAD = (
    b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n"
)


@attrs.define(eq=False)
class LeanServer(_ServerControl):
    """A running :func:`serve_lean` (its ``task_status`` value).

    Attributes:
        app: The application being served.
        urls: The WebSocket URLs served (one per listening socket).
        clients: TCP connections being served now (WebSocket or HTTP).
    """

    app: ASGIApp
    urls: tuple[str, ...]
    clients: int = attrs.field(default=0, init=False)
    # Every client task (a second request during the grace cancels it).
    _clients_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    # Woken when the last client task ends.
    _idle_lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)

    def __repr__(self) -> str:
        state = "stopping" if self._requests else "serving"
        return f"<LeanServer {' '.join(self.urls)} {state} clients={self.clients}>"

    def _skip_waiting(self) -> None:
        self._clients_scope.cancel()  # every client task, with its connection

    async def _accept(self, sock: socket.socket, nursery: trio.Nursery, access_log: bool) -> None:
        """Accept clients on ``sock`` until cancelled, each in a task of ``nursery``."""
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(_ACCEPT_BATCH):
                try:
                    client, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break  # another worker process took it, or none left
                except OSError as exc:
                    if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                        logger.error(
                            "accept failed (%s); pausing 0.1 s",
                            errno.errorcode.get(exc.errno or 0, "?"),
                        )
                        await trio.sleep(0.1)
                        break
                    if exc.errno == errno.ECONNABORTED:
                        continue
                    raise
                client.setblocking(False)
                try:
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # reset already; the first read will say so
                self.clients += 1
                nursery.start_soon(self._serve_client, client, access_log)

    async def _serve_client(self, sock: socket.socket, access_log: bool) -> None:
        """One TCP client, behind an exception firewall; the socket is closed at the end."""
        app = self.app
        cfg = app.config
        head: HandshakeHead | None = None
        client: tuple[str, int] | None = None
        try:
            with trio.move_on_after(cfg.handshake_timeout):
                head = await read_request_head(sock, cfg.handshake_limits)
            if head is None:
                return  # no whole request in time: dropped
            client = head.client
            if head.websocket_upgrade:
                stream = await self._answer_refusals(sock, head, access_log)
                # The stream drops the h11 state once it answered; this frame
                # must not keep it alive for the connection's life (~2 KiB).
                head = None
                if stream is not None:
                    # Served from this task (one coroutine frame less per
                    # connection than a helper that serves it).
                    try:
                        await serve_connection(stream, app.served, config=cfg)
                    finally:
                        await stream.abort()
            else:
                await _serve_http(app, sock, head, access_log)
        except PeerGone:
            pass
        except HeadRefused as exc:
            text = str(exc).encode() + b"\n"
            response = _BAD_HEAD % (exc.status, h11_reason(exc.status), len(text)) + text
            if await write_all(sock, response):
                await _linger_close(sock)
        except BaseException as exc:
            _firewall(exc, client)
        finally:
            drop_socket(sock, graceful=False)  # a no-op if already closed
            self.clients -= 1
            if not self.clients:
                self._idle_lot.unpark_all()

    async def _answer_refusals(
        self, sock: socket.socket, head: HandshakeHead, log: bool
    ) -> LeanStream | None:
        """The stream of a handshake to serve, or ``None`` once it was refused here."""
        app = self.app
        fault = head.handshake_fault()
        if fault is not None:
            status, text = fault
            extra = [(b"sec-websocket-version", b"13")] if status == 426 else []
            await respond(sock, head.connection, status, text.encode() + b"\n", extra)
            handshake_refused(status)
            _log_access(log, head, status)
            await _linger_close(sock)
            return None
        stream = LeanStream(sock, head, app.config.max_message_bytes)
        if stream.request.path != app.path:
            await stream.reject(404, body=b"not found")
            handshake_refused(404)
            _log_access(log, head, 404)
            return None
        if app.draining:
            await stream.reject(
                503,
                body=b"server is draining; reconnect shortly",
                headers=(("retry-after", str(app.retry_after)),),
            )
            handshake_refused(503)
            _log_access(log, head, 503)
            return None
        _log_access(log, head, 101)
        return stream

    async def _wait_idle(self) -> None:
        while self.clients:
            await self._idle_lot.park()


def h11_reason(status: int) -> bytes:
    """The reason phrase of an HTTP status (``b""`` for an unknown one)."""
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _log_access(enabled: bool, head: HandshakeHead, status: int) -> None:
    """The request's access-log line, as on hypercorn (:func:`~chatcore._logs.log_request`)."""
    if enabled:
        request = head.request
        scope = {
            "type": "websocket" if head.websocket_upgrade else "http",
            "client": head.client,
            "method": request.method.decode("latin-1"),
            "raw_path": request.target,  # the client's text; log_request escapes it
            "http_version": request.http_version.decode("latin-1"),
            "headers": request.headers,
        }
        log_request(scope, {"status": status, "headers": ()}, time.monotonic() - head.started)


async def _serve_http(app: ASGIApp, sock: socket.socket, head: HandshakeHead, log: bool) -> None:
    """One plain HTTP request: the app's ASGI ``http`` call, then close."""
    connection = head.connection
    request = head.request
    body: list[bytes] = []
    size = 0
    with trio.move_on_after(HTTP_TIMEOUT) as timer:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                try:
                    connection.receive_data(await _read(sock))
                except (OSError, trio.ClosedResourceError):
                    return
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    await respond(sock, connection, 413, b"request body too large\n")
                    _log_access(log, head, 413)
                    await _linger_close(sock)
                    return
                body.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                break
            return  # the client left
    if timer.cancelled_caught:
        return
    target = request.target
    raw_path, _, query = target.partition(b"?")
    try:
        local = sock.getsockname()
        server: tuple[str, int] | None = (str(local[0]), int(local[1]))
    except OSError:
        server = None
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method.decode("latin-1"),
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(bytes(name), bytes(value)) for name, value in request.headers],
        "client": head.client,
        "server": server,
    }
    answered = trio.Event()
    delivered = False
    status = 500

    async def receive() -> ASGIMessage:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: ASGIMessage) -> None:
        nonlocal status
        kind = message.get("type")
        if kind == "http.response.start":
            status = int(message["status"])
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            headers.append((b"connection", b"close"))
            data = connection.send(h11.Response(status_code=status, headers=headers))
        elif kind == "http.response.body":
            data = b""
            chunk = bytes(message.get("body", b""))
            if chunk and request.method != b"HEAD":
                data = connection.send(h11.Data(data=chunk)) or b""
            if not message.get("more_body", False):
                data += connection.send(h11.EndOfMessage()) or b""
                answered.set()
        else:
            raise ValueError(f"unexpected ASGI message {kind!r} for an HTTP request")
        if data and not await write_all(sock, data):
            raise OSError("the client left")

    with trio.move_on_after(HTTP_TIMEOUT):
        try:
            await app(scope, receive, send)
        except OSError:
            return
        except Exception:
            logger.exception("HTTP %r: the application raised", target[:200])
            if connection.our_state is h11.SEND_RESPONSE:
                await respond(sock, connection, 500, b"internal error\n")
                answered.set()
            status = 500
    _log_access(log, head, status)
    if not answered.is_set():
        return  # incomplete response: reset
    await _linger_close(sock)


async def _read(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(65_536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def _linger_close(sock: socket.socket) -> None:
    """FIN, then read what the client still sends (bounded), then close."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(LINGER_SECONDS):
            while await _read(sock):
                pass
    except (OSError, trio.ClosedResourceError):
        pass
    drop_socket(sock, graceful=True)


async def serve_lean(
    app: ASGIApp,
    sockets: Sequence[socket.socket],
    *,
    drain_grace: float,
    access_log: bool = True,
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    task_status: trio.TaskStatus[LeanServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the lean engine until shut down, then drain (see the module docs).

    The counterpart of :func:`chatcore._serve.serve` (hypercorn): the same
    shutdown sequence, the same sockets (they stay open; the caller made them).

    Args:
        app: The application.
        sockets: Listening sockets, non-blocking (:func:`~chatcore._serve.create_listening_socket`).
        drain_grace: Seconds the drain may take after the shutdown request.
        access_log: Log every request and handshake to ``chatcore.access``.
        signals: Signals that request the shutdown (``()``: none).
        task_status: Started with the :class:`LeanServer` once listening.

    Raises:
        Exception: whatever the handler's background work raises at start.

    Cancellation: stops at once; each open connection still gets a 1012
    close frame (its actor's shielded, bounded close).
    """
    from ._serve import SHUTDOWN_GRACE, websocket_url

    server = LeanServer(app, tuple(websocket_url(sock, app.path) for sock in sockets))
    async with trio.open_nursery() as nursery:
        if signals:
            nursery.start_soon(server._watch_signals, signals)
        # The handler's background work (what the ASGI lifespan runs on hypercorn).
        await nursery.start(app.served.run)
        if app.metrics_path is not None:
            metrics_started(app)  # as the ASGI lifespan does on hypercorn
        with server._clients_scope:
            async with trio.open_nursery() as clients:
                accepting = trio.CancelScope()

                async def accept_all() -> None:
                    with accepting:
                        async with trio.open_nursery() as acceptors:
                            for sock in sockets:
                                acceptors.start_soon(server._accept, sock, clients, access_log)

                clients.start_soon(accept_all)
                task_status.started(server)
                await server._drain(app, drain_grace)
                accepting.cancel()
                with trio.move_on_after(SHUTDOWN_GRACE):
                    await server._wait_idle()
                clients.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
