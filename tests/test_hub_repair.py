"""The hub's delivery in offset order, driven by a scripted backplane.

A real backplane (Redis) hands the hub what it sequenced in whatever order
its channels and catch-up reads produce: out of order, twice, with a gap
that :meth:`Hub.run` must fill from the room's history, or in a new epoch
once the room's order was lost. :class:`ScriptedBackplane` sequences and
stores like a backplane but delivers only when the test says so, and its
``position``/``replay`` can be held, failed or made to answer ``None``, so
every one of those paths runs deterministically on the ``autojump_clock``:

- messages held behind a gap go out in order once the repair fills it, and
  duplicates are dropped;
- a gap that cannot be filled, and an epoch change on a live room, close the
  room's members with 4001, and later joiners start from the new position;
- the publisher's nonce-matched reply goes out before its own message whether
  the message is delivered before ``publish()`` returns or after;
- presence events from other nodes (malformed ones ignored), ``online_users``,
  ``presence`` and ``history`` on the server side.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from unittest.mock import ANY

import attrs
import pytest
import trio
import trio.testing
from conftest import TEST_CONFIG

from chatcore import (
    Backplane,
    BackplaneError,
    HandshakeRequest,
    Hub,
    HubConfig,
    Identity,
    LocalBackplane,
    NodeDown,
    OutboundMessage,
    Position,
    Reject,
    RoomReset,
    Sequenced,
)
from chatcore.sansio import PresenceEvent, decode_node_event, encode_node_event
from chatcore.sansio._protocol import encode_message
from chatcore.testing import TestClient, open_test_client

GRACE = 5.0

# -- the scripted backplane ------------------------------------------------------------------------


class ScriptedBackplane(Backplane):
    """Sequences and stores room messages; delivers them only when told to.

    ``publish()`` appends to the room's log and, with ``deliver_on_publish``,
    hands the message to the hub before it returns (as the in-process
    backplane does); otherwise the test delivers it with :meth:`deliver`, in
    any order, any number of times. ``position()`` and ``replay()`` can be
    held on a gate; ``replay()`` answers ``None`` with ``replay_none`` (the
    history no longer holds the range); ``position()`` raises
    :class:`BackplaneError` ``position_errors`` times.
    """

    def __init__(self, node_id: str = "scripted") -> None:
        self.node_id = node_id
        self.hub: Hub | None = None
        self.epochs: dict[str, str] = {}
        #: room -> its messages, offset ``i + 1`` at index ``i`` (with the nonce).
        self.logs: dict[str, list[Sequenced]] = {}
        self.deliver_on_publish = False
        #: Held publishes wait on it (after delivering, if they deliver).
        self.publish_gate: trio.Event | None = None
        self.position_gate: trio.Event | None = None
        self.replay_gate: trio.Event | None = None
        self.replay_none = False
        self.position_errors = 0
        #: Every ``replay`` call: (room, epoch, after, upto).
        self.replays: list[tuple[str, str, int, int]] = []
        self.positions: list[str] = []
        #: Every presence event this node published.
        self.announced: list[dict[str, Any]] = []
        self.presence_gate: trio.Event | None = None
        self.presence_errors = 0

    # -- scripting ---------------------------------------------------------------

    def attach(self, sink: Any) -> None:
        self.hub = sink

    def epoch(self, room: str) -> str:
        return self.epochs.setdefault(room, "e1")

    def sequence(
        self, room: str, data: Any, sender: str | None = "srv", nonce: str | None = None
    ) -> Sequenced:
        """Give ``data`` the room's next offset and store it (nothing delivered)."""
        log = self.logs.setdefault(room, [])
        epoch = self.epoch(room)
        offset = len(log) + 1
        item = Sequenced(
            room, epoch, offset, encode_message(room, offset, epoch, sender, data), nonce
        )
        log.append(item)
        return item

    def items(self, room: str, *offsets: int) -> list[Sequenced]:
        return [self.logs[room][offset - 1] for offset in offsets]

    def new_epoch(self, room: str, epoch: str) -> None:
        """The room's order is lost: it starts over in ``epoch`` at offset 0."""
        self.epochs[room] = epoch
        self.logs[room] = []

    def deliver(self, *items: Sequenced) -> None:
        assert self.hub is not None
        for item in items:
            self.hub.backplane_event(item)

    # -- Backplane ---------------------------------------------------------------

    async def publish(
        self, room: str, sender: str | None, data: Any, nonce: str | None
    ) -> Position:
        item = self.sequence(room, data, sender, nonce)
        if self.deliver_on_publish:
            self.deliver(item)
        if self.publish_gate is not None:
            await self.publish_gate.wait()
        else:
            await trio.lowlevel.checkpoint()
        return Position(item.epoch, item.offset)

    async def position(self, room: str) -> Position:
        self.positions.append(room)
        # Read when asked; the answer may be held (it then arrives late).
        position = Position(self.epoch(room), len(self.logs.get(room, ())))
        if self.position_gate is not None:
            await self.position_gate.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.position_errors:
            self.position_errors -= 1
            raise BackplaneError("scripted outage")
        return position

    async def replay(self, room: str, epoch: str, after: int, upto: int) -> list[Sequenced] | None:
        self.replays.append((room, epoch, after, upto))
        if self.replay_gate is not None:
            await self.replay_gate.wait()
        else:
            await trio.lowlevel.checkpoint()
        log = self.logs.get(room, [])
        if self.replay_none or epoch != self.epoch(room) or upto > len(log):
            return None
        # As stored: a replayed message carries no nonce.
        return [attrs.evolve(item, nonce=None) for item in log[after:upto]]

    async def recent(self, room: str, limit: int) -> list[Sequenced]:
        await trio.lowlevel.checkpoint()
        return self.logs.get(room, [])[-limit:] if limit > 0 else []

    async def broadcast(self, room: str, message: OutboundMessage, exclude: str | None) -> None:
        await trio.lowlevel.checkpoint()

    async def send_to_user(self, user: str, message: OutboundMessage) -> None:
        await trio.lowlevel.checkpoint()

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        await trio.lowlevel.checkpoint()

    async def publish_presence(self, event: PresenceEvent) -> None:
        if self.presence_gate is not None:
            await self.presence_gate.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.presence_errors:
            self.presence_errors -= 1
            raise BackplaneError("scripted outage")
        # What other nodes would read: the event's byte format, decoded as JSON.
        self.announced.append(json.loads(encode_node_event(event).split(b"\n", 1)[1]))


