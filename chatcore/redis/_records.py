"""What the Redis backplane keeps per session, per room and per publish; reply parsing."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

import anyio
import attrs
import coredis
import coredis.exceptions
import trio

from .._backplane import BackplaneError

# How many channels go into one SUBSCRIBE, and rooms into one catch-up round.
SUBSCRIBE_CHUNK: Final = 1_000
CATCH_UP_ROUND: Final = 256
# Push messages handed to the hub in one scheduler pass, at most.
BURST: Final = 1_024
# Epochs a room remembers having left (messages from them are dropped).
RETIRED_EPOCHS: Final = 8
# Push kinds: messages and (un)subscribe confirmations, plain and sharded.
MESSAGE_KINDS: Final = frozenset({b"message", b"smessage"})
ACK_KINDS: Final = frozenset({b"subscribe", b"unsubscribe", b"ssubscribe", b"sunsubscribe"})


class SessionLost(Exception):
    """This session cannot go on (the supervisor reconnects)."""


class Redirected(BackplaneError):
    """Redis Cluster: the room's slot is served by another node, or moving.

    The command did not run (``MOVED``, ``ASK``, ``TRYAGAIN``,
    ``CLUSTERDOWN``); the cluster backplane routes it again.
    """


def redirect_of(exc: BaseException) -> Redirected | None:
    """The :class:`Redirected` for a cluster redirection error, else ``None``."""
    if isinstance(
        exc,
        (
            coredis.exceptions.AskError,  # MovedError too
            coredis.exceptions.TryAgainError,
            coredis.exceptions.ClusterDownError,
        ),
    ):
        return Redirected(f"Redis Cluster redirected the command: {exc}")
    return None


@attrs.frozen
class RedisBackplaneStatistics:
    """A snapshot of a :class:`RedisBackplane` (see :meth:`RedisBackplane.statistics`).

    Attributes:
        node_id: This node's id.
        connected: A session is established (subscribed and caught up).
        degraded: Not connected (the backplane cannot currently do its job).
        degraded_for: Seconds since the backplane became degraded, or ``None``.
        sessions: Sessions established since :meth:`RedisBackplane.run` started.
        session_failures: Sessions (or connection attempts) that ended in an error.
        last_error: Why the last session ended or the last attempt failed.
        watched_rooms: Rooms this node watches (subscribed, or will be on reconnect).
        queued_publishes: Publishes waiting for the publishing task.
        published: Messages sequenced through this node.
        publish_failures: Publishes that raised :class:`~chatcore.BackplaneError`.
        delivered: Room messages handed to the hub (live and caught up).
        caught_up: Of those, read from the streams after a (re)connect.
        duplicates: Room messages handed to the hub again (an offset it already
            had); the hub's sequencer drops them.
        stale: Room messages of an epoch the room left behind (not handed over).
        room_resets: Epoch changes seen for watched rooms.
        nodes: Other nodes currently known to be alive.
        shards: On Redis Cluster, each shard's state (empty on one Redis).
        degraded_shards: On Redis Cluster, shards without a session.
        topology_refreshes: On Redis Cluster, topology reads (``CLUSTER SLOTS``).
        topology_changes: On Redis Cluster, topology reads that changed
            something (a failover, a slot moved, a shard added or gone).
        redirects: On Redis Cluster, calls routed again after ``MOVED``,
            ``ASK``, ``TRYAGAIN`` or ``CLUSTERDOWN``.
        round_trips: Pipelined publish batches by how long Redis took to
            answer them (from sending to the last reply): counts per bucket of
            :data:`ROUND_TRIP_BOUNDS`, the last one for slower ones.
        round_trip_seconds: The sum of those round trips.
    """

    node_id: str
    connected: bool
    degraded: bool
    degraded_for: float | None
    sessions: int
    session_failures: int
    last_error: str | None
    watched_rooms: int
    queued_publishes: int
    published: int
    publish_failures: int
    delivered: int
    caught_up: int
    duplicates: int
    stale: int
    room_resets: int
    nodes: int
    shards: tuple[ShardStatistics, ...] = ()
    degraded_shards: int = 0
    topology_refreshes: int = 0
    topology_changes: int = 0
    redirects: int = 0
    round_trips: tuple[int, ...] = ()
    round_trip_seconds: float = 0.0


#: Upper bounds (seconds) of :attr:`RedisBackplaneStatistics.round_trips`.
ROUND_TRIP_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@attrs.frozen
class ShardStatistics:
    """One Redis Cluster shard as a node sees it (in :attr:`RedisBackplaneStatistics.shards`).

    Attributes:
        address: ``host:port`` of the shard's primary.
        slots: How many of the 16,384 slots it serves.
        connected: Its session is established (subscribed and caught up).
        degraded_for: Seconds since it lost its session, or ``None``.
        sessions: Sessions established with it.
        session_failures: Sessions (or attempts) with it that ended in an error.
        last_error: Why its last session ended.
        watched_rooms: Watched rooms whose slots it serves.
        published: Messages sequenced on it through this node.
        delivered: Room messages from it handed to the hub.
    """

    address: str
    slots: int
    connected: bool
    degraded_for: float | None
    sessions: int
    session_failures: int
    last_error: str | None
    watched_rooms: int
    published: int
    delivered: int


@attrs.define(eq=False)
class RoomState:
    """What this node knows of a watched room."""

    # The room's epoch as last seen here (None: not learned yet).
    epoch: str | None = None
    # The last offset handed to the hub in ``epoch`` (dedupe and catch-up start).
    delivered: int = 0
    # The highest position() answered for the room: the hub has everything up
    # to it. Catch-up starts after ``delivered``, or after this if nothing
    # was delivered yet.
    known: int = 0
    # Epochs this room left behind; their messages are stale.
    retired: deque[str] = attrs.Factory(lambda: deque(maxlen=RETIRED_EPOCHS))
    # Set once the current session's SUBSCRIBE for the room is acknowledged.
    subscribed: trio.Event = attrs.Factory(trio.Event)
    # False while the subscription lingers after unwatch() (see _linger_loop).
    watched: bool = True


@attrs.define(eq=False)
class PublishItem:
    """One queued publish: the script's arguments and the caller's outcome."""

    room: str
    args: tuple[str, ...]
    done: trio.Event = attrs.Factory(trio.Event)
    result: tuple[str, int] | None = None
    error: BackplaneError | None = None
    # The script was handed to Redis: from here on the outcome is unknown until
    # the reply comes.
    sent: bool = False
    # The caller gave up (deadline or cancellation) before it was sent: skip it.
    abandoned: bool = False

    def resolve(self, epoch: str, offset: int) -> None:
        self.result = (epoch, offset)
        self.done.set()

    def fail(self, error: BackplaneError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@attrs.define(eq=False)
class RedisSession:
    """One connected period: a fresh coredis client and its three connections."""

    client: coredis.Redis[bytes]
    sub: coredis.BaseConnection
    pub: coredis.BaseConnection
    cmd: coredis.BaseConnection
    # SHA1 of each script, by name.
    shas: dict[str, bytes]
    # Cancelling it ends the session (see RedisBackplane._kick).
    scope: trio.CancelScope
    # (UN)SUBSCRIBE commands sent per channel whose acknowledgement is pending.
    inflight: dict[bytes, int] = attrs.Factory(dict)
    unacked: int = 0
    # Subscribed and caught up: serving calls.
    established: bool = False
    # Redis ms before which no node is reported down (a grace after connecting).
    grace_until_ms: int = 0
    # The command confirming a publish's durability (WAIT, or WAITAOF on 7.2+).
    wait_command: bytes = b"WAIT"


def as_str(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise BackplaneError(f"unexpected reply from Redis: {value!r}")


def as_int(value: object) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, (bytes, str)):
        return int(value)
    raise BackplaneError(f"unexpected reply from Redis: {value!r}")


def as_list(value: object) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise BackplaneError(f"unexpected reply from Redis: {value!r}")


def nonce_field(nonce: str | None, published: float) -> str:
    """The third line of a room message on its channel: nonce, then the stamp.

    ``published`` (the origin's :func:`time.time`, see
    :data:`chatcore._backplane.published_at`) goes after a tab as whole
    microseconds, only on sampled messages (17 bytes). A node that does not
    know the stamp takes the whole line for the nonce, which matches no
    publish of its own: mixed versions stay compatible both ways.
    """
    if not published:
        return nonce or ""
    return f"{nonce or ''}\t{round(published * 1e6)}"


def parse_nonce_field(field: bytes) -> tuple[str | None, float]:
    """``(nonce or None, published or 0.0)`` of a :func:`nonce_field` line.

    A line without a stamp (an older node, or not sampled) gives ``0.0``;
    so does a malformed stamp (the message is delivered, not measured).
    """
    nonce, tab, stamp = field.rpartition(b"\t")
    if not tab or not stamp.isdigit():
        return field.decode() or None, 0.0
    return nonce.decode() or None, int(stamp) / 1e6


def parse_entries(raw: Iterable[Any]) -> Iterable[tuple[int, int, str]]:
    """(offset, appended at ms, text) of raw XRANGE entries."""
    for entry in raw:
        entry_id, fields = entry[0], entry[1]
        if isinstance(fields, dict):
            values = {as_str(k): v for k, v in fields.items()}
        else:
            values = {as_str(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
        offset = int(as_str(entry_id).partition("-")[0])
        yield offset, as_int(values["t"]), as_str(values["m"])


def push_buffer(connection: coredis.BaseConnection) -> Callable[[], list[Any]]:
    """A non-blocking receive of the connection's already-parsed push messages.

    coredis only offers the ``push_messages`` generator, which yields to the
    scheduler before every message; its buffer is a private attribute. If a
    coredis version renames it, fall back to one message per pass.
    """
    stream = getattr(connection, "_push_message_buffer_out", None)
    receive = getattr(stream, "receive_nowait", None)
    if receive is None:  # pragma: no cover - another coredis layout

        def receive() -> list[Any]:
            raise anyio.WouldBlock

    def receive_nowait() -> list[Any]:
        try:
            return cast(list[Any], receive())
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise anyio.WouldBlock from None  # the generator reports the loss

    return receive_nowait


def is_link_error(exc: BaseException) -> bool:
    """True if ``exc`` (or every exception in a group) is a lost or slow link."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_link_error(inner) for inner in exc.exceptions)
    return isinstance(
        exc,
        (
            coredis.exceptions.RedisError,
            TimeoutError,
            OSError,
            trio.TooSlowError,
            SessionLost,
            BackplaneError,
            StopAsyncIteration,
        ),
    )


def describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
