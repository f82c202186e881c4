"""The server layer: serving any :class:`~chatcore.ConnectionHandler` to clients.

Theory of operation
-------------------

Three layers meet here. A *transport* adapts one WebSocket library's
connection to a :class:`~chatcore.MessageStream` and knows nothing else
(``chatcore.transports``). The *connection actor*
(:func:`~chatcore.serve_connection`) runs one connection on a stream for a
handler. The *server layer*, this module and :mod:`chatcore.asgi`, accepts
clients, runs one actor per client behind an exception firewall, and runs the
handler's lifecycle: its background work, its health, its drain.

A server knows a handler only through :class:`ServedHandler`: health
(:meth:`~ServedHandler.health`), drain (:meth:`~ServedHandler.start_draining`,
:meth:`~ServedHandler.drain`) and :attr:`~ServedHandler.retry_after`, besides
the :class:`~chatcore.ConnectionHandler` methods. :class:`~chatcore.Hub`
implements it; any other handler is wrapped in a :class:`TrackedHandler`,
which counts its connections so that it can be drained too.

There is one drain algorithm, :func:`drain_connections`: a farewell to each
open connection (the hub's ``shutdown`` message), then 1012 closes spread
over ``grace - close_timeout`` seconds, so that each close (itself bounded by
:attr:`Config.close_timeout <chatcore.Config.close_timeout>`) ends within
``grace``, then a wait until every accepted connection has closed.

Serving functions:

* :func:`serve_websocket`: a TCP server on trio-websocket.
* :func:`serve_asgi_websocket` / :func:`refuse_asgi_websocket`: one ASGI
  ``websocket`` scope (used by :class:`chatcore.asgi.ASGIApp`).
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, Protocol, runtime_checkable

import attrs
import trio

from ._config import Config
from ._connection import Connection, ConnectionHandler, serve_connection
from ._exceptions import PeerGone
from .sansio import Accept, CloseCause, HandshakeRequest, Reject
from .transports._asgi_stream import (
    LINGER,
    ASGIReceive,
    ASGIScope,
    ASGISend,
    ASGIStream,
    deny_websocket,
)
from .transports._trio_websocket import _describe_peer, serve_trio_websocket_stream

__all__ = [
    "HandlerHealth",
    "ServedHandler",
    "TrackedHandler",
    "drain_connections",
    "refuse_asgi_websocket",
    "serve_asgi_websocket",
    "serve_websocket",
    "served",
]

server_logger = logging.getLogger("chatcore.server")
logger = logging.getLogger("chatcore.asgi")


@attrs.frozen
class HandlerHealth:
    """What a served handler reports about itself (a snapshot).

    Attributes:
        connections: Its open connections.
        rooms: Rooms with at least one member (0 for a handler without rooms).
        draining: A drain started: new handshakes are refused with 503.
        degraded: It cannot currently do its whole job (e.g. its backplane
            lost Redis); open connections keep working.
        degraded_parts: Which parts are degraded, where the backplane can
            tell (the Redis Cluster shards without a session, by address);
            empty otherwise.
    """

    connections: int
    rooms: int
    draining: bool
    degraded: bool = False
    degraded_parts: tuple[str, ...] = ()


@runtime_checkable
class ServedHandler(Protocol):
    """A :class:`~chatcore.ConnectionHandler` that a server can watch and drain.

    :class:`~chatcore.Hub` implements it. Servers wrap any other handler in a
    :class:`TrackedHandler` (see :func:`served`).
    """

    @property
    def retry_after(self) -> int:
        """Seconds announced in ``Retry-After`` when refusing with 503."""

    def health(self) -> HandlerHealth:
        """A snapshot for health checks (cheap: counters only)."""

    def start_draining(self) -> None:
        """Refuse new handshakes with 503 from now on."""

    async def drain(self, grace: float = 8.0) -> int:
        """Close every connection gracefully within ``grace`` seconds.

        Returns:
            How many connections were still open when it returned.

        Cancellation: stops the drain where it is.
        """


async def drain_connections(
    connections: Sequence[Connection],
    *,
    grace: float,
    close_timeout: float,
    wait_all_closed: Callable[[], Awaitable[None]],
    farewell: Callable[[Connection], None] | None = None,
) -> None:
    """The drain algorithm, for any handler (see the module docs).

    Args:
        connections: The connections open when the drain began.
        grace: Seconds the whole drain may take.
        close_timeout: Seconds one close may take (closes start at the latest
            this long before the end of ``grace``).
        wait_all_closed: Waits until every accepted connection has closed,
            including any that registers late (accepted just before the drain).
        farewell: Called once per connection first (e.g. queue a ``shutdown``).

    Cancellation: stops the drain where it is; connections still open are
    closed with 1012 by their own actors when the server is cancelled.
    """
    start = trio.current_time()
    if farewell is not None:
        for connection in connections:
            farewell(connection)
    spread = max(0.0, grace - close_timeout)
    with trio.move_on_at(start + grace):
        for index, connection in enumerate(connections):
            at = start + spread * index / len(connections)
            if at > trio.current_time():
                await trio.sleep_until(at)
            connection.close_nowait(1012, "service restart", cause=CloseCause.SHUTDOWN)
        await wait_all_closed()


class TrackedHandler(ConnectionHandler):
    """Serves a plain handler and keeps the set of its open connections.

    It implements :class:`ServedHandler` for a handler that does not, so
    that a server can count and drain its connections.

    Args:
        inner: The handler.
    """

    def __init__(self, inner: ConnectionHandler) -> None:
        #: The handler served.
        self.inner = inner
        #: Bounds of its connections (the inner handler's).
        self.connection_config = inner.connection_config
        # Open connections: added by the connection's own handle task, removed
        # in connection_closed, which runs however the connection ended.
        self.connections: set[Connection] = set()
        self._draining = False

    def __repr__(self) -> str:
        return f"<TrackedHandler {self.inner!r} connections={len(self.connections)}>"

    @property
    def retry_after(self) -> int:
        """Seconds announced in ``Retry-After``: 5."""
        return 5

    def health(self) -> HandlerHealth:
        """See :meth:`ServedHandler.health`."""
        return HandlerHealth(len(self.connections), 0, self._draining)

    def start_draining(self) -> None:
        """See :meth:`ServedHandler.start_draining` (a server refuses the handshakes)."""
        self._draining = True

    async def drain(self, grace: float = 8.0) -> int:
        """Close the connections with 1012 (see :func:`drain_connections`)."""
        self.start_draining()

        async def wait_all_closed() -> None:
            while self.connections:
                # Handshakes accepted just before the drain began register late.
                for connection in list(self.connections):
                    connection.close_nowait(1012, "service restart", cause=CloseCause.SHUTDOWN)
                for connection in list(self.connections):
                    await connection.wait_closed()

        close_timeout = (self.connection_config or Config()).close_timeout
        await drain_connections(
            list(self.connections),
            grace=grace,
            close_timeout=close_timeout,
            wait_all_closed=wait_all_closed,
        )
        return len(self.connections)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The inner handler's background work."""
        await self.inner.run(task_status=task_status)

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        """The inner handler's decision."""
        return await self.inner.authenticate(request)

    async def handle(self, connection: Connection) -> None:
        """Track the connection and let the inner handler serve it."""
        self.connections.add(connection)
        await self.inner.handle(connection)

    def connection_closed(self, connection: Connection) -> None:
        """Forget the connection; tell the inner handler."""
        self.connections.discard(connection)
        self.inner.connection_closed(connection)


