"""Where the close log, metrics and tracing see connections and publishes.

A few process-wide hooks, called from the connection actor
(:func:`~chatcore.serve_connection`) and the dispatcher. What each costs when
nothing is installed is the point of this module:

* per connection (not per message): :func:`connection_started` /
  :func:`connection_ended`; the close log (:class:`~chatcore._logs.CloseLog`)
  is always installed, metrics and tracing add themselves;
* per publish: :data:`publish_hooks` is read once; while it is empty the
  dispatcher does nothing more.

Hooks never raise into chatcore: an exception is logged and the hook is kept.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

import trio

from ._logs import CloseLog

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._connection import Connection, ConnectionHandler

__all__ = [
    "ConnectionObserver",
    "PublishObserver",
    "add_connection_observer",
    "add_publish_observer",
    "close_log",
    "connection_ended",
    "connection_started",
    "join_done",
    "publish_acked",
    "publish_began",
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


#: The close log every connection goes through.
close_log = CloseLog()

_connection_observers: list[ConnectionObserver] = []
#: Non-empty while something observes publishes (read on every publish).
publish_hooks: list[PublishObserver] = []
#: Set by tracing: wraps the handler of each connection (its handshake span).
handler_wrapper: Callable[[ConnectionHandler, Connection], ConnectionHandler] | None = None


def add_connection_observer(observer: ConnectionObserver) -> None:
    """Tell ``observer`` about every connection from now on (idempotent)."""
    if observer not in _connection_observers:
        _connection_observers.append(observer)


def add_publish_observer(observer: PublishObserver) -> None:
    """Tell ``observer`` about every client publish from now on (idempotent)."""
    if observer not in publish_hooks:
        publish_hooks.append(observer)


def remove_observer(observer: object) -> None:
    """Stop telling ``observer`` anything (no error if it was not added)."""
    for registry in (_connection_observers, publish_hooks):
        while observer in registry:
            registry.remove(observer)  # type: ignore[arg-type]


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
