"""Serve chatcore from an ASGI server (hypercorn's trio worker).

:class:`ASGIApp` is an ASGI application for a :class:`~chatcore.Hub` (or any
:class:`~chatcore.ConnectionHandler`)::

    # chat.py
    from chatcore import Hub
    from chatcore.asgi import ASGIApp

    hub = Hub()
    app = ASGIApp(hub)

Run it with ``chatcore serve chat:app`` (the production entry point: it owns
SIGTERM and drains gracefully, see ``docs/deploy.md``) or with plain
``hypercorn --worker-class trio chat:app``.

Routes:

* ``websocket`` on ``path`` (default ``/ws``): a chatcore connection. Other
  WebSocket paths are refused with HTTP 404, and while draining every
  handshake is refused with 503 and ``Retry-After``.
* ``GET``/``HEAD`` on ``health_path`` (default ``/healthz``): readiness as JSON
  (see :meth:`ASGIApp.health`); 200, or 503 while draining.
* any other HTTP request: the optional ``http_app`` (e.g. static files), else 404.
* ``lifespan``: at startup the hub's background work starts
  (:meth:`Hub.run <chatcore.Hub.run>`: the backplane, presence), at shutdown
  it stops; both phases are answered, as hypercorn requires. ``http_app``
  does not receive lifespan events.

Nothing past the ASGI edge sees a scope dict: the WebSocket handshake is
converted into a :class:`~chatcore.HandshakeRequest` in
:mod:`chatcore.transports._asgi`, which also handles hypercorn's traps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from ._config import Config
from ._connection import Connection, ConnectionHandler
from ._hub import Hub
from .sansio import Accept, CloseCause, HandshakeRequest, Reject
from .static import serve_client_script
from .transports._asgi import (
    LINGER,
    ASGIMessage,
    ASGIReceive,
    ASGIScope,
    ASGISend,
    ASGIStream,
    refuse_asgi_websocket,
    serve_asgi_websocket,
)

__all__ = [
    "ASGIApp",
    "ASGIApplication",
    "ASGIMessage",
    "ASGIReceive",
    "ASGIScope",
    "ASGISend",
    "ASGIStream",
    "Health",
]

logger = logging.getLogger("chatcore.asgi")

#: Any ASGI 3 application: ``async (scope, receive, send) -> None``.
ASGIApplication = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]

_JSON = (b"content-type", b"application/json")


@attrs.frozen
class Health:
    """What the health endpoint reports (a snapshot).

    Attributes:
        status: ``"draining"`` once a drain started (not ready), else
            ``"degraded"`` while the hub's backplane cannot do its job (e.g.
            Redis unreachable), else ``"ok"``.
        connections: Open connections of this process.
        rooms: Rooms with at least one member (0 for a plain handler).
        draining: True once a drain started: new handshakes get 503.
        ready: False while draining (and, if the app is configured so, while
            degraded): a load balancer should stop routing here (HTTP 503).
    """

    status: str
    connections: int
    rooms: int
    draining: bool
    ready: bool = attrs.field()

    @ready.default
    def _ready_unless_draining(self) -> bool:
        return not self.draining


class _Tracked(ConnectionHandler):
    """Delegates to a plain handler and keeps the set of its open connections.

    A :class:`~chatcore.Hub` keeps its own registry; other handlers get this so
    that the app can count and drain their connections.
    """

    def __init__(self, inner: ConnectionHandler) -> None:
        self.inner = inner
        # Open connections: added by the connection's own handle task, removed
        # in connection_closed, which runs however the connection ended.
        self.connections: set[Connection] = set()

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        return await self.inner.authenticate(request)

    async def handle(self, connection: Connection) -> None:
        self.connections.add(connection)
        await self.inner.handle(connection)

    def connection_closed(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.inner.connection_closed(connection)


class ASGIApp:
    """An ASGI application serving a chatcore handler (see the module docs).

    Args:
        handler: A :class:`~chatcore.Hub`, or any
            :class:`~chatcore.ConnectionHandler`.
        http_app: An ASGI application for HTTP requests other than the health
            check (e.g. static files); ``None`` answers them with 404.
        path: The WebSocket endpoint.
        health_path: The health/readiness endpoint.
        config: Bounds of every connection. Default: the hub's
            :attr:`~chatcore.Hub.connection_config`, or :class:`~chatcore.Config` ``()``
            for a plain handler.
        retry_after: Seconds announced in ``Retry-After`` when refusing during a
            drain. Default: the hub's :attr:`~chatcore.HubConfig.retry_after`, else 5.
        linger: Seconds a finished connection waits for the server's
            ``websocket.disconnect`` before the application returns (returning
            earlier can crash hypercorn; see :mod:`chatcore.transports._asgi`).
        unready_when_degraded: Report not ready (503) while the backplane is
            degraded, so a load balancer sends new clients to healthy nodes.
            Off by default: open connections keep working during an outage.

    Raises:
        TypeError: ``handler`` is not a :class:`~chatcore.ConnectionHandler`.
        ValueError: ``path`` or ``health_path`` does not start with ``/``.
    """

    #: Where the browser client ``chatcore.js`` is served (GET/HEAD), before
    #: ``http_app`` sees the request; set it on the instance to move the route,
    #: or to ``None`` to leave that path to ``http_app``. See docs/client-js.md.
    client_path: str | None = "/chatcore.js"

    def __init__(
        self,
        handler: ConnectionHandler,
        *,
        http_app: ASGIApplication | None = None,
        path: str = "/ws",
        health_path: str = "/healthz",
        config: Config | None = None,
        retry_after: int | None = None,
        linger: float = LINGER,
        unready_when_degraded: bool = False,
    ) -> None:
        if not isinstance(handler, ConnectionHandler):
            raise TypeError(f"{handler!r} is not a chatcore ConnectionHandler")
        for name, value in (("path", path), ("health_path", health_path)):
            if not value.startswith("/"):
                raise ValueError(f"{name} must start with '/', got {value!r}")
        #: The application's handler (the hub).
        self.handler = handler
        #: The fallback for other HTTP requests.
        self.http_app = http_app
        #: The WebSocket endpoint.
        self.path = path
        #: The health endpoint.
        self.health_path = health_path
        #: Seconds to wait for the server's disconnect after a connection ended.
        self.linger = linger
        #: Whether a degraded backplane makes the health endpoint answer 503.
        self.unready_when_degraded = unready_when_degraded
        self._config = config
        self._default_config = Config()
        self._retry_after = retry_after
        # What connections actually run: the hub itself, or a tracking wrapper.
        self._serving: ConnectionHandler = (
            handler if isinstance(handler, Hub) else _Tracked(handler)
        )
        # Set by start_draining(); a hub has its own flag too.
        self._draining = False

    def __repr__(self) -> str:
        health = self.health()
        return (
            f"<ASGIApp {type(self.handler).__name__} {self.path!r} "
            f"connections={health.connections} {health.status}>"
        )

    @property
    def config(self) -> Config:
        """The bounds of every new connection (see the ``config`` argument); settable."""
        if self._config is not None:
            return self._config
        handler_config = getattr(self.handler, "connection_config", None)
        if isinstance(handler_config, Config):
            return handler_config
        return self._default_config

    @config.setter
    def config(self, value: Config) -> None:
        if not isinstance(value, Config):
            raise TypeError(f"expected a chatcore.Config, got {value!r}")
        self._config = value

    @property
    def retry_after(self) -> int:
        """Seconds announced in ``Retry-After`` when refusing during a drain."""
        if self._retry_after is not None:
            return self._retry_after
        if isinstance(self.handler, Hub):
            return self.handler.config.retry_after
        return 5

    # -- draining --------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once a drain started: handshakes get 503, health reports not ready."""
        if isinstance(self.handler, Hub) and self.handler.draining:
            return True
        return self._draining

    def start_draining(self) -> None:
        """Refuse new handshakes with 503 and ``Retry-After``; report not ready."""
        self._draining = True
        if isinstance(self.handler, Hub):
            self.handler.start_draining()

    async def drain(self, grace: float = 8.0) -> int:
        """Gracefully close every connection within ``grace`` seconds.

        For a hub this is :meth:`Hub.drain <chatcore.Hub.drain>` (``shutdown``
        message with a jittered ``reconnect_after_ms``, then 1012 in batches).
        For a plain handler, the connections are closed with 1012 spread over
        ``grace - close_timeout`` seconds. Either way new handshakes get 503
        from the first moment.

        Cancellation: stops the drain where it is; the connections still open
        are closed with 1012 by their own actors when the server is cancelled.

        Returns:
            How many connections were still open when it returned (0 on success).
        """
        self.start_draining()
        if isinstance(self.handler, Hub):
            return await self.handler.drain(grace)
        assert isinstance(self._serving, _Tracked)
        tracked = self._serving.connections
        start = trio.current_time()
        spread = max(0.0, grace - self.config.close_timeout)
        with trio.move_on_at(start + grace):
            connections = list(tracked)
            for index, connection in enumerate(connections):
                at = start + spread * index / len(connections)
                if at > trio.current_time():
                    await trio.sleep_until(at)
                connection.close_nowait(1012, "service restart", cause=CloseCause.SHUTDOWN)
            while tracked:
                # Handshakes accepted just before the drain began register late.
                for connection in list(tracked):
                    connection.close_nowait(1012, "service restart", cause=CloseCause.SHUTDOWN)
                for connection in list(tracked):
                    await connection.wait_closed()
        return len(tracked)

    def health(self) -> Health:
        """A snapshot of what the health endpoint reports."""
        draining = self.draining
        degraded = False
        if isinstance(self.handler, Hub):
            stats = self.handler.statistics()
            connections, rooms = stats.connections, stats.rooms
            degraded = self.handler.backplane.degraded
        else:
            assert isinstance(self._serving, _Tracked)
            connections, rooms = len(self._serving.connections), 0
        return Health(
            status="draining" if draining else "degraded" if degraded else "ok",
            connections=connections,
            rooms=rooms,
            draining=draining,
            ready=not draining and not (degraded and self.unready_when_degraded),
        )

    # -- ASGI ------------------------------------------------------------------

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        """The ASGI 3 entry point.

        For WebSocket scopes it never raises except :class:`trio.Cancelled`
        (an escaping exception can take hypercorn down). Cancellation (the
        server stopping) closes an open connection with 1012 first.
        """
        kind = scope.get("type")
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    async def _websocket(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope.get("path") != self.path:
            await refuse_asgi_websocket(scope, receive, send, 404, b"not found")
        elif self.draining:
            await refuse_asgi_websocket(
                scope,
                receive,
                send,
                503,
                b"server is draining; reconnect shortly",
                (("retry-after", str(self.retry_after)),),
            )
        else:
            await serve_asgi_websocket(
                scope, receive, send, self._serving, config=self.config, linger=self.linger
            )

    async def _http(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope.get("path") == self.health_path:
            method = scope.get("method", "GET")
            if method in ("GET", "HEAD"):
                health = self.health()
                body = json.dumps(
                    {
                        "status": health.status,
                        "connections": health.connections,
                        "rooms": health.rooms,
                        "draining": health.draining,
                    },
                    separators=(",", ":"),
                ).encode()
                status = 200 if health.ready else 503
                headers = [_JSON, (b"cache-control", b"no-store")]
                if not health.ready:
                    headers.append((b"retry-after", str(self.retry_after).encode()))
                await _respond(send, status, body if method == "GET" else b"", headers, len(body))
            else:
                await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
        elif self.client_path is not None and scope.get("path") == self.client_path:
            await serve_client_script(scope, send)  # the browser client, chatcore.js
        elif self.http_app is not None:
            await self.http_app(scope, receive, send)
        else:
            await _respond(send, 404, b"not found\n")

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        # hypercorn crashes at start-up if the lifespan scope returns early, so
        # answer both phases and return only after shutdown. The hub's
        # background work lives in this task's nursery, from startup to shutdown.
        async with trio.open_nursery() as nursery:
            while True:
                message = await receive()
                kind = message.get("type")
                if kind == "lifespan.startup":
                    if isinstance(self.handler, Hub):
                        try:
                            await nursery.start(self.handler.run)
                        except Exception as exc:
                            logger.exception("the hub failed to start")
                            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                            return
                    await send({"type": "lifespan.startup.complete"})
                elif kind == "lifespan.shutdown":
                    nursery.cancel_scope.cancel()
                    break
        await send({"type": "lifespan.shutdown.complete"})


async def _respond(
    send: ASGISend,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    length: int | None = None,
) -> None:
    headers = headers or [(b"content-type", b"text/plain; charset=utf-8")]
    headers = [*headers, (b"content-length", str(len(body) if length is None else length).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
