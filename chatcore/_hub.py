"""The hub: the registry and router of a chat server (protocol v1).

Theory of operation
-------------------

A :class:`Hub` is the :class:`~chatcore.ConnectionHandler` of every connection.
It keeps three indexes: sessions by connection id, sessions by user (one user,
many tabs and devices), and rooms (members are connections; a user is "in" a
room while any of their connections is). Entries are added by the connection's
own ``handle`` task and removed in its ``finally``, so a connection cannot leak
from the registry however it ends (invariant 3).

Fan-out never waits on a client (invariant 6): a room message is encoded once
and the same :class:`~chatcore.sansio.OutboundMessage` is offered to every
member's outbox without blocking; a full outbox applies the message's delivery
class (durable: the slow member is closed with 4001; ephemeral: dropped or
coalesced). There is no task per delivery.

Per-room order is decided in one place, the :class:`~chatcore.Backplane`
(in process by default, Redis across nodes). The hub delivers what the
backplane sequenced in offset order: duplicates are dropped, a message that
arrives ahead of a gap waits while :meth:`Hub.run` fills the gap from the
room's history. A publisher's ``reply`` is matched by a nonce and queued right
before its own message, whichever of the two this node learns first.

Recovery (``join`` with ``since``) replays from the backplane's history and
then, with no ``await`` in between, makes the connection a member, answers
and queues the replay: no live message can fall between the replayed ones and
the next live one. Presence (opt-in) is a :class:`~chatcore.sansio.PresenceTable`
fed by local joins and leaves and by other nodes' events.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeAlias

import attrs
import trio

from ._backplane import Backplane, BackplaneError, LocalBackplane, Position, Sequenced
from ._config import Config, _positive, _positive_or_none
from ._connection import Connection, ConnectionHandler
from ._exceptions import ChatcoreError
from .sansio import (
    Accept,
    CloseCause,
    CloseOutcome,
    CloseRecord,
    Delivery,
    HandshakeRequest,
    OutboundMessage,
    PresenceDiff,
    PresenceMeta,
    PresenceTable,
    PushResult,
    Reject,
    encode,
)
from .sansio._limits import TokenBucket, WindowCounter
from .sansio._protocol import (
    AppMessage,
    BadFrame,
    ErrorCode,
    Join,
    Leave,
    Ping,
    Pong,
    Publish,
    Ref,
    Since,
    encode_error,
    encode_hello,
    encode_reply,
    encode_reply_error,
    encode_shutdown,
    parse_client_message,
    valid_room,
    valid_user,
)

__all__ = [
    "ErrorReply",
    "Hub",
    "HubConfig",
    "HubStatistics",
    "Identity",
    "Room",
    "RoomStatistics",
    "Session",
]

logger = logging.getLogger("chatcore.hub")


def _origins(value: Iterable[str] | None) -> frozenset[str] | None:
    # A typed converter: with ``optional(frozenset)`` mypy cannot infer the
    # parameter type, and passing a set of origins fails type checking.
    return None if value is None else frozenset(value)


@attrs.frozen
class HubConfig:
    """Limits of a hub, with the documented defaults (PROTOCOL.md, Pinned details).

    Attributes:
        max_rooms_per_connection: Rooms one connection may be in (``too_many_rooms``).
        max_connections_per_user: Open connections per user (429 at the handshake).
        max_connections_per_address: Per client address (429); ``None``: no limit
            (behind a proxy every client shares one address).
        max_connections: Connections of this hub (503 at the handshake); ``None``: no limit.
        publish_rate: Publishes per second per connection (token bucket rate).
        publish_burst: Token bucket capacity.
        rate_limit_abuse: ``rate_limited`` answers within ``abuse_window`` after
            which the connection is closed with 1008.
        abuse_window: Seconds of the window for ``rate_limit_abuse``.
        bad_frame_limit: Bad frames (bad_json, bad_message, unknown_type) answered
            within ``bad_frame_window``; the next one closes with 1008.
        bad_frame_window: Seconds of the bad-frame window.
        allowed_origins: Browser origins allowed to connect (403 otherwise); a
            request without ``Origin`` (not a browser) is judged by authenticate
            alone. ``None``: no Origin check.
        retry_after: Seconds announced in ``Retry-After`` on 503 refusals.
        presence: Track who is in each room: ``presence_state`` on join and
            ``presence_diff`` after (off by default: it costs traffic).
        presence_grace: Seconds a user stays present after their last
            connection in a room closed, so reconnects and deploys do not flap.
        reconnect_min_ms: Lower bound of the jittered ``reconnect_after_ms`` sent
            in ``shutdown`` during a drain.
        reconnect_max_ms: Upper bound of it (spreads the reconnect storm).
    """

    max_rooms_per_connection: int = attrs.field(default=100, validator=_positive)
    max_connections_per_user: int = attrs.field(default=20, validator=_positive)
    max_connections_per_address: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_connections: int | None = attrs.field(default=None, validator=_positive_or_none)
    publish_rate: float = attrs.field(default=20.0, validator=_positive)
    publish_burst: int = attrs.field(default=40, validator=_positive)
    rate_limit_abuse: int = attrs.field(default=200, validator=_positive)
    abuse_window: float = attrs.field(default=60.0, validator=_positive)
    bad_frame_limit: int = attrs.field(default=10, validator=_positive)
    bad_frame_window: float = attrs.field(default=60.0, validator=_positive)
    allowed_origins: frozenset[str] | None = attrs.field(default=None, converter=_origins)
    retry_after: int = attrs.field(default=5, validator=_positive)
    presence: bool = False
    presence_grace: float = attrs.field(default=5.0, validator=_positive)
    reconnect_min_ms: int = attrs.field(default=500, validator=_positive)
    reconnect_max_ms: int = attrs.field(default=5_000, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.reconnect_min_ms > self.reconnect_max_ms:
            raise ValueError("HubConfig.reconnect_min_ms must not exceed reconnect_max_ms")


@attrs.frozen
class Identity:
    """Who a connection belongs to, as decided by the authenticate hook.

    Attributes:
        user: The user id (1-64 of ``[A-Za-z0-9_.-]``); several connections
            (tabs, devices) may share it.
        data: Anything else the application wants to keep (claims, roles).
    """

    user: str
    data: Any = None


class ErrorReply(ChatcoreError):
    """Raise from a hook or message handler to answer the request with an error.

    Whose fault: the client's request (e.g. ``forbidden``). The connection
    stays open. The code should be one of PROTOCOL.md's error codes or an
    application-defined one.

    Attributes:
        code: The ``error.code`` (e.g. ``"forbidden"``).
        message: Human-readable explanation.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        #: The ``error.code`` of the reply.
        self.code = code
        #: The ``error.message`` of the reply.
        self.message = message


