"""The Redis backplane on a real Redis Cluster (3 primaries + 3 replicas on loopback).

End to end: three ``chatcore serve --redis-url redis+cluster://...``
processes (the example chat app) with members on each: one order for
concurrent publishers on all three, recovery with ``since`` on another
process, presence across processes, and the room's primary killed with
SIGKILL while members stay connected (``/healthz`` degraded, then ``ok``).

One cluster (``tests/redis_cluster.py``) serves the module; each test uses
its own key prefix. In process: the backplane contract
(:func:`chatcore.testing.check_backplane`) on the cluster, where rooms,
channels and the bus land, a primary killed with SIGKILL mid-stream (with and
without ``WAIT``: acknowledged messages lost are counted, 0 with ``WAIT``),
a slot migrated during traffic. The tests that kill a primary restart it
(it rejoins as a replica) and wait for a healthy cluster before they end.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from chatcore import Backplane, BackplaneError, BackplaneEvent, Sequenced
from chatcore.testing import BACKPLANE_CHECKS, check_backplane
from tests.test_redis_serve import (
    ROOM,
    STOP_TIMEOUT,
    Member,
    all_received,
    chatcore_serve,
    check_publisher_order,
    http_get,
    member,
    publish,
    publish_concurrently,
    wait_health,
)

if TYPE_CHECKING:
    from chatcore.redis import RedisClusterBackplane
    from tests.redis_cluster import RedisCluster

pytest_plugins = ("tests.redis_server", "tests.redis_cluster")

pytestmark = pytest.mark.slow


@asynccontextmanager
async def running(
    cluster: RedisCluster, nodes: int, **settings: Any
) -> AsyncIterator[list[RedisClusterBackplane]]:
    """``nodes`` cluster backplanes with one fresh prefix, running and connected."""
    from chatcore.redis import RedisBackplane, RedisClusterBackplane

    prefix = "t-" + secrets.token_hex(4)
    backplanes = []
    for i in range(nodes):
        backplane = RedisBackplane(
            cluster.url, node_id=f"n{i}", prefix=prefix, heartbeat_interval=0.1, **settings
        )
        assert isinstance(backplane, RedisClusterBackplane)
        backplanes.append(backplane)
    async with trio.open_nursery() as nursery:
        for backplane in backplanes:
            await nursery.start(backplane.run)
        with trio.fail_after(10):
            for backplane in backplanes:
                await backplane.wait_connected()
        yield backplanes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("check", BACKPLANE_CHECKS)
async def test_the_cluster_backplane_keeps_the_contract(
    check: str, redis_cluster: RedisCluster
) -> None:
    @asynccontextmanager
    async def open_cluster(nodes: int) -> AsyncIterator[Sequence[Backplane]]:
        async with running(redis_cluster, nodes) as backplanes:
            yield backplanes

    await check_backplane(open_cluster, nodes=3, checks=[check], check_timeout=10)


# -- where things land ----------------------------------------------------------------------


async def test_rooms_and_the_bus_are_spread_over_every_shard(redis_cluster: RedisCluster) -> None:
    async with running(redis_cluster, 1) as (node,):
        stats = node.statistics()
        assert len(stats.shards) == 3
        assert stats.degraded_shards == 0
        assert sum(shard.slots for shard in stats.shards) == 16384
        # The bus channels: every shard serves some of them.
        subscribed: dict[str, int] = {}
        for shard in node._shards:
            subscribed[f"{shard.address[1]}"] = len(shard._buses)
        assert sorted(subscribed.values())[0] >= 4, subscribed
        rooms = [f"room-{i}" for i in range(30)]
        for room in rooms:
            node.watch(room)
        for room in rooms:
            await node.position(room)  # waits for the room's subscription
        per_shard = [shard.watched_rooms for shard in node.statistics().shards]
        assert sum(per_shard) == 30, per_shard
        assert min(per_shard) > 0, per_shard
        # Redis agrees: each room's shard channel has one subscriber on its own primary.
        for room in rooms[:5]:
            primary = redis_cluster.primary_for(f"{node.prefix}:{{{room}}}:meta")
            assert primary is not None
            counts = primary.command("PUBSUB", "SHARDNUMSUB", f"{node.prefix}:{{{room}}}:ch")
            assert counts.split() == [f"{node.prefix}:{{{room}}}:ch", "1"], counts


# -- topology changes -----------------------------------------------------------------------


class Traffic:
    """Publishers on one node, a recorder (the hub's ordering) on another."""

    def __init__(self, publisher: RedisClusterBackplane, watcher: RedisClusterBackplane) -> None:
        from chatcore.testing import BackplaneRecorder

        self.publisher = publisher
        self.watcher = watcher
        self.room = "traffic-" + secrets.token_hex(4)
        self.recorder = BackplaneRecorder(watcher)
        watcher.attach(self.recorder)
        publisher.attach(BackplaneRecorder(publisher))
        #: offset -> the data acknowledged with it.
        self.acked: dict[int, int] = {}
        self.failed = 0
        self.acked_after_event = 0
        self.event_at: float | None = None
        self.first_ack_after: float | None = None
        self._count = 0
        self._acked = trio.Event()

    async def start(self) -> None:
        self.watcher.watch(self.room)
        self.recorder.follow(self.room, await self.watcher.position(self.room))

    async def publish(self, stop: trio.Event) -> None:
        while not stop.is_set():
            value = self._count
            self._count += 1
            sent_at = trio.current_time()
            try:
                position = await self.publisher.publish(self.room, "u", {"i": value}, None)
            except BackplaneError:
                self.failed += 1
                await trio.sleep(0.01)
                continue
            self.acked[position.offset] = value
            self._acked.set()
            self._acked = trio.Event()
            if self.event_at is not None and sent_at >= self.event_at:
                self.acked_after_event += 1
                if self.first_ack_after is None:
                    self.first_ack_after = trio.current_time()

    async def run_around(self, event: Any, before: int, after: int, tasks: int = 4) -> None:
        """Publish with ``tasks`` publishers; ``await event()`` after ``before`` acks."""
        stop = trio.Event()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(tasks):
                    nursery.start_soon(self.publish, stop)
                while len(self.acked) < before:
                    await self._acked.wait()
                self.event_at = trio.current_time()
                await event()
                while self.acked_after_event < after:
                    await self._acked.wait()
                stop.set()

    async def stored(self) -> dict[int, str]:
        """offset -> text of every message the room's shard has now."""
        with trio.fail_after(10):
            while True:
                try:
                    items = await self.watcher.recent(self.room, 10_000)
                    return {item.offset: item.message.text for item in items}
                except BackplaneError:
                    await trio.sleep(0.05)

    def lost(self, stored: dict[int, str]) -> list[int]:
        """Acknowledged offsets whose message is not what is stored there now."""
        return [
            offset
            for offset, value in self.acked.items()
            if f'"data":{{"i":{value}}}' not in stored.get(offset, "")
        ]

    async def delivered(self, upto: int) -> list[Sequenced]:
        """What the watcher emitted in order, once it has everything up to ``upto``."""
        recorder = self.recorder
        with trio.fail_after(10):
            while recorder.offsets(self.room)[-1:] != [upto]:
                if self.room in recorder.gaps:
                    await recorder.repair(self.room, upto)
                with trio.move_on_after(0.2):
                    await recorder.wait_for(lambda: self.room in recorder.gaps)
        return recorder.messages[self.room]


async def kill_a_primary_mid_stream(
    cluster: RedisCluster, **settings: Any
) -> tuple[list[int], int, float]:
    """SIGKILL the primary of a busy room.

    Returns the acknowledged offsets lost, the deliveries that differ from
    what is stored now, and the seconds from the kill to the first
    acknowledgement of a publish sent after it.
    """
    async with running(cluster, 2, **settings) as (publisher, watcher):
        traffic = Traffic(publisher, watcher)
        await traffic.start()
        key = f"{watcher.prefix}:{{{traffic.room}}}:meta"
        victim = cluster.primary_for(key)
        assert victim is not None

        async def kill() -> None:
            victim.kill()
            # The replica takes over; the old primary comes back as its
            # replica (until then WAIT 1 cannot be satisfied: with one
            # replica per shard, acknowledgements wait for it).
            with trio.fail_after(20):
                while await trio.to_thread.run_sync(cluster.primary_for, key) in (None, victim):
                    await trio.sleep(0.05)
            await cluster.restart(victim)

        await traffic.run_around(kill, before=150, after=150)
        stored = await traffic.stored()
        lost = traffic.lost(stored)
        delivered = await traffic.delivered(max(stored))
        # The hub's order: every offset once, consecutive.
        assert [m.offset for m in delivered] == list(range(1, max(stored) + 1))
        divergent = sum(stored.get(m.offset) != m.message.text for m in delivered)
        assert watcher.statistics().degraded_shards == 0
        assert publisher.statistics().topology_changes >= 2  # discovered, then failed over
    await cluster.wait_healthy()
    assert traffic.event_at is not None
    assert traffic.first_ack_after is not None
    recovery = traffic.first_ack_after - traffic.event_at
    print(
        f"{settings or 'no WAIT'}: acked {len(traffic.acked)}, lost {len(lost)},"
        f" divergent {divergent}, failed {traffic.failed}, recovered in {recovery:.2f} s"
    )
    return lost, divergent, recovery


async def test_a_killed_primary_loses_no_acknowledged_message_with_wait(
    redis_cluster: RedisCluster,
) -> None:
    lost, divergent, recovery = await kill_a_primary_mid_stream(redis_cluster, wait_replicas=1)
    assert lost == []
    assert divergent == 0
    assert recovery < 10


async def test_a_killed_primary_without_wait_keeps_the_order(redis_cluster: RedisCluster) -> None:
    # Asynchronous replication: what the replica had not received when the
    # primary died is gone although it was acknowledged (counted, not
    # required to be 0; the order is checked inside).
    _, _, recovery = await kill_a_primary_mid_stream(redis_cluster)
    assert recovery < 10


async def test_a_slot_migrated_during_traffic(redis_cluster: RedisCluster) -> None:
    async with running(redis_cluster, 2) as (publisher, watcher):
        traffic = Traffic(publisher, watcher)
        await traffic.start()
        key = f"{watcher.prefix}:{{{traffic.room}}}:meta"
        source = redis_cluster.primary_for(key)
        assert source is not None
        target = next(
            n
            for n in redis_cluster.nodes
            if n is not source and n.process is not None and redis_cluster.role(n) == "master"
        )
        slot = int(source.command("CLUSTER", "KEYSLOT", key))

        async def migrate() -> None:
            await trio.to_thread.run_sync(redis_cluster.migrate_slot, slot, source, target)

        await traffic.run_around(migrate, before=100, after=100)
        assert redis_cluster.primary_for(key) is target
        stored = await traffic.stored()
        assert traffic.lost(stored) == []
        delivered = await traffic.delivered(max(stored))
        assert [m.offset for m in delivered] == list(range(1, max(stored) + 1))
        assert all(stored[m.offset] == m.message.text for m in delivered)
        shard = next(s for s in watcher._shards if traffic.room in s._rooms)
        assert shard.address[1] == target.port
        print(f"migration: acked {len(traffic.acked)}, failed {traffic.failed}")


# -- chatcore serve processes ---------------------------------------------------------------


def present(m: Member) -> set[str]:
    """Who ``m`` was told is in ``ROOM`` (its presence_state, then every diff)."""
    users: set[str] = set()
    for message in m.received:
        if message.get("room") != ROOM:
            continue
        if message.get("type") == "presence_state":
            users = set(message["users"])
        elif message.get("type") == "presence_diff":
            users |= set(message["joins"])
            users -= set(message["leaves"])
    return users


async def test_three_processes_on_the_cluster_share_one_order_and_survive_a_failover(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    url = redis_cluster.url
    with trio.fail_after(90):
        async with (
            chatcore_serve(url, tmp_path) as a,
            chatcore_serve(url, tmp_path) as b,
            chatcore_serve(url, tmp_path) as c,
            trio.open_nursery() as nursery,
        ):
            servers = (a, b, c)
            for server in servers:
                await wait_health(server, "ok", within=10)
            groups = [
                [(await member(nursery, s.port, f"{name}{i}"))[0] for i in range(2)]
                for s, name in zip(servers, ("alice", "bob", "carol"), strict=True)
            ]
            everyone = [m for group in groups for m in group]

            # Presence across the three processes: everyone sees everyone.
            names = {m.user for m in everyone}
            for m in everyone:
                await m.wait_for(lambda m=m: present(m) == names)

            # Concurrent publishers on all three: one order for every member.
            jobs = [(group[0], 12, group[0].user) for group in groups]
            offsets = await publish_concurrently(jobs)
            sequence = await all_received(everyone, 36)
            assert sorted(offsets) == [o for o, *_ in sequence] == list(range(1, 37))
            check_publisher_order(sequence, [p.user for p, _, _ in jobs])

            # Recovery: leave A, miss 5 messages published on B, come back on C.
            leaver = groups[0][1]
            last_offset, epoch = leaver.last()
            assert await leaver.leave() == 1000
            everyone.remove(leaver)
            await publish(groups[1][0], 5, "missed")
            await all_received(everyone, 41)
            back, reply = await member(
                nursery, c.port, leaver.user, since={"epoch": epoch, "offset": last_offset}
            )
            assert reply == {"room": ROOM, "epoch": epoch, "offset": 41, "recovered": True}
            await back.wait_messages(5)
            assert [d["text"] for *_, d in back.room_messages()] == [
                f"missed-{i}" for i in range(5)
            ]
            everyone.append(back)

            # The room's primary is killed: every process is degraded (per
            # shard), then serves again on the promoted replica; members stay.
            victim = redis_cluster.primary_for(f"chatcore:{{{ROOM}}}:meta")
            assert victim is not None
            killed = trio.current_time()
            victim.kill()
            # /healthz says degraded (still ready: 200) and names the shard
            # that is down; the others serve on.
            reports = [await degraded_report(server, within=5) for server in servers]
            for report in reports:
                assert len(report["degraded_shards"]) == 1, report
            for server in servers:
                await wait_health(server, "ok", within=15)
            for server in servers:
                assert "degraded_shards" not in (await http_get(server.port, "/healthz"))[1]
            recovered = trio.current_time() - killed
            assert all(m.close_code is None for m in everyone)
            had = [len(m.room_messages()) for m in everyone]
            offsets = await publish_concurrently(
                [(groups[0][0], 4, "after-a"), (groups[2][0], 4, "after-c")]
            )
            assert sorted(offsets) == list(range(42, 50))
            for m, count in zip(everyone, had, strict=True):
                await m.wait_messages(count + 8)
            tails = [m.room_messages()[-8:] for m in everyone]
            assert all(t == tails[0] for t in tails)
            assert [o for o, *_ in tails[0]] == list(range(42, 50))
            print(f"serve: all three processes ok {recovered:.2f} s after the primary was killed")

            for server in servers:
                assert await server.stop() == 0
            for m in everyone:
                await m.wait_closed(STOP_TIMEOUT)
            assert {m.close_code for m in everyone} == {1012}
    await redis_cluster.restart(victim)
    await redis_cluster.wait_healthy()


async def test_a_shards_subscriptions_killed_during_traffic(redis_cluster: RedisCluster) -> None:
    async with running(redis_cluster, 2) as (publisher, watcher):
        traffic = Traffic(publisher, watcher)
        await traffic.start()
        primary = redis_cluster.primary_for(f"{watcher.prefix}:{{{traffic.room}}}:meta")
        assert primary is not None
        before = [s.sessions for s in watcher.statistics().shards]

        async def kill_subscriptions() -> None:
            killed = await trio.to_thread.run_sync(
                primary.command, "CLIENT", "KILL", "TYPE", "pubsub"
            )
            assert int(killed) >= 2  # both nodes' subscriptions on that shard

        await traffic.run_around(kill_subscriptions, before=100, after=100)
        stored = await traffic.stored()
        assert traffic.lost(stored) == []
        delivered = await traffic.delivered(max(stored))
        assert [m.offset for m in delivered] == list(range(1, max(stored) + 1))
        assert all(stored[m.offset] == m.message.text for m in delivered)
        # Only the shard whose subscriptions were killed started a new session.
        after = [s.sessions for s in watcher.statistics().shards]
        assert sum(a - b for a, b in zip(after, before, strict=True)) == 1, (before, after)
        assert watcher.statistics().degraded_shards == 0


class EventLog:
    """A sink keeping every event as it arrived (no ordering of its own)."""

    def __init__(self) -> None:
        self.events: list[BackplaneEvent] = []
        self._changed = trio.lowlevel.ParkingLot()

    def backplane_event(self, event: BackplaneEvent) -> None:
        self.events.append(event)
        self._changed.unpark_all()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.park()


async def test_a_room_that_went_back_in_redis_gets_a_new_epoch(
    redis_cluster: RedisCluster,
) -> None:
    # What a promoted replica that missed the newest messages looks like:
    # the room's offset and stream are behind what the nodes handed out.
    from chatcore import RoomReset

    async with running(redis_cluster, 2) as (publisher, watcher):
        room = "rollback-" + secrets.token_hex(4)
        sink = EventLog()
        events = sink.events
        watcher.attach(sink)
        watcher.watch(room)
        first = await watcher.position(room)
        for i in range(5):
            await publisher.publish(room, "u", {"i": i}, None)
        with trio.fail_after(5):
            await sink.wait_for(lambda: sum(isinstance(e, Sequenced) for e in events) == 5)
        primary = redis_cluster.primary_for(f"{watcher.prefix}:{{{room}}}:meta")
        assert primary is not None
        prefix = f"{watcher.prefix}:{{{room}}}"
        assert primary.command("HSET", f"{prefix}:meta", "o", "3") == "0"
        assert primary.command("XDEL", f"{prefix}:log", "4-0", "5-0") == "2"
        # The watcher's sessions end (as on a failover) and catch up.
        primary.command("CLIENT", "KILL", "TYPE", "pubsub")
        with trio.fail_after(10):
            await sink.wait_for(lambda: any(isinstance(e, RoomReset) for e in events))
        position = await watcher.position(room)
        assert position.epoch != first.epoch
        assert position.offset == 0
        # The next message starts the new epoch for every node.
        again = await publisher.publish(room, "u", {"i": 5}, None)
        assert (again.epoch, again.offset) == (position.epoch, 1)
        assert watcher.statistics().room_resets == 1


# -- URLs (no Redis needed) -----------------------------------------------------------------


def test_the_url_picks_the_implementation_and_carries_the_acknowledgement_mode() -> None:
    from chatcore.redis import RedisBackplane, RedisClusterBackplane

    single = RedisBackplane("redis://127.0.0.1:6379/0?wait_replicas=2&wait_timeout=0.25")
    assert type(single) is RedisBackplane
    assert single.url == "redis://127.0.0.1:6379/0"
    assert (single.ack.replicas, single.ack.timeout, single.ack.aof) == (2, 0.25, False)
    cluster = RedisBackplane("rediss+cluster://u:pw@h1:7000,[::1]:7001/0?wait_aof=1", node_id="x")
    assert isinstance(cluster, RedisClusterBackplane)
    assert cluster.node_id == "x"
    assert cluster.ack.aof
    assert cluster.target.seeds == (("h1", 7000), ("::1", 7001))
    assert cluster.target.node_url("::1", 7001) == "rediss://u:pw@[::1]:7001/0"
    assert cluster.target.node_url("h2", 7002) == "rediss://u:pw@h2:7002/0"
    # An explicit argument wins over the URL.
    assert RedisBackplane("redis+cluster://h:1?wait_replicas=1", wait_replicas=0).ack.replicas == 0
    assert repr(cluster).startswith("<RedisClusterBackplane x shards=0")


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://host",
        "redis+cluster://host:0",
        "redis+cluster://host:port",
        "redis+cluster://h:1,:2",
        "redis://h:1?wait_replicas=-1",
        "redis://h:1?wait_timeout=0",
        "redis://h:1?wait_replicas=many",
    ],
)
def test_a_malformed_url_is_refused(url: str) -> None:
    from chatcore.redis import RedisBackplane

    with pytest.raises(ValueError, match=r"Cluster seed|Cluster URL|wait_|acknowledgement"):
        RedisBackplane(url)


