"""The Redis backplane on Redis Cluster: one supervised session per shard.

Theory of operation
-------------------

Rule 1: **a room lives on one shard.** A room's keys and its channel share
the hash tag ``{<room>}``, so they are in one slot: the sequencing script runs
on the primary serving that slot and publishes the message there with
``SPUBLISH`` (sharded pub/sub: a shard channel's messages go only to that
shard's subscribers, so adding shards adds publish and fan-out capacity,
where plain ``PUBLISH`` would be broadcast to every node of the cluster).

Rule 2: **each shard is one single-Redis backplane.** A
:class:`ShardBackplane` is a :class:`~chatcore.redis.RedisBackplane` bound to
one shard's primary, using ``SSUBSCRIBE``/``SPUBLISH``: it keeps the rules of
the single-Redis backplane (subscribe first, then catch up from the streams;
heartbeat and reply deadlines; degraded and reconnecting with backoff) for
the rooms whose slots that shard serves. A shard that fails is degraded on
its own; rooms on the other shards carry on.

Rule 3: **the topology is read, never guessed.** The cluster backplane asks
any reachable node for ``CLUSTER SLOTS`` at start, whenever a shard's session
ends, whenever a command is redirected (``MOVED``, ``ASK``, ``TRYAGAIN``,
``CLUSTERDOWN``) or a shard channel is unsubscribed by Redis (its slot left),
and every few seconds (a few times a second while a shard is degraded). A
shard is known by its nodes' ids, so a promoted replica is the same shard at a
new address: its backplane reconnects there and catches up. When a slot
moves, the watched rooms in it move to their new shard's backplane with what
this node knows of them (epoch, last offset delivered), and that backplane
resubscribes and catches up: nothing is lost, the hub drops what it already
has, and gaps are filled from the streams.

Rule 4: **a redirected call is routed again.** A command that Redis refused
with a redirection did not run, so a publish, position, replay or recent
read is sent again to the slot's owner (within ``request_timeout``).

Rule 5: **the bus is spread.** Directed messages and presence go over
``BUS_CHANNELS`` shard channels whose slots are spread evenly over the slot
space: a user's messages always take the channel of the user's hash (so
they stay in order), a node's presence events the channel of the node's
hash. Every node subscribes to all of them, on the shards that serve them.

Rule 6: **leases are cluster-wide.** The node leases are one sorted set in one
slot; the shard serving it refreshes and reaps them for this node.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import coredis
import trio
from coredis._utils import crc16, hash_slot
from coredis.retry import NoRetryPolicy

from .._backplane import BackplaneError, BackplaneSink, Position, Sequenced
from ..sansio import (
    OutboundMessage,
    PresenceEvent,
    UserDisconnect,
    UserMessage,
    encode_node_event,
)
from ._backplane import RedisBackplane
from ._records import (
    Redirected,
    RedisBackplaneStatistics,
    RedisSession,
    ShardStatistics,
    as_int,
    as_list,
    as_str,
    describe,
)
from ._scripts import SCRIPTS
from ._url import ClusterURL, parse_cluster_url

__all__ = ["BUS_CHANNELS", "RedisClusterBackplane", "ShardBackplane"]

logger = logging.getLogger("chatcore.redis")

SLOTS: Final = 16_384
#: Bus channels (directed messages, presence), spread evenly over the slots.
BUS_CHANNELS: Final = 16
#: Seconds between topology reads while every shard is connected, and while one is not.
REFRESH_IDLE: Final = 5.0
REFRESH_DEGRADED: Final = 0.1

#: The publish script with the room's message on its shard channel.
SHARDED_SCRIPTS: Final = {
    **SCRIPTS,
    "publish": SCRIPTS["publish"].replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"),
}
assert SHARDED_SCRIPTS["publish"] != SCRIPTS["publish"], "the publish script has no PUBLISH"

_T = TypeVar("_T")


def _bus_tags() -> list[str]:
    # Tag k hashes into the k-th of BUS_CHANNELS equal slot ranges, so the
    # channels land on different shards of any evenly split cluster.
    tags = []
    for k in range(BUS_CHANNELS):
        low, high = k * SLOTS // BUS_CHANNELS, (k + 1) * SLOTS // BUS_CHANNELS
        i = 0
        while not low <= hash_slot(f"bus.{k}.{i}".encode()) < high:
            i += 1
        tags.append(f"bus.{k}.{i}")
    return tags


BUS_TAGS: Final = _bus_tags()


def _overlap(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> int:
    """How many slots two lists of ``(first, last)`` ranges share."""
    return sum(
        max(0, min(last1, last2) - max(first1, first2) + 1)
        for first1, last1 in a
        for first2, last2 in b
    )


class ShardBackplane(RedisBackplane):
    """The backplane of one shard of a Redis Cluster (see the module docs, Rule 2).

    Made and driven by :class:`RedisClusterBackplane`; not for direct use.
    """

    _SUBSCRIBE = b"SSUBSCRIBE"
    _UNSUBSCRIBE = b"SUNSUBSCRIBE"
    _PUBLISH = b"SPUBLISH"
    _scripts = SHARDED_SCRIPTS

    def __init__(
        self, cluster: RedisClusterBackplane, address: tuple[str, int], **settings: Any
    ) -> None:
        super().__init__(cluster.target.node_url(*address), **settings)
        #: The backplane this shard belongs to.
        self.cluster = cluster
        #: The primary's (host, port).
        self.address = address
        #: Ids of the shard's nodes (primary and replicas): how a promoted
        #: replica is recognised as the same shard.
        self.node_ids: set[str] = set()
        #: The slot ranges it serves, ``(first, last)``.
        self.ranges: tuple[tuple[int, int], ...] = ()
        #: Whether this shard holds the node leases' slot (Rule 6).
        self.holds_lease = False
        # Cancelled when the shard leaves the cluster.
        self.scope = trio.CancelScope()
        self._buses = set()
        # Shared with the cluster: the nodes known alive.
        self._nodes = cluster._nodes

    def __repr__(self) -> str:
        return (
            f"<ShardBackplane {self.address[0]}:{self.address[1]}"
            f" {'DEGRADED' if self.degraded else 'CONNECTED'} rooms={len(self._rooms)}>"
        )

    def move_to(self, address: tuple[str, int]) -> None:
        """Reconnect to the shard's new primary (a replica was promoted)."""
        self.address = address
        self.url = self.cluster.target.node_url(*address)
        self.restart(f"the shard's primary is now {address[0]}:{address[1]}")

    def restart(self, reason: str) -> None:
        """End the current session: the next one subscribes and catches up everything."""
        if self._session is not None:
            self._kick(self._session, reason)

    def shard_statistics(self) -> ShardStatistics:
        """This shard's part of :meth:`RedisClusterBackplane.statistics`."""
        stats = self.statistics()
        return ShardStatistics(
            address=f"{self.address[0]}:{self.address[1]}",
            slots=sum(last - first + 1 for first, last in self.ranges),
            connected=stats.connected,
            degraded_for=stats.degraded_for,
            sessions=stats.sessions,
            session_failures=stats.session_failures,
            last_error=stats.last_error,
            watched_rooms=stats.watched_rooms,
            published=stats.published,
            delivered=stats.delivered,
        )

    # -- the single-Redis backplane's hooks -------------------------------

    def _send_subscription(self, command: bytes, channels: list[bytes]) -> None:
        # One SSUBSCRIBE names channels of one slot only.
        by_slot: dict[int, list[bytes]] = {}
        for channel in channels:
            by_slot.setdefault(hash_slot(channel), []).append(channel)
        for group in by_slot.values():
            super()._send_subscription(command, group)

    async def _lease(self, session: RedisSession) -> int:
        if not self.holds_lease:
            return 0
        return await super()._lease(session)

    def _end_session(self) -> None:
        super()._end_session()
        self.cluster.refresh_soon()

    def _on_redirect(self) -> None:
        self.cluster.refresh_soon()

    def _on_dropped(self, channel: bytes) -> None:
        if channel in self._channel_rooms or channel in self._buses:
            self.cluster.refresh_soon()