# -- helpers ---------------------------------------------------------------------------------------


async def by_query(request: HandshakeRequest) -> Identity | str | Reject:
    await trio.lowlevel.checkpoint()
    user = request.query.get("user")
    return Reject(401, b"who?") if user is None else user


def scripted_hub(backplane: Backplane, *, presence: bool = False) -> Hub:
    return Hub(
        authenticate=by_query,
        backplane=backplane,
        config=HubConfig(
            presence=presence, presence_grace=GRACE, publish_rate=1_000, publish_burst=1_000
        ),
        connection_config=TEST_CONFIG,
    )


@asynccontextmanager
async def running(hub: Hub) -> AsyncIterator[trio.Nursery]:
    """``hub.run()`` (the gap repair and the presence timer) for the block."""
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def offsets(client: TestClient) -> list[int]:
    """The offsets of the ``message``s ``client`` has received so far (all consumed)."""
    await trio.testing.wait_all_tasks_blocked()
    got = []
    while client.messages:
        message = await client.receive()
        assert message["type"] == "message", message
        got.append(message["offset"])
    return got


def presence_event(hub: Hub, node: str, event: Any) -> None:
    """Another node's presence event, through its byte format, as a backplane hands it over."""
    wire = b"p" + json.dumps([node]).encode() + b"\n" + json.dumps(event).encode()
    decoded = decode_node_event(wire)
    if decoded is not None:  # an op of a newer version is ignored
        hub.backplane_event(decoded)


def me(client: TestClient) -> dict[str, Any]:
    return {"connection_id": client.connection_id}


