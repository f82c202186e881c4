"""Where the close log, metrics and tracing see connections and publishes.

A few process-wide hooks, called from the connection actor
(:func:`~chatcore.serve_connection`) and the dispatcher. What each costs when
nothing is installed is the point of this module:

* per connection (not per message): :func:`connection_started` /
  :func:`connection_ended`; the close log (:class:`~chatcore._logs.CloseLog`)
  is always installed, metrics and tracing add themselves;
* per publish: :data:`publish_hooks` is read once; while it is empty the
  dispatcher does nothing more;
* per frame written: one attribute of the outbox is read and tested (see
  below); nothing more unless the frame's oldest message was sampled.

The delivery lag (publish to frame written) is sampled where it is cheap: the
hub asks :func:`publish_stamp` once per room publish, which stamps one
publish in :attr:`DeliveryLagObserver.lag_sample_every` with the wall-clock
time (and none while nobody observes the lag). The stamp travels with the
message (:attr:`OutboundMessage.published
<chatcore.sansio.OutboundMessage.published>`, one per publish, shared by
every outbox), across nodes too; a connection that writes a frame whose
oldest message carries one calls :func:`frame_delivered`.

Hooks never raise into chatcore: an exception is logged and the hook is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ._logs import CloseLog

if TYPE_CHECKING:
    from ._connection import Connection, ConnectionHandler

__all__ = [
    "ConnectionObserver",
    "DeliveryLagObserver",
    "LagHistogram",
    "PublishObserver",
    "add_connection_observer",
    "add_lag_observer",
    "add_publish_observer",
    "close_log",
    "connection_ended",
    "connection_started",
    "frame_delivered",
    "join_done",
    "publish_acked",
    "publish_began",
    "publish_stamp",
    "remove_observer",
]

logger = logging.getLogger("chatcore.observe")


class ConnectionObserver(Protocol):
    """Told when connections start and end (metrics, tracing)."""

    def connection_started(self, connection: Connection) -> None:
        """Before the handshake is decided."""

    def connection_ended(self, connection: Connection, duration: float) -> None:
        """After the close completed; ``duration`` in seconds since the start."""


class PublishObserver(Protocol):
    """Told when a client's publish or join got its answer."""

    def publish_acked(self, began_ns: int, connection: Connection, room: str, ok: bool) -> None:
        """The backplane acknowledged (``ok``) or failed a publish.

        ``began_ns``: :func:`time.time_ns` when the client's frame was taken up.
        """

    def join_done(
        self,
        began_ns: int,
        connection: Connection,
        room: str,
        recovered: bool | None,
        replayed: int,
    ) -> None:
        """A client's join succeeded; ``recovered`` as in the answer (None: no ``since``)."""


class LagHistogram(Protocol):
    """Where delivery lags are counted (:class:`chatcore.metrics.Buckets`)."""

    def observe(self, value: float) -> None:
        """Count one lag in seconds (>= 0)."""


class DeliveryLagObserver(Protocol):
    """Told the publish-to-delivery lag of sampled frames (metrics)."""

    #: Stamp one room publish in this many (1: every one).
    lag_sample_every: int

    @property
    def delivery_lag(self) -> LagHistogram:
        """Counts the lag of each frame written whose oldest message was stamped.

        Its ``observe`` is called directly: one call per sampled frame.
        """


#: The close log every connection goes through.
close_log = CloseLog()

_connection_observers: list[ConnectionObserver] = []
#: Non-empty while something observes publishes (read on every publish).
publish_hooks: list[PublishObserver] = []
#: Set by tracing: wraps the handler of each connection (its handshake span).
handler_wrapper: Callable[[ConnectionHandler, Connection], ConnectionHandler] | None = None


#: The wall clock stamps and lags are read from (a test may put a virtual one here).
wall_clock: Callable[[], float] = time.time

_lag_observers: list[DeliveryLagObserver] = []
# Their histograms' observe methods, called per sampled frame.
_lag_hooks: list[Callable[[float], None]] = []
# Publishes per stamp (the smallest any lag observer asks for; 0: no stamps)
# and how many publishes remain until the next stamp.
_sample_every = 0
_countdown = 0


