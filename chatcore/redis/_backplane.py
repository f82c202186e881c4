"""The Redis backplane: the calls, the supervised session, incoming messages.

See the package docs (:mod:`chatcore.redis`) for the rules it keeps.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from contextlib import AsyncExitStack, aclosing
from typing import Any

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from .._backplane import (
    Backplane,
    BackplaneError,
    BackplaneEvent,
    BackplaneSink,
    HistoryConfig,
    NodeDown,
    Position,
    Reconnected,
    RoomReset,
    Sequenced,
    published_at,
)
from ..sansio import (
    NodeEvent,
    OutboundMessage,
    PresenceEvent,
    RoomBroadcast,
    UserDisconnect,
    UserMessage,
    decode_node_event,
    encode_node_event,
)
from ..sansio._protocol import text_message
from ._records import (
    ACK_KINDS,
    BURST,
    CATCH_UP_ROUND,
    MESSAGE_KINDS,
    ROUND_TRIP_BOUNDS,
    SUBSCRIBE_CHUNK,
    PublishItem,
    RedisBackplaneStatistics,
    RedisSession,
    RoomState,
    SessionLost,
    as_int,
    as_list,
    as_str,
    describe,
    is_link_error,
    nonce_field,
    parse_entries,
    parse_nonce_field,
    push_buffer,
    redirect_of,
)
from ._scripts import JSON, SCRIPTS
from ._url import AckOptions, is_cluster_url, split_ack_options

__all__ = ["RedisBackplane"]

logger = logging.getLogger("chatcore.redis")


class RedisBackplane(Backplane):
    """The backplane on Redis: rooms and users across processes and nodes.

    Run it alongside its hub (``await nursery.start(backplane.run)``; the hub
    does this when it owns the backplane). One Redis 7+ server (or a primary
    behind a stable address) serves any number of nodes; a Redis Cluster URL
    makes a :class:`~chatcore.redis.RedisClusterBackplane` instead. See the module docs
    for how order, recovery and outages are handled, and ``docs/scale-out.md``.

    Args:
        url: The Redis URL (``redis://[user:password@]host:port/db``,
            ``rediss://`` for TLS, ``unix:///path/to/socket``), or a Redis
            Cluster's (``redis+cluster://HOST:PORT[,HOST:PORT...]``,
            ``rediss+cluster://`` for TLS): then the constructor returns a
            :class:`~chatcore.redis.RedisClusterBackplane`. Query options
            ``wait_replicas``, ``wait_timeout`` and ``wait_aof`` set the
            arguments of the same names (see ``docs/scale-out.md``).
        history: How much of each room's order is kept for recovery:
            ``max_messages`` caps the stream (approximately: up to 64 more
            may be kept between trims), ``max_bytes`` caps the bytes of its
            messages (exactly) and bounds one replay, ``max_age`` expires the
            stream of an idle room and bounds replay. ``rooms`` and
            ``total_bytes`` do not apply (Redis holds every room: size Redis's
            ``maxmemory`` for rooms active within ``max_age``).
        node_id: This node's id, unique across the deployment (default: a
            random one).
        prefix: Prefix of every Redis key and channel (deployments sharing one
            Redis use different prefixes).
        publish_batch: Most publishes sent to Redis in one pipelined batch.
        publish_queue: Publishes that may wait for the publishing task; a
            publish beyond it waits for room (within ``request_timeout``).
        request_timeout: Longest a call (publish, position, replay, directed
            delivery) waits, for Redis to come back and for its reply
            together, before :class:`~chatcore.BackplaneError`.
        command_timeout: Deadline for any one reply from Redis (and for the
            subscription's heartbeat reply); a miss ends the session.
        heartbeat_interval: Seconds between pings on the subscription.
        reconnect_initial: First delay before reconnecting after a session
            ended (doubled per failed attempt, with jitter).
        reconnect_max: Largest delay between reconnect attempts.
        node_ttl: Seconds a node's lease lives; refreshed every third of it.
            A node that stops refreshing is reported down after about this.
        room_ttl: Seconds an idle room's epoch and offset are kept in Redis
            (refreshed by every publish and position read); ``None``: forever.
            A room idle for longer starts a new epoch.
        unsubscribe_linger: Seconds a room stays subscribed after
            :meth:`unwatch`, so a member coming right back (or the hub's
            unwatch/watch around a first join) keeps the live subscription.
        wait_replicas: A publish is acknowledged only once this many
            replicas have it (``WAIT``); 0: once the primary ran the script.
        wait_timeout: Seconds a publish waits for those replicas; fewer in
            time fails the publish with :class:`~chatcore.BackplaneError`
            (the message may still be delivered: it was sequenced).
        wait_aof: Also wait until the primary and ``wait_replicas`` replicas
            fsynced it to their append-only file (``WAITAOF``, Redis 7.2+;
            an older server gets ``WAIT`` and a warning in the log).

    Raises:
        ValueError: a bound is not positive, or the URL is malformed.
    """

    # Pub/sub commands and push kinds (sharded ones on Redis Cluster).
    _SUBSCRIBE = b"SUBSCRIBE"
    _UNSUBSCRIBE = b"UNSUBSCRIBE"
    _PUBLISH = b"PUBLISH"
    _scripts = SCRIPTS

    def __new__(cls, *args: Any, **kwargs: Any) -> RedisBackplane:
        # The URL picks the implementation, as a user passes it (one argument,
        # one environment variable, one command-line option).
        url = args[0] if args else kwargs.get("url", "")
        if cls is RedisBackplane and isinstance(url, str) and is_cluster_url(url):
            from ._cluster import RedisClusterBackplane

            return super().__new__(RedisClusterBackplane)
        return super().__new__(cls)

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        *,
        history: HistoryConfig | None = None,
        node_id: str | None = None,
        prefix: str = "chatcore",
        publish_batch: int = 128,
        publish_queue: int = 4_096,
        request_timeout: float = 2.0,
        command_timeout: float = 1.0,
        heartbeat_interval: float = 0.5,
        reconnect_initial: float = 0.05,
        reconnect_max: float = 0.5,
        node_ttl: float = 10.0,
        room_ttl: float | None = 7 * 24 * 3600.0,
        unsubscribe_linger: float = 2.0,
        wait_replicas: int | None = None,
        wait_timeout: float | None = None,
        wait_aof: bool | None = None,
    ) -> None:
        url, in_url = split_ack_options(url)
        in_url = in_url or AckOptions()
        #: What a publish waits for before its ``ok``.
        self.ack = AckOptions(
            in_url.replicas if wait_replicas is None else wait_replicas,
            in_url.timeout if wait_timeout is None else wait_timeout,
            in_url.aof if wait_aof is None else wait_aof,
        )
        if self.ack.replicas < 0 or not self.ack.timeout > 0:
            raise ValueError("RedisBackplane wait_replicas must be >= 0 and wait_timeout > 0")
        for name, value in (
            ("publish_batch", publish_batch),
            ("publish_queue", publish_queue),
            ("request_timeout", request_timeout),
            ("command_timeout", command_timeout),
            ("heartbeat_interval", heartbeat_interval),
            ("reconnect_initial", reconnect_initial),
            ("reconnect_max", reconnect_max),
            ("node_ttl", node_ttl),
            ("room_ttl", 1 if room_ttl is None else room_ttl),
            ("unsubscribe_linger", unsubscribe_linger),
        ):
            if not value > 0:  # also refuses NaN
                raise ValueError(f"RedisBackplane {name} must be > 0, got {value!r}")
        if not prefix or any(c in prefix for c in "{}\n"):
            raise ValueError(f"RedisBackplane prefix must be non-empty without braces: {prefix!r}")
        #: This node's id.
        self.node_id = node_id or "node-" + secrets.token_hex(4)
        #: The Redis URL.
        self.url = url
        #: The history bounds in force.
        self.history = history or HistoryConfig()
        #: The key and channel prefix.
        self.prefix = prefix
        self._publish_batch = publish_batch
        self._request_timeout = request_timeout
        self._command_timeout = command_timeout
        self._heartbeat_interval = heartbeat_interval
        self._reconnect_initial = reconnect_initial
        self._reconnect_max = reconnect_max
        self._node_ttl = node_ttl
        self._linger = unsubscribe_linger
        self._log_ttl_ms = (
            "0" if self.history.max_age is None else str(math.ceil(self.history.max_age * 1000))
        )
        self._meta_ttl_ms = "0" if room_ttl is None else str(math.ceil(room_ttl * 1000))
        self._bus = f"{prefix}:bus".encode()
        # The bus channels this backplane subscribes to (one shard's share on a cluster).
        self._buses = {self._bus}
        self._nodes_key = f"{prefix}:nodes"

        self._sink: BackplaneSink | None = None
        # Subscribed rooms (watched, or lingering after unwatch), and the
        # channel -> room map for incoming messages.
        self._rooms: dict[str, RoomState] = {}
        self._channel_rooms: dict[bytes, str] = {}
        # Unwatched rooms -> when their subscription ends.
        self._lingering: dict[str, float] = {}
        # Other nodes known alive -> their last lease expiry (Redis ms; 0: only
        # heard of through presence).
        self._nodes: dict[str, int] = {}
        # Publishes: the bounded queue, and those taken from it but not sent
        # when a session ended (sent first by the next session).
        self._queue_send, self._queue_receive = trio.open_memory_channel[PublishItem](publish_queue)
        self._carry: deque[PublishItem] = deque()
        self._running = False
        self._session: RedisSession | None = None
        # Set while a session is established; replaced when it ends.
        self._connected = trio.Event()
        self._degraded_since: float | None = None
        # Counters for statistics().
        self._sessions = 0
        self._session_failures = 0
        self._last_error: str | None = None
        self._published = 0
        # Publish batches by round-trip time (ROUND_TRIP_BOUNDS), and their sum.
        self._round_trips = [0] * (len(ROUND_TRIP_BOUNDS) + 1)
        self._round_trip_seconds = 0.0
        self._publish_failures = 0
        self._delivered = 0
        self._caught_up = 0
        self._duplicates = 0
        self._stale = 0
        self._room_resets = 0

    def __repr__(self) -> str:
        state = (
            "CONNECTED"
            if self._session is not None and self._session.established
            else ("DEGRADED" if self._running else "STOPPED")
        )
        return (
            f"<RedisBackplane {self.node_id} {state} rooms={len(self._rooms)}"
            f" queued={self._queue_send.statistics().current_buffer_used}>"
        )

    # -- keys -------------------------------------------------------------

    def _meta_key(self, room: str) -> str:
        return f"{self.prefix}:{{{room}}}:meta"

    def _log_key(self, room: str) -> str:
        return f"{self.prefix}:{{{room}}}:log"

    def _channel(self, room: str) -> bytes:
        return f"{self.prefix}:{{{room}}}:ch".encode()

    # -- Backplane --------------------------------------------------------

    def attach(self, sink: BackplaneSink) -> None:
        """See :meth:`Backplane.attach`."""
        self._sink = sink

    @property
    def degraded(self) -> bool:
        """True while no session is established (Redis unreachable, or reconnecting).

        Also true before :meth:`run` first connects.
        """
        return self._session is None or not self._session.established

    def statistics(self) -> RedisBackplaneStatistics:
        """A snapshot of the backplane's state and counters."""
        since = self._degraded_since
        return RedisBackplaneStatistics(
            node_id=self.node_id,
            connected=not self.degraded,
            degraded=self.degraded,
            degraded_for=None if since is None else trio.current_time() - since,
            sessions=self._sessions,
            session_failures=self._session_failures,
            last_error=self._last_error,
            watched_rooms=len(self._rooms),
            queued_publishes=self._queue_send.statistics().current_buffer_used + len(self._carry),
            published=self._published,
            publish_failures=self._publish_failures,
            delivered=self._delivered,
            caught_up=self._caught_up,
            duplicates=self._duplicates,
            stale=self._stale,
            room_resets=self._room_resets,
            nodes=len(self._nodes),
            round_trips=tuple(self._round_trips),
            round_trip_seconds=self._round_trip_seconds,
        )

    async def wait_connected(self) -> None:
        """Wait until a session is established (returns at once if one is).

        Cancellation: just stops waiting.
        """
        while self.degraded:
            await self._connected.wait()
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, keep connected, and serve until cancelled.

        Signals ``task_status.started()`` at once, before Redis is reached: a
        server starts (degraded) even while Redis is down. Use
        :meth:`wait_connected` to wait for the first session.

        Raises:
            RuntimeError: it is already running.

        Cancellation: closes every Redis connection; queued publishes fail
        with :class:`~chatcore.BackplaneError`.
        """
        if self._running:
            raise RuntimeError("RedisBackplane.run() is already running")
        self._running = True
        self._degraded_since = trio.current_time()
        task_status.started()
        try:
            await self._supervise()
        finally:
            self._running = False
            self._session = None
            stopped = "the Redis backplane stopped"
            while self._carry:
                self._carry.popleft().fail(BackplaneError(stopped))
            while True:
                try:
                    self._queue_receive.receive_nowait().fail(BackplaneError(stopped))
                except (trio.WouldBlock, trio.EndOfChannel):
                    break

    async def publish(
        self, room: str, sender: str | None, data: Any, nonce: str | None
    ) -> Position:
        """Sequence, store and deliver a room message (see :meth:`Backplane.publish`).

        The message is queued for the node's publishing task, which sends
        queued publishes to Redis in pipelined batches; this returns when the
        script's reply is in.

        Raises:
            TypeError, ValueError: ``data`` is not JSON-serialisable, or
                ``nonce`` has a newline (nothing stored).
            BackplaneError: not sequenced within ``request_timeout``
                (Redis unreachable or too slow). If the script had already been
                sent, it may still have been sequenced; it is then delivered
                to every member as usual.

        Cancellation: a publish not yet sent to Redis is withdrawn; one already
        sent completes in Redis regardless.
        """
        # Encoding first: unencodable data raises before anything is queued.
        args = (
            secrets.token_hex(4),
            JSON.encode(room),
            JSON.encode(sender),
            JSON.encode(data),
            nonce_field(nonce, published_at.get()),
            str(self.history.max_messages),
            self._channel(room).decode(),
            self._log_ttl_ms,
            self._meta_ttl_ms,
            str(self.history.max_bytes or 0),
        )
        if nonce is not None and "\n" in nonce:
            raise ValueError("a publish nonce cannot contain a newline")
        self._check_available()
        item = PublishItem(room, args)
        try:
            with trio.move_on_after(self._request_timeout):
                await self._queue_send.send(item)
                await item.done.wait()
        finally:
            if not item.done.is_set():
                item.abandoned = True
        if item.result is None:
            self._publish_failures += 1
            if item.error is not None:
                raise item.error
            raise BackplaneError(
                "Redis did not answer in time: the message may have been sequenced"
                if item.sent
                else "Redis is unavailable: the message was not sequenced"
            )
        epoch, offset = item.result
        self._published += 1
        state = self._rooms.get(room)
        if state is not None:
            self._observe_epoch(room, state, epoch)
        return Position(epoch, offset)

    async def position(self, room: str) -> Position:
        """The room's position (creating its epoch if it has none).

        For a watched room this first waits until the room's subscription is
        acknowledged, so every message after the returned offset reaches this
        node (call :meth:`watch` before this when a member joins).

        Raises:
            BackplaneError: Redis unreachable within ``request_timeout``.

        Cancellation: nothing to undo.
        """
        with trio.move_on_after(self._request_timeout):
            session = await self._wait_established()
            state = self._rooms.get(room)
            if state is not None:
                await state.subscribed.wait()
            reply = await self._command(
                session, "read", room, secrets.token_hex(4), "", "0", "+", "0", self._meta_ttl_ms
            )
            epoch, offset = as_str(reply[0]), as_int(reply[1])
            if state is not None and self._rooms.get(room) is state:
                self._observe_epoch(room, state, epoch)
                if epoch == state.epoch:
                    state.known = max(state.known, offset)
            return Position(epoch, offset)
        raise BackplaneError("Redis is unavailable: no position for the room")

    async def replay(self, room: str, epoch: str, after: int, upto: int) -> list[Sequenced] | None:
        """The stored messages with ``after < offset <= upto`` (see :meth:`Backplane.replay`).

        Returns ``None`` if the room's epoch is not ``epoch``, or any of the
        messages is no longer in the stream, is older than
        ``history.max_age``, or the range is larger than ``history.max_bytes``.

        Raises:
            BackplaneError: Redis unreachable within ``request_timeout``.
        """
        if upto < after or after < 0:
            await trio.lowlevel.checkpoint()
            return None
        with trio.move_on_after(self._request_timeout):
            session = await self._wait_established()
            reply = await self._command(
                session, "read", room, "", epoch, str(after), str(upto), str(upto - after), "0"
            )
            if reply[0] is None or as_str(reply[0]) != epoch or as_int(reply[1]) < upto:
                return None
            now_ms = as_int(reply[2])
            raw_entries = as_list(reply[3])
            if len(raw_entries) != upto - after:
                return None
            oldest_ms = (
                None if self.history.max_age is None else now_ms - self.history.max_age * 1000
            )
            budget = self.history.max_bytes
            result = []
            expected = after + 1
            for offset, at_ms, text in parse_entries(raw_entries):
                if offset != expected or (oldest_ms is not None and at_ms < oldest_ms):
                    return None
                message = text_message(text)
                if budget is not None:
                    budget -= message.nbytes
                    if budget < 0:
                        return None
                result.append(Sequenced(room, epoch, offset, message))
                expected += 1
            return result
        raise BackplaneError("Redis is unavailable: cannot replay the room")

    def watch(self, room: str) -> None:
        """Subscribe to ``room``'s channel (idempotent; takes effect asynchronously).

        :meth:`position` waits for the subscription. While disconnected, the
        room is subscribed to, and caught up, by the next session.
        """
        state = self._rooms.get(room)
        if state is not None:
            # Still subscribed (lingering): keep the subscription and what it knows.
            state.watched = True
            self._lingering.pop(room, None)
            return
        self._rooms[room] = RoomState()
        channel = self._channel(room)
        self._channel_rooms[channel] = room
        self._send_subscription(self._SUBSCRIBE, [channel])

    def unwatch(self, room: str) -> None:
        """Stop delivering ``room`` here (idempotent).

        The subscription itself ends ``unsubscribe_linger`` seconds later
        unless the room is watched again before.
        """
        state = self._rooms.get(room)
        if state is None or not state.watched:
            return
        state.watched = False
        self._lingering[room] = trio.current_time() + self._linger

    async def recent(self, room: str, limit: int) -> list[Sequenced]:
        """The room's newest ``limit`` stored messages, oldest first (see :meth:`Backplane.recent`).

        Messages older than ``history.max_age`` are left out.

        Raises:
            BackplaneError: Redis unreachable within ``request_timeout``.
        """
        if limit <= 0:
            await trio.lowlevel.checkpoint()
            return []
        with trio.move_on_after(self._request_timeout):
            session = await self._wait_established()
            reply = as_list(
                await self._request(
                    session,
                    session.cmd,
                    "recent",
                    (self._meta_key(room), self._log_key(room)),
                    (str(limit),),
                )
            )
            if reply[0] is None:
                return []
            epoch, now_ms = as_str(reply[0]), as_int(reply[1])
            oldest_ms = (
                None if self.history.max_age is None else now_ms - self.history.max_age * 1000
            )
            result = [
                Sequenced(room, epoch, offset, text_message(text))
                for offset, at_ms, text in parse_entries(as_list(reply[2]))
                if oldest_ms is None or at_ms >= oldest_ms
            ]
            result.reverse()
            return result
        raise BackplaneError("Redis is unavailable: cannot read the room's messages")

    async def broadcast(self, room: str, message: OutboundMessage, exclude: str | None) -> None:
        """Deliver a message outside the room's order to its members on every node.

        This node's members get it at once (even while Redis is down); other
        nodes through the room's channel, so only nodes with members in the
        room receive it.

        Raises:
            BackplaneError: the other nodes could not be told.
        """
        event = RoomBroadcast(self.node_id, room, message, exclude)
        self._emit(event)
        await self._publish_raw(self._channel(room), encode_node_event(event))

    async def send_to_user(self, user: str, message: OutboundMessage) -> None:
        """Deliver ``message`` to every connection of ``user`` on every node.

        This node's connections get it at once (even while Redis is down);
        the others through the bus channel.

        Raises:
            BackplaneError: the other nodes could not be told (Redis
                unavailable); this node's connections did get it.
        """
        event = UserMessage(self.node_id, user, message)
        self._emit(event)
        await self._publish_raw(self._bus, encode_node_event(event))

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        """Close every connection of ``user`` on every node.

        This node's connections are closed at once (even while Redis is down);
        the others through the bus channel.

        Raises:
            BackplaneError: the other nodes could not be told.
        """
        event = UserDisconnect(self.node_id, user, code, reason)
        self._emit(event)
        await self._publish_raw(self._bus, encode_node_event(event))

    async def publish_presence(self, event: PresenceEvent) -> None:
        """Tell the other nodes about a presence change of this node.

        Raises:
            TypeError, ValueError: the event's data is not JSON-serialisable.
            BackplaneError: Redis unavailable.
        """
        await self._publish_raw(self._bus, encode_node_event(event))

    # -- calls ------------------------------------------------------------

    def _check_available(self) -> None:
        if not self._running:
            raise BackplaneError("the Redis backplane is not running")
        since = self._degraded_since
        if since is not None and trio.current_time() - since >= self._request_timeout:
            raise BackplaneError("Redis is unavailable")

    async def _wait_established(self) -> RedisSession:
        self._check_available()
        while True:
            session = self._session
            if session is not None and session.established:
                return session
            await self._connected.wait()

    async def _command(
        self, session: RedisSession, script: str, room: str, *args: str
    ) -> list[Any]:
        """Run a room script on the session's command connection."""
        keys = (self._meta_key(room), self._log_key(room))
        return as_list(await self._request(session, session.cmd, script, keys, args))

    async def _request(
        self,
        session: RedisSession,
        connection: coredis.BaseConnection,
        script: str,
        keys: Sequence[str],
        args: Sequence[str],
    ) -> object:
        """EVALSHA one script; failures of the link end the session."""

        def evalsha() -> Awaitable[object]:
            return connection.create_request(
                b"EVALSHA",
                session.shas[script],
                len(keys),
                *keys,
                *args,
                timeout=self._command_timeout,
            )

        try:
            try:
                return await evalsha()
            except coredis.exceptions.NoScriptError:
                # The script cache was flushed (SCRIPT FLUSH, a failover):
                # nothing ran, so load it again and retry once.
                await self._load_script(session, connection, script)
                return await evalsha()
        except coredis.exceptions.ResponseError as exc:
            if (redirected := redirect_of(exc)) is not None:
                self._on_redirect()
                raise redirected from exc
            raise BackplaneError(f"Redis refused the {script} script: {exc}") from exc
        except (coredis.exceptions.RedisError, TimeoutError, OSError) as exc:
            self._kick(session, f"{script} failed: {exc!r}")
            raise BackplaneError(f"Redis is unavailable: {exc}") from exc

    async def _load_script(
        self, session: RedisSession, connection: coredis.BaseConnection, script: str
    ) -> None:
        sha = await connection.create_request(
            b"SCRIPT", b"LOAD", self._scripts[script], timeout=self._command_timeout
        )
        session.shas[script] = sha if isinstance(sha, bytes) else as_str(sha).encode()

    async def _publish_raw(self, channel: bytes, payload: bytes) -> None:
        self._check_available()
        with trio.move_on_after(self._request_timeout):
            session = await self._wait_established()
            try:
                await session.cmd.create_request(
                    self._PUBLISH, channel, payload, timeout=self._command_timeout
                )
            except (coredis.exceptions.RedisError, TimeoutError, OSError) as exc:
                if (redirected := redirect_of(exc)) is not None:
                    self._on_redirect()
                    raise redirected from exc
                self._kick(session, f"bus publish failed: {exc!r}")
                raise BackplaneError(f"Redis is unavailable: {exc}") from exc
            return
        raise BackplaneError("Redis is unavailable: the other nodes were not told")

    def _emit(self, event: BackplaneEvent) -> None:
        # A hub bug must not take the backplane down (nor skip other deliveries).
        if self._sink is None:
            return
        try:
            self._sink.backplane_event(event)
        except Exception:
            logger.exception("%s: the hub failed on %s", self.node_id, type(event).__name__)

    # -- rooms and epochs -------------------------------------------------

    def _observe_epoch(self, room: str, state: RoomState, epoch: str) -> bool:
        """Note the room's epoch; False if it is one the room already left."""
        if state.epoch == epoch:
            return True
        if epoch in state.retired:
            return False
        if state.epoch is None:
            state.epoch = epoch
            return True
        logger.warning(
            "%s: room %r lost its order in Redis (epoch %s -> %s)",
            self.node_id,
            room,
            state.epoch,
            epoch,
        )
        state.retired.append(state.epoch)
        state.epoch = epoch
        state.delivered = 0
        state.known = 0
        self._room_resets += 1
        self._emit(RoomReset(room))
        return True

    def _deliver(
        self,
        room: str,
        state: RoomState,
        epoch: str,
        offset: int,
        text: str,
        nonce: str | None,
        published: float = 0.0,
    ) -> None:
        if not self._observe_epoch(room, state, epoch):
            # An epoch this room left behind (a late message of a lost order):
            # it must not look like a new order to a hub that reopened the
            # room since, so it is not handed over.
            self._stale += 1
            return
        # Every other message goes to the hub, whose sequencer drops what it
        # already has (the one duplicate filter); here only the catch-up
        # start moves.
        if offset > state.delivered:
            state.delivered = offset
        else:
            self._duplicates += 1
        self._delivered += 1
        self._emit(Sequenced(room, epoch, offset, text_message(text, published), nonce))

    # -- incoming ---------------------------------------------------------

    def _on_push(self, session: RedisSession, push: list[Any]) -> None:
        kind = push[0]
        if kind in MESSAGE_KINDS:
            self._on_message(push[1], push[2])
        elif kind in ACK_KINDS:
            self._on_ack(session, push[1])

    def _on_ack(self, session: RedisSession, channel: bytes) -> None:
        if channel not in session.inflight:
            # Not asked for: Redis Cluster unsubscribes a shard channel whose
            # slot moved to another node.
            self._on_dropped(channel)
            return
        pending = session.inflight.get(channel, 0) - 1
        session.unacked -= 1
        if pending > 0:
            session.inflight[channel] = pending
            return
        session.inflight.pop(channel, None)
        room = self._channel_rooms.get(channel)
        if room is not None:
            self._rooms[room].subscribed.set()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel in self._buses:
            self._on_bus(data)
            return
        room = self._channel_rooms.get(channel)
        if room is None:
            return  # unsubscribed meanwhile
        if data[:1] == b"b":
            self._on_broadcast(room, data)
            return
        try:
            offset, epoch, field, text = data.split(b"\n", 3)
            nonce, published = parse_nonce_field(field)
            self._deliver(
                room,
                self._rooms[room],
                epoch.decode(),
                int(offset),
                text.decode(),
                nonce,
                published,
            )
        except ValueError:
            logger.warning("%s: ignored a malformed message on %r", self.node_id, channel)

    def _on_broadcast(self, room: str, data: bytes) -> None:
        try:
            event = decode_node_event(data, room=room)
        except ValueError:
            logger.warning("%s: ignored a malformed broadcast %r", self.node_id, data[:80])
            return
        if event is None or event.node == self.node_id or not self._rooms[room].watched:
            return  # unknown, or our own echo: delivered here directly
        self._emit(event)

    def _on_bus(self, data: bytes) -> None:
        try:
            event: NodeEvent | None = decode_node_event(data)
        except ValueError:
            logger.warning("%s: ignored a malformed bus message %r", self.node_id, data[:80])
            return
        if event is None or event.node == self.node_id:
            return  # unknown, or our own echo: delivered here directly
        if not isinstance(event, (UserMessage, UserDisconnect, RoomBroadcast)):
            self._nodes.setdefault(event.node, 0)  # a presence event: the node is alive
        self._emit(event)

    # -- the session ------------------------------------------------------

    def _send_subscription(self, command: bytes, channels: list[bytes]) -> None:
        session = self._session
        if session is None:
            return  # the next session subscribes to every watched room
        try:
            for start in range(0, len(channels), SUBSCRIBE_CHUNK):
                chunk = channels[start : start + SUBSCRIBE_CHUNK]
                session.sub.send_command(command, *chunk)
                for channel in chunk:
                    session.inflight[channel] = session.inflight.get(channel, 0) + 1
                session.unacked += len(chunk)
        except (coredis.exceptions.RedisError, anyio.ClosedResourceError) as exc:
            # The connection is gone: the next session subscribes to everything.
            self._kick(session, f"{command.decode()} failed: {exc!r}")

    def _kick(self, session: RedisSession, reason: str) -> None:
        """End ``session`` (if it is still the current one)."""
        if self._session is session and not session.scope.cancel_called:
            self._last_error = reason
            session.scope.cancel()

    async def _supervise(self) -> None:
        delay = self._reconnect_initial
        outage_logged = False
        while True:
            try:
                with trio.CancelScope() as scope:
                    await self._session_run(scope)
                reason = self._last_error or "session ended"
            except Exception as exc:
                reason = describe(exc)
                self._last_error = reason
                if not is_link_error(exc):
                    logger.error("%s: Redis session failed", self.node_id, exc_info=exc)
            self._session_failures += 1
            held = self._session is not None and self._session.established
            self._end_session()
            if held:
                logger.warning("%s: lost Redis (%s); degraded, reconnecting", self.node_id, reason)
                # A session that held starts the backoff over.
                delay = self._reconnect_initial
                outage_logged = True
            elif not outage_logged:
                logger.warning("%s: cannot reach Redis (%s); degraded", self.node_id, reason)
                outage_logged = True
            else:
                logger.debug("%s: cannot reach Redis (%s)", self.node_id, reason)
            await trio.sleep(random.uniform(delay / 2, delay))
            if not held:
                delay = min(delay * 2, self._reconnect_max)

    def _end_session(self) -> None:
        was = self._session
        self._session = None
        if was is not None and was.established:
            self._degraded_since = trio.current_time()
            self._connected = trio.Event()
        # A lingering room is not resubscribed: it is simply gone.
        for room in self._lingering:
            self._forget(room)
        self._lingering.clear()
        for state in self._rooms.values():
            # Waiters on an unset event keep it: the next session sets it.
            if state.subscribed.is_set():
                state.subscribed = trio.Event()

    def _forget(self, room: str) -> None:
        state = self._rooms.pop(room, None)
        if state is not None:
            self._channel_rooms.pop(self._channel(room), None)
            state.subscribed.set()  # wakes position() waiters; they see it is gone

    async def _session_run(self, scope: trio.CancelScope) -> None:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            self.url,
            decode_responses=False,
            retry_policy=NoRetryPolicy(),
            stream_timeout=self._command_timeout,
            connect_timeout=self._command_timeout,
            client_name=f"chatcore:{self.node_id}",
        )
        # Connecting, loading the scripts and subscribing are bounded together
        # (a hung server accepts TCP connections but never answers).
        setup_deadline = trio.current_time() + max(2 * self._command_timeout, 1.0)
        async with client, AsyncExitStack() as stack:
            with trio.fail_at(setup_deadline):
                pool = client.connection_pool
                sub = await pool.get_connection()
                pub = await pool.get_connection()
                cmd = await pool.get_connection()
                session = RedisSession(client, sub, pub, cmd, {}, scope)
                for name in self._scripts:
                    await self._load_script(session, cmd, name)
                if self.ack.aof:
                    session.wait_command = await self._wait_command(cmd)
                self._session = session
                now_ms = await self._lease(session)
                session.grace_until_ms = now_ms + math.ceil(self._node_ttl * 1000)
                pushes = await stack.enter_async_context(aclosing(sub.push_messages))
                self._send_subscription(self._SUBSCRIBE, [*self._buses, *self._channel_rooms])
                buffered: list[list[Any]] = []
                while session.unacked > 0:
                    push = await pushes.__anext__()
                    if push[0] in MESSAGE_KINDS:
                        buffered.append(push)
                    else:
                        self._on_push(session, push)
            # Every watched room is subscribed: read what was missed, then
            # what arrived meanwhile (the hub drops what it already has).
            await self._catch_up(session)
            for push in buffered:
                self._on_push(session, push)
            session.established = True
            self._sessions += 1
            if self._degraded_since is not None:
                logger.info(
                    "%s: connected to Redis again after %.3f s without it",
                    self.node_id,
                    trio.current_time() - self._degraded_since,
                )
            self._degraded_since = None
            self._connected.set()
            if self._sessions > 1:
                # Bus messages (presence, directed) sent while this node was
                # away are gone, and peers may have dropped its connections
                # (lease expiry): the hub re-announces its presence and asks
                # the others for theirs.
                self._emit(Reconnected())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, session)
                nursery.start_soon(self._lease_loop, session)
                nursery.start_soon(self._publisher, session)
                nursery.start_soon(self._linger_loop, session)
                burst = push_buffer(sub)
                async for push in pushes:
                    self._on_push(session, push)
                    # Hand the hub everything that already arrived before
                    # yielding: its connections then send the burst as one
                    # frame each instead of one frame per message.
                    for _ in range(BURST):
                        try:
                            self._on_push(session, burst())
                        except anyio.WouldBlock:
                            break
                raise SessionLost("the subscription ended")

    async def _catch_up(self, session: RedisSession) -> None:
        # Rooms are read in rounds of concurrent (pipelined) reads; a room with
        # more to read than one read returns goes into the next round.
        todo = list(self._rooms)
        count = str(max(self.history.max_messages, 1))
        while todo:
            batch, todo = todo[:CATCH_UP_ROUND], todo[CATCH_UP_ROUND:]
            requests = []
            for room in batch:
                state = self._rooms.get(room)
                if state is None:
                    continue
                # From the last delivered offset (the hub dedupes); a room
                # with nothing delivered yet from the hub's known position.
                after = state.delivered or state.known
                request = session.cmd.create_request(
                    b"EVALSHA",
                    session.shas["read"],
                    2,
                    self._meta_key(room),
                    self._log_key(room),
                    secrets.token_hex(4),
                    state.epoch or "",
                    str(after),
                    "+",
                    count if state.epoch is not None else "0",
                    self._meta_ttl_ms,
                    timeout=self._command_timeout,
                )
                requests.append((room, state, request))
            for room, state, request in requests:
                reply = as_list(await request)
                if self._rooms.get(room) is not state:
                    continue
                epoch, offset = as_str(reply[0]), as_int(reply[1])
                if state.epoch is None:
                    # Never learnt: the hub reads its position after this.
                    state.epoch = epoch
                    state.known = offset
                    continue
                if epoch == state.epoch and offset < max(state.delivered, state.known):
                    # Redis is behind what this node already handed out (a
                    # replica promoted before it had everything, an old
                    # snapshot): the next offsets would be reused for other
                    # messages. The order is lost: end the epoch for everyone.
                    epoch = await self._end_rolled_back_epoch(session, room, state, offset)
                if epoch != state.epoch:
                    # A new order (Redis lost the old one): the hub is told,
                    # then gets the new epoch's messages from its start.
                    if self._observe_epoch(room, state, epoch):
                        todo.append(room)
                    continue
                raw_entries = as_list(reply[3])
                for entry_offset, _, text in parse_entries(raw_entries):
                    before = self._delivered
                    self._deliver(room, state, epoch, entry_offset, text, None)
                    self._caught_up += self._delivered - before
                if raw_entries and state.delivered < offset:
                    todo.append(room)

    async def _end_rolled_back_epoch(
        self, session: RedisSession, room: str, state: RoomState, offset: int
    ) -> str:
        """Replace the room's epoch if Redis still has it at ``offset``; the room's epoch now."""
        logger.warning(
            "%s: room %r went back in Redis (offset %d, %d handed out here): new epoch",
            self.node_id,
            room,
            offset,
            max(state.delivered, state.known),
        )
        reply = await self._request(
            session,
            session.cmd,
            "rollback",
            (self._meta_key(room), self._log_key(room)),
            (state.epoch or "", str(max(state.delivered, state.known)), secrets.token_hex(4)),
        )
        return as_str(reply)

    async def _lease(self, session: RedisSession) -> int:
        reply = as_list(
            await self._request(
                session,
                session.cmd,
                "lease",
                (self._nodes_key,),
                (self.node_id, str(math.ceil(self._node_ttl * 1000))),
            )
        )
        now_ms = as_int(reply[0])
        flat = as_list(reply[1])
        live = {as_str(flat[i]): int(float(as_str(flat[i + 1]))) for i in range(0, len(flat), 2)}
        live.pop(self.node_id, None)
        for node, expiry in list(self._nodes.items()):
            if node not in live and now_ms >= max(expiry, session.grace_until_ms):
                del self._nodes[node]
                logger.warning("%s: node %s is down (lease expired)", self.node_id, node)
                self._emit(NodeDown(node))
        self._nodes.update(live)
        return now_ms

    async def _lease_loop(self, session: RedisSession) -> None:
        while True:
            await trio.sleep(self._node_ttl / 3)
            await self._lease(session)

    async def _linger_loop(self, session: RedisSession) -> None:
        while True:
            await trio.sleep(self._linger / 2)
            now = trio.current_time()
            expired = [room for room, until in self._lingering.items() if until <= now]
            for room in expired:
                del self._lingering[room]
                self._forget(room)
            if expired:
                self._send_subscription(self._UNSUBSCRIBE, [self._channel(r) for r in expired])

    async def _heartbeat(self, session: RedisSession) -> None:
        # The subscription is otherwise silent while rooms are: a PING with a
        # deadline tells a dead or hung server from a quiet one.
        while True:
            await trio.sleep(self._heartbeat_interval)
            try:
                await session.sub.create_request(b"PING", timeout=self._command_timeout)
            except (coredis.exceptions.RedisError, TimeoutError, OSError) as exc:
                raise SessionLost(f"heartbeat failed: {exc!r}") from exc

    async def _publisher(self, session: RedisSession) -> None:
        while True:
            batch: list[PublishItem] = []
            while self._carry and len(batch) < self._publish_batch:
                batch.append(self._carry.popleft())
            if not batch:
                batch.append(await self._queue_receive.receive())
            while len(batch) < self._publish_batch:
                try:
                    batch.append(self._queue_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._publish_batch_to(session, batch)

    async def _publish_batch_to(self, session: RedisSession, batch: list[PublishItem]) -> None:
        pending = [item for item in batch if not item.abandoned]
        try:
            for attempt in range(2):
                sent_at = time.perf_counter()
                requests = []
                for item in pending:
                    request = session.pub.create_request(
                        b"EVALSHA",
                        session.shas["publish"],
                        2,
                        self._meta_key(item.room),
                        self._log_key(item.room),
                        *item.args,
                        timeout=self._command_timeout,
                    )
                    item.sent = True
                    requests.append((item, request))
                # WAIT / WAITAOF count what the connection wrote before them:
                # pipelined right behind the batch, one reply covers it all.
                replicated = self._send_wait(session) if requests else None
                unscripted = []
                sequenced = []
                for item, request in requests:
                    try:
                        reply = as_list(await request)
                    except coredis.exceptions.NoScriptError:
                        # Not run (the script cache was flushed): safe to resend.
                        item.sent = False
                        unscripted.append(item)
                    except coredis.exceptions.ResponseError as exc:
                        if (redirected := redirect_of(exc)) is not None:
                            # Not run (the slot is served elsewhere): the
                            # caller routes it again.
                            item.sent = False
                            item.fail(redirected)
                            self._on_redirect()
                        else:
                            item.fail(BackplaneError(f"Redis refused the publish: {exc}"))
                    else:
                        sequenced.append((item, as_str(reply[0]), as_int(reply[1])))
                confirmed = replicated is None or await self._confirmed(replicated)
                if requests:
                    took = time.perf_counter() - sent_at
                    self._round_trips[bisect.bisect_left(ROUND_TRIP_BOUNDS, took)] += 1
                    self._round_trip_seconds += took
                if not confirmed:
                    for item, _, _ in sequenced:
                        item.fail(
                            BackplaneError(
                                f"not confirmed by {self.ack.replicas} replica(s) within"
                                f" {self.ack.timeout} s: the message was sequenced but"
                                " may be lost if the primary fails"
                            )
                        )
                else:
                    for item, epoch, offset in sequenced:
                        item.resolve(epoch, offset)
                if not unscripted:
                    return
                if attempt == 0:
                    await self._load_script(session, session.pub, "publish")
                pending = unscripted
            for item in pending:
                item.fail(BackplaneError("Redis lost the publish script"))
        except (coredis.exceptions.RedisError, TimeoutError, OSError) as exc:
            raise SessionLost(f"publish failed: {exc!r}") from exc
        finally:
            # Not sent, and the caller still waits: the next session sends it.
            unsent = [
                item
                for item in batch
                if not item.done.is_set() and not item.sent and not item.abandoned
            ]
            self._carry.extendleft(reversed(unsent))
            for item in batch:
                if not item.done.is_set() and item.sent:
                    item.fail(
                        BackplaneError(
                            "the connection to Redis was lost: the message may have been sequenced"
                        )
                    )

    # -- acknowledgement modes -------------------------------------------

    def _send_wait(self, session: RedisSession) -> Awaitable[object] | None:
        """Pipeline ``WAIT`` (or ``WAITAOF``) behind a batch, if the mode asks for it."""
        if not self.ack.replicas and not self.ack.aof:
            return None
        timeout_ms = str(math.ceil(self.ack.timeout * 1000))
        args = (
            (b"WAITAOF", b"1", str(self.ack.replicas), timeout_ms)
            if session.wait_command == b"WAITAOF"
            else (b"WAIT", str(self.ack.replicas), timeout_ms)
        )
        return session.pub.create_request(*args, timeout=self._command_timeout + self.ack.timeout)

    async def _confirmed(self, replicated: Awaitable[object]) -> bool:
        """Whether the ``WAIT`` / ``WAITAOF`` reply says the batch is as safe as asked."""
        reply = await replicated
        if isinstance(reply, (list, tuple)):  # WAITAOF: [local fsyncs, replica fsyncs]
            return as_int(reply[0]) >= 1 and as_int(reply[1]) >= self.ack.replicas
        return as_int(reply) >= self.ack.replicas

    async def _wait_command(self, connection: coredis.BaseConnection) -> bytes:
        """``WAITAOF`` if the server has it (Redis 7.2+), else ``WAIT`` (and a warning)."""
        info = as_str(
            await connection.create_request(b"INFO", b"server", timeout=self._command_timeout)
        )
        fields = dict(line.partition(":")[::2] for line in info.splitlines())
        version = fields.get("redis_version", "0").strip()
        major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if major_minor >= (7, 2):
            return b"WAITAOF"
        logger.warning(
            "%s: Redis %s has no WAITAOF (7.2+): a publish waits for %d replica(s) with WAIT only",
            self.node_id,
            version,
            self.ack.replicas,
        )
        return b"WAIT"

    # -- hooks for Redis Cluster ------------------------------------------

    def _on_redirect(self) -> None:
        """A command was answered ``MOVED`` / ``ASK`` / ``TRYAGAIN`` / ``CLUSTERDOWN``."""

    def _on_dropped(self, channel: bytes) -> None:
        """Redis ended a subscription nobody asked to end (a slot moved away)."""