def remote_join(
    room: str, user: str, connection_id: str, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "op": "join",
        "room": room,
        "user": user,
        "connection_id": connection_id,
        "joined_at": 1.0,
        "data": data or {},
    }


# -- gaps, duplicates, order -----------------------------------------------------------------------


async def test_messages_behind_a_gap_go_out_in_order_once_the_repair_fills_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        assert (await alice.join("r"))["offset"] == 0
        for n in range(1, 7):
            bp.sequence("r", n)
        bp.replay_gate = trio.Event()  # hold the repair where it reads the history
        bp.deliver(*bp.items("r", 3, 5))  # 1, 2 and 4 are missing
        assert await offsets(alice) == []
        assert bp.replays == [("r", "e1", 0, 6)]  # the repair asked for everything missing
        bp.deliver(*bp.items("r", 1))  # the next one arrives live meanwhile
        assert await offsets(alice) == [1]  # 3 still waits for 2
        bp.replay_gate.set()
        assert await offsets(alice) == [2, 3, 4, 5, 6]
        room = hub.room("r")
        assert room is not None
        assert (room.offset, room.sequencer.held) == (6, 0)
        assert not hub._registry.repairs_pending
        bp.deliver(*bp.items("r", 6, 2, 5))  # late copies of what went out
        assert await offsets(alice) == []
        bp.deliver(bp.sequence("r", 7))
        assert await offsets(alice) == [7]
        assert len(bp.replays) == 1


async def test_duplicates_and_reordering_without_a_repair(autojump_clock: trio.abc.Clock) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with (
        running(hub),
        open_test_client(hub, user="alice") as alice,
        open_test_client(hub, user="bob") as bob,
    ):
        await alice.join("r")
        await bob.join("r")
        items = [bp.sequence("r", n) for n in range(1, 5)]
        bp.replay_gate = trio.Event()  # a repair would hang: none must be needed here
        bp.deliver(items[0], items[0], items[1], items[0], items[1], items[2], items[2])
        bp.deliver(items[3], items[1], items[3])
        for client in (alice, bob):
            assert await offsets(client) == [1, 2, 3, 4]
        assert bp.replays == []
        assert hub.statistics().delivered == 8


async def test_a_gap_with_nothing_else_missing_is_filled_by_run_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The only message after a gap, with nothing live after it: the repair
    alone delivers the missed one and then the held one."""
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        first, second = bp.sequence("r", "a"), bp.sequence("r", "b")
        bp.deliver(second)
        assert [m["data"] for m in [await alice.receive(), await alice.receive()]] == ["a", "b"]
        await alice.assert_nothing_received()
        bp.deliver(first)  # the channel's late copy
        await alice.assert_nothing_received()


async def test_a_repair_that_fails_is_retried(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        items = [bp.sequence("r", n) for n in range(1, 4)]
        bp.position_errors = 2  # the backplane is unavailable twice
        start = trio.current_time()
        bp.deliver(items[2])
        await alice.expect("message", offset=1, timeout=10)
        assert trio.current_time() - start == pytest.approx(2.0)  # retried every second
        assert await offsets(alice) == [2, 3]
        assert caplog.text.count("cannot fill a gap yet") == 2


async def test_a_repair_of_a_room_that_closed_meanwhile_is_skipped(
    autojump_clock: trio.abc.Clock,
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        bp.sequence("r", 1)
        bp.deliver(bp.sequence("r", 2))
        assert hub.leave(alice.connection_id, "r")  # before the repair task runs
        await trio.testing.wait_all_tasks_blocked()
        assert hub.room("r") is None
        assert not hub._registry.repairs_pending
        assert bp.replays == []
        await alice.assert_nothing_received()
        # An unknown room's reset is nothing to repair either.
        hub.backplane_event(RoomReset("elsewhere"))
        assert not hub._registry.repairs_pending


async def test_messages_that_arrive_before_the_position_is_known(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While the first joiner waits for the room's position, messages are
    held; once it is known, those at or before it are dropped and the others
    delivered in order (a gap among them repaired), and the joiner recovers
    everything after its ``since`` exactly once."""
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        first = bp.sequence("r", 1)
        bp.position_gate = trio.Event()
        async with trio.open_nursery() as nursery:
            joined: list[Any] = []

            async def join() -> None:
                joined.append(await alice.join("r", since={"epoch": "e1", "offset": 0}))

            nursery.start_soon(join)
            await trio.testing.wait_all_tasks_blocked()
            assert bp.positions == ["r"]  # read as (e1, 1), answer held
            second = bp.sequence("r", 2)
            bp.sequence("r", 3)  # never delivered live: repaired
            fourth = bp.sequence("r", 4)
            bp.deliver(fourth, first, second, first)  # all before the position: held
            room = hub._registry.rooms["r"]
            assert not room.ready
            assert room.sequencer.held == 3  # 1, 2 and 4
            bp.position_gate.set()
        assert joined == [
            {"room": "r", "epoch": "e1", "offset": joined[0]["offset"], "recovered": True}
        ]
        assert await offsets(alice) == [1, 2, 3, 4]
        bp.deliver(bp.sequence("r", 5))
        assert await offsets(alice) == [5]


