"""RedisBackplane against a real redis-server: the backplane contract, hubs on
separate backplanes, and Redis failures (crash, restart, hang, killed
subscriptions).

Every test starts its own ``redis-server`` on a free 127.0.0.1 port (see
``tests/redis_server.py``); tests run on the real clock with ``fail_after``
bounds and short backplane timeouts so faults are detected in well under a
second.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import coredis
import pytest
import trio

from chatcore import (
    BackplaneError,
    BackplaneEvent,
    HistoryConfig,
    Hub,
    HubConfig,
    Identity,
    NodeDown,
    Reconnected,
    RoomReset,
    Sequenced,
)
from chatcore._backplane import published_at
from chatcore._dispatch import sequence
from chatcore.metrics import ConnectionMetrics
from chatcore.redis import RedisBackplane
from chatcore.redis._records import ROUND_TRIP_BOUNDS, nonce_field, parse_nonce_field
from chatcore.sansio import (
    Delivery,
    HandshakeRequest,
    OutboundMessage,
    PresenceEvent,
    PresenceLeave,
    PresenceSync,
    Reject,
    RoomBroadcast,
    UserDisconnect,
    UserMessage,
    encode,
)
from chatcore.sansio._protocol import encode_message
from chatcore.testing import RequestFailed, TestClient, open_test_client

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

pytestmark = pytest.mark.slow

#: Short bounds, so faults are noticed and repaired within a test's budget.
FAST: dict[str, Any] = {
    "request_timeout": 1.0,
    "command_timeout": 0.4,
    "heartbeat_interval": 0.1,
    "reconnect_initial": 0.02,
    "reconnect_max": 0.2,
    "unsubscribe_linger": 0.2,
    "node_ttl": 3.0,
}


@attrs.define
class FakeSink:
    """Records what a backplane hands its hub (a :class:`~chatcore.BackplaneSink`).

    ``received`` is every room message as handed over (possibly repeated);
    ``delivered`` keeps each (room, epoch, offset) once, the first time it
    arrived, as the hub's sequencer would let it through.
    """

    received: list[Sequenced] = attrs.Factory(list)
    delivered: list[Sequenced] = attrs.Factory(list)
    to_users: list[tuple[str, OutboundMessage]] = attrs.Factory(list)
    disconnects: list[tuple[str, int, str]] = attrs.Factory(list)
    presence: list[PresenceEvent] = attrs.Factory(list)
    nodes_down: list[str] = attrs.Factory(list)
    resets: list[str] = attrs.Factory(list)
    broadcasts: list[tuple[str, OutboundMessage, str | None]] = attrs.Factory(list)
    resyncs: int = 0
    _last: dict[tuple[str, str], int] = attrs.Factory(dict)

    def backplane_event(self, event: BackplaneEvent) -> None:
        if isinstance(event, Sequenced):
            self.received.append(event)
            key = (event.room, event.epoch)
            if event.offset > self._last.get(key, 0):
                self._last[key] = event.offset
                self.delivered.append(event)
        elif isinstance(event, Reconnected):
            self.resyncs += 1
        elif isinstance(event, UserMessage):
            self.to_users.append((event.user, event.message))
        elif isinstance(event, UserDisconnect):
            self.disconnects.append((event.user, event.code, event.reason))
        elif isinstance(event, NodeDown):
            self.nodes_down.append(event.node)
        elif isinstance(event, RoomReset):
            self.resets.append(event.room)
        elif isinstance(event, RoomBroadcast):
            self.broadcasts.append((event.room, event.message, event.exclude))
        else:
            self.presence.append(event)

    def offsets(self, room: str, epoch: str | None = None) -> list[int]:
        return [
            d.offset
            for d in self.delivered
            if d.room == room and (epoch is None or d.epoch == epoch)
        ]


@attrs.define
class FlakySink(FakeSink):
    """A sink whose first room message raises (a hub bug)."""

    calls: int = 0

    def backplane_event(self, event: BackplaneEvent) -> None:
        if isinstance(event, Sequenced):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a hub bug")
        super().backplane_event(event)


@attrs.define
class Node:
    backplane: RedisBackplane
    sink: FakeSink


@asynccontextmanager
async def open_nodes(
    url: str, count: int, *, first: int = 0, **options: Any
) -> AsyncIterator[list[Node]]:
    """``count`` running backplanes (node ids n<first>, n<first+1>, ...), each connected."""
    settings = {**FAST, **options}
    async with trio.open_nursery() as nursery:
        nodes = []
        for i in range(count):
            backplane = RedisBackplane(url, node_id=f"n{first + i}", **settings)
            sink = FakeSink()
            backplane.attach(sink)
            await nursery.start(backplane.run)
            nodes.append(Node(backplane, sink))
        with trio.fail_after(5):
            for node in nodes:
                await node.backplane.wait_connected()
        yield nodes
        nursery.cancel_scope.cancel()


async def eventually(check: Callable[[], object], within: float = 5.0) -> float:
    """Poll ``check`` until true; returns how long it took."""
    start = trio.current_time()
    with trio.move_on_after(within):
        while not check():
            await trio.sleep(0.005)
        return trio.current_time() - start
    raise AssertionError(f"not true within {within} s")


def assert_in_order(sink: FakeSink, room: str, epoch: str) -> list[int]:
    """The room's offsets delivered in ``epoch``: strictly increasing, no duplicates."""
    offsets = sink.offsets(room, epoch)
    assert offsets == sorted(set(offsets)), f"out of order or duplicated: {offsets}"
    return offsets


async def raw_redis(server: RedisServer) -> coredis.Redis[bytes]:
    await trio.lowlevel.checkpoint()
    return coredis.Redis.from_url(server.url)


# -- import and construction -------------------------------------------------------