@attrs.frozen
class RoomStatistics:
    """A snapshot of one room.

    Attributes:
        name: The room name.
        members: Connections in the room.
        users: Distinct users in the room.
        offset: The last assigned offset (0 when nothing was published).
        epoch: The room's epoch (changes when its history was lost).
    """

    name: str
    members: int
    users: int
    offset: int
    epoch: str


@attrs.frozen
class HubStatistics:
    """A snapshot of a hub (cheap: counters only).

    Attributes:
        connections: Open connections registered in the hub.
        users: Distinct users with at least one connection.
        rooms: Rooms with at least one member.
        published: Room messages that were given an offset.
        delivered: Messages queued into an outbox (room messages and server sends).
        dropped: Ephemeral messages dropped for a full outbox.
        coalesced: Ephemeral messages that replaced a queued one with the same key.
        slow_consumer_disconnects: Connections closed as slow consumers (4001:
            no progress while over budget, past the hard bound, or a stalled send).
        rejected_handshakes: Handshakes refused (401/403/429/503).
    """

    connections: int
    users: int
    rooms: int
    published: int
    delivered: int
    dropped: int
    coalesced: int
    slow_consumer_disconnects: int
    rejected_handshakes: int


class Room:
    """A room as this process sees it: its local members and its position.

    Created by the hub when a local connection joins and dropped when the last
    one leaves; the room's order itself lives in the backplane. Not created by
    users.
    """

    __slots__ = ("_joining", "_pending", "_presence_serial", "epoch", "members", "name", "offset")

    def __init__(self, name: str) -> None:
        #: The room's name.
        self.name = name
        #: The epoch of the room's order ("" until the position is known).
        self.epoch = ""
        #: The last offset delivered to this process's members.
        self.offset = 0
        #: Member connections, in join order.
        self.members: dict[Connection, Session] = {}
        # Joins in progress (they keep the room open while they await).
        self._joining = 0
        # Messages that arrived ahead of a gap (or before the position was known).
        self._pending: dict[int, Sequenced] = {}
        # Part of the coalescing key of this room's presence diffs; changes
        # when a presence_state is sent to a backlogged joiner (Hub._presence_join).
        self._presence_serial = 0

    @property
    def ready(self) -> bool:
        """True once the room's position is known here."""
        return bool(self.epoch)

    def __repr__(self) -> str:
        return f"<Room {self.name!r} members={len(self.members)} offset={self.offset}>"

    def statistics(self) -> RoomStatistics:
        """A snapshot of this room."""
        return RoomStatistics(
            name=self.name,
            members=len(self.members),
            users=len({s.user for s in self.members.values()}),
            offset=self.offset,
            epoch=self.epoch,
        )


class Session:
    """One connection as the hub sees it: who it is and which rooms it is in.

    Hooks and message handlers receive it. It is valid while the connection
    is open; after that, sends raise :class:`~chatcore.ConnectionClosed`.
    """

    __slots__ = ("_abuse", "_bad_frames", "_bucket", "_rooms", "connection", "hub", "identity")

    def __init__(self, hub: Hub, connection: Connection, identity: Identity, now: float) -> None:
        cfg = hub.config
        #: The hub this session belongs to.
        self.hub = hub
        #: The underlying connection.
        self.connection = connection
        #: Who the client is.
        self.identity = identity
        self._rooms: dict[str, Room] = {}
        self._bucket = TokenBucket(cfg.publish_rate, cfg.publish_burst, now)
        self._abuse = WindowCounter(cfg.rate_limit_abuse, cfg.abuse_window)
        self._bad_frames = WindowCounter(cfg.bad_frame_limit, cfg.bad_frame_window)

    @property
    def user(self) -> str:
        """The user id."""
        return self.identity.user

    @property
    def id(self) -> str:
        """The connection id."""
        return self.connection.id

    @property
    def rooms(self) -> frozenset[str]:
        """Names of the rooms this connection is in."""
        return frozenset(self._rooms)

    def __repr__(self) -> str:
        return f"<Session {self.connection.id} user={self.user!r} rooms={len(self._rooms)}>"

    def send_nowait(self, message: Mapping[str, Any] | OutboundMessage) -> None:
        """Queue a message to this connection (see :meth:`Connection.send_nowait`)."""
        self.connection.send_nowait(message)

    async def send(self, message: Mapping[str, Any] | OutboundMessage) -> None:
        """Queue a message, waiting for room (see :meth:`Connection.send`)."""
        await self.connection.send(message)

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None
    ) -> None:
        """Start a task owned by this connection (cancelled when it closes)."""
        self.connection.start_soon(fn, *args, name=name)

    def close_nowait(self, code: int = 1000, reason: str = "") -> CloseOutcome:
        """Ask the connection to close (idempotent; never raises)."""
        return self.connection.close_nowait(code, reason)

    def _answer(self, ref: Ref | None, message: OutboundMessage) -> None:
        # Replies are durable: a client too slow to take its replies is a slow consumer.
        self.connection.offer(message)

    def _reply(self, ref: Ref | None, data: Any = None) -> None:
        self._answer(ref, encode_reply(ref, data))

    def _error(self, ref: Ref | None, code: str, message: str) -> None:
        if ref is None:
            self._answer(None, encode_error(code, message))
        else:
            self._answer(ref, encode_reply_error(ref, code, message))


#: ``authenticate(request) -> Identity | str | Reject`` (a str is a user id).
Authenticator: TypeAlias = Callable[[HandshakeRequest], Awaitable[Identity | str | Reject]]
#: ``handler(session, message) -> reply data``; raise :class:`ErrorReply` to refuse.
MessageHandler: TypeAlias = Callable[[Session, AppMessage], Awaitable[Any]]


