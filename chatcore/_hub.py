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

Per-room order: offsets are assigned in one place, :meth:`Room._assign`,
+1 per message, and the publisher's ``reply`` is queued before the message
itself, so it arrives first.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeAlias

import attrs
import trio

from ._config import Config
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
    encode_error,
    encode_hello,
    encode_message,
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


def _positive_or_none(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"HubConfig.{attribute.name} must be > 0 or None, got {value!r}")


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not value > 0:
        raise ValueError(f"HubConfig.{attribute.name} must be > 0, got {value!r}")


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
        reconnect_min_ms: Lower bound of the jittered ``reconnect_after_ms`` sent
            in ``shutdown`` during a drain.
        reconnect_max_ms: Upper bound of it (spreads the reconnect storm).
        idle_rooms: Empty rooms whose offset and epoch are kept for when members
            come back; beyond it the least recently used are forgotten (and get
            a new epoch if they return).
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
    reconnect_min_ms: int = attrs.field(default=500, validator=_positive)
    reconnect_max_ms: int = attrs.field(default=5_000, validator=_positive)
    idle_rooms: int = attrs.field(default=10_000, validator=_positive)

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
        slow_consumer_disconnects: Connections closed with 4001 by fan-out.
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
    """A room: its members and its position in its message order.

    Created by the hub on first join (or server-side publish); not by users.
    """

    __slots__ = ("epoch", "members", "name", "offset")

    def __init__(self, name: str) -> None:
        #: The room's name.
        self.name = name
        #: Changes whenever the room's history is lost (a new Room object).
        self.epoch = secrets.token_hex(4)
        #: The last assigned offset; the first message gets 1.
        self.offset = 0
        #: Member connections, in join order.
        self.members: dict[Connection, Session] = {}

    def _assign(self) -> int:
        """Give the next message its place in the room's order."""
        self.offset += 1
        return self.offset

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
        config: The hub's limits.
        connection_config: Bounds of every connection (outbox, heartbeat, ...).
    """

    def __init__(
        self,
        *,
        authenticate: Authenticator | None = None,
        on_connect: Callable[[Session], Awaitable[None]] | None = None,
        on_disconnect: Callable[[Session, CloseRecord], None] | None = None,
        authorize_join: Callable[[Session, str], Awaitable[bool]] | None = None,
        on_publish: Callable[[Session, str, Any], Awaitable[Any]] | None = None,
        config: HubConfig | None = None,
        connection_config: Config | None = None,
    ) -> None:
        #: The hub's limits.
        self.config = config or HubConfig()
        #: Bounds of every connection served for this hub.
        self.connection_config: Config = connection_config or Config()
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
        # Rooms with members; rooms without members wait in _idle (LRU) so their
        # offsets survive a brief emptiness.
        self._rooms: dict[str, Room] = {}
        self._idle: OrderedDict[str, Room] = OrderedDict()
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
        """The room called ``name`` if it has members, else ``None``."""
        return self._rooms.get(name)

    def rooms(self) -> list[str]:
        """Names of the rooms with at least one member."""
        return list(self._rooms)

    def publish(self, room: str, data: Any, *, sender: str | None = None) -> int:
        """Publish ``data`` to ``room`` from the server side; returns its offset.

        Members receive ``{"type":"message", ..., "from": sender}``.

        Raises:
            ValueError: ``room`` is not a valid room name.
        """
        if not valid_room(room):
            raise ValueError(f"invalid room name {room!r}")
        target = self._room_for_publish(room)
        encoded = encode_message(room, target.offset + 1, target.epoch, sender, data)
        offset = target._assign()  # only once encoding succeeded: no gaps
        self._published += 1
        self._fan_out(target.members, encoded)
        return offset

    def broadcast(
        self,
        room: str,
        message: Mapping[str, Any],
        *,
        delivery: Delivery = Delivery.EPHEMERAL,
        key: str | None = None,
        exclude: Session | None = None,
    ) -> int:
        """Send a message outside the room's order (no offset) to its members.

        For ephemeral signals such as typing indicators: with the default
        ephemeral delivery a full outbox drops it, and with a ``key`` a queued
        one with the same key is replaced (latest wins).

        Returns:
            How many members it was queued for.
        """
        target = self._rooms.get(room)
        if target is None:
            return 0
        encoded = encode(message, delivery=delivery, key=key)
        members: Iterable[Connection] = target.members
        if exclude is not None:
            members = [c for c in target.members if c is not exclude.connection]
        return self._fan_out(members, encoded)

    def send_to_user(
        self,
        user: str,
        message: Mapping[str, Any],
        *,
        delivery: Delivery = Delivery.DURABLE,
        key: str | None = None,
    ) -> int:
        """Send a message to every connection of ``user``; returns how many took it."""
        sessions = self._users.get(user)
        if not sessions:
            return 0
        encoded = encode(message, delivery=delivery, key=key)
        return self._fan_out([s.connection for s in sessions], encoded)

    def send_to_connection(
        self,
        connection_id: str,
        message: Mapping[str, Any],
        *,
        delivery: Delivery = Delivery.DURABLE,
    ) -> bool:
        """Send a message to one connection; False if it is not open here."""
        session = self._sessions.get(connection_id)
        if session is None:
            return False
        return self._fan_out((session.connection,), encode(message, delivery=delivery)) == 1

    def disconnect_user(self, user: str, code: int = 4002, reason: str = "") -> int:
        """Close every connection of ``user`` (default 4002, kicked); returns how many."""
        sessions = list(self._users.get(user, ()))
        for session in sessions:
            session.connection.close_nowait(code, reason)
        return len(sessions)

    def join(self, connection_id: str, room: str) -> bool:
        """Make a connection a member of ``room`` from the server side.

        Returns:
            False if the connection is not open here.

        Raises:
            ValueError: ``room`` is not a valid room name.
        """
        if not valid_room(room):
            raise ValueError(f"invalid room name {room!r}")
        session = self._sessions.get(connection_id)
        if session is None:
            return False
        self._add_member(session, room)
        return True

    def leave(self, connection_id: str, room: str) -> bool:
        """Remove a connection from ``room`` from the server side; False if it was not in it."""
        session = self._sessions.get(connection_id)
        if session is None or room not in session._rooms:
            return False
        self._remove_member(session, room)
        return True

    def statistics(self) -> HubStatistics:
        """A snapshot of the hub's counters."""
        return HubStatistics(
            connections=len(self._sessions),
            users=len(self._users),
            rooms=len(self._rooms),
            published=self._published,
            delivered=self._delivered,
            dropped=self._dropped,
            coalesced=self._coalesced,
            slow_consumer_disconnects=self._slow,
            rejected_handshakes=self._rejected,
        )

    # -- registry ------------------------------------------------------------------

    def _room_for_publish(self, name: str) -> Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._idle.get(name)
            if room is None:
                room = Room(name)
                self._park_idle(room)
            else:
                self._idle.move_to_end(name)
        return room

    def _park_idle(self, room: Room) -> None:
        self._idle[room.name] = room
        self._idle.move_to_end(room.name)
        while len(self._idle) > self.config.idle_rooms:
            self._idle.popitem(last=False)

    def _add_member(self, session: Session, name: str) -> Room:
        room = session._rooms.get(name)
        if room is not None:
            return room
        room = self._rooms.get(name)
        if room is None:
            room = self._idle.pop(name, None) or Room(name)
            self._rooms[name] = room
        room.members[session.connection] = session
        session._rooms[name] = room
        return room

    def _remove_member(self, session: Session, name: str) -> None:
        room = session._rooms.pop(name)
        del room.members[session.connection]
        if not room.members:
            del self._rooms[name]
            self._park_idle(room)

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
            elif result is PushResult.OVERFLOW:
                self._slow += 1
        self._delivered += queued
        return queued

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
        session = connection.scope.get("chatcore.session")
        if self._on_disconnect is not None and isinstance(session, Session):
            record = connection.close_record
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
        room = self._add_member(session, name)
        data: dict[str, Any] = {"room": name, "epoch": room.epoch, "offset": room.offset}
        if message.since is not None:
            # Without history (yet), recovery succeeds only when nothing was missed.
            data["recovered"] = (
                message.since.epoch == room.epoch and message.since.offset == room.offset
            )
        session._reply(message.ref, data)

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
        # Encode before taking the offset: data that cannot be encoded (an app
        # hook's bug, closing with 1011) must not leave a gap in the order.
        encoded = encode_message(room.name, room.offset + 1, room.epoch, session.user, data)
        offset = room._assign()
        self._published += 1
        session._reply(message.ref, {"offset": offset})
        self._fan_out(room.members, encoded)

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