# -- lost order: 4001 ------------------------------------------------------------------------------


async def test_a_gap_that_cannot_be_filled_closes_members_with_4001(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with (
        running(hub),
        open_test_client(hub, user="alice") as alice,
        open_test_client(hub, user="bob") as bob,
    ):
        await alice.join("r")
        await bob.join("r")
        room = hub.room("r")
        assert room is not None
        bp.deliver(bp.sequence("r", 1))
        bp.sequence("r", 2)  # never reaches this node, and is trimmed
        bp.replay_none = True
        bp.deliver(bp.sequence("r", 3))
        for client in (alice, bob):
            await client.expect("message", offset=1)
            await client.expect_closed(4001)
            assert client.messages == []
        assert "messages lost to members here" in caplog.text
        # The room here moved on to the backplane's position.
        assert (room.epoch, room.offset, room.sequencer.held) == ("e1", 3, 0)
        # A later joiner starts from the room's position; it is not told 3.
        async with open_test_client(hub, user="carol") as carol:
            joined = await carol.join("r", since={"epoch": "e1", "offset": 1})
            assert joined == {"room": "r", "epoch": "e1", "offset": 3, "recovered": False}
            bp.deliver(bp.sequence("r", 4))
            assert await offsets(carol) == [4]


@pytest.mark.parametrize("how", ["message", "reset"])
async def test_an_epoch_change_on_a_live_room_closes_members_with_4001(
    autojump_clock: trio.abc.Clock, how: str
) -> None:
    """The room's order started over: by a message of the new epoch arriving,
    or by the backplane's reset (the position's epoch changed, even to an
    offset this node is already past). A connection that joins at once, while
    the old members are still closing, starts from the new position."""
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with (
        running(hub),
        open_test_client(hub, user="alice") as alice,
        open_test_client(hub, user="bob") as bob,
        open_test_client(hub, user="carol") as carol,
    ):
        await alice.join("r")
        await bob.join("r")
        room = hub.room("r")
        assert room is not None
        bp.deliver(*[bp.sequence("r", f"old{n}") for n in (1, 2)])
        bp.new_epoch("r", "e2")
        if how == "message":
            bp.sequence("r", "lost")
            bp.deliver(bp.sequence("r", "new"))  # e2, offset 2
            # No checkpoint since: the old members are closing, the room is open.
            assert await hub.join(carol.connection_id, "r")
            assert hub.room("r") is room
        else:
            bp.sequence("r", "new")  # e2, offset 1: behind this node's position
            hub.backplane_event(RoomReset("r"))
        for client in (alice, bob):
            assert await offsets(client) == [1, 2]
            await client.expect_closed(4001)
        position = ("e2", len(bp.logs["r"]))
        assert (room.epoch, room.offset) == position
        if how == "reset":
            joined = await carol.join("r", since={"epoch": "e1", "offset": 2})
            assert joined == {"room": "r", "epoch": "e2", "offset": 1, "recovered": False}
        bp.deliver(bp.sequence("r", "next"))
        await carol.expect("message", epoch="e2", offset=position[1] + 1, data="next")
        await carol.assert_nothing_received()


async def test_a_reset_of_a_room_that_is_up_to_date_changes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        bp.deliver(bp.sequence("r", 1))
        await alice.expect("message", offset=1)
        hub.backplane_event(RoomReset("r"))
        await alice.assert_nothing_received()
        assert bp.positions == ["r", "r"]
        assert bp.replays == []
        # Messages the channel lost (no gap seen): a reset reads them back.
        bp.sequence("r", 2)
        bp.sequence("r", 3)
        hub.backplane_event(RoomReset("r"))
        assert await offsets(alice) == [2, 3]
        assert bp.replays == [("r", "e1", 1, 3)]


# -- the publisher's reply -------------------------------------------------------------------------


async def publish_frame(client: TestClient, ref: int, data: Any) -> None:
    await client.send({"type": "publish", "room": "r", "ref": ref, "data": data})


async def test_reply_before_the_message_when_it_is_delivered_before_publish_returns(
    autojump_clock: trio.abc.Clock,
) -> None:
    bp = ScriptedBackplane()
    bp.deliver_on_publish = True
    hub = scripted_hub(bp)
    async with (
        running(hub),
        open_test_client(hub, user="alice") as alice,
        open_test_client(hub, user="bob") as bob,
    ):
        await alice.join("r")
        await bob.join("r")
        bp.publish_gate = trio.Event()  # publish() has not returned yet
        await publish_frame(alice, 7, "hi")
        await alice.expect_reply(7, status="ok")
        await alice.expect("message", offset=1, data="hi", from_="alice")
        await bob.expect("message", offset=1)
        bp.publish_gate.set()  # publish() returns: no second reply
        await alice.assert_nothing_received()
        await bob.assert_nothing_received()
        assert hub._registry.awaiting == 0


async def test_reply_before_the_message_when_publish_returns_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        await publish_frame(alice, 7, "hi")
        reply = await alice.expect_reply(7, status="ok")
        assert reply["data"] == {"offset": 1}
        await alice.assert_nothing_received()  # sequenced, not delivered yet
        assert hub._registry.awaiting == 0
        [item] = bp.logs["r"]
        assert item.nonce is not None
        bp.deliver(item)
        await alice.expect("message", offset=1, data="hi")
        await alice.assert_nothing_received()


@pytest.mark.parametrize("delivered_first", [False, True])
async def test_reply_of_a_message_held_behind_a_gap(
    autojump_clock: trio.abc.Clock, delivered_first: bool
) -> None:
    """The publisher's message waits for a gap before it: the reply goes out
    when ``publish()`` returns, whether or not the message already arrived,
    and the message follows in order once the gap is filled."""
    bp = ScriptedBackplane()
    bp.deliver_on_publish = delivered_first
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        bp.sequence("r", "before")  # offset 1, not delivered here yet
        bp.replay_gate = trio.Event()
        await publish_frame(alice, 7, "mine")
        await alice.expect_reply(7, status="ok")
        await alice.assert_nothing_received()
        if not delivered_first:
            bp.deliver(bp.logs["r"][1])
        bp.replay_gate.set()
        await alice.expect("message", offset=1, data="before")
        await alice.expect("message", offset=2, data="mine")
        await alice.assert_nothing_received()
        assert hub._registry.awaiting == 0


async def test_reply_when_the_room_closed_before_the_message_arrived(
    autojump_clock: trio.abc.Clock,
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        bp.publish_gate = trio.Event()
        await publish_frame(alice, 7, "hi")
        await trio.testing.wait_all_tasks_blocked()
        assert hub.leave(alice.connection_id, "r")
        assert hub.room("r") is None
        bp.deliver(bp.logs["r"][0])  # no room here: only the reply
        await alice.expect_reply(7, status="ok")
        bp.publish_gate.set()
        await alice.assert_nothing_received()


async def test_reply_then_4001_when_the_message_comes_in_a_new_epoch(
    autojump_clock: trio.abc.Clock,
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        bp.new_epoch("r", "e2")  # the order was lost just before this publish
        bp.deliver_on_publish = True
        await publish_frame(alice, 7, "hi")
        reply = await alice.expect_reply(7, status="ok")
        assert reply["data"] == {"offset": 1}
        await alice.expect_closed(4001)
        assert alice.messages == []


# -- presence from other nodes ---------------------------------------------------------------------


MALFORMED: list[Any] = [
    {},
    {"op": "join"},
    {"op": "join", "room": "r", "user": "x", "connection_id": "c9"},  # no joined_at
    {"op": "join", "room": "r", "user": "x", "connection_id": "c9", "joined_at": "soon"},
    {"op": "join", "room": "r", "user": "x", "connection_id": "c9", "joined_at": 1, "data": [1]},
    {"op": "join", "room": "r", "user": "x", "connection_id": "c9", "joined_at": 1, "data": "ab"},
    {"op": "join", "room": "r", "user": "x", "connection_id": "c9", "joined_at": None},
    {"op": "leave", "room": "r"},
    {"op": "leave", "connection_id": "c1"},
    ["op", "join"],
    "join",
    None,
]


@pytest.mark.parametrize("event", MALFORMED, ids=[repr(e)[:40] for e in MALFORMED])
def test_malformed_presence_events_never_reach_the_hub(event: Any) -> None:
    """The byte format refuses them: a backplane logs and drops what does not decode."""
    wire = b'p["n2"]\n' + json.dumps(event).encode()
    with pytest.raises(ValueError, match=r"presence|op|joined_at|connection_id|room|object"):
        decode_node_event(wire)


async def test_a_presence_event_that_does_not_fit_is_logged_and_ignored(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp, presence=True)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        await alice.expect("presence_state", users={"alice": [me(alice)]})
        presence_event(hub, "n2", remote_join("r", "bob", "c1"))
        await alice.expect("presence_diff", joins={"bob": [{"connection_id": "c1"}]})
        before = hub.presence("r")
        # c1 is bob's connection on that node: it cannot turn into someone else's.
        with caplog.at_level(logging.WARNING, logger="chatcore.hub"):
            presence_event(hub, "n2", remote_join("r", "mallory", "c1"))
        assert "ignoring a presence event from node n2" in caplog.text
        assert hub.presence("r") == before
        await trio.sleep(2 * GRACE)
        await alice.assert_nothing_received()
        assert hub.presence("r") == before


async def test_presence_events_from_other_nodes(autojump_clock: trio.abc.Clock) -> None:
    bp = ScriptedBackplane("n1")
    hub = scripted_hub(bp, presence=True)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        await alice.expect("presence_state")
        presence_event(hub, "n2", remote_join("r", "bob", "c1", {"device": "phone"}))
        await alice.expect(
            "presence_diff", joins={"bob": [{"connection_id": "c1", "device": "phone"}]}
        )
        presence_event(hub, "n2", remote_join("r", "bob", "c2"))  # a second tab: no diff
        presence_event(hub, "n1", remote_join("r", "eve", "c3"))  # our own echo: ignored
        await alice.assert_nothing_received()
        assert set(hub.presence("r")) == {"alice", "bob"}
        # Another node asks for the state: every local connection is announced.
        bp.announced.clear()
        presence_event(hub, "n3", {"op": "sync"})
        await trio.testing.wait_all_tasks_blocked()
        assert [(e["op"], e.get("user"), e.get("connection_id")) for e in bp.announced] == [
            ("state", None, None),  # all it has, between these two
            ("join", "alice", alice.connection_id),
            ("state_end", None, None),
        ]
        # An op this version does not know is skipped.
        presence_event(hub, "n2", {"op": "future", "room": "r"})
        for cid in ("c1", "c2"):
            presence_event(hub, "n2", {"op": "leave", "room": "r", "connection_id": cid})
        left = trio.current_time()
        assert set(hub.presence("r")) == {"alice", "bob"}  # in grace
        await alice.expect(
            "presence_diff", leaves={"bob": [{"connection_id": "c2"}]}, timeout=2 * GRACE
        )
        assert trio.current_time() - left == pytest.approx(GRACE)
        # A node whose lease expired: its users go after the grace window too.
        presence_event(hub, "n3", remote_join("r", "carol", "c1"))
        await alice.expect("presence_diff", joins={"carol": [{"connection_id": "c1"}]})
        hub.backplane_event(NodeDown("n1"))  # this node itself: ignored
        hub.backplane_event(NodeDown("n3"))
        down = trio.current_time()
        await alice.expect(
            "presence_diff", leaves={"carol": [{"connection_id": "c1"}]}, timeout=2 * GRACE
        )
        assert trio.current_time() - down == pytest.approx(GRACE)
        await alice.assert_nothing_received()
        assert hub.presence("r") == {"alice": [me(alice)]}


async def test_a_nodes_state_replaces_what_was_known_of_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A node re-announces everything it has between ``{"op": "state"}`` and
    ``{"op": "state_end"}`` (its answer to a sync, or its own resync). What
    this node held of it and it did not re-announce (a leave this node missed:
    the bus is not stored) leaves a grace window after ``state_end``; users it
    did re-announce never flap, however long the re-announcement takes."""
    bp = ScriptedBackplane("n1")
    hub = scripted_hub(bp, presence=True)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        await alice.expect("presence_state")
        for user, cid in (("bob", "c1"), ("carol", "c2"), ("bob", "c3"), ("erin", "c4")):
            presence_event(hub, "n2", remote_join("r", user, cid))
        presence_event(hub, "n3", remote_join("r", "dave", "c1"))
        for user in ("bob", "carol", "erin", "dave"):
            await alice.expect("presence_diff", joins={user: [{"connection_id": ANY}]})
        # n2's state; carol's leave and bob's tab c1 closing never got here.
        presence_event(hub, "n2", {"op": "state"})
        presence_event(hub, "n1", {"op": "state"})  # an echo of our own: harmless
        presence_event(hub, "n1", {"op": "state_end"})
        await trio.sleep(3 * GRACE)  # a long re-announcement: nobody is dropped meanwhile
        presence_event(hub, "n2", remote_join("r", "bob", "c3"))
        presence_event(hub, "n2", {"op": "leave", "room": "r", "connection_id": "c4"})  # live
        presence_event(hub, "n2", remote_join("r", "frank", "c5"))  # live, after the state
        await alice.expect("presence_diff", joins={"frank": [{"connection_id": "c5"}]})
        await alice.assert_nothing_received()
        assert set(hub.presence("r")) == {"alice", "bob", "carol", "dave", "erin", "frank"}
        presence_event(hub, "n2", {"op": "state_end"})
        ended = trio.current_time()
        leaves = [await alice.receive(timeout=2 * GRACE) for _ in range(2)]
        assert trio.current_time() - ended == pytest.approx(GRACE)
        assert sorted((list(m["leaves"]), m["joins"]) for m in leaves) == [
            (["carol"], {}),
            (["erin"], {}),
        ]
        await trio.sleep(2 * GRACE)
        await alice.assert_nothing_received()
        assert hub.presence("r") == {
            "alice": [me(alice)],
            "bob": [{"connection_id": "c3"}],
            "dave": [{"connection_id": "c1"}],
            "frank": [{"connection_id": "c5"}],
        }
        # A node that goes down in the middle of its state: its end never comes.
        presence_event(hub, "n3", {"op": "state"})
        hub.backplane_event(NodeDown("n3"))
        assert hub._presence.unconfirmed == {}  # nothing kept for a node that is gone
        presence_event(hub, "n3", {"op": "state_end"})  # late: harmless
        await alice.expect(
            "presence_diff", leaves={"dave": [{"connection_id": "c1"}]}, timeout=2 * GRACE
        )
        assert hub._presence.unconfirmed == {}


async def test_announcements_wait_for_the_backplane_and_go_out_in_order(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    bp = ScriptedBackplane("n1")
    hub = scripted_hub(bp, presence=True)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await trio.testing.wait_all_tasks_blocked()
        assert bp.announced == [{"op": "sync"}]  # hub.run() asks the others
        bp.presence_errors = 3  # unavailable: three attempts fail
        start = trio.current_time()
        await alice.join("r")
        await alice.leave("r")
        await alice.join("s")
        await trio.testing.wait_all_tasks_blocked()
        assert bp.announced == [{"op": "sync"}]
        await trio.sleep(3.0)  # retried every second, nothing lost, in order
        await trio.testing.wait_all_tasks_blocked()
        assert [(e["op"], e["room"]) for e in bp.announced[1:]] == [
            ("join", "r"),
            ("leave", "r"),
            ("join", "s"),
        ]
        assert trio.current_time() - start == pytest.approx(3.0)
        assert bp.presence_errors == 0
        # The queue overflows while one is being sent: the oldest are
        # dropped (the one in flight among them, which is not popped again:
        # that would drop a newer one), the newest go out.
        hub._presence.announcements = deque(maxlen=2)
        bp.presence_gate = trio.Event()
        bp.announced.clear()
        for room in ("a", "b", "c", "d"):
            await alice.join(room)
        await trio.testing.wait_all_tasks_blocked()
        bp.presence_gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [e["room"] for e in bp.announced] == ["a", "c", "d"]
        assert not hub._presence.announcements


async def test_online_users_and_presence_on_the_server(autojump_clock: trio.abc.Clock) -> None:
    bp = ScriptedBackplane()
    hub = scripted_hub(bp, presence=True)
    async with (
        running(hub),
        open_test_client(hub, user="alice") as alice,
        open_test_client(hub, user="idle") as idle,
    ):
        await alice.join("r")
        presence_event(hub, "n2", remote_join("r", "bob", "c1"))
        presence_event(hub, "n2", remote_join("s", "carol", "c2"))
        assert hub.online_users() == {"alice", "idle", "bob", "carol"}  # idle: in no room
        assert hub.presence("r") == {"alice": [me(alice)], "bob": [{"connection_id": "c1"}]}
        assert hub.presence("s") == {"carol": [{"connection_id": "c2"}]}
        assert hub.presence("none") == {}
        # A user in the grace window is present, not online.
        presence_event(hub, "n2", {"op": "leave", "room": "r", "connection_id": "c1"})
        await alice.leave("r")
        assert hub.online_users() == {"alice", "idle", "carol"}
        assert hub.presence("r") == {"alice": [me(alice)], "bob": [{"connection_id": "c1"}]}
        await trio.sleep(GRACE + 0.1)
        assert hub.presence("r") == {}
        await idle.close()
        await trio.testing.wait_all_tasks_blocked()
        assert hub.online_users() == {"alice", "carol"}


async def test_presence_off_ignores_other_nodes(autojump_clock: trio.abc.Clock) -> None:
    """Presence off: nothing is tracked or sent, whatever other nodes announce."""
    bp = ScriptedBackplane()
    hub = scripted_hub(bp, presence=False)
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        presence_event(hub, "n2", remote_join("r", "bob", "c1"))
        presence_event(hub, "n2", {"op": "sync"})
        await trio.sleep(1)
        await alice.assert_nothing_received()
        assert hub.presence("r") == {}
        assert hub.online_users() == {"alice"}
        hub.backplane_event(NodeDown("n2"))
        await trio.sleep(2 * GRACE)
        await alice.assert_nothing_received()
        assert bp.announced == []


# -- history ---------------------------------------------------------------------------------------


async def test_history_returns_the_last_messages_oldest_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = scripted_hub(LocalBackplane())
    async with running(hub), open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        for n in range(1, 6):
            await alice.publish("r", {"n": n})
        await hub.publish("r", "from the server")
        history = await hub.history("r", limit=3)
        assert [(m["offset"], m["data"]) for m in history] == [
            (4, {"n": 4}),
            (5, {"n": 5}),
            (6, "from the server"),
        ]
        assert history[0] == {
            "type": "message",
            "room": "r",
            "offset": 4,
            "epoch": history[0]["epoch"],
            "from": "alice",
            "data": {"n": 4},
        }
        assert history[-1]["from"] is None
        assert [m["offset"] for m in await hub.history("r")] == [1, 2, 3, 4, 5, 6]
        assert await hub.history("r", limit=0) == []
        assert await hub.history("never") == []