def test_the_bus_channels_cover_the_slot_space_evenly() -> None:
    from coredis._utils import hash_slot

    from chatcore.redis._cluster import BUS_CHANNELS, BUS_TAGS

    slots = [hash_slot(tag.encode()) for tag in BUS_TAGS]
    assert [slot * BUS_CHANNELS // 16384 for slot in slots] == list(range(BUS_CHANNELS))


async def test_calls_before_run_fail_clearly() -> None:
    from chatcore.redis import RedisBackplane

    backplane = RedisBackplane("redis+cluster://127.0.0.1:1")
    with pytest.raises(BackplaneError, match="not running"):
        await backplane.publish("r", None, {}, None)
    backplane.watch("r")  # remembered until the topology is known
    assert backplane.statistics().watched_rooms == 1
    backplane.unwatch("r")
    assert backplane.statistics().watched_rooms == 0
    assert backplane.degraded


async def test_a_publish_not_confirmed_by_enough_replicas_fails_but_is_sequenced(
    redis_cluster: RedisCluster,
) -> None:
    # One replica per shard: WAIT 2 can never be satisfied.
    async with running(redis_cluster, 2, wait_replicas=2, wait_timeout=0.2) as (
        publisher,
        watcher,
    ):
        room = "unconfirmed-" + secrets.token_hex(4)
        sink = EventLog()
        watcher.attach(sink)
        watcher.watch(room)
        await watcher.position(room)
        with pytest.raises(BackplaneError, match="not confirmed by 2 replica"):
            await publisher.publish(room, "u", {"i": 1}, None)
        # It was sequenced: every watching node receives it, and it is stored.
        with trio.fail_after(5):
            await sink.wait_for(lambda: any(isinstance(e, Sequenced) for e in sink.events))
        assert [m.offset for m in await watcher.recent(room, 10)] == [1]
        assert publisher.statistics().publish_failures == 1


class FakeConnection:
    """Answers ``INFO server`` with a given version (for the WAITAOF choice)."""

    def __init__(self, version: str) -> None:
        self.version = version

    async def create_request(self, *args: Any, **kwargs: Any) -> bytes:
        assert args == (b"INFO", b"server")
        return f"# Server\r\nredis_version:{self.version}\r\nredis_mode:cluster\r\n".encode()


@pytest.mark.parametrize(
    ("version", "command"),
    [("7.0.15", b"WAIT"), ("7.2.4", b"WAITAOF"), ("8.0.0", b"WAITAOF"), ("6.2.6", b"WAIT")],
)
async def test_waitaof_is_used_only_where_the_server_has_it(
    version: str, command: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    from chatcore.redis import RedisBackplane

    backplane = RedisBackplane("redis://127.0.0.1:1?wait_replicas=1&wait_aof=1")
    chosen = await backplane._wait_command(FakeConnection(version))  # type: ignore[arg-type]
    assert chosen == command
    assert ("has no WAITAOF" in caplog.text) is (command == b"WAIT")


@pytest.mark.parametrize(
    ("reply", "confirmed"),
    [(1, True), (0, False), (2, True), ([1, 1], True), ([0, 1], False), ([1, 0], False)],
)
async def test_the_wait_reply_decides_the_acknowledgement(reply: Any, confirmed: bool) -> None:
    from chatcore.redis import RedisBackplane

    backplane = RedisBackplane("redis://127.0.0.1:1", wait_replicas=1)

    async def answer() -> Any:
        return reply

    assert await backplane._confirmed(answer()) is confirmed


async def test_without_a_reachable_node_calls_fail_within_the_request_timeout() -> None:
    import socket

    from chatcore.redis import RedisBackplane

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backplane = RedisBackplane(
        f"redis+cluster://127.0.0.1:{port}", request_timeout=0.3, command_timeout=0.2
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(backplane.run)
        with pytest.raises(RuntimeError, match="already running"):
            await backplane.run()
        backplane.watch("r")
        started = trio.current_time()
        with pytest.raises(BackplaneError):
            await backplane.publish("r", None, {}, None)
        assert trio.current_time() - started < 1.0
        stats = backplane.statistics()
        assert stats.degraded
        assert stats.shards == ()
        assert stats.watched_rooms == 1  # remembered for when the cluster answers
        assert stats.topology_refreshes >= 1
        assert "no Redis Cluster node answered" in (stats.last_error or "")
        nursery.cancel_scope.cancel()


async def degraded_report(server: Any, within: float) -> dict[str, Any]:
    """The first ``/healthz`` body that says ``degraded`` (answered 200: still ready)."""
    with trio.fail_after(within):
        while True:
            status, body = await http_get(server.port, "/healthz")
            if body["status"] == "degraded":
                assert status == 200
                return body
            await trio.sleep(0.05)
