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

Routes (a request over ``Config.handshake_limits`` gets 414 or 431 first,
and a WebSocket handshake without exactly one valid ``Sec-WebSocket-Key``
400; see ``docs/security.md``):

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

The app knows its handler only through the server layer's
:class:`~chatcore.ServedHandler` protocol (health, drain, ``Retry-After``),
which :class:`~chatcore.Hub` implements; any other handler is tracked so that
it can be counted and drained the same way. Nothing past the ASGI edge sees a
scope dict: the WebSocket handshake is converted into a
:class:`~chatcore.HandshakeRequest` by the ASGI transport
(``chatcore.transports._asgi_stream``), which also handles hypercorn's traps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import cast

import attrs
import trio

from ._config import Config
from ._connection import ConnectionHandler
from ._server import ServedHandler, refuse_asgi_websocket, serve_asgi_websocket, served
from .metrics import handshake_refused, metrics_started, serve_metrics
from .static import serve_client_script
from .transports._asgi_stream import (
    LINGER,
    ASGIMessage,
    ASGIReceive,
    ASGIScope,
    ASGISend,
    ASGIStream,
    screen_request,
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
        degraded_shards: While degraded on Redis Cluster, the shards without
            a session (``host:port`` of their primary); empty otherwise.
    """

    status: str
    connections: int
    rooms: int
    draining: bool
    ready: bool = attrs.field()
    degraded_shards: tuple[str, ...] = attrs.field(default=(), kw_only=True)

    @ready.default
    def _ready_unless_draining(self) -> bool:
        return not self.draining


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
            earlier can crash hypercorn; see :mod:`chatcore.transports._asgi_stream`).
        unready_when_degraded: Report not ready (503) while the backplane is
            degraded, so a load balancer sends new clients to healthy nodes.
            Off by default: open connections keep working during an outage.
        metrics_path: Where Prometheus metrics are served (GET), or ``None``
            for nowhere. Needs the ``chatcore[metrics]`` extra; without it the
            path answers 404 and the start-up logs say why. See
            docs/observability.md.

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
        metrics_path: str | None = "/metrics",
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
        #: Where Prometheus metrics are served, or ``None`` (see chatcore.metrics).
        self.metrics_path = metrics_path
        self._config = config
        self._default_config = Config()
        self._retry_after = retry_after
        # What connections actually run: the handler itself if a server can
        # watch and drain it (a hub), else a tracking wrapper around it.
        self._serving = served(handler)
        # The same object, as the server layer sees it (health, drain).
        self._served = cast(ServedHandler, self._serving)
        # Set by start_draining() (the handler has its own flag too).
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
    def served(self) -> ConnectionHandler:
        """What each connection runs: the handler, or a tracking wrapper of it.

        A server that serves WebSockets without ASGI (the lean engine) runs
        its connections on this, so they are counted and drained like the
        ASGI ones.
        """
        return self._serving

    @property
    def retry_after(self) -> int:
        """Seconds announced in ``Retry-After`` when refusing during a drain."""
        if self._retry_after is not None:
            return self._retry_after
        return self._served.retry_after

    # -- draining --------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once a drain started: handshakes get 503, health reports not ready."""
        return self._draining or self._served.health().draining

    def start_draining(self) -> None:
        """Refuse new handshakes with 503 and ``Retry-After``; report not ready."""
        self._draining = True
        self._served.start_draining()

    async def drain(self, grace: float = 8.0) -> int:
        """Gracefully close every connection within ``grace`` seconds.

        The handler's own drain (:meth:`ServedHandler.drain
        <chatcore.ServedHandler.drain>`): for a hub, a ``shutdown`` message
        with a jittered ``reconnect_after_ms``, then 1012 in batches; for a
        plain handler, 1012 closes spread over ``grace - close_timeout``
        seconds. Either way new handshakes get 503 from the first moment.

        Cancellation: stops the drain where it is; the connections still open
        are closed with 1012 by their own actors when the server is cancelled.

        Returns:
            How many connections were still open when it returned (0 on success).
        """
        self.start_draining()
        return await self._served.drain(grace)

    def health(self) -> Health:
        """A snapshot of what the health endpoint reports."""
        handler = self._served.health()
        draining = self._draining or handler.draining
        degraded = handler.degraded
        connections, rooms = handler.connections, handler.rooms
        return Health(
            status="draining" if draining else "degraded" if degraded else "ok",
            connections=connections,
            rooms=rooms,
            draining=draining,
            ready=not draining and not (degraded and self.unready_when_degraded),
            degraded_shards=handler.degraded_parts if degraded else (),
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
        if (refusal := screen_request(scope, self.config.handshake_limits)) is not None:
            # Over a handshake limit (414/431) or a bad key (400): see docs/security.md.
            handshake_refused(refusal.status)
            await refuse_asgi_websocket(scope, receive, send, refusal.status, refusal.body)
        elif scope.get("path") != self.path:
            handshake_refused(404)
            await refuse_asgi_websocket(scope, receive, send, 404, b"not found")
        elif self.draining:
            handshake_refused(503)
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
        if (refusal := screen_request(scope, self.config.handshake_limits)) is not None:
            await _respond(send, refusal.status, refusal.body)  # 414/431, as for handshakes
        elif scope.get("path") == self.health_path:
            method = scope.get("method", "GET")
            if method in ("GET", "HEAD"):
                health = self.health()
                report: dict[str, object] = {
                    "status": health.status,
                    "connections": health.connections,
                    "rooms": health.rooms,
                    "draining": health.draining,
                }
                if health.degraded_shards:
                    report["degraded_shards"] = list(health.degraded_shards)
                body = json.dumps(report, separators=(",", ":")).encode()
                status = 200 if health.ready else 503
                headers = [_JSON, (b"cache-control", b"no-store")]
                if not health.ready:
                    headers.append((b"retry-after", str(self.retry_after).encode()))
                await _respond(send, status, body if method == "GET" else b"", headers, len(body))
            else:
                await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
        elif self.metrics_path is not None and scope.get("path") == self.metrics_path:
            await serve_metrics(self, scope, send)
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
                    try:
                        await nursery.start(self._serving.run)
                    except Exception as exc:
                        logger.exception("the handler failed to start")
                        await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                        return
                    if self.metrics_path is not None:
                        metrics_started(self)
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