class Hub(ConnectionHandler):
    """The registry and router of a chat server speaking protocol v1.

    Args:
        authenticate: ``async (request) -> Identity | str | Reject``: who is
            connecting, or an HTTP refusal (401/403/429). It sees path, query,
            headers (Origin, cookies, Authorization) and the client address.
            Default: every connection is its own anonymous user.
        on_connect: ``async (session)``: after ``hello`` was queued.
        on_disconnect: ``(session, record)``: after the connection closed
            (synchronous: start your own tasks for I/O).
        authorize_join: ``async (session, room) -> bool``: False answers ``forbidden``.
        on_publish: ``async (session, room, data) -> data``: validate or transform
            a publish; raise :class:`ErrorReply` to refuse it.
        presence_meta: ``(session) -> dict``: what others see about this
            connection in ``presence_state``/``presence_diff`` besides its
            ``connection_id`` (e.g. ``{"device": "phone"}``).
        config: The hub's limits.
        connection_config: Bounds of every connection (outbox, heartbeat, ...).
        backplane: Where rooms' order and history live and how hubs reach each
            other. Default: a ``chatcore.redis.RedisBackplane`` on
            ``$CHATCORE_REDIS_URL`` when that is set (``chatcore serve
            --redis-url`` sets it), else :class:`~chatcore.LocalBackplane`, in
            process. Backplanes with background work (Redis) need :meth:`run`.
    """

    def __init__(
        self,
        *,
        authenticate: Authenticator | None = None,
        on_connect: Callable[[Session], Awaitable[None]] | None = None,
        on_disconnect: Callable[[Session, CloseRecord], None] | None = None,
        authorize_join: Callable[[Session, str], Awaitable[bool]] | None = None,
        on_publish: Callable[[Session, str, Any], Awaitable[Any]] | None = None,
        presence_meta: Callable[[Session], Mapping[str, Any]] | None = None,
        config: HubConfig | None = None,
        connection_config: Config | None = None,
        backplane: Backplane | None = None,
    ) -> None:
        #: The hub's limits.
        self.config = config or HubConfig()
        #: Bounds of every connection served for this hub.
        self.connection_config: Config = connection_config or Config()
        #: The backplane: rooms' order and history, and the other hubs.
        self.backplane: Backplane = backplane or _default_backplane()
        self.backplane.attach(self)
        self._authenticate = authenticate
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._authorize_join = authorize_join
        self._on_publish = on_publish
        # App-defined message types -> handlers.
        self._handlers: dict[str, MessageHandler] = {}
        # Registered sessions (connection id -> session), by the session's own task.
        self._sessions: dict[str, Session] = {}
        # user -> that user's sessions (every tab and device).
        self._users: dict[str, dict[Session, None]] = {}
        # Rooms with local members (or joins in progress).
        self._rooms: dict[str, Room] = {}
        # Local publishes waiting for their message: nonce -> (publisher, ref).
        # The reply goes out right before the message, whichever comes first.
        self._awaiting: dict[str, tuple[Session, Ref | None]] = {}
        self._nonces = itertools.count(1)
        # Rooms with a gap in delivery (or a reset epoch) for run() to repair.
        self._repairs: set[str] = set()
        self._repair_wakeup = trio.lowlevel.ParkingLot()
        # User-level presence of every room this node hears about.
        self._presence = PresenceTable(self.backplane.node_id, self.config.presence_grace)
        self._presence_meta = presence_meta
        # Presence serials, unique per process (a reopened room never reuses one).
        self._presence_serials = itertools.count(1)
        # Presence changes of local connections, for run() to tell other nodes.
        self._announcements: deque[dict[str, Any]] = deque(maxlen=100_000)
        # node -> its (room, connection id) not re-announced yet since its
        # "state" began: dropped at its "state_end" (_presence_event).
        self._unconfirmed: dict[str, set[tuple[str, str]]] = {}
        self._presence_wakeup = trio.lowlevel.ParkingLot()
        # Handshake reservations (accepted, not yet closed): for the limits.
        self._reserved_total = 0
        self._reserved_users: dict[str, int] = {}
        self._reserved_addresses: dict[str, int] = {}
        # While True, handshakes are refused with 503.
        self._draining = False
        # Created by drain(): set when the last accepted connection has closed
        # (no reservation left). While it exists, a connection that registers
        # (accepted just before the drain began) is shut down at once.
        self._drained: trio.Event | None = None
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._coalesced = 0
        self._slow = 0
        self._rejected = 0

    def __repr__(self) -> str:
        return (
            f"<Hub connections={len(self._sessions)} users={len(self._users)} "
            f"rooms={len(self._rooms)}>"
        )

    # -- application API -------------------------------------------------------

    def on(self, type: str) -> Callable[[MessageHandler], MessageHandler]:
        """Decorator: handle client messages of an application-defined ``type``.

        The handler runs in the connection's ``handle`` task (messages of one
        connection are handled in order). Its return value is sent as the ok
        ``reply`` when the message had a ``ref``; raising :class:`ErrorReply`
        answers with an error; any other exception closes the connection with
        1011. For long work (streaming a reply), start a task with
        :meth:`Session.start_soon`: it is cancelled if the connection closes.

        Raises:
            ValueError: ``type`` is built in (join, leave, publish, ping, pong).
        """
        if type in ("join", "leave", "publish", "ping", "pong"):
            raise ValueError(f"{type!r} is a built-in message type")

        def register(handler: MessageHandler) -> MessageHandler:
            self._handlers[type] = handler
            return handler

        return register

    @property
    def draining(self) -> bool:
        """True once :meth:`start_draining` was called: new handshakes get 503."""
        return self._draining

    def start_draining(self) -> None:
        """Refuse new handshakes with 503 and ``Retry-After`` from now on."""
        self._draining = True

    async def drain(self, grace: float = 8.0) -> int:
        """Gracefully close every connection within ``grace`` seconds.

        1. Stop admitting: new handshakes get 503 with ``Retry-After``.
        2. Queue ``{"type":"shutdown","reconnect_after_ms": …}`` to every
           connection, jittered per connection between
           :attr:`HubConfig.reconnect_min_ms` and ``reconnect_max_ms``.
        3. Close the connections with 1012 in batches spread over
           ``grace - close_timeout`` seconds, so that each close (bounded by
           :attr:`Config.close_timeout`) still ends within ``grace``.
        4. Wait until every connection is closed or ``grace`` passed. A
           connection whose handshake was accepted just before the drain
           began is sent ``shutdown`` and closed with 1012 as it opens.

        Keep ``grace`` below the platform's kill deadline (Cloud Run and
        Kubernetes default to 10 s after SIGTERM) and above ``close_timeout``.

        Cancellation: stops the drain where it is; connections still open are
        closed with 1012 by their own actors when the server is cancelled.

        Returns:
            How many connections were still open when it returned (0 on success).
        """
        start = trio.current_time()
        deadline = start + grace
        self.start_draining()
        if self._drained is None:
            self._drained = trio.Event()
        cfg = self.config
        rng = random.Random()
        sessions = list(self._sessions.values())
        for session in sessions:
            session.connection.offer(
                encode_shutdown(rng.randint(cfg.reconnect_min_ms, cfg.reconnect_max_ms))
            )
        spread = max(0.0, grace - self.connection_config.close_timeout)
        with trio.move_on_at(deadline):
            for index, session in enumerate(sessions):
                at = start + spread * index / len(sessions)
                if at > trio.current_time():
                    await trio.sleep_until(at)
                session.connection.close_nowait(1012, "service restart", cause=CloseCause.SHUTDOWN)
            # Handshakes accepted just before draining began may not have
            # registered yet: ``handle`` shuts them down as they do. Wait until
            # every accepted connection (every reservation) is closed.
            if self._reserved_total:
                await self._drained.wait()
        return self._reserved_total

    def sessions(self) -> list[Session]:
        """Every open session (a snapshot)."""
        return list(self._sessions.values())

    def session(self, connection_id: str) -> Session | None:
        """The session of a connection id, or ``None``."""
        return self._sessions.get(connection_id)

    def sessions_of(self, user: str) -> list[Session]:
        """The sessions (tabs, devices) of ``user`` (a snapshot; empty if offline)."""
        return list(self._users.get(user, ()))

    def room(self, name: str) -> Room | None:
        """The room called ``name`` if it has local members, else ``None``."""
        room = self._rooms.get(name)
        return room if room is not None and room.members else None

    def rooms(self) -> list[str]:
        """Names of the rooms with at least one local member."""
        return [name for name, room in self._rooms.items() if room.members]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the hub's background work until cancelled.

        Starts the backplane's tasks (the Redis backplane's subscriptions),
        the repair of delivery gaps, and presence: the grace-window timer that
        publishes leaves, and telling other nodes about local presence.
        Servers start it (``ASGIApp``'s lifespan, ``serve_websocket``); with
        the in-memory test client, start it yourself when a test needs
        presence leaves: ``await nursery.start(hub.run)``.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backplane.run)
            nursery.start_soon(self._repair_loop)
            nursery.start_soon(self._presence_loop)
            if self.config.presence:  # ask the other nodes for their connections
                self._announce({"op": "sync"})
            task_status.started()

    async def publish(self, room: str, data: Any, *, sender: str | None = None) -> int:
        """Publish ``data`` to ``room`` from the server side; returns its offset.

        Members everywhere receive ``{"type":"message", ..., "from": sender}``.

        Raises:
            ValueError: ``room`` is not a valid room name, or ``data`` is not
                JSON-serialisable (nothing was published).
            BackplaneError: the backplane is unavailable (nothing was published).
        """
        if not valid_room(room):
            raise ValueError(f"invalid room name {room!r}")
        position = await self.backplane.publish(room, sender, data, None)
        self._published += 1
        return position.offset

    async def broadcast(
        self,
        room: str,
        message: Mapping[str, Any],
        *,
        delivery: Delivery = Delivery.EPHEMERAL,
        key: str | None = None,
        exclude: Session | None = None,
    ) -> None:
        """Send a message outside the room's order (no offset) to its members.

        For ephemeral signals such as typing indicators: with the default
        ephemeral delivery a full outbox drops it, and with a ``key`` a queued
        one with the same key is replaced (latest wins). Reaches members on
        every node.

        Raises:
            BackplaneError: the backplane is unavailable (this node's own
                connections were already served; other nodes were not).
        """
        encoded = encode(message, delivery=delivery, key=key)
        await self.backplane.broadcast(room, encoded, exclude.id if exclude else None)

    async def send_to_user(
        self,
        user: str,
        message: Mapping[str, Any],
        *,
        delivery: Delivery = Delivery.DURABLE,
        key: str | None = None,
    ) -> None:
        """Send a message to every connection of ``user``, on every node.

        Raises:
            BackplaneError: the backplane is unavailable (this node's own
                connections were already served; other nodes were not).
        """
        await self.backplane.send_to_user(user, encode(message, delivery=delivery, key=key))

    def send_to_connection(
        self,
        connection_id: str,
        message: Mapping[str, Any],
        *,
        delivery: Delivery = Delivery.DURABLE,
    ) -> bool:
        """Send a message to one connection of this process; False if it is not open here."""
        session = self._sessions.get(connection_id)
        if session is None:
            return False
        return self._fan_out((session.connection,), encode(message, delivery=delivery)) == 1

    async def disconnect_user(self, user: str, code: int = 4002, reason: str = "") -> None:
        """Close every connection of ``user`` on every node (default 4002, kicked).

        Raises:
            BackplaneError: the backplane is unavailable (this node's own
                connections were already served; other nodes were not).
        """
        await self.backplane.disconnect_user(user, code, reason)

    async def join(self, connection_id: str, room: str) -> bool:
        """Make a connection of this process a member of ``room``.

        Returns:
            False if the connection is not open here.

        Raises:
            ValueError: ``room`` is not a valid room name.
            BackplaneError: the room's position could not be read.
        """
        if not valid_room(room):
            raise ValueError(f"invalid room name {room!r}")
        session = self._sessions.get(connection_id)
        if session is None:
            return False
        if room not in session._rooms:
            target = self._open_room(room)
            target._joining += 1
            try:
                await self._ready(target)
                if self._sessions.get(connection_id) is not session:
                    return False
                # A member before the join is released: the room stays open.
                self._add_member(session, target)
            finally:
                target._joining -= 1
                self._close_room_if_unused(target)
            self._presence_join(session, target, _outbox_busy(session.connection))
        return True

    def leave(self, connection_id: str, room: str) -> bool:
        """Remove a connection from ``room`` from the server side; False if it was not in it."""
        session = self._sessions.get(connection_id)
        if session is None or room not in session._rooms:
            return False
        self._remove_member(session, room)
        return True

    def presence(self, room: str) -> dict[str, list[dict[str, Any]]]:
        """Who is present in ``room`` on every node: user -> their connections' metas."""
        return {
            user: [_meta_json(meta) for meta in metas]
            for user, metas in self._presence.state(room).items()
        }

    def online_users(self) -> set[str]:
        """Users with a connection on this node or present in a room on any node."""
        users = set(self._users)
        for _, user, _ in self._presence.connections():
            users.add(user)
        return users

    async def history(self, room: str, limit: int = 50) -> list[dict[str, Any]]:
        """The room's last ``limit`` messages (decoded ``message`` objects), oldest first.

        Raises:
            BackplaneError: the backplane is unavailable.
        """
        items = await self.backplane.recent(room, limit)
        return [json.loads(item.message.text) for item in items]

    def statistics(self) -> HubStatistics:
        """A snapshot of the hub's counters."""
        return HubStatistics(
            connections=len(self._sessions),
            users=len(self._users),
            rooms=sum(1 for room in self._rooms.values() if room.members),
            published=self._published,
            delivered=self._delivered,
            dropped=self._dropped,
            coalesced=self._coalesced,
            slow_consumer_disconnects=self._slow,
            rejected_handshakes=self._rejected,
        )

    # -- registry ------------------------------------------------------------------

    def _open_room(self, name: str) -> Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name)
            self.backplane.watch(name)
        return room

    def _close_room_if_unused(self, room: Room) -> None:
        if not room.members and not room._joining and self._rooms.get(room.name) is room:
            del self._rooms[room.name]
            self.backplane.unwatch(room.name)

    async def _ready(self, room: Room) -> None:
        """Learn the room's position (once per room opened here)."""
        while not room.ready:
            position = await self.backplane.position(room.name)
            if not room.ready:
                self._set_position(room, position)

    def _set_position(self, room: Room, position: Position) -> None:
        room.epoch = position.epoch
        room.offset = position.offset
        early = sorted(room._pending.items())
        room._pending.clear()
        for _, item in early:
            self._deliver(item)

    def _add_member(self, session: Session, room: Room) -> None:
        room.members[session.connection] = session
        session._rooms[room.name] = room

    def _remove_member(self, session: Session, name: str) -> None:
        room = session._rooms.pop(name)
        del room.members[session.connection]
        self._close_room_if_unused(room)
        if self.config.presence:
            if self._presence.leave(name, session.id, trio.current_time()) is not None:
                self._presence_wakeup.unpark_all()
            self._announce({"op": "leave", "room": name, "connection_id": session.id})

    def _register(self, session: Session) -> None:
        self._sessions[session.connection.id] = session
        self._users.setdefault(session.user, {})[session] = None

    def _unregister(self, session: Session) -> None:
        for name in list(session._rooms):
            self._remove_member(session, name)
        self._sessions.pop(session.connection.id, None)
        sessions = self._users.get(session.user)
        if sessions is not None:
            sessions.pop(session, None)
            if not sessions:
                del self._users[session.user]

    def _fan_out(self, members: Iterable[Connection], message: OutboundMessage) -> int:
        """Offer one encoded message to many connections; never blocks."""
        queued = 0
        for connection in members:
            result = connection.offer(message)
            if result is PushResult.QUEUED:
                queued += 1
            elif result is PushResult.COALESCED:
                self._coalesced += 1
                queued += 1
            elif result is PushResult.DROPPED:
                self._dropped += 1
        self._delivered += queued
        return queued

    # -- BackplaneSink: what the backplane delivers ---------------------------------

    def _deliver(self, item: Sequenced) -> None:
        """Deliver a room message in offset order: drop duplicates, hold gaps."""
        room = self._rooms.get(item.room)
        if room is None:
            self._answer_publisher(item)
            return
        if not room.ready:
            room._pending[item.offset] = item
            return
        if item.epoch != room.epoch:
            # The room's order was lost and began anew: members here cannot be
            # brought up to date message by message; they must recover.
            self._answer_publisher(item)
            self._lost_order(room, Position(item.epoch, item.offset))
            return
        if item.offset <= room.offset:
            self._answer_publisher(item)
            return
        if item.offset > room.offset + 1:
            room._pending[item.offset] = item
            self._repairs.add(room.name)
            self._repair_wakeup.unpark_all()
            return
        self._emit(room, item)
        pending = room._pending
        while room.offset + 1 in pending:
            self._emit(room, pending.pop(room.offset + 1))

    def _emit(self, room: Room, item: Sequenced) -> None:
        self._answer_publisher(item)
        room.offset = item.offset
        self._fan_out(room.members, item.message)

    def _answer_publisher(self, item: Sequenced) -> None:
        if item.nonce is not None:
            waiting = self._awaiting.pop(item.nonce, None)
            if waiting is not None:
                session, ref = waiting
                session._reply(ref, {"offset": item.offset})

    def _deliver_to_user(self, user: str, message: OutboundMessage) -> None:
        sessions = self._users.get(user)
        if sessions:
            self._fan_out([s.connection for s in sessions], message)

    def _disconnect_user_here(self, user: str, code: int, reason: str) -> None:
        for session in list(self._users.get(user, ())):
            session.connection.close_nowait(code, reason)

    def _broadcast_here(self, room: str, message: OutboundMessage, exclude: str | None) -> None:
        target = self._rooms.get(room)
        if target is None:
            return
        members: Iterable[Connection] = target.members
        if exclude is not None:
            members = [c for c in target.members if c.id != exclude]
        self._fan_out(members, message)

    def _presence_event(self, node: str, event: dict[str, Any]) -> None:
        """Apply another node's presence change (malformed events are logged and ignored)."""
        if not self.config.presence:
            return  # off here: nothing is tracked or sent, whatever other nodes do
        try:
            op = event["op"]
            if op == "sync":
                self._announce_all()
            elif op == "state":
                # The node re-announces all it has, up to "state_end". What we
                # hold of it and it does not confirm by then (a leave we
                # missed: the bus is not stored) then leaves, after the grace.
                self._unconfirmed[node] = {
                    (room, meta.connection_id) for room, _, meta in self._presence.connections(node)
                }
            elif op == "state_end":
                now = trio.current_time()
                for room, connection_id in self._unconfirmed.pop(node, ()):
                    if self._presence.apply_remote_leave(room, node, connection_id, now):
                        self._presence_wakeup.unpark_all()
            elif op == "join":
                meta = PresenceMeta(
                    str(event["connection_id"]),
                    node,
                    float(event["joined_at"]),
                    event.get("data") or None,
                )
                room = str(event["room"])
                diff = self._presence.apply_remote_join(room, str(event["user"]), meta)
                self._unconfirmed.get(node, set()).discard((room, meta.connection_id))
                if diff is not None:
                    self._emit_presence(diff)
            elif op == "leave":
                deadline = self._presence.apply_remote_leave(
                    str(event["room"]), node, str(event["connection_id"]), trio.current_time()
                )
                if deadline is not None:
                    self._presence_wakeup.unpark_all()
        except (KeyError, TypeError, ValueError, ChatcoreError) as exc:
            logger.warning("ignoring a presence event from node %s: %r (%s)", node, event, exc)

    def _node_down(self, node: str) -> None:
        if not self.config.presence:
            return
        self._unconfirmed.pop(node, None)
        if node != self._presence.node and self._presence.drop_node(node, trio.current_time()):
            self._presence_wakeup.unpark_all()

    def _emit_presence(self, diff: PresenceDiff, exclude: Connection | None = None) -> None:
        """Tell local members, one ephemeral message per user, coalesced per user.

        The latest change of a user supersedes an earlier one still queued, so
        coalescing under pressure keeps every member's view correct. Never
        across a ``presence_state``: the key changes when one goes to a joiner
        that may still have this room's diffs queued (it left and rejoined while
        behind), so a change cannot take the place of a diff queued before the
        joiner's snapshot, which would put the change ahead of the snapshot.
        """
        room = self._rooms.get(diff.room)
        if room is None or not room.members:
            return
        members: Iterable[Connection] = room.members
        if exclude is not None:
            members = [c for c in room.members if c is not exclude]
        for field, users in (("joins", diff.joins), ("leaves", diff.leaves)):
            for user, metas in users.items():
                change: dict[str, Any] = {"joins": {}, "leaves": {}}
                change[field] = {user: [_meta_json(meta) for meta in metas]}
                message = encode(
                    {"type": "presence_diff", "room": diff.room, **change},
                    delivery=Delivery.EPHEMERAL,
                    key=f"presence:{diff.room}:{room._presence_serial}:{user}",
                )
                self._fan_out(members, message)

    def _announce(self, event: dict[str, Any]) -> None:
        self._announcements.append(event)
        self._presence_wakeup.unpark_all()

    def _announce_all(self) -> None:
        # Between "state" and "state_end": all this node has (see _presence_event).
        self._announce({"op": "state"})
        for room, user, meta in self._presence.connections(self._presence.node):
            self._announce(
                {
                    "op": "join",
                    "room": room,
                    "user": user,
                    "connection_id": meta.connection_id,
                    "joined_at": meta.joined_at,
                    "data": dict(meta.data),
                }
            )
        self._announce({"op": "state_end"})

    async def _presence_loop(self) -> None:
        """Publish leaves whose grace passed; tell other nodes about local changes."""
        while True:
            while self._announcements:
                event = self._announcements[0]
                try:
                    await self.backplane.publish_presence(event)
                except BackplaneError:
                    await trio.sleep(1.0)  # kept queued; retried when it is back
                    continue
                if self._announcements and self._announcements[0] is event:
                    self._announcements.popleft()
            for diff in self._presence.expire(trio.current_time()):
                self._emit_presence(diff)
            deadline = self._presence.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._presence_wakeup.park()

    def _resync(self) -> None:
        """The backplane reconnected: bus messages may have been lost, so
        re-announce this node's presence and ask the others for theirs."""
        if self.config.presence:
            self._announce_all()
            self._announce({"op": "sync"})

    def _room_reset(self, room: str) -> None:
        if room in self._rooms:
            self._repairs.add(room)
            self._repair_wakeup.unpark_all()

    async def _repair_loop(self) -> None:
        """Fill delivery gaps from the backplane's history (run() only)."""
        while True:
            while not self._repairs:
                await self._repair_wakeup.park()
            name = self._repairs.pop()
            room = self._rooms.get(name)
            if room is None or not room.ready:
                continue
            try:
                await self._repair(room)
            except BackplaneError:
                logger.warning("room %s: cannot fill a gap yet (backplane unavailable)", name)
                self._repairs.add(name)
                await trio.sleep(1.0)

    async def _repair(self, room: Room) -> None:
        position = await self.backplane.position(room.name)
        if position.epoch != room.epoch:
            self._lost_order(room, position)
            return
        if not room._pending and position.offset <= room.offset:
            return
        items = await self.backplane.replay(room.name, room.epoch, room.offset, position.offset)
        if items is None:
            self._lost_order(room, position)
            return
        for item in items:
            self._deliver(item)

    def _lost_order(self, room: Room, position: Position) -> None:
        """Members missed messages that can no longer be replayed: they must recover."""
        logger.warning("room %s: messages lost to members here; closing them with 4001", room.name)
        for connection in list(room.members):
            connection.close_nowait(4001, "missed messages; rejoin with since")
        room.epoch = position.epoch
        room.offset = position.offset
        room._pending.clear()

    # -- ConnectionHandler -----------------------------------------------------------

    def _refuse(self, status: int, body: str, headers: tuple[tuple[str, str], ...] = ()) -> Reject:
        self._rejected += 1
        return Reject(status, body.encode(), headers)

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        """Admission: draining/capacity (503), Origin (403), the app hook, limits (429)."""
        cfg = self.config
        retry = (("retry-after", str(cfg.retry_after)),)
        if self._draining:
            await trio.lowlevel.checkpoint()
            return self._refuse(503, "server is draining; reconnect shortly", retry)
        if cfg.max_connections is not None and self._reserved_total >= cfg.max_connections:
            await trio.lowlevel.checkpoint()
            return self._refuse(503, "server at capacity", retry)
        origin = request.origin
        if (
            cfg.allowed_origins is not None
            and origin is not None
            and origin not in cfg.allowed_origins
        ):
            await trio.lowlevel.checkpoint()
            return self._refuse(403, "origin not allowed")
        if self._authenticate is None:
            await trio.lowlevel.checkpoint()
            identity = Identity("anonymous-" + secrets.token_hex(4))
        else:
            decision = await self._authenticate(request)
            if isinstance(decision, Reject):
                self._rejected += 1
                return decision
            identity = Identity(decision) if isinstance(decision, str) else decision
        if not isinstance(identity, Identity) or not valid_user(identity.user):
            return self._refuse(401, "invalid user")
        # Re-check after the hook's awaits, then reserve with no await in between.
        if self._draining:
            return self._refuse(503, "server is draining; reconnect shortly", retry)
        if cfg.max_connections is not None and self._reserved_total >= cfg.max_connections:
            return self._refuse(503, "server at capacity", retry)
        if self._reserved_users.get(identity.user, 0) >= cfg.max_connections_per_user:
            return self._refuse(429, "too many connections for this user")
        address = request.client[0] if request.client else None
        if (
            cfg.max_connections_per_address is not None
            and address is not None
            and self._reserved_addresses.get(address, 0) >= cfg.max_connections_per_address
        ):
            return self._refuse(429, "too many connections from this address")
        self._reserved_total += 1
        self._reserved_users[identity.user] = self._reserved_users.get(identity.user, 0) + 1
        if address is not None:
            self._reserved_addresses[address] = self._reserved_addresses.get(address, 0) + 1
        return Accept(identity)

    def _release(self, connection: Connection) -> None:
        identity = connection.identity
        if not isinstance(identity, Identity):
            return
        self._reserved_total -= 1
        _decrement(self._reserved_users, identity.user)
        if connection.request.client:
            _decrement(self._reserved_addresses, connection.request.client[0])
        if self._reserved_total == 0 and self._drained is not None:
            self._drained.set()

    async def handle(self, connection: Connection) -> None:
        """Serve one connection: hello, then dispatch its messages in order."""
        identity = connection.identity
        assert isinstance(identity, Identity)
        session = Session(self, connection, identity, trio.current_time())
        connection.scope["chatcore.session"] = session
        self._register(session)
        try:
            cfg = connection.config
            connection.offer(
                encode_hello(
                    connection.id, session.user, cfg.heartbeat_interval, cfg.heartbeat_timeout
                )
            )
            if self._drained is not None:  # accepted just before a drain began
                hub_cfg = self.config
                connection.offer(
                    encode_shutdown(
                        random.randint(hub_cfg.reconnect_min_ms, hub_cfg.reconnect_max_ms)
                    )
                )
                connection.close_nowait(1012, "service restart", cause=CloseCause.SHUTDOWN)
            if self._on_connect is not None:
                await self._on_connect(session)
            async for text in connection:
                await self._dispatch(session, text)
        finally:
            self._unregister(session)

    def connection_closed(self, connection: Connection) -> None:
        """Release the handshake reservation; run the on_disconnect hook."""
        self._release(connection)
        record = connection.close_record
        if record is not None and record.cause is CloseCause.SLOW_CONSUMER:
            self._slow += 1
        # The session and the connection refer to each other: part them, so
        # a closed connection is freed without the cycle collector.
        session = connection.scope.pop("chatcore.session", None)
        if self._on_disconnect is not None and isinstance(session, Session):
            assert record is not None
            self._on_disconnect(session, record)

    # -- dispatch --------------------------------------------------------------------

    async def _dispatch(self, session: Session, text: str) -> None:
        message = parse_client_message(text)
        if isinstance(message, Publish):
            await self._publish(session, message)
        elif isinstance(message, Pong):
            pass  # liveness was already noted by the connection's reader
        elif isinstance(message, Join):
            await self._join(session, message)
        elif isinstance(message, Leave):
            if message.room in session._rooms:
                self._remove_member(session, message.room)
            session._reply(message.ref, {"room": message.room})
        elif isinstance(message, Ping):
            session._reply(message.ref)
        elif isinstance(message, BadFrame):
            self._bad_frame(session, message.code, message.message, message.ref)
        else:
            await self._app_message(session, message)

    def _bad_frame(self, session: Session, code: str, text: str, ref: Ref | None) -> None:
        if session._bad_frames.hit(trio.current_time()):
            session.connection.close_nowait(1008, "too many bad frames", cause=CloseCause.PROTOCOL)
            return
        session._error(ref, code, text)

    async def _join(self, session: Session, message: Join) -> None:
        name = message.room
        data: dict[str, Any]
        if name not in session._rooms:
            if len(session._rooms) >= self.config.max_rooms_per_connection:
                session._error(message.ref, ErrorCode.TOO_MANY_ROOMS, "too many rooms")
                return
            if self._authorize_join is not None:
                try:
                    allowed = await self._authorize_join(session, name)
                except ErrorReply as exc:  # a hook may refuse with its own code
                    session._error(message.ref, exc.code, exc.message)
                    return
                if not allowed:
                    session._error(
                        message.ref, ErrorCode.FORBIDDEN, "not allowed to join this room"
                    )
                    return
        else:
            self._answer_member(session, message)
            return
        room = self._open_room(name)
        room._joining += 1
        try:
            await self._ready(room)
            replay, recovered = await self._recover(session, room, message.since)
        except BackplaneError as exc:
            session._error(message.ref, ErrorCode.UNAVAILABLE, str(exc) or "try again later")
            return
        else:
            if name in session._rooms:
                # A server-side join made it a member meanwhile: it already gets
                # the room live, so replaying would repeat messages.
                self._answer_member(session, message)
                return
            # From here on, synchronously: become a member, answer, replay. No live
            # message can fall between the replayed ones and the next live one.
            # A member before the join is released: the room never closes (and
            # is never unwatched) in between.
            self._add_member(session, room)
        finally:
            room._joining -= 1
            self._close_room_if_unused(room)
        backlog = _outbox_busy(session.connection)  # before the reply is queued
        data = {"room": name, "epoch": room.epoch, "offset": room.offset}
        if recovered is not None:
            data["recovered"] = recovered
        session._reply(message.ref, data)
        for item in replay:
            session.connection.offer(item.message)
        self._presence_join(session, room, backlog)

    def _answer_member(self, session: Session, message: Join) -> None:
        """Answer a join of a room the connection is already in (nothing to replay)."""
        room = session._rooms[message.room]
        data: dict[str, Any] = {"room": room.name, "epoch": room.epoch, "offset": room.offset}
        if message.since is not None:
            data["recovered"] = (
                message.since.epoch == room.epoch and message.since.offset == room.offset
            )
        session._reply(message.ref, data)

    def _presence_join(self, session: Session, room: Room, backlog: bool) -> None:
        """Record the join, send the joiner the room's presence, tell the others.

        ``backlog``: the joiner's outbox held something before this join was
        answered, so it may still hold a diff of this room from an earlier
        membership (nothing else can be there).
        """
        if not self.config.presence:
            return
        meta = self._presence_meta(session) if self._presence_meta is not None else None
        now = trio.current_time()
        diff = self._presence.join(room.name, session.user, session.id, meta, now)
        # Not keyed: a later snapshot must not take the place of one queued
        # before this connection's leave of the room.
        session.connection.offer(
            encode(
                {"type": "presence_state", "room": room.name, "users": self.presence(room.name)},
                delivery=Delivery.EPHEMERAL,
            )
        )
        if backlog:
            # Later diffs must not take the place of one queued before this
            # snapshot: that would put them ahead of it (see _emit_presence).
            room._presence_serial = next(self._presence_serials)
        if diff is not None:
            self._emit_presence(diff, exclude=session.connection)
        self._announce(
            {
                "op": "join",
                "room": room.name,
                "user": session.user,
                "connection_id": session.id,
                "joined_at": now,
                "data": dict(meta or {}),
            }
        )

    async def _recover(
        self, session: Session, room: Room, since: Since | None
    ) -> tuple[list[Sequenced], bool | None]:
        """Everything after ``since`` up to the room's position here, or nothing."""
        if since is None:
            return [], None
        replay: list[Sequenced] = []
        after = since.offset
        while True:
            if since.epoch != room.epoch or after > room.offset:
                return [], False
            upto = room.offset
            if after == upto:
                break
            items = await self.backplane.replay(room.name, room.epoch, after, upto)
            if items is None or since.epoch != room.epoch:
                return [], False
            replay.extend(items)
            after = upto
        nbytes = sum(item.message.nbytes for item in replay)
        free_bytes, free_messages = session.connection.outbox_room()
        if nbytes + 256 > free_bytes or len(replay) + 1 > free_messages:
            return [], False  # would overflow: never partial
        return replay, True

    async def _publish(self, session: Session, message: Publish) -> None:
        # Every publish frame spends a token, joined or not, so a client cannot
        # flood with publishes to rooms it is not in.
        now = trio.current_time()
        if not session._bucket.take(now):
            if session._abuse.hit(now):
                session.connection.close_nowait(
                    1008, "sustained rate-limit abuse", cause=CloseCause.PROTOCOL
                )
                return
            session._error(message.ref, ErrorCode.RATE_LIMITED, "publishing too fast")
            return
        room = session._rooms.get(message.room)
        if room is None:
            session._error(message.ref, ErrorCode.NOT_JOINED, "join the room before publishing")
            return
        data = message.data
        if self._on_publish is not None:
            try:
                data = await self._on_publish(session, message.room, data)
            except ErrorReply as exc:
                session._error(message.ref, exc.code, exc.message)
                return
            if session._rooms.get(message.room) is not room:  # left while the hook ran
                session._error(message.ref, ErrorCode.NOT_JOINED, "left the room")
                return
        nonce = f"{self.backplane.node_id}:{next(self._nonces)}"
        self._awaiting[nonce] = (session, message.ref)
        try:
            position = await self.backplane.publish(room.name, session.user, data, nonce)
        except BackplaneError as exc:
            session._error(message.ref, ErrorCode.UNAVAILABLE, str(exc) or "try again later")
            return
        finally:
            waiting = self._awaiting.pop(nonce, None)
        self._published += 1
        if waiting is not None:
            # Sequenced, but not delivered here yet (a gap is being filled): the
            # publisher learns its offset now; the message follows.
            session._reply(message.ref, {"offset": position.offset})

    async def _app_message(self, session: Session, message: AppMessage) -> None:
        handler = self._handlers.get(message.type)
        if handler is None:
            self._bad_frame(
                session,
                ErrorCode.UNKNOWN_TYPE,
                f"unknown message type {message.type!r}",
                message.ref,
            )
            return
        try:
            result = await handler(session, message)
        except ErrorReply as exc:
            session._error(message.ref, exc.code, exc.message)
            return
        except Exception:
            # A handler bug: the connection closes with 1011 (the actor's
            # firewall logs it). The request still gets its answer, queued
            # before the close frame; no detail leaks to the client.
            if message.ref is not None:
                session._error(message.ref, ErrorCode.INTERNAL, "internal error")
            raise
        if message.ref is not None:
            session._reply(message.ref, result)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _outbox_busy(connection: Connection) -> bool:
    """True if anything is queued in the connection's outbox."""
    return connection.outbox_room()[1] < connection.config.outbox_max_messages


def _meta_json(meta: PresenceMeta) -> dict[str, Any]:
    """What clients see of a presence meta: the connection id and the app's data."""
    return {**meta.data, "connection_id": meta.connection_id}


def _default_backplane() -> Backplane:
    """Redis when ``CHATCORE_REDIS_URL`` is set, else in process."""
    url = os.environ.get("CHATCORE_REDIS_URL")
    if not url:
        return LocalBackplane()
    from .redis import RedisBackplane  # needs the ``chatcore[redis]`` extra

    return RedisBackplane(url)