def served(handler: ConnectionHandler) -> ConnectionHandler:
    """``handler`` if it is a :class:`ServedHandler`, else a :class:`TrackedHandler` of it."""
    return handler if isinstance(handler, ServedHandler) else TrackedHandler(handler)


# -- serving on trio-websocket -------------------------------------------------------------

# What the server's firewall lets through: cancellation and interpreter exits.
_PASS_THROUGH = (trio.Cancelled, KeyboardInterrupt, SystemExit, GeneratorExit)


def _log_crash(exc: BaseException, client: object) -> None:
    server_logger.error("client %s: unexpected error; connection dropped", client, exc_info=exc)


def _firewall(exc: BaseException, client: object) -> None:
    """Log what a client connection raised; re-raise only cancellation and exits."""
    if isinstance(exc, BaseExceptionGroup):
        passing, crashing = exc.split(_PASS_THROUGH)
        if crashing is not None:
            _log_crash(crashing, client)
        if passing is not None:
            raise passing
        return
    if isinstance(exc, _PASS_THROUGH):
        raise exc
    _log_crash(exc, client)


async def _serve_client(
    stream: trio.SocketStream,
    handler: ConnectionHandler,
    config: Config,
    library_nursery: trio.Nursery,
) -> None:
    """One client of :func:`serve_websocket`, behind an exception firewall."""
    client, _ = _describe_peer(stream)
    try:
        await serve_trio_websocket_stream(
            stream,
            functools.partial(serve_connection, handler=handler, config=config),
            config=config,
            library_nursery=library_nursery,
        )
    except PeerGone:
        server_logger.debug("client %s: no WebSocket handshake; dropped", client)
    except BaseException as exc:
        _firewall(exc, client)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_websocket(
    handler: ConnectionHandler,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    config: Config | None = None,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve WebSocket clients over TCP with trio-websocket; never returns.

    Each client runs as one connection actor (:func:`chatcore.serve_connection`)
    behind an exception firewall: nothing a client or the handler does can end
    the server or another connection (errors are logged on the
    ``chatcore.server`` logger). A client that does not complete its
    handshake within :attr:`Config.handshake_timeout
    <chatcore.Config.handshake_timeout>` is dropped.

    Use it with ``nursery.start`` to learn the bound port::

        listeners = await nursery.start(serve_websocket, handler, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]

    Args:
        handler: The application (authenticate, handle, connection_closed);
            its ``run`` is started before the first client is accepted.
        host: Interface to bind (``"0.0.0.0"`` for all IPv4 interfaces).
        port: TCP port; 0 picks a free one.
        config: Bounds and timings (default: ``handler.connection_config``,
            else :class:`~chatcore.Config` ``()``).
        handler_nursery: Nursery to run client tasks in (default: an internal one).
        task_status: Started with the list of :class:`trio.SocketListener`.

    Raises:
        OSError: the listening socket could not be opened.

    Cancellation: the listeners close, and every open connection closes with
    1012 (shielded, bounded by :attr:`Config.close_timeout
    <chatcore.Config.close_timeout>`) before this returns.
    """
    cfg = config or handler.connection_config or Config()
    listeners = await trio.open_tcp_listeners(port, host=host)

    async with trio.open_nursery() as nursery:

        async def serve_client(stream: trio.SocketStream) -> None:
            # trio-websocket's reader tasks run beside the clients' tasks.
            await _serve_client(stream, handler, cfg, handler_nursery or nursery)

        # The handler's background work (a hub's backplane and presence timer).
        await nursery.start(handler.run)
        await trio.serve_listeners(
            serve_client, listeners, handler_nursery=handler_nursery, task_status=task_status
        )


# -- serving one ASGI websocket scope ------------------------------------------------------


async def serve_asgi_websocket(
    scope: ASGIScope,
    receive: ASGIReceive,
    send: ASGISend,
    handler: ConnectionHandler,
    *,
    config: Config | None = None,
    linger: float = LINGER,
) -> None:
    """Serve one ASGI ``websocket`` scope with chatcore's connection actor.

    Receives ``websocket.connect``, converts the scope, runs
    :func:`~chatcore.serve_connection` on an :class:`ASGIStream`, then lingers
    until ``websocket.disconnect`` (bounded by ``linger``) before returning,
    because returning earlier can crash hypercorn (Rule 1).

    Never raises except :class:`trio.Cancelled`: an error (a chatcore bug, a
    malformed scope) is logged, and a handshake nobody answered is refused
    with 500 (400 for a malformed scope). Cancellation (server shutdown) closes
    an open connection with 1012, shielded and bounded by
    :attr:`Config.close_timeout`, then propagates without lingering.

    Args:
        scope: The ``websocket`` scope.
        receive: The server's ``receive``.
        send: The server's ``send``.
        handler: The application (a :class:`~chatcore.Hub` or any handler).
        config: Bounds of the connection (default :class:`~chatcore.Config` ``()``).
        linger: Seconds to wait for the disconnect after the connection ended.
    """
    stream: ASGIStream | None = None
    try:
        first = await receive()
        if first.get("type") != "websocket.connect":
            return  # the client left before the handshake reached us
        try:
            stream = ASGIStream(scope, receive, send)
        except ValueError as exc:
            logger.warning("refusing a malformed websocket scope: %s", exc)
            await deny_websocket(scope, send, 400, b"malformed request")
            return
        # The actor tells the stream if the server cancels it (no watcher
        # task per connection: see MessageStream.server_stopping).
        await serve_connection(stream, handler, config=config)
    except Exception:
        # serve_connection never raises because of the client or the
        # application, so this is a chatcore bug; it must still not escape.
        logger.exception("ASGI websocket %s: unexpected error", scope.get("path"))
        if stream is not None and not stream.answered:
            await _refuse_quietly(scope, send, 500)
    if stream is not None and stream.accepted:
        await stream.linger(linger)


async def _refuse_quietly(scope: ASGIScope, send: ASGISend, status: int) -> None:
    try:
        await deny_websocket(scope, send, status, b"internal error")
    except Exception as exc:
        logger.debug("refusal not delivered: %r", exc)


async def refuse_asgi_websocket(
    scope: ASGIScope,
    receive: ASGIReceive,
    send: ASGISend,
    status: int,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    """Refuse a WebSocket scope without running a connection (wrong path, draining).

    Receives ``websocket.connect``, then answers with :func:`deny_websocket`.
    Never raises except :class:`trio.Cancelled` (a client that already left
    makes the refusal moot).
    """
    try:
        first = await receive()
        if first.get("type") == "websocket.connect":
            await deny_websocket(scope, send, status, body, headers)
    except Exception as exc:
        logger.debug("refusal (%d) not delivered: %r", status, exc)


_serve_logger = logging.getLogger("chatcore.serve")


@attrs.define(eq=False)
class _ServerControl:
    """What both ``chatcore serve`` engines share: the shutdown requests and the drain.

    The first request (SIGTERM, or :meth:`request_shutdown`) starts a graceful
    drain; a second one calls :meth:`_skip_waiting`, which each engine
    defines to cut its remaining waits short.
    """

    # Set by the first shutdown request.
    _shutdown: trio.Event = attrs.field(factory=trio.Event, init=False)
    # The drain in progress (a second request cancels it).
    _drain_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _requests: int = attrs.field(default=0, init=False)

    @property
    def shutting_down(self) -> bool:
        """True once a shutdown was requested."""
        return self._requests > 0

    def request_shutdown(self) -> None:
        """Like SIGTERM: the first call drains gracefully, a second skips the waiting."""
        self._requests += 1
        if self._requests == 1:
            self._shutdown.set()
            return
        _serve_logger.warning("second shutdown request: closing everything now")
        self._drain_scope.cancel()
        self._skip_waiting()

    def _skip_waiting(self) -> None:
        """A second shutdown request: stop waiting for anything (per engine)."""
        raise NotImplementedError

    async def _watch_signals(self, signals: Sequence[int]) -> None:
        with trio.open_signal_receiver(*signals) as received:
            # A worker process starts with SIGTERM blocked (see
            # chatcore._serve.run_workers), and so does ``chatcore serve``
            # while it imports its target: one that arrived meanwhile is
            # delivered now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            async for signum in received:
                _serve_logger.info("received %s", signal.Signals(signum).name)
                self.request_shutdown()

    async def _drain(self, app: _DrainableApp, grace: float) -> None:
        """Once shutdown was requested: drain ``app`` within ``grace`` seconds, logged."""
        await self._shutdown.wait()
        start = trio.current_time()
        _serve_logger.info(
            "shutting down: refusing new connections, draining %d within %.1f s",
            app.health().connections,
            grace,
        )
        with self._drain_scope:
            left = await app.drain(grace)
            _serve_logger.info(
                "drain finished in %.2f s; %d connection(s) left",
                trio.current_time() - start,
                left,
            )


class _Counted(Protocol):
    @property
    def connections(self) -> int: ...


class _DrainableApp(Protocol):
    """What :meth:`_ServerControl._drain` needs of an app (an ``ASGIApp``)."""

    def health(self) -> _Counted:
        """A snapshot with ``connections``."""

    async def drain(self, grace: float) -> int:
        """Drain within ``grace`` seconds; how many connections were left."""