def test_missing_coredis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "chatcore.redis")
    monkeypatch.setitem(sys.modules, "coredis", None)
    with pytest.raises(ImportError, match=r"pip install 'chatcore\[redis\]'"):
        importlib.import_module("chatcore.redis")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"publish_batch": 0}, "publish_batch must be > 0"),
        ({"request_timeout": 0}, "request_timeout must be > 0"),
        ({"command_timeout": math.nan}, "command_timeout must be > 0"),
        ({"reconnect_max": -1}, "reconnect_max must be > 0"),
        ({"node_ttl": 0}, "node_ttl must be > 0"),
        ({"room_ttl": 0}, "room_ttl must be > 0"),
        ({"prefix": "a{b}"}, "prefix must be non-empty without braces"),
        ({"prefix": ""}, "prefix must be non-empty without braces"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisBackplane(**options)


async def test_calls_before_run_fail_with_backplane_error() -> None:
    backplane = RedisBackplane("redis://127.0.0.1:1")
    assert backplane.degraded
    with pytest.raises(BackplaneError):
        await backplane.publish("r", "u", 1, None)
    with pytest.raises(BackplaneError):
        await backplane.position("r")
    assert "STOPPED" in repr(backplane)


# -- the contract with one or more nodes ----------------------------------------------


@pytest.mark.parametrize(
    ("room", "sender", "data"),
    [
        ("lobby", "alice", {"text": "hello"}),
        (
            "a.b:c-d_e",
            None,
            ["é", "\u2028", "\n", '"\\'],
        ),
        ("r", "bob", {"nested": {"deep": [1, 2.5, -3e300, True, None]}, "ünï": "😀"}),
        ("r", "bob", "plain string"),
        ("r", "bob", 12345678901234567890),
    ],
)
async def test_message_text_is_byte_identical_to_encode_message(
    redis_server: RedisServer, room: str, sender: str | None, data: Any
) -> None:
    async with open_nodes(redis_server.url, 1) as [node]:
        node.backplane.watch(room)
        await node.backplane.position(room)
        position = await node.backplane.publish(room, sender, data, "nonce-1")
        await eventually(lambda: len(node.sink.delivered) == 1)
        [item] = node.sink.delivered
        expected = encode_message(room, position.offset, position.epoch, sender, data)
        assert item.message == expected
        assert item.message.nbytes == len(item.message.text.encode())
        assert (item.room, item.epoch, item.offset, item.nonce) == (
            room,
            position.epoch,
            position.offset,
            "nonce-1",
        )
        # The stored copy is the same text.
        [stored] = await node.backplane.replay(room, position.epoch, 0, 1) or []
        assert stored.message.text == expected.text


async def test_unencodable_data_stores_nothing(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 1) as [node]:
        before = await node.backplane.position("r")
        with pytest.raises(TypeError, match="not JSON serializable"):
            await node.backplane.publish("r", "u", {1, 2}, None)
        with pytest.raises(ValueError, match="not JSON compliant"):
            await node.backplane.publish("r", "u", math.inf, None)
        with pytest.raises(ValueError, match="cannot contain a newline"):
            await node.backplane.publish("r", "u", 1, "bad\nnonce")
        assert await node.backplane.position("r") == before


async def test_concurrent_publishers_on_three_nodes_share_one_order(
    redis_server: RedisServer,
) -> None:
    async with open_nodes(redis_server.url, 3) as nodes:
        for node in nodes:
            node.backplane.watch("room")
            assert (await node.backplane.position("room")).offset == 0
        acked: dict[int, tuple[str, int]] = {}

        async def publisher(node: Node, count: int) -> None:
            for i in range(count):
                position = await node.backplane.publish("room", node.backplane.node_id, i, None)
                assert position.offset not in acked
                acked[position.offset] = (node.backplane.node_id, i)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    for _ in range(10):  # ten concurrent callers per node
                        nursery.start_soon(publisher, node, 60)
            total = 3 * 10 * 60
            assert sorted(acked) == list(range(1, total + 1))
            for node in nodes:
                await eventually(lambda node=node: len(node.sink.delivered) == total)
        texts = [d.message.text for d in nodes[0].sink.delivered]
        for node in nodes:
            assert node.sink.offsets("room") == list(range(1, total + 1))
            assert [d.message.text for d in node.sink.delivered] == texts
        for item in nodes[0].sink.delivered:
            payload = json.loads(item.message.text)
            assert (payload["from"], payload["data"]) == acked[item.offset]
        stats = nodes[0].backplane.statistics()
        assert stats.published == 600
        # Every publish went out in a pipelined batch whose round trip was timed.
        batches = sum(stats.round_trips)
        assert 1 <= batches <= 600
        assert len(stats.round_trips) == len(ROUND_TRIP_BOUNDS) + 1
        assert stats.round_trip_seconds > 0


async def test_replay_is_all_or_nothing(redis_server: RedisServer) -> None:
    history = HistoryConfig(max_messages=10, max_age=None, max_bytes=2_000)
    async with open_nodes(redis_server.url, 1, history=history) as [node]:
        backplane = node.backplane
        epoch = ""
        for i in range(5):
            epoch = (await backplane.publish("r", "u", {"i": i}, None)).epoch
        got = await backplane.replay("r", epoch, 1, 4)
        assert got is not None
        assert [(s.offset, json.loads(s.message.text)["data"]) for s in got] == [
            (2, {"i": 1}),
            (3, {"i": 2}),
            (4, {"i": 3}),
        ]
        assert await backplane.replay("r", epoch, 5, 5) == []
        assert await backplane.replay("r", "other-epoch", 1, 4) is None
        assert await backplane.replay("r", epoch, 3, 9) is None  # beyond the last offset
        assert await backplane.replay("r", epoch, 4, 3) is None
        assert await backplane.replay("never", epoch, 0, 1) is None
        # Past the stream's cap (Redis trims whole blocks, so publish well past it).
        for _ in range(400):
            await backplane.publish("r", "u", "x", None)
        assert await backplane.replay("r", epoch, 0, 5) is None
        last = (await backplane.position("r")).offset
        assert [s.offset for s in await backplane.replay("r", epoch, last - 3, last) or []] == [
            last - 2,
            last - 1,
            last,
        ]
        # More bytes than history.max_bytes: nothing, never a part.
        assert await backplane.replay("r", epoch, last - 60, last) is None


async def test_replay_leaves_out_messages_older_than_max_age(redis_server: RedisServer) -> None:
    history = HistoryConfig(max_messages=100, max_age=0.3)
    async with open_nodes(redis_server.url, 1, history=history) as [node]:
        first = await node.backplane.publish("r", "u", 1, None)
        await trio.sleep(0.4)
        second = await node.backplane.publish("r", "u", 2, None)
        assert await node.backplane.replay("r", first.epoch, 0, 2) is None
        assert [s.offset for s in await node.backplane.replay("r", first.epoch, 1, 2) or []] == [2]
        recent = await node.backplane.recent("r", 10)
        assert [s.offset for s in recent] == [second.offset]


async def test_recent_returns_the_newest_oldest_first(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 1) as [node]:
        assert await node.backplane.recent("r", 5) == []
        for i in range(8):
            await node.backplane.publish("r", "u", i, None)
        recent = await node.backplane.recent("r", 3)
        assert [s.offset for s in recent] == [6, 7, 8]
        assert [json.loads(s.message.text)["data"] for s in recent] == [5, 6, 7]
        assert await node.backplane.recent("r", 0) == []


async def test_position_waits_for_the_subscription(redis_server: RedisServer) -> None:
    # After watch() + position(), every later message arrives, even one
    # published by another node the instant position() returned.
    async with open_nodes(redis_server.url, 2) as (a, b):
        for round_ in range(20):
            room = f"room{round_}"
            await b.backplane.publish(room, "u", "before", None)
            a.backplane.watch(room)
            position = await a.backplane.position(room)
            after = await b.backplane.publish(room, "u", "after", None)
            await eventually(lambda r=room, o=after.offset: o in a.sink.offsets(r))
            assert position.offset == after.offset - 1


async def test_unwatch_lingers_then_unsubscribes(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 1) as [node]:
        client = await raw_redis(redis_server)
        async with client:
            channel = "chatcore:{r}:ch"

            async def subscribers() -> int:
                return (await client.pubsub_numsub(channel))[channel.encode()]

            node.backplane.watch("r")
            await node.backplane.position("r")
            assert await subscribers() == 1
            # The hub's unwatch/watch around a first join keeps the subscription.
            node.backplane.unwatch("r")
            node.backplane.watch("r")
            await trio.sleep(0.5)
            assert await subscribers() == 1
            node.backplane.unwatch("r")
            node.backplane.unwatch("r")  # idempotent
            await eventually(lambda: node.backplane.statistics().watched_rooms == 0)
            with trio.fail_after(2):
                while await subscribers() != 0:
                    await trio.sleep(0.01)


async def test_directed_delivery_reaches_every_node_once(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 3) as nodes:
        a, b, c = nodes
        message = encode({"type": "note", "text": "ö"}, delivery=Delivery.EPHEMERAL, key="k")
        await a.backplane.send_to_user("alice", message)
        await b.backplane.disconnect_user("bob", 4002, "kicked\nfor good")
        await c.backplane.publish_presence(PresenceLeave("n2", "r", "c1"))
        a.backplane.watch("r")
        b.backplane.watch("r")
        await a.backplane.position("r")
        await b.backplane.position("r")
        typing = encode({"type": "typing"}, delivery=Delivery.EPHEMERAL, key="t")
        await c.backplane.broadcast("r", typing, "conn-1")
        # A barrier instead of a pause: markers sent after everything else,
        # on the same channels, by two nodes (a node gets its own directly).
        marker = encode({"type": "marker"})
        for sender in (a, c):
            await sender.backplane.send_to_user("marker", marker)
            await sender.backplane.broadcast("r", marker, None)
        for node, broadcast_markers in ((a, 2), (b, 2), (c, 1)):  # c does not watch "r"
            await eventually(
                lambda node=node, n=broadcast_markers: (
                    node.sink.to_users.count(("marker", marker)) == 2
                    and node.sink.broadcasts.count(("r", marker, None)) == n
                )
            )
        for node in nodes:
            users = [u for u in node.sink.to_users if u != ("marker", marker)]
            assert users == [("alice", message)]
            assert node.sink.disconnects == [("bob", 4002, "kicked\nfor good")]
            broadcasts = [b for b in node.sink.broadcasts if b != ("r", marker, None)]
            assert broadcasts == [("r", typing, "conn-1")]
        assert a.sink.presence == b.sink.presence == [PresenceLeave("n2", "r", "c1")]
        assert c.sink.presence == []  # a node does not hear its own presence


async def test_a_dead_node_is_reported_down_once(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 1, node_ttl=0.6) as [a]:
        b = RedisBackplane(redis_server.url, node_id="b", **{**FAST, "node_ttl": 0.6})
        b.attach(FakeSink())
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            await b.wait_connected()
            await eventually(lambda: a.backplane.statistics().nodes == 1)
            await trio.sleep(1.5)  # several lease periods: alive nodes are not reported
            assert a.sink.nodes_down == []
            nursery.cancel_scope.cancel()
        took = await eventually(lambda: a.sink.nodes_down == ["b"], within=3)
        assert took < 1.5
        await trio.sleep(0.5)
        assert a.sink.nodes_down == ["b"]


async def test_lost_room_keys_start_a_new_epoch_and_reset_the_room(
    redis_server: RedisServer,
) -> None:
    async with open_nodes(redis_server.url, 2) as (a, b):
        for node in (a, b):
            node.backplane.watch("r")
            await node.backplane.position("r")
        old = await a.backplane.publish("r", "u", 1, None)
        client = await raw_redis(redis_server)
        async with client:
            await client.delete(["chatcore:{r}:meta", "chatcore:{r}:log"])
        new = await a.backplane.publish("r", "u", 2, None)
        assert new.epoch != old.epoch
        assert new.offset == 1
        for node in (a, b):
            await eventually(lambda node=node: node.sink.offsets("r", new.epoch) == [1])
            assert node.sink.resets == ["r"]
        assert await a.backplane.replay("r", old.epoch, 0, 1) is None


async def test_an_idle_room_expires_after_room_ttl(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 1, room_ttl=0.3) as [node]:
        kept = await node.backplane.publish("kept", "u", 1, None)
        idle = await node.backplane.publish("idle", "u", 1, None)
        for _ in range(6):  # position reads keep a room alive
            await trio.sleep(0.1)
            assert (await node.backplane.position("kept")).epoch == kept.epoch
        again = await node.backplane.publish("idle", "u", 2, None)
        assert again.epoch != idle.epoch
        assert again.offset == 1
        assert (await node.backplane.publish("kept", "u", 2, None)).offset == 2


async def test_a_flushed_script_cache_is_reloaded(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 1) as [node], await raw_redis(redis_server) as client:
        node.backplane.watch("r")
        await node.backplane.position("r")
        await node.backplane.publish("r", "u", 1, None)
        await client.script_flush()
        position = await node.backplane.publish("r", "u", 2, None)
        assert position.offset == 2
        await client.script_flush()
        assert (await node.backplane.position("r")).offset == 2
        await client.script_flush()
        assert len(await node.backplane.replay("r", position.epoch, 0, 2) or []) == 2
        await eventually(lambda: node.sink.offsets("r") == [1, 2])
        assert node.backplane.statistics().sessions == 1


async def test_garbage_and_a_failing_hub_do_not_stop_delivery(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_nodes(redis_server.url, 1) as [node], await raw_redis(redis_server) as client:
        node.backplane.watch("r")
        await node.backplane.position("r")
        node.backplane.attach(sink := FlakySink())
        for channel, payload in [
            ("chatcore:{r}:ch", b"not a message"),
            ("chatcore:{r}:ch", b"b{not json"),
            ("chatcore:bus", b"u[1,2"),
            ("chatcore:bus", b"x"),
            ("chatcore:bus", b'p["other"]\n{bad'),
            ("chatcore:bus", b'u{"a": 1}\ntext'),
            ("chatcore:{r}:ch", b'b{"a": 1}\ntext'),
        ]:
            await client.publish(channel, payload)
        await node.backplane.publish("r", "u", "lost to the bug", None)
        await node.backplane.publish("r", "u", "delivered", None)
        await eventually(lambda: sink.offsets("r") == [2])
        assert "a hub bug" in caplog.text
        assert "malformed" in caplog.text
        assert not node.backplane.degraded


async def test_run_twice_is_refused(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 1) as [node]:
        with pytest.raises(RuntimeError, match="already running"):
            await node.backplane.run()


async def test_catch_up_reads_many_rooms_and_long_backlogs(redis_server: RedisServer) -> None:
    rooms = [f"room{i}" for i in range(300)]
    history = HistoryConfig(max_messages=10)
    async with (
        open_nodes(redis_server.url, 1, history=history) as [writer],
        open_nodes(redis_server.url, 1, first=1, history=history, reconnect_initial=0.4) as [
            reader
        ],
        await raw_redis(redis_server) as client,
    ):
        for room in rooms:
            reader.backplane.watch(room)
        for room in rooms:
            await reader.backplane.position(room)
        await writer.backplane.publish("room0", "w", "before", None)
        await eventually(lambda: reader.sink.offsets("room0") == [1])
        for info in await client.client_list():
            if info["name"] == "chatcore:n1":
                await client.client_kill(identifier=info["id"])
        await eventually(lambda: reader.backplane.degraded)
        # While the reader waits to reconnect (0.2-0.4 s): one message per
        # room, and a backlog in room0 longer than one catch-up read.
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for room in rooms:
                    nursery.start_soon(writer.backplane.publish, room, "w", "missed", None)
                for _ in range(30):
                    await writer.backplane.publish("room0", "w", "backlog", None)
        await reader.backplane.wait_connected()
        await eventually(lambda: len(reader.sink.delivered) == 1 + 300 + 30)
        assert reader.sink.offsets("room0") == list(range(1, 33))
        for room in rooms[1:]:
            assert reader.sink.offsets(room) == [1]
        assert reader.backplane.statistics().caught_up >= 300


# -- hubs on separate backplanes ------------------------------------------------------------


async def by_query(request: HandshakeRequest) -> Identity | str | Reject:
    await trio.lowlevel.checkpoint()
    user = request.query.get("user")
    return Reject(401, b"who?") if user is None else user


@asynccontextmanager
async def open_hubs(url: str, count: int, **options: Any) -> AsyncIterator[list[Hub]]:
    settings = {**FAST, **options}
    async with trio.open_nursery() as nursery:
        hubs = []
        for i in range(count):
            backplane = RedisBackplane(url, node_id=f"hub{i}", **settings)
            hub = Hub(
                authenticate=by_query,
                backplane=backplane,
                config=HubConfig(publish_rate=10_000, publish_burst=10_000),
            )
            await nursery.start(hub.run)
            with trio.fail_after(5):
                await backplane.wait_connected()
            hubs.append(hub)
        yield hubs
        nursery.cancel_scope.cancel()


async def read_messages(client: TestClient, room: str, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < count:
        message = await client.receive()
        if message["type"] == "message" and message["room"] == room:
            got.append(message)
    return got


async def test_cross_hub_room_order_is_the_same_for_every_member(
    redis_server: RedisServer,
) -> None:
    per_client = 40
    async with open_hubs(redis_server.url, 3) as hubs, trio.open_nursery() as nursery:
        clients: list[TestClient] = []
        exits = []
        for i, hub in enumerate(hubs):
            for j in range(2):
                manager = open_test_client(hub, user=f"u{i}{j}", timeout=15)
                clients.append(await manager.__aenter__())
                exits.append(manager)
        for client in clients:
            assert (await client.join("lobby"))["offset"] == 0
        published: dict[str, list[int]] = {}

        async def publish_all(client: TestClient) -> None:
            offsets = []
            for k in range(per_client):
                offsets.append(await client.publish("lobby", {"k": k, "by": client.user}))
            published[str(client.user)] = offsets

        with trio.fail_after(30):
            async with trio.open_nursery() as publishers:
                for client in clients:
                    publishers.start_soon(publish_all, client)
            total = per_client * len(clients)
            seen = [await read_messages(client, "lobby", total) for client in clients]
        reference = [(m["offset"], m["from"], m["data"]) for m in seen[0]]
        assert [offset for offset, _, _ in reference] == list(range(1, total + 1))
        for messages in seen[1:]:
            assert [(m["offset"], m["from"], m["data"]) for m in messages] == reference
        for client in clients:
            # Its own messages arrived at the offsets its replies announced.
            mine = [o for o, sender, _ in reference if sender == client.user]
            assert mine == published[str(client.user)]
        for manager in reversed(exits):
            await manager.__aexit__(None, None, None)
        nursery.cancel_scope.cancel()


async def test_multi_tab_users_across_hubs(redis_server: RedisServer) -> None:
    async with (
        open_hubs(redis_server.url, 3) as (h0, h1, h2),
        open_test_client(h0, user="alice") as tab0,
        open_test_client(h1, user="alice") as tab1,
        open_test_client(h1, user="bob") as bob,
        open_test_client(h2, user="carol") as carol,
    ):
        await h2.send_to_user("alice", {"type": "note", "n": 1})
        await tab0.expect("note", n=1)
        await tab1.expect("note", n=1)
        await h0.send_to_user("bob", {"type": "note", "n": 2})
        await bob.expect("note", n=2)
        await h2.disconnect_user("alice", 4002, "bye")
        await tab0.expect_closed(4002)
        await tab1.expect_closed(4002)
        # A barrier instead of a pause: a marker sent on the same bus after the
        # disconnect is the next thing bob and carol get, so nothing came before.
        for user in ("bob", "carol"):
            await h0.send_to_user(user, {"type": "marker"})
        await bob.expect("marker")
        await carol.expect("marker")
        await bob.assert_nothing_received()
        await carol.assert_nothing_received()
        await carol.ping()  # still served


async def test_recovery_across_hubs(redis_server: RedisServer) -> None:
    async with (
        open_hubs(redis_server.url, 3) as (h0, h1, h2),
        open_test_client(h1, user="writer") as writer,
    ):
        await writer.join("r")
        async with open_test_client(h0, user="reader") as reader:
            joined = await reader.join("r")
            await writer.publish("r", "one")
            seen = await read_messages(reader, "r", 1)
        for text in ("two", "three"):
            await writer.publish("r", text)
        async with open_test_client(h2, user="reader") as again:
            since = {"epoch": joined["epoch"], "offset": seen[-1]["offset"]}
            answer = await again.join("r", since=since)
            assert answer["recovered"] is True
            missed = await read_messages(again, "r", 2)
            assert [m["data"] for m in missed] == ["two", "three"]
            stale = await again.request("join", room="q", since={"epoch": "x", "offset": 3})
            assert stale["data"]["recovered"] is False
        assert [m["data"] for m in await h2.history("r", 2)] == ["two", "three"]


# -- the publish time, for the delivery-lag metric ------------------------------------------


def test_the_nonce_line_carries_the_publish_time_and_reads_old_records() -> None:
    assert nonce_field("n0:7", 0.0) == "n0:7"  # not sampled: the line as before
    assert nonce_field(None, 0.0) == ""
    assert parse_nonce_field(nonce_field("n0:7", 1765132200.123456).encode()) == (
        "n0:7",
        1765132200.123456,
    )
    assert parse_nonce_field(nonce_field(None, 1.5).encode()) == (None, 1.5)
    # A record of a node that does not stamp: the nonce, nothing measured.
    assert parse_nonce_field(b"n0:7") == ("n0:7", 0.0)
    assert parse_nonce_field(b"") == (None, 0.0)
    # A tab that is not followed by a stamp belongs to the nonce.
    assert parse_nonce_field(b"odd\tnode:1") == ("odd\tnode:1", 0.0)


async def test_the_publish_time_reaches_the_other_node_but_not_the_stream(
    redis_server: RedisServer,
) -> None:
    async with open_nodes(redis_server.url, 2) as (origin, other):
        other.backplane.watch("r")
        await other.backplane.position("r")
        stamped = published_at.set(1765132200.25)
        try:
            await origin.backplane.publish("r", "u", "sampled", "n0:1")
        finally:
            published_at.reset(stamped)
        position = await origin.backplane.publish("r", "u", "not sampled", "n0:2")
        await eventually(lambda: len(other.sink.delivered) == 2)
        first, second = other.sink.delivered
        assert (first.nonce, first.message.published) == ("n0:1", 1765132200.25)
        assert (second.nonce, second.message.published) == ("n0:2", 0.0)
        # What the stream keeps (replays, recovery) carries no publish time.
        replayed = await other.backplane.replay("r", position.epoch, 0, position.offset) or []
        assert [item.message.published for item in replayed] == [0.0, 0.0]
        assert replayed[0].message.text == first.message.text


async def test_delivery_lag_on_another_node_is_measured_from_the_origin(
    redis_server: RedisServer,
) -> None:
    metrics = ConnectionMetrics(lag_sample_every=1)
    lag = metrics.delivery_lag

    def counts() -> dict[str, float]:
        return dict(lag.cumulative())

    try:
        async with (
            open_hubs(redis_server.url, 2) as (origin, other),
            open_test_client(other, user="reader") as reader,
        ):
            await reader.join("r")
            # Stamped by the origin hub where it is published, measured here
            # when the reader's frame is written: well under a second.
            await origin.publish("r", "hello")
            await reader.expect("message", data="hello")
            assert counts()["1.0"] == counts()["+Inf"] == 1
            # The origin's clock runs 2 s behind: the lag measured here is
            # its stamp's age (clock skew included), not this node's.
            await sequence(origin.backplane, "r", None, "behind", None, time.time() - 2.0)
            await reader.expect("message", data="behind")
            assert counts()["+Inf"] == 2
            assert counts()["2.5"] - counts()["1.0"] == 1
            # A clock ahead of this node's gives a negative lag: counted as 0.
            await sequence(origin.backplane, "r", None, "ahead", None, time.time() + 5.0)
            await reader.expect("message", data="ahead")
            assert counts()["+Inf"] == 3
            assert counts()["0.0005"] == 1
            # A record without a stamp (an unsampled publish, an older node).
            await sequence(origin.backplane, "r", None, "unstamped", None, 0.0)
            await reader.expect("message", data="unstamped")
            assert counts()["+Inf"] == 3
    finally:
        metrics.close()


# -- Redis failures -------------------------------------------------------------------------


@attrs.define
class Traffic:
    """Publishers on every node, recording the outcome of every publish.

    Each publish sends ``data = [node id, publisher, i]``; its outcome is
    ``"acked"``, ``"not sequenced"`` or ``"maybe"`` (the link broke after
    the script was sent: it may have been stored).
    """

    acked: dict[str, list[tuple[str, int]]] = attrs.Factory(dict)
    failures: list[float] = attrs.Factory(list)
    failure_latency: list[float] = attrs.Factory(list)
    outcomes: dict[tuple[str, int, int], str] = attrs.Factory(dict)
    running: bool = True
    active: int = 0
    _publishers: int = 0

    async def publish_from(self, node: Node, room: str, pause: float = 0.002) -> None:
        self.active += 1
        try:
            await self._publish_from(node, room, pause)
        finally:
            self.active -= 1

    async def settle(self, nodes: list[Node], room: str) -> None:
        """Stop, then one last publish that every node must see: everything
        sequenced before it has then reached every node that will get it."""
        self.running = False
        await eventually(lambda: self.active == 0)
        key = ("last", 0, 0)
        last = await nodes[0].backplane.publish(room, "last", list(key), None)
        self.outcomes[key] = "acked"
        for node in nodes:
            await eventually(
                lambda node=node: (
                    (last.epoch, last.offset) in {(d.epoch, d.offset) for d in node.sink.delivered}
                )
            )

    async def _publish_from(self, node: Node, room: str, pause: float) -> None:
        node_id = node.backplane.node_id
        mine = self.acked.setdefault(node_id, [])
        self._publishers += 1
        publisher = self._publishers
        i = 0
        while self.running:
            i += 1
            start = trio.current_time()
            key = (node_id, publisher, i)
            try:
                position = await node.backplane.publish(room, node_id, list(key), None)
            except BackplaneError as exc:
                self.outcomes[key] = "maybe" if "may have been" in str(exc) else "not sequenced"
                self.failures.append(start)
                self.failure_latency.append(trio.current_time() - start)
                await trio.sleep(0.02)
            else:
                self.outcomes[key] = "acked"
                mine.append((position.epoch, position.offset))
                await trio.sleep(pause)

    def all_acked(self) -> set[tuple[str, int]]:
        return {position for positions in self.acked.values() for position in positions}


async def expect_backplane_error(call: Callable[[], Awaitable[object]]) -> None:
    with pytest.raises(BackplaneError):
        await call()


async def degraded_within(nodes: list[Node], since: float) -> float:
    await eventually(lambda: all(n.backplane.degraded for n in nodes), within=5)
    return trio.current_time() - since


async def recovered_within(nodes: list[Node], since: float) -> float:
    await eventually(lambda: not any(n.backplane.degraded for n in nodes), within=5)
    return trio.current_time() - since


def assert_every_publish_accounted_for(nodes: list[Node], traffic: Traffic, room: str) -> None:
    """Every publish: acknowledged ones reached every node, refused ones none,
    and one whose outcome was unknown reached either every node or none;
    nothing arrived that was not published."""
    seen = []
    for node in nodes:
        payloads = [
            tuple(json.loads(d.message.text)["data"]) for d in node.sink.delivered if d.room == room
        ]
        assert len(payloads) == len(set(payloads)), f"{node.backplane.node_id}: a duplicate"
        seen.append(set(payloads))
    for payload in set().union(*seen):
        assert payload in traffic.outcomes, f"delivered but never published: {payload}"
    for key, outcome in traffic.outcomes.items():
        reached = sum(key in payloads for payloads in seen)
        if outcome == "acked":
            assert reached == len(nodes), f"acknowledged {key} reached {reached} nodes"
        elif outcome == "not sequenced":
            assert reached == 0, f"{key} was reported not sequenced but was delivered"
        else:
            assert reached in (0, len(nodes)), f"{key} reached {reached} of {len(nodes)} nodes"


def assert_every_acked_delivered(nodes: list[Node], traffic: Traffic, room: str) -> None:
    acked = traffic.all_acked()
    for node in nodes:
        delivered = {(d.epoch, d.offset) for d in node.sink.delivered if d.room == room}
        assert len(delivered) == len([d for d in node.sink.delivered if d.room == room])
        missing = acked - delivered
        assert not missing, f"{node.backplane.node_id} lost acknowledged {sorted(missing)[:5]}"
        for epoch in {e for e, _ in delivered}:
            offsets = assert_in_order(node.sink, room, epoch)
            assert offsets == list(range(offsets[0], offsets[-1] + 1)), "a gap"


@pytest.mark.parametrize("redis_server", [{"persistent": True}], indirect=True)
async def test_crash_and_restart_with_persistence_loses_nothing(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(30):
        async with open_nodes(redis_server.url, 2) as nodes, trio.open_nursery() as nursery:
            for node in nodes:
                node.backplane.watch("room")
                await node.backplane.position("room")
            traffic = Traffic()
            for node in nodes:
                for _ in range(4):
                    nursery.start_soon(traffic.publish_from, node, "room")
            await trio.sleep(0.3)
            crashed_at = trio.current_time()
            await redis_server.crash()
            assert await degraded_within(nodes, crashed_at) < 0.5
            # Short blips are ridden out; past request_timeout calls fail.
            await trio.sleep(1.3)
            assert traffic.failures
            assert max(traffic.failure_latency) < 1.3
            await redis_server.start()
            back_at = trio.current_time()
            recovery = await recovered_within(nodes, back_at)
            await trio.sleep(0.3)
            await traffic.settle(nodes, "room")
            acked = traffic.all_acked()
            assert len({e for e, _ in acked}) == 1, "the epoch is kept"
            assert_every_acked_delivered(nodes, traffic, "room")
            assert_every_publish_accounted_for(nodes, traffic, "room")
            for node in nodes:
                stats = node.backplane.statistics()
                assert stats.sessions == 2
                assert stats.session_failures >= 1
                assert node.sink.resets == []
            print(f"recovery after restart: {recovery * 1000:.0f} ms")
            assert recovery < 1.0
            nursery.cancel_scope.cancel()


async def test_crash_without_persistence_starts_a_new_epoch(redis_server: RedisServer) -> None:
    with trio.fail_after(30):
        async with open_nodes(redis_server.url, 2) as nodes, trio.open_nursery() as nursery:
            for node in nodes:
                node.backplane.watch("room")
                await node.backplane.position("room")
            traffic = Traffic()
            for node in nodes:
                nursery.start_soon(traffic.publish_from, node, "room")
            await trio.sleep(0.3)
            crashed_at = trio.current_time()
            await redis_server.crash()
            assert await degraded_within(nodes, crashed_at) < 0.5
            await trio.sleep(0.3)
            await redis_server.start()
            recovery = await recovered_within(nodes, trio.current_time())
            assert recovery < 1.0
            await trio.sleep(0.3)
            traffic.running = False
            epochs = {e for e, _ in traffic.all_acked()}
            assert len(epochs) == 2, "Redis lost the room: a new epoch"
            for node in nodes:
                await eventually(lambda node=node: node.sink.resets == ["room"])
                for epoch in epochs:
                    assert_in_order(node.sink, "room", epoch)
            # Everything acknowledged in the new epoch reaches every node.
            new = next(epoch for epoch, offset in traffic.all_acked() if offset == 1)
            after = {p for p in traffic.all_acked() if p[0] == new}
            for node in nodes:
                await eventually(
                    lambda node=node: after <= {(d.epoch, d.offset) for d in node.sink.delivered}
                )
            nursery.cancel_scope.cancel()


async def test_killed_subscriptions_catch_up_from_the_stream(redis_server: RedisServer) -> None:
    with trio.fail_after(30):
        async with open_nodes(redis_server.url, 3) as nodes, trio.open_nursery() as nursery:
            for node in nodes:
                node.backplane.watch("room")
                await node.backplane.position("room")
            traffic = Traffic()
            for node in nodes:
                for _ in range(3):
                    nursery.start_soon(traffic.publish_from, node, "room", 0.0)
            client = await raw_redis(redis_server)
            async with client:
                for _ in range(5):
                    await trio.sleep(0.15)
                    # Drops every subscription; publishing connections stay.
                    await client.client_kill(type_=coredis.PureToken.PUBSUB)
            await trio.sleep(0.2)
            await traffic.settle(nodes, "room")
            assert_every_acked_delivered(nodes, traffic, "room")
            for node in nodes:
                stats = node.backplane.statistics()
                assert stats.sessions >= 3, stats
                # The hub hears that bus messages may have been missed.
                assert node.sink.resyncs == stats.sessions - 1
            assert_every_publish_accounted_for(nodes, traffic, room="room")
            # Fresh clients per session: no connection leaks on the server.
            async with client:
                names = [
                    c["name"]
                    for c in await client.client_list()
                    if c["name"].startswith("chatcore")
                ]
            assert sorted(names) == sorted(f"chatcore:n{i}" for i in range(3) for _ in range(3))
            nursery.cancel_scope.cancel()


async def test_a_hung_server_is_detected_by_timeouts(redis_server: RedisServer) -> None:
    with trio.fail_after(30):
        async with open_nodes(redis_server.url, 2) as nodes, trio.open_nursery() as nursery:
            for node in nodes:
                node.backplane.watch("room")
                await node.backplane.position("room")
            traffic = Traffic()
            for node in nodes:
                nursery.start_soon(traffic.publish_from, node, "room")
            await trio.sleep(0.3)
            paused_at = trio.current_time()
            redis_server.pause()
            detected = await degraded_within(nodes, paused_at)
            # heartbeat_interval + command_timeout, plus scheduling slack.
            assert detected < 0.4 + 0.1 + 0.4
            # Every call waits at most request_timeout (1 s), then fails.
            a = nodes[0].backplane
            started = trio.current_time()
            async with trio.open_nursery() as calls:
                for call in (
                    lambda: a.position("room"),
                    lambda: a.replay("room", "e", 0, 1),
                    lambda: a.recent("room", 1),
                    lambda: a.publish_presence(PresenceSync(a.node_id)),
                ):
                    calls.start_soon(expect_backplane_error, call)
            assert trio.current_time() - started < 1.3
            await trio.sleep(0.3)
            assert traffic.failures
            assert max(traffic.failure_latency) < 1.3
            redis_server.resume()
            recovery = await recovered_within(nodes, trio.current_time())
            await trio.sleep(0.3)
            traffic.running = False
            acked = traffic.all_acked()
            for node in nodes:
                await eventually(
                    lambda node=node: acked <= {(d.epoch, d.offset) for d in node.sink.delivered}
                )
            assert_every_acked_delivered(nodes, traffic, "room")
            print(
                f"hang detected after {detected * 1000:.0f} ms; recovered {recovery * 1000:.0f} ms"
            )
            assert recovery < 1.5
            nursery.cancel_scope.cancel()


async def test_backoff_starts_over_after_a_session_that_held(redis_server: RedisServer) -> None:
    with trio.fail_after(30):
        async with open_nodes(redis_server.url, 1, reconnect_max=3.0) as [node]:
            await redis_server.crash()
            await trio.sleep(4.0)  # backoff grows to its 3 s ceiling
            await redis_server.start()
            await node.backplane.wait_connected()
            await trio.sleep(0.2)
            await redis_server.crash()
            await trio.sleep(0.2)
            await redis_server.start()
            # A second, short outage is repaired at the short end of the backoff.
            assert await recovered_within([node], trio.current_time()) < 0.5


async def test_publish_fails_at_once_during_a_long_outage(redis_server: RedisServer) -> None:
    async with open_nodes(redis_server.url, 1) as [node]:
        await redis_server.stop()
        await eventually(lambda: node.backplane.degraded)
        with pytest.raises(BackplaneError):
            await node.backplane.publish("r", "u", 1, None)  # waits request_timeout at most
        start = trio.current_time()
        for call in (
            node.backplane.publish("r", "u", 1, None),
            node.backplane.position("r"),
            node.backplane.replay("r", "e", 0, 1),
            node.backplane.recent("r", 1),
            node.backplane.send_to_user("u", encode({"type": "x"})),
        ):
            with pytest.raises(BackplaneError):
                await call
        assert trio.current_time() - start < 0.1
        stats = node.backplane.statistics()
        assert stats.degraded
        assert stats.degraded_for is not None
        assert stats.last_error
        assert "DEGRADED" in repr(node.backplane)
        # Local connections still got the directed message.
        assert [user for user, _ in node.sink.to_users] == ["u"]


@pytest.mark.parametrize("redis_server", [{"persistent": True}], indirect=True)
async def test_hub_answers_unavailable_and_keeps_connections_during_an_outage(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(30):
        async with (
            open_hubs(redis_server.url, 2) as (h0, h1),
            open_test_client(h0, user="a") as a,
            open_test_client(h1, user="b") as b,
        ):
            await a.join("r")
            await b.join("r")
            await a.publish("r", "before")
            await read_messages(b, "r", 1)
            await redis_server.crash()
            await eventually(lambda: h0.backplane.degraded and h1.backplane.degraded)
            with pytest.raises(RequestFailed) as info:
                await a.publish("r", "during")
            assert info.value.code == "unavailable"
            await b.ping()  # connections stay up
            await redis_server.start()
            await eventually(lambda: not h0.backplane.degraded and not h1.backplane.degraded)
            assert await a.publish("r", "after") == 2
            [message] = await read_messages(b, "r", 1)
            assert (message["offset"], message["data"]) == (2, "after")


async def test_hub_closes_members_with_4001_when_redis_lost_the_room(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(30):
        async with (
            open_hubs(redis_server.url, 2) as (h0, h1),
            open_test_client(h0, user="a") as a,
            open_test_client(h1, user="b") as b,
        ):
            await a.join("r")
            joined = await b.join("r")
            await a.publish("r", "before")
            [seen] = await read_messages(b, "r", 1)
            await redis_server.crash()  # no persistence: the room's order is gone
            await redis_server.start()
            # Members cannot know what they missed: they must recover.
            await a.expect_closed(4001)
            await b.expect_closed(4001)
            async with open_test_client(h1, user="b") as again:
                since = {"epoch": joined["epoch"], "offset": seen["offset"]}
                answer = await again.join("r", since=since)
                assert answer["recovered"] is False
                assert answer["epoch"] != joined["epoch"]
                assert await again.publish("r", "fresh") == 1


async def test_hub_repairs_a_gap_from_the_redis_stream(redis_server: RedisServer) -> None:
    """A room message lost on pub/sub (stored, never heard) makes a real gap:
    the next message arrives ahead of it, the hub holds it and fills the gap
    with ``RedisBackplane.replay``; members get both, in order."""
    from chatcore.redis._scripts import PUBLISH_LUA

    replays: list[tuple[str, str, int, int]] = []

    class Recorded(RedisBackplane):
        async def replay(
            self, room: str, epoch: str, after: int, upto: int
        ) -> list[Sequenced] | None:
            replays.append((room, epoch, after, upto))
            return await super().replay(room, epoch, after, upto)

    backplane = Recorded(redis_server.url, node_id="hub0", **FAST)
    hub = Hub(authenticate=by_query, backplane=backplane)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            await backplane.wait_connected()
            async with open_test_client(hub, user="alice") as alice:
                joined = await alice.join("r")
                assert await alice.publish("r", "one") == 1
                await alice.expect("message", offset=1, data="one")
                # Offset 2 is sequenced and stored by the real script, but
                # published on a channel nobody hears: lost on pub/sub.
                client = await raw_redis(redis_server)
                async with client:
                    await client.eval(
                        PUBLISH_LUA,
                        keys=["chatcore:{r}:meta", "chatcore:{r}:log"],
                        args=[
                            "unused",
                            json.dumps("r"),
                            json.dumps("ghost"),
                            json.dumps("two"),
                            "",
                            "1000",
                            "chatcore:{r}:nowhere",
                            "0",
                            "0",
                        ],
                    )
                assert replays == []
                # Offset 3 arrives live, ahead of the gap; the reply still comes first.
                assert await alice.publish("r", "three") == 3
                await alice.expect("message", offset=2, data="two", from_="ghost")
                await alice.expect("message", offset=3, data="three")
                assert replays == [("r", joined["epoch"], 1, 3)]
                await alice.assert_nothing_received()
            nursery.cancel_scope.cancel()