class RedisClusterBackplane(RedisBackplane):
    """The Redis backplane on a Redis Cluster (7.0+) with sharded pub/sub.

    ``RedisBackplane("redis+cluster://HOST:PORT,...")`` makes one; the
    arguments are those of :class:`RedisBackplane`. See the module docs of
    ``chatcore.redis._cluster`` (rules) and ``docs/scale-out.md``.

    :attr:`degraded` is true while any shard is (its rooms cannot publish);
    :meth:`statistics` has one :class:`~chatcore.redis.ShardStatistics` per
    shard in ``shards``.

    Raises:
        ValueError: the URL is malformed, or a bound is not positive.
    """

    def __init__(self, url: str = "redis+cluster://127.0.0.1:7000", **settings: Any) -> None:
        super().__init__(url, **settings)
        #: The parsed cluster URL (its acknowledgement options were taken out).
        self.target: ClusterURL = parse_cluster_url(self.url)
        self._settings = {
            **settings,
            "node_id": self.node_id,
            "history": self.history,
            "wait_replicas": self.ack.replicas,
            "wait_timeout": self.ack.timeout,
            "wait_aof": self.ack.aof,
        }
        self._shards: list[ShardBackplane] = []
        # slot -> the shard serving it (None: not served, or not known yet).
        self._owners: list[ShardBackplane | None] = [None] * SLOTS
        # Rooms watched before the topology was known.
        self._pending: set[str] = set()
        self._bus_channels = [f"{self.prefix}:{{{tag}}}:bus".encode() for tag in BUS_TAGS]
        self._topology_known = trio.Event()
        self._refresh_wanted = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._refreshes = 0
        self._topology_changes = 0
        self._redirects = 0

    def __repr__(self) -> str:
        degraded = sum(shard.degraded for shard in self._shards)
        return (
            f"<RedisClusterBackplane {self.node_id}"
            f" shards={len(self._shards)} degraded={degraded}"
            f" rooms={sum(len(shard._rooms) for shard in self._shards)}>"
        )

    # -- Backplane --------------------------------------------------------

    def attach(self, sink: BackplaneSink) -> None:
        """See :meth:`Backplane.attach`."""
        self._sink = sink
        for shard in self._shards:
            shard.attach(sink)

    @property
    def degraded(self) -> bool:
        """True while the topology is unknown or any shard has no session."""
        return not self._shards or any(shard.degraded for shard in self._shards)

    @property
    def degraded_parts(self) -> tuple[str, ...]:
        """The shards (``host:port`` of their primary) without a session now.

        ``("topology",)`` while the cluster's topology is not known yet. The
        health endpoint lists them (``degraded_shards``).
        """
        if not self._shards:
            return ("topology",)
        return tuple(
            f"{shard.address[0]}:{shard.address[1]}" for shard in self._shards if shard.degraded
        )

    def statistics(self) -> RedisBackplaneStatistics:
        """A snapshot: the shards' counters summed, and each shard's state in ``shards``."""
        parts = [shard.statistics() for shard in self._shards]
        since = [p.degraded_for for p in parts if p.degraded_for is not None]
        errors = [p.last_error for p in parts if p.last_error is not None]
        return RedisBackplaneStatistics(
            node_id=self.node_id,
            connected=not self.degraded,
            degraded=self.degraded,
            degraded_for=max(since) if since else None,
            sessions=sum(p.sessions for p in parts),
            session_failures=sum(p.session_failures for p in parts),
            last_error=errors[-1] if errors else self._last_error,
            watched_rooms=sum(p.watched_rooms for p in parts) + len(self._pending),
            queued_publishes=sum(p.queued_publishes for p in parts),
            published=sum(p.published for p in parts),
            publish_failures=sum(p.publish_failures for p in parts),
            delivered=sum(p.delivered for p in parts),
            caught_up=sum(p.caught_up for p in parts),
            duplicates=sum(p.duplicates for p in parts),
            stale=sum(p.stale for p in parts),
            room_resets=sum(p.room_resets for p in parts),
            nodes=len(self._nodes),
            shards=tuple(shard.shard_statistics() for shard in self._shards),
            degraded_shards=sum(p.degraded for p in parts),
            topology_refreshes=self._refreshes,
            topology_changes=self._topology_changes,
            redirects=self._redirects,
            round_trips=tuple(
                sum(column) for column in zip(*(p.round_trips for p in parts), strict=True)
            )
            if parts
            else (),
            round_trip_seconds=sum(p.round_trip_seconds for p in parts),
        )

    async def wait_connected(self) -> None:
        """Wait until the topology is known and every shard has a session.

        Cancellation: just stops waiting.
        """
        await self._topology_known.wait()
        while self.degraded:
            for shard in list(self._shards):
                await shard.wait_connected()
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Discover the cluster, run one session per shard, follow the topology.

        Signals ``task_status.started()`` at once, before Redis is reached.

        Raises:
            RuntimeError: it is already running.

        Cancellation: closes every connection; queued publishes fail with
        :class:`~chatcore.BackplaneError`.
        """
        if self._running:
            raise RuntimeError("RedisBackplane.run() is already running")
        self._running = True
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._follow_topology()
        finally:
            self._running = False
            self._nursery = None

    async def publish(
        self, room: str, sender: str | None, data: Any, nonce: str | None
    ) -> Position:
        """Sequence a room message on its shard (see :meth:`RedisBackplane.publish`)."""
        return await self._routed(room, lambda shard: shard.publish(room, sender, data, nonce))

    async def position(self, room: str) -> Position:
        """The room's position, from its shard (see :meth:`RedisBackplane.position`)."""
        return await self._routed(room, lambda shard: shard.position(room))

    async def replay(self, room: str, epoch: str, after: int, upto: int) -> list[Sequenced] | None:
        """Stored messages of a room, from its shard (see :meth:`RedisBackplane.replay`)."""
        return await self._routed(room, lambda shard: shard.replay(room, epoch, after, upto))

    async def recent(self, room: str, limit: int) -> list[Sequenced]:
        """A room's newest stored messages (see :meth:`RedisBackplane.recent`)."""
        return await self._routed(room, lambda shard: shard.recent(room, limit))

    def watch(self, room: str) -> None:
        """Subscribe to ``room``'s shard channel on its shard (see :meth:`RedisBackplane.watch`)."""
        holder = self._holder(room)
        if holder is not None:
            holder.watch(room)
            return
        shard = self._owner(room)
        if shard is None:
            self._pending.add(room)
        else:
            shard.watch(room)

    def unwatch(self, room: str) -> None:
        """Stop delivering ``room`` here (see :meth:`RedisBackplane.unwatch`)."""
        self._pending.discard(room)
        holder = self._holder(room)
        if holder is not None:
            holder.unwatch(room)

    async def broadcast(self, room: str, message: OutboundMessage, exclude: str | None) -> None:
        """Deliver outside the room's order (see :meth:`RedisBackplane.broadcast`)."""
        await self._routed(room, lambda shard: shard.broadcast(room, message, exclude))

    async def send_to_user(self, user: str, message: OutboundMessage) -> None:
        """Deliver to every connection of ``user`` (see :meth:`RedisBackplane.send_to_user`)."""
        event = UserMessage(self.node_id, user, message)
        self._emit(event)
        await self._bus_publish(user, encode_node_event(event))

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        """Close every connection of ``user`` (see :meth:`RedisBackplane.disconnect_user`)."""
        event = UserDisconnect(self.node_id, user, code, reason)
        self._emit(event)
        await self._bus_publish(user, encode_node_event(event))

    async def publish_presence(self, event: PresenceEvent) -> None:
        """Tell the other nodes about a presence change (on this node's bus channel)."""
        await self._bus_publish(self.node_id, encode_node_event(event))

    # -- routing ----------------------------------------------------------

    def _owner(self, room: str) -> ShardBackplane | None:
        return self._owners[hash_slot(self._channel(room))]

    def _holder(self, room: str) -> ShardBackplane | None:
        """The shard that has the room's state (normally its owner)."""
        for shard in self._shards:
            if room in shard._rooms:
                return shard
        return None

    def _bus_channel(self, key: str) -> bytes:
        return self._bus_channels[crc16(key.encode()) % BUS_CHANNELS]

    async def _bus_publish(self, key: str, payload: bytes) -> None:
        channel = self._bus_channel(key)

        def send(shard: ShardBackplane) -> Awaitable[None]:
            return shard._publish_raw(channel, payload)

        await self._routed_slot(hash_slot(channel), send)

    async def _routed(self, room: str, call: Callable[[ShardBackplane], Awaitable[_T]]) -> _T:
        return await self._routed_slot(hash_slot(self._channel(room)), call)

    async def _routed_slot(self, slot: int, call: Callable[[ShardBackplane], Awaitable[_T]]) -> _T:
        """Run ``call`` on the slot's shard; again on its new owner after a redirection."""
        if not self._running:
            raise BackplaneError("the Redis backplane is not running")
        deadline = trio.current_time() + self._request_timeout
        while True:
            with trio.move_on_at(deadline):
                await self._topology_known.wait()
            shard = self._owners[slot]
            if shard is None:
                self.refresh_soon()
                if trio.current_time() >= deadline:
                    raise BackplaneError(f"no Redis Cluster shard serves slot {slot}")
                await trio.sleep(min(REFRESH_DEGRADED, max(deadline - trio.current_time(), 0)))
                continue
            try:
                return await call(shard)
            except Redirected:
                self._redirects += 1
                if trio.current_time() >= deadline:
                    raise
                # The slot is moving or moved: wait for the topology to say
                # where (a migrating slot finishes within milliseconds).
                await trio.sleep(REFRESH_DEGRADED / 2)

    # -- the topology -----------------------------------------------------

    def refresh_soon(self) -> None:
        """Read the topology again now (a shard failed, or a command was redirected)."""
        self._refresh_wanted.set()

    async def _follow_topology(self) -> None:
        unread = 0  # failed reads in a row: only the first is a warning
        while True:
            try:
                slots = await self._read_slots()
            except Exception as exc:
                self._last_error = describe(exc)
                logger.log(
                    logging.DEBUG if unread else logging.WARNING,
                    "%s: cannot read the Redis Cluster topology (%s)",
                    self.node_id,
                    self._last_error,
                )
                unread += 1
            else:
                unread = 0
                await self._apply(slots)
            period = REFRESH_DEGRADED if self.degraded else REFRESH_IDLE
            with trio.move_on_after(period):
                await self._refresh_wanted.wait()
            self._refresh_wanted = trio.Event()
            # At most a few reads a second, however many shards complain.
            await trio.sleep(REFRESH_DEGRADED / 2)

    def _candidates(self) -> list[tuple[str, int]]:
        known = [shard.address for shard in self._shards]
        return list(dict.fromkeys([*known, *self.target.seeds]))

    async def _read_slots(self) -> list[Any]:
        """``CLUSTER SLOTS`` from the first node that answers."""
        self._refreshes += 1
        errors = []
        for host, port in self._candidates():
            client: coredis.Redis[bytes] = coredis.Redis.from_url(
                self.target.node_url(host, port),
                decode_responses=False,
                retry_policy=NoRetryPolicy(),
                stream_timeout=self._command_timeout,
                connect_timeout=self._command_timeout,
            )
            try:
                with trio.fail_after(2 * self._command_timeout):
                    async with client:
                        connection = await client.connection_pool.get_connection()
                        reply = await connection.create_request(
                            b"CLUSTER", b"SLOTS", timeout=self._command_timeout
                        )
                entries = as_list(reply)
                if entries:
                    return [(host, entry) for entry in entries]
                errors.append(f"{host}:{port}: no slots")
            except Exception as exc:  # any node may be down: try the next
                errors.append(f"{host}:{port}: {describe(exc)}")
        raise BackplaneError("no Redis Cluster node answered: " + "; ".join(errors))

    async def _apply(self, slots: list[Any]) -> None:
        """Make the shards, the slot table and the rooms follow ``CLUSTER SLOTS``."""
        groups: dict[str, tuple[tuple[str, int], set[str], list[tuple[int, int]]]] = {}
        for asked_host, entry in slots:
            first, last, primary = as_int(entry[0]), as_int(entry[1]), as_list(entry[2])
            host = as_str(primary[0]) or asked_host
            primary_id = as_str(primary[2])
            address, ids, ranges = groups.setdefault(
                primary_id, ((host, as_int(primary[1])), {primary_id}, [])
            )
            ids.update(as_str(as_list(replica)[2]) for replica in entry[3:])
            ranges.append((first, last))
        left = list(self._shards)
        shards = []
        changed = False
        for address, ids, ranges in groups.values():
            shard = (
                next((s for s in left if address == s.address), None)
                or next((s for s in left if s.node_ids & ids), None)
                or max(left, key=lambda s: _overlap(s.ranges, ranges), default=None)
            )
            if (
                shard is not None
                and not _overlap(shard.ranges, ranges)
                and shard.address != address
            ):
                shard = None  # shares nothing with it: a new shard
            if shard is None:
                shard = await self._start_shard(address)
                changed = True
            else:
                left.remove(shard)
                if shard.address != address:
                    logger.warning(
                        "%s: Redis Cluster shard %s:%d failed over to %s:%d",
                        self.node_id,
                        *shard.address,
                        *address,
                    )
                    shard.move_to(address)
                    changed = True
            shard.node_ids = ids
            if tuple(sorted(ranges)) != shard.ranges:
                changed = True
            shard.ranges = tuple(sorted(ranges))
            shards.append(shard)
        if not changed and not left:
            return
        self._topology_changes += 1
        owners: list[ShardBackplane | None] = [None] * SLOTS
        for shard in shards:
            for first, last in shard.ranges:
                owners[first : last + 1] = [shard] * (last - first + 1)
        self._owners = owners
        self._shards = shards
        # Rooms follow their slots, with what this node knows of them.
        for shard in [*shards, *left]:
            for room in list(shard._rooms):
                target = self._owner(room)
                if target is not None and target is not shard:
                    self._move_room(room, shard, target)
        for room in list(self._pending):
            if (target := self._owner(room)) is not None:
                self._pending.discard(room)
                target.watch(room)
        lease_slot = hash_slot(self._nodes_key.encode())
        for shard in shards:
            shard.holds_lease = owners[lease_slot] is shard
            buses = {ch for ch in self._bus_channels if owners[hash_slot(ch)] is shard}
            if buses != shard._buses:
                shard._buses = buses
                shard.restart("the shard's bus channels changed")
        for shard in left:
            logger.warning("%s: Redis Cluster shard %s:%d is gone", self.node_id, *shard.address)
            shard.scope.cancel()
        self._topology_known.set()

    def _move_room(self, room: str, source: ShardBackplane, target: ShardBackplane) -> None:
        state = source._rooms.pop(room)
        channel = self._channel(room)
        source._channel_rooms.pop(channel, None)
        lingering = source._lingering.pop(room, None)
        if not state.watched and lingering is not None:
            state.subscribed.set()
            return  # only lingering here: simply gone
        # Position waiters on the old event are woken; they wait again on the new.
        old, state.subscribed = state.subscribed, trio.Event()
        old.set()
        target._rooms[room] = state
        target._channel_rooms[channel] = room
        target.restart(f"room slot moved here from {source.address[0]}:{source.address[1]}")

    async def _start_shard(self, address: tuple[str, int]) -> ShardBackplane:
        shard = ShardBackplane(self, address, **self._settings)
        if self._sink is not None:
            shard.attach(self._sink)
        assert self._nursery is not None
        # Started (running, not yet connected) before any call is routed to it.
        await self._nursery.start(self._run_shard, shard)
        return shard

    async def _run_shard(
        self,
        shard: ShardBackplane,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with shard.scope:
            await shard.run(task_status=task_status)