def add_connection_observer(observer: ConnectionObserver) -> None:
    """Tell ``observer`` about every connection from now on (idempotent)."""
    if observer not in _connection_observers:
        _connection_observers.append(observer)


def add_publish_observer(observer: PublishObserver) -> None:
    """Tell ``observer`` about every client publish from now on (idempotent)."""
    if observer not in publish_hooks:
        publish_hooks.append(observer)


def add_lag_observer(observer: DeliveryLagObserver) -> None:
    """Stamp room publishes and tell ``observer`` the lag of sampled frames (idempotent)."""
    if observer not in _lag_observers:
        _lag_observers.append(observer)
    _resample()


def remove_observer(observer: object) -> None:
    """Stop telling ``observer`` anything (no error if it was not added)."""
    registries: tuple[list[Any], ...] = (_connection_observers, publish_hooks, _lag_observers)
    for registry in registries:
        while observer in registry:
            registry.remove(observer)
    _resample()


def _resample() -> None:
    global _sample_every, _countdown
    _lag_hooks[:] = [observer.delivery_lag.observe for observer in _lag_observers]
    _sample_every = min((max(1, o.lag_sample_every) for o in _lag_observers), default=0)
    _countdown = min(_countdown, _sample_every)


def connection_started(
    connection: Connection, handler: ConnectionHandler
) -> tuple[float, ConnectionHandler]:
    """Note a connection's start.

    Returns:
        The start time for :func:`connection_ended`, and the handler to run
        it with (``handler``, or tracing's wrapper around it).
    """
    if handler_wrapper is not None:
        handler = handler_wrapper(handler, connection)
    for observer in _connection_observers:
        try:
            observer.connection_started(connection)
        except Exception:
            logger.exception("%r failed on a connection start", observer)
    return trio.current_time(), handler


def connection_ended(connection: Connection, started: float) -> None:
    """Log and count a connection that ended (its close is complete)."""
    duration = trio.current_time() - started
    close_log.connection_ended(connection, duration)
    for observer in _connection_observers:
        try:
            observer.connection_ended(connection, duration)
        except Exception:
            logger.exception("%r failed on a connection end", observer)


def publish_began() -> int | None:
    """When a client publish or join was taken up, or ``None`` when nobody observes them."""
    return time.time_ns() if publish_hooks else None


def publish_stamp() -> float:
    """The wall-clock time to stamp a room publish with, or ``0.0`` (not sampled).

    Called by the hub once per room publish, where it accepts it: one in
    :attr:`DeliveryLagObserver.lag_sample_every` gets :func:`time.time`,
    none while nobody observes the delivery lag. (``wall_clock()``, which is
    :func:`time.time` outside tests.)
    """
    global _countdown
    if not _sample_every:
        return 0.0
    _countdown -= 1
    if _countdown > 0:
        return 0.0
    _countdown = _sample_every
    return wall_clock()


def frame_delivered(published: float) -> None:
    """A frame whose oldest message was stamped ``published`` was written now.

    The lag is wall-clock time since the stamp, so a message stamped on
    another node includes the two clocks' difference; a negative one (a
    clock behind) counts as 0.
    """
    hooks = _lag_hooks
    if not hooks:
        return  # stamped by another node, not measured here
    lag = wall_clock() - published
    if lag < 0.0:
        lag = 0.0
    for hook in hooks:
        try:
            hook(lag)
        except Exception:
            logger.exception("%r failed on a delivery lag", hook)


def publish_acked(began_ns: int, connection: Connection, room: str, ok: bool) -> None:
    """Tell the publish observers that a publish begun at ``began_ns`` has its answer."""
    for observer in publish_hooks:
        try:
            observer.publish_acked(began_ns, connection, room, ok)
        except Exception:
            logger.exception("%r failed on a publish", observer)


def join_done(
    began_ns: int, connection: Connection, room: str, recovered: bool | None, replayed: int
) -> None:
    """Tell the publish observers that a join begun at ``began_ns`` succeeded."""
    for observer in publish_hooks:
        try:
            observer.join_done(began_ns, connection, room, recovered, replayed)
        except Exception:
            logger.exception("%r failed on a join", observer)
