"""The hub: the registry and router of a chat server (protocol v1).

Theory of operation
-------------------

A :class:`Hub` is the :class:`~chatcore.ConnectionHandler` of every
connection, the :class:`~chatcore.BackplaneSink` of its backplane, and a
:class:`~chatcore.ServedHandler` for servers. It is a facade over
collaborators that hold each other and talk through their public methods
only::

    Hub ─ constructor, application API, ConnectionHandler, BackplaneSink, drain
     ├─ Admission (sansio)   limits and reservations: Accept or Reject
     ├─ Dispatcher           client messages: join/recovery, publish, leave, app types
     ├─ RoomRegistry         members, users, rooms; fan-out; ordered delivery
     │   └─ Room ─ RoomSequencer (sansio): epoch, offset, held, duplicates
     └─ PresenceRelay        the PresenceTable; presence events to and from nodes

One room message: ``Dispatcher`` (a client's ``publish``) →
:meth:`Backplane.publish <chatcore.Backplane.publish>` (the order is decided
there) → :meth:`Hub.backplane_event` with a :class:`~chatcore.Sequenced` →
``RoomRegistry.deliver`` → the room's sequencer → ``fan_out``: the message,
encoded once, offered to every member's outbox; the publisher's reply right
before it.

Entries are added by the connection's own ``handle`` task and removed in its
``finally``, so a connection cannot leak from the registry however it ends.
Fan-out never waits on a client. Recovery (``join`` with ``since``) replays
from the backplane's history and then, with no ``await`` in between, makes the
connection a member, answers and queues the replay.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import attrs
import trio

from . import _observe
from ._backplane import (
    Backplane,
    BackplaneEvent,
    BackplaneSink,
    HistoryConfig,
    LocalBackplane,
    NodeDown,
    Reconnected,
    RoomReset,
)
from ._config import Config
from ._connection import Connection, ConnectionHandler
from ._dispatch import SENDER, Dispatcher, MessageHandler, sequence
from ._hub_config import HubConfig, HubStatistics
from ._presence_relay import PresenceRelay
from ._rooms import Room, RoomRegistry, RoomStatistics
from ._server import HandlerHealth, ServedHandler, drain_connections
from ._session import ErrorReply, Identity, Member, Session
from .sansio import (
    Accept,
    Admission,
    CloseCause,
    CloseRecord,
    Delivery,
    HandshakeRequest,
    PresenceEvent,
    Reject,
    RoomBroadcast,
    Sequenced,
    UserDisconnect,
    UserMessage,
    encode,
)
from .sansio._protocol import encode_hello, encode_shutdown, valid_room, valid_user

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


#: ``authenticate(request) -> Identity | str | Reject`` (a str is a user id).
Authenticator: TypeAlias = Callable[[HandshakeRequest], Awaitable[Identity | str | Reject]]


class Hub(ConnectionHandler, BackplaneSink, ServedHandler):
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
        cfg = self.config
        self._authenticate = authenticate
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        # Handshake limits and reservations (accepted, not yet closed).
        self._admission = Admission(
            max_connections=cfg.max_connections,
            max_per_user=cfg.max_connections_per_user,
            max_per_address=cfg.max_connections_per_address,
            allowed_origins=cfg.allowed_origins,
            retry_after=cfg.retry_after,
        )
        # Members, rooms, fan-out and ordered delivery.
        self._registry = RoomRegistry(self.backplane)
        # Presence: local changes out, other nodes' in.
        self._presence = PresenceRelay(
            self._registry,
            self.backplane,
            enabled=cfg.presence,
            grace=cfg.presence_grace,
            meta=presence_meta,
        )
        self._registry.on_leave = self._presence.left
        # The protocol's client messages.
        self._dispatcher = Dispatcher(
            self._registry,
            self._presence,
            self.backplane,
            max_rooms=cfg.max_rooms_per_connection,
            authorize_join=authorize_join,
            on_publish=on_publish,
            costs=cfg.frame_costs,
            max_rooms_here=cfg.max_rooms,
            new_rooms_per_user=cfg.new_rooms_per_user,
            new_room_window=cfg.new_room_window,
        )
        # Connections that closed as slow consumers.
        self._slow_consumer_disconnects = 0
        # Created by drain(): set when the last accepted connection has closed
        # (no reservation left). While it exists, a connection that registers
        # (accepted just before the drain began) is shut down at once.
        self._drained: trio.Event | None = None
        # Sessions between the end of their handle() and connection_closed
        # (which hands them to on_disconnect): not kept on every connection.
        self._ending: dict[Connection, Session] = {}
        self.backplane.attach(self)

    def __repr__(self) -> str:
        registry = self._registry
        return (
            f"<Hub connections={len(registry.members)} users={len(registry.users)} "
            f"rooms={len(registry.active_rooms())}>"
        )

    # -- application API -------------------------------------------------------

    def on(self, type: str, *, cost: float = 1.0) -> Callable[[MessageHandler], MessageHandler]:
        """Decorator: handle client messages of an application-defined ``type``.

        Each such frame first pays ``cost`` tokens from the connection's frame
        budget (:attr:`HubConfig.publish_rate` tokens per second, a publish
        costs 1); without them it is answered ``rate_limited`` and the handler
        does not run. The reply is charged too, by size
        (:attr:`HubConfig.reply_bytes_per_token`). Declare more than 1 for
        handlers that do more than a publish would.

        The handler runs in the connection's ``handle`` task (messages of one
        connection are handled in order). Its return value is sent as the ok
        ``reply`` when the message had a ``ref``; raising :class:`ErrorReply`
        answers with an error; any other exception closes the connection with
        1011. For long work (streaming a reply), start a task with
        :meth:`Session.start_soon`: it is cancelled if the connection closes.

        Args:
            type: The message type.
            cost: Tokens one such frame costs (>= 0).

        Raises:
            ValueError: ``type`` is built in (join, leave, publish, ping, pong),
                or ``cost`` is negative.
        """
        if type in ("join", "leave", "publish", "ping", "pong"):
            raise ValueError(f"{type!r} is a built-in message type")
        if not cost >= 0:
            raise ValueError(f"cost must be >= 0, got {cost!r}")

        def register(handler: MessageHandler) -> MessageHandler:
            self._dispatcher.handlers[type] = handler
            self._dispatcher.handler_costs[type] = cost
            return handler

        return register

    @property
    def draining(self) -> bool:
        """True once :meth:`start_draining` was called: new handshakes get 503."""
        return self._admission.draining

    @property
    def retry_after(self) -> int:
        """Seconds announced in ``Retry-After`` on 503 refusals (:attr:`HubConfig.retry_after`)."""
        return self.config.retry_after

    def start_draining(self) -> None:
        """Refuse new handshakes with 503 and ``Retry-After`` from now on."""
        self._admission.draining = True

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
        self.start_draining()
        if self._drained is None:
            self._drained = trio.Event()
        drained = self._drained
        cfg = self.config
        rng = random.Random()

        def farewell(connection: Connection) -> None:
            connection.offer(
                encode_shutdown(rng.randint(cfg.reconnect_min_ms, cfg.reconnect_max_ms))
            )

        async def wait_all_closed() -> None:
            # Handshakes accepted just before draining began may not have
            # registered yet: ``handle`` shuts them down as they do. Wait until
            # every accepted connection (every reservation) is closed.
            if self._admission.reserved:
                await drained.wait()

        await drain_connections(
            [member.connection for member in self._registry.members.values()],
            grace=grace,
            close_timeout=self.connection_config.close_timeout,
            wait_all_closed=wait_all_closed,
            farewell=farewell,
        )
        return self._admission.reserved

    def health(self) -> HandlerHealth:
        """A snapshot for health checks (see :class:`~chatcore.ServedHandler`)."""
        return HandlerHealth(
            connections=len(self._registry.members),
            rooms=len(self._registry.active_rooms()),
            draining=self.draining,
            degraded=self.backplane.degraded,
            # A sharded backplane names its degraded shards (duck-typed: optional).
            degraded_parts=tuple(getattr(self.backplane, "degraded_parts", ())),
        )

    def sessions(self) -> list[Session]:
        """Every open session (a snapshot)."""
        return [member.session for member in self._registry.members.values()]

    def session(self, connection_id: str) -> Session | None:
        """The session of a connection id, or ``None``."""
        member = self._registry.members.get(connection_id)
        return None if member is None else member.session

    def sessions_of(self, user: str) -> list[Session]:
        """The sessions (tabs, devices) of ``user`` (a snapshot; empty if offline)."""
        return [member.session for member in self._registry.users.get(user, ())]

    def room(self, name: str) -> Room | None:
        """The room called ``name`` if it has local members, else ``None``."""
        room = self._registry.rooms.get(name)
        return room if room is not None and room.members else None

    def rooms(self) -> list[str]:
        """Names of the rooms with at least one local member."""
        return [room.name for room in self._registry.active_rooms()]

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
            nursery.start_soon(self._registry.run_repairs)
            nursery.start_soon(self._presence.run)
            self._presence.start()  # ask the other nodes for their connections
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
        stamp = _observe.publish_stamp()  # 0.0 unless this publish's lag is sampled
        position = await sequence(self.backplane, room, sender, data, None, stamp)
        self._dispatcher.published += 1
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

        Called from a :meth:`on` handler (or a task it started), an ephemeral
        broadcast is charged to that client's frame budget: one token per
        :attr:`HubConfig.ephemeral_deliveries_per_token` members of the room
        on this node, so one client's signals cannot fan out without bound.

        Raises:
            BackplaneError: the backplane is unavailable (this node's own
                connections were already served; other nodes were not).
        """
        encoded = encode(message, delivery=delivery, key=key)
        sender = SENDER.get()
        if sender is not None and delivery is Delivery.EPHEMERAL:
            here = self._registry.rooms.get(room)
            if here is not None:
                sender.budget.charge(
                    len(here.members) / self.config.ephemeral_deliveries_per_token,
                    trio.current_time(),
                )
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
        member = self._registry.members.get(connection_id)
        if member is None:
            return False
        return self._registry.fan_out((member.connection,), encode(message, delivery=delivery)) == 1

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
        member = self._registry.members.get(connection_id)
        if member is None:
            return False
        return await self._dispatcher.join_from_server(member, room)

    def leave(self, connection_id: str, room: str) -> bool:
        """Remove a connection from ``room`` from the server side; False if it was not in it."""
        member = self._registry.members.get(connection_id)
        if member is None or room not in member.rooms:
            return False
        self._registry.remove_member(member, room)
        return True

    def presence(self, room: str) -> dict[str, list[dict[str, Any]]]:
        """Who is present in ``room`` on every node: user -> their connections' metas."""
        return self._presence.state(room)

    def online_users(self) -> set[str]:
        """Users with a connection on this node or present in a room on any node."""
        return set(self._registry.users) | self._presence.users()

    async def history(self, room: str, limit: int = 50) -> list[dict[str, Any]]:
        """The room's last ``limit`` messages (decoded ``message`` objects), oldest first.

        Raises:
            BackplaneError: the backplane is unavailable.
        """
        items = await self.backplane.recent(room, limit)
        return [json.loads(item.message.text) for item in items]

    def statistics(self) -> HubStatistics:
        """A snapshot of the hub's counters."""
        registry = self._registry
        return HubStatistics(
            connections=len(registry.members),
            users=len(registry.users),
            rooms=len(registry.active_rooms()),
            published=self._dispatcher.published,
            delivered=registry.delivered,
            dropped=registry.dropped,
            coalesced=registry.coalesced,
            slow_consumer_disconnects=self._slow_consumer_disconnects,
            rejected_handshakes=self._admission.rejected,
            rate_limited=self._dispatcher.rate_limited,
            refused_rooms=self._dispatcher.refused_rooms,
        )

    # -- BackplaneSink ---------------------------------------------------------------

    def backplane_event(self, event: BackplaneEvent) -> None:
        """Take one event from the backplane (see :class:`~chatcore.BackplaneSink`)."""
        registry = self._registry
        if type(event) is Sequenced:  # the hot path first
            registry.deliver(event)
        elif isinstance(event, RoomBroadcast):
            registry.broadcast_here(event)
        elif isinstance(event, UserMessage):
            registry.deliver_to_user(event)
        elif isinstance(event, UserDisconnect):
            registry.disconnect_user_here(event)
        elif isinstance(event, PresenceEvent):
            self._presence.apply(event)
        elif isinstance(event, NodeDown):
            self._presence.node_down(event.node)
        elif isinstance(event, RoomReset):
            registry.schedule_repair(event.room)
        elif isinstance(event, Reconnected):
            self._presence.resync()

    # -- ConnectionHandler -----------------------------------------------------------

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        """Admission: draining/capacity (503), Origin (403), the app hook, limits (429)."""
        admission = self._admission
        refusal = admission.screen(request.origin)
        if refusal is not None:
            await trio.lowlevel.checkpoint()
            return refusal
        if self._authenticate is None:
            await trio.lowlevel.checkpoint()
            identity = Identity("anonymous-" + secrets.token_hex(4))
        else:
            decision = await self._authenticate(request)
            if isinstance(decision, Reject):
                admission.count_rejection()
                return decision
            identity = Identity(decision) if isinstance(decision, str) else decision
        if not isinstance(identity, Identity) or not valid_user(identity.user):
            return admission.refuse(401, "invalid user")
        # Re-checked after the hook's awaits, and reserved with no await in between.
        address = request.client[0] if request.client else None
        return admission.admit(identity, identity.user, address)

    async def handle(self, connection: Connection) -> None:
        """Serve one connection: hello, then dispatch its messages in order."""
        identity = connection.identity
        assert isinstance(identity, Identity)
        cfg = self.config
        member = Member(connection, cfg, trio.current_time())
        session = Session(self, member, identity)
        self._registry.register(member)
        try:
            conn_cfg = connection.config
            connection.offer(
                encode_hello(
                    connection.id,
                    session.user,
                    conn_cfg.heartbeat_interval,
                    conn_cfg.heartbeat_timeout,
                )
            )
            if self._drained is not None:  # accepted just before a drain began
                connection.offer(
                    encode_shutdown(random.randint(cfg.reconnect_min_ms, cfg.reconnect_max_ms))
                )
                connection.close_nowait(1012, "service restart", cause=CloseCause.SHUTDOWN)
            if self._on_connect is not None:
                await self._on_connect(session)
            dispatch = self._dispatcher.dispatch
            async for text in connection:
                await dispatch(member, text)
        finally:
            self._registry.unregister(member)
            if self._on_disconnect is not None:
                self._ending[connection] = session

    def connection_closed(self, connection: Connection) -> None:
        """Release the handshake reservation; run the on_disconnect hook."""
        identity = connection.identity
        if isinstance(identity, Identity):
            client = connection.request.client
            self._admission.release(identity.user, client[0] if client else None)
            if self._admission.reserved == 0 and self._drained is not None:
                self._drained.set()
        record = connection.close_record
        if record is not None and record.cause is CloseCause.SLOW_CONSUMER:
            self._slow_consumer_disconnects += 1
        session = self._ending.pop(connection, None)
        if self._on_disconnect is not None and session is not None:
            assert record is not None
            self._on_disconnect(session, record)


def _default_backplane() -> Backplane:
    """Redis when ``CHATCORE_REDIS_URL`` is set, else in process.

    In process, ``CHATCORE_HISTORY_BYTES`` (an integer) sets the history budget
    and ``CHATCORE_HISTORY_MAX_AGE`` (seconds) how long messages are kept
    (:class:`~chatcore.HistoryConfig` ``total_bytes`` and ``max_age``).
    """
    url = os.environ.get("CHATCORE_REDIS_URL")
    if not url:
        history = HistoryConfig()
        budget = os.environ.get("CHATCORE_HISTORY_BYTES")
        if budget:
            history = attrs.evolve(history, total_bytes=int(budget))
        max_age = os.environ.get("CHATCORE_HISTORY_MAX_AGE")
        if max_age:
            history = attrs.evolve(history, max_age=float(max_age))
        return LocalBackplane(history)
    from .redis import RedisBackplane  # needs the ``chatcore[redis]`` extra

    return RedisBackplane(url)
