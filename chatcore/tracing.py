"""OpenTelemetry spans for handshakes, publishes and joins (the ``chatcore[tracing]`` extra).

Off by default. :func:`enable` turns it on for the process; then each
connection makes a ``chatcore.handshake`` span (the ``authenticate``
decision, with the HTTP status), and each client ``publish`` and ``join``
makes a ``chatcore.publish`` span (from the client's frame to the backplane's
acknowledgement) or a ``chatcore.join`` span (with its recovery outcome and
the messages replayed). A handshake that carries a W3C ``traceparent`` header
continues that trace; the connection's later spans are children of its
handshake span.

Theory of operation
-------------------

Zero cost when off: nothing here is imported by chatcore itself. The hooks
it uses (``chatcore._observe``) cost one list test per publish and one
``None`` test per connection while tracing is off.

Spans are made with the tracer provider given to :func:`enable` (default:
OpenTelemetry's global one), so the application's SDK configuration
(exporters, sampling) applies.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

from . import _observe
from ._connection import Connection, ConnectionHandler

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Tracer, TracerProvider

    from .sansio import Accept, HandshakeRequest, Reject

__all__ = ["disable", "enable", "enabled"]

#: The instrumentation name spans are recorded under.
TRACER_NAME = "chatcore"

_tracer: Tracer | None = None
# The context of each open connection's handshake span (parent of its later spans).
_contexts: weakref.WeakKeyDictionary[Connection, Context] = weakref.WeakKeyDictionary()


class _Spans:
    """The publish observer that turns publishes and joins into spans."""

    def publish_acked(self, began_ns: int, connection: Connection, room: str, ok: bool) -> None:
        self._span("chatcore.publish", began_ns, connection, room, {"chatcore.ok": ok}, ok)

    def join_done(
        self,
        began_ns: int,
        connection: Connection,
        room: str,
        recovered: bool | None,
        replayed: int,
    ) -> None:
        attributes: dict[str, Any] = {"chatcore.replayed": replayed}
        if recovered is not None:
            attributes["chatcore.recovered"] = recovered
        self._span("chatcore.join", began_ns, connection, room, attributes, True)

    def _span(
        self,
        name: str,
        began_ns: int,
        connection: Connection,
        room: str,
        attributes: dict[str, Any],
        ok: bool,
    ) -> None:
        from opentelemetry.trace import Status, StatusCode

        if _tracer is None:  # pragma: no cover  (disabled meanwhile)
            return
        span = _tracer.start_span(
            name,
            context=_contexts.get(connection),
            start_time=began_ns,
            attributes={
                "chatcore.connection_id": connection.id,
                "chatcore.room": room,
                **attributes,
            },
        )
        if not ok:
            span.set_status(Status(StatusCode.ERROR, "backplane unavailable"))
        span.end(end_time=time.time_ns())


_spans = _Spans()


class _TracedHandler(ConnectionHandler):
    """A connection's handler with its handshake in a span (one per traced connection)."""

    def __init__(self, inner: ConnectionHandler, connection: Connection) -> None:
        self._inner = inner
        self._connection = connection
        self.connection_config = inner.connection_config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        from opentelemetry import trace
        from opentelemetry.propagate import extract
        from opentelemetry.trace import Status, StatusCode

        assert _tracer is not None
        carrier = dict(request.headers)
        parent = extract(carrier)
        with _tracer.start_as_current_span(
            "chatcore.handshake",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"chatcore.connection_id": self._connection.id, "url.path": request.path},
            end_on_exit=True,
        ) as span:
            decision = await self._inner.authenticate(request)
            status = getattr(decision, "status", 101)
            span.set_attribute("http.response.status_code", status)
            if status != 101:
                span.set_status(Status(StatusCode.ERROR, f"refused with {status}"))
            _contexts[self._connection] = trace.set_span_in_context(span)
        return decision

    async def handle(self, connection: Connection) -> None:
        await self._inner.handle(connection)

    def connection_closed(self, connection: Connection) -> None:
        _contexts.pop(connection, None)
        self._inner.connection_closed(connection)


def _wrap(handler: ConnectionHandler, connection: Connection) -> ConnectionHandler:
    return _TracedHandler(handler, connection)


def enable(tracer_provider: TracerProvider | None = None) -> None:
    """Make spans for every connection's handshake, publishes and joins from now on.

    Args:
        tracer_provider: Where spans go (default: OpenTelemetry's global provider).

    Raises:
        ImportError: ``opentelemetry-api`` is not installed (``pip install
            'chatcore[tracing]'``).
    """
    global _tracer
    from opentelemetry import trace

    _tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    _observe.handler_wrapper = _wrap
    _observe.add_publish_observer(_spans)


def disable() -> None:
    """Stop making spans (connections already traced finish their spans)."""
    global _tracer
    _observe.handler_wrapper = None
    _observe.remove_observer(_spans)
    _tracer = None


def enabled() -> bool:
    """True while :func:`enable` is in force."""
    return _tracer is not None
