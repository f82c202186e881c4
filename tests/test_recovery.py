"""Reconnect recovery: ``join`` with ``since``, on the in-process backplane.

The protocol (docs/protocol.md) promises, per room: a client that comes back with the position it
last saw (``since: {"epoch", "offset"}``) either gets *every* message it
missed, right after the join reply and before anything live
(``recovered: true``), or is told ``recovered: false`` and gets nothing
replayed. Nothing is partially recovered. After ``recovered: false`` the
client reloads: the reply's ``offset`` is its new position, and it continues
gap-free from there.

These tests check that promise from the client's side. The ground truth is
the room's order as the backplane assigned it (:class:`RecordingBackplane`
records every sequenced message); a client's *sequence* is every ``message``
it received for the room across all its connections, in arrival order.

- ``test_recovery_property`` (hypothesis) and ``test_recovery_long_schedules``
  (seeded): random interleavings of publishes from several clients and the
  server, closes and vanishes, reconnects with ``since``, virtual time passing
  and a small :class:`~chatcore.HistoryConfig` (count, age, forgotten rooms).
  Every client's sequence is the room's order with no gap or duplicate,
  restarting only where it was told ``recovered: false``; and
  ``recovered: false`` only when the history really no longer held what it
  missed.
- A slow consumer closed with 4001 and a drained (1012) client both come back
  with ``since`` and end with every message.
- Each bound of :class:`~chatcore.HistoryConfig` answers ``recovered: false``
  once it has trimmed what a client missed; a replay that would not fit the
  connection's outbox is refused whole.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from conftest import TEST_CONFIG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatcore import (
    HandshakeRejected,
    HandshakeRequest,
    HistoryConfig,
    Hub,
    HubConfig,
    Identity,
    LocalBackplane,
    Position,
    Reject,
    serve_connection,
)
from chatcore.testing import TestClient, open_test_client
from chatcore.transports import CloseFrame, MemoryClient, TextFrame, memory_stream_pair

# -- helpers -------------------------------------------------------------------------


async def by_query(request: HandshakeRequest) -> Identity | str | Reject:
    """The example app's authentication: ``?user=<id>``."""
    await trio.lowlevel.checkpoint()
    user = request.query.get("user")
    return Reject(401, b"who are you?") if user is None else user


@attrs.frozen
class Published:
    """One message as the backplane sequenced it (the ground truth)."""

    room: str
    epoch: str
    offset: int
    data: Any
    at: float


class RecordingBackplane(LocalBackplane):
    """A :class:`LocalBackplane` that records every message it sequences, in order."""

    def __init__(self, history: HistoryConfig | None = None) -> None:
        super().__init__(history)
        #: Every sequenced message, in the order offsets were assigned.
        self.published: list[Published] = []

    async def publish(
        self, room: str, sender: str | None, data: Any, nonce: str | None
    ) -> Position:
        position = await super().publish(room, sender, data, nonce)
        # No checkpoint between the offset being taken and this line, so the
        # record is in the order offsets were assigned.
        self.published.append(
            Published(room, position.epoch, position.offset, data, trio.current_time())
        )
        return position

    def order(self, room: str) -> list[Published]:
        """The room's messages in order (all epochs)."""
        return [p for p in self.published if p.room == room]


def check_room_order(order: list[Published]) -> None:
    """Within each epoch the room's offsets are 1, 2, 3... (the truth is sane)."""
    last: dict[str, int] = {}
    for p in order:
        assert p.offset == last.get(p.epoch, 0) + 1, f"the backplane skipped an offset: {p}"
        last[p.epoch] = p.offset


def room_messages(messages: list[dict[str, Any]], room: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "message" and m["room"] == room]


def wire_messages(wire: MemoryClient) -> list[dict[str, Any]]:
    """Every message in the text frames a raw wire received so far."""
    return [
        json.loads(line)
        for frame in wire.frames
        if isinstance(frame, TextFrame)
        for line in frame.text.split("\n")
    ]


def assert_gapless(messages: list[dict[str, Any]], truth: list[Published]) -> None:
    """``messages`` are exactly the room's order, from its first message on."""
    got = [(m["epoch"], m["offset"], m["data"]) for m in messages]
    want = [(p.epoch, p.offset, p.data) for p in truth]
    assert got == want


# -- the property: random schedules ------------------------------------------------


@attrs.frozen
class Joined:
    """A join reply as a tab saw it."""

    since: dict[str, Any] | None
    data: dict[str, Any]
    #: Virtual time the join was sent; ``exact`` if the reply came at the same instant
    #: (then the server handled the join at ``at``).
    at: float
    exact: bool


@attrs.frozen
class Received:
    """A room message as a tab saw it."""

    epoch: str
    offset: int
    data: Any


@attrs.define(eq=False)
class Tab:
    """A browser tab: one user, one connection at a time, a memory across them."""

    name: str
    #: down | connecting | up | closing
    state: str = "down"
    client: TestClient | None = None
    stop: trio.Event = attrs.Factory(trio.Event)
    how: str = "close"
    #: Everything it saw, across its connections, in order.
    log: list[Joined | Received] = attrs.Factory(list)

    def position(self) -> dict[str, Any] | None:
        """The position a client would send as ``since``: what it last saw.

        A join reply sets it when the client reloads (first join, or
        ``recovered: false``); every message moves it.
        """
        position: dict[str, Any] | None = None
        for event in self.log:
            if isinstance(event, Joined):
                if event.since is None or not event.data["recovered"]:
                    position = {"epoch": event.data["epoch"], "offset": event.data["offset"]}
            else:
                position = {"epoch": event.epoch, "offset": event.offset}
        return position


@attrs.define
class Stats:
    recovered_with_replay: int = 0
    recovered_nothing_missed: int = 0
    not_recovered: int = 0
    epoch_changes: int = 0


async def _tab_connection(hub: Hub, tab: Tab) -> None:
    """One connection of ``tab``: join (with ``since`` after the first), wait, leave."""
    since = tab.position()
    async with open_test_client(hub, user=tab.name) as client:
        sent_at = trio.current_time()
        data = await client.join("r", since=since)
        tab.log.append(Joined(since, data, sent_at, trio.current_time() == sent_at))
        tab.client = client
        tab.stop = trio.Event()
        tab.state = "up"
        await tab.stop.wait()
        if tab.how == "vanish":
            client.vanish()
        # Otherwise leaving the block closes with 1000.
    # What arrived before the link went away is what the tab saw.
    for message in room_messages(client.messages, "r"):
        tab.log.append(Received(message["epoch"], message["offset"], message["data"]))
    tab.client = None
    tab.state = "down"


def _must_have_recovered(joined: Joined, truth: list[Published], history: HistoryConfig) -> bool:
    """True if the history still held everything the tab missed when it joined."""
    assert joined.since is not None
    if not joined.exact or joined.since["epoch"] != joined.data["epoch"]:
        return False
    after, upto = joined.since["offset"], joined.data["offset"]
    if after > upto:
        return False
    now = joined.at
    for p in truth:
        if p.epoch != joined.data["epoch"] or not after < p.offset <= upto:
            continue
        if p.offset <= upto - history.max_messages:
            return False  # trimmed by count
        if history.max_age is not None and p.at + history.max_age < now:
            return False  # trimmed by age
    return True


def check_tab(tab: Tab, truth: list[Published], history: HistoryConfig, stats: Stats) -> None:
    """The tab's sequence is the room's order, restarting only where it reloaded."""
    by_position = {(p.epoch, p.offset): p for p in truth}
    position: tuple[str, int] | None = None
    for event in tab.log:
        if isinstance(event, Joined):
            data = event.data
            if event.since is None:
                assert "recovered" not in data
                position = (data["epoch"], data["offset"])
                continue
            assert position == (event.since["epoch"], event.since["offset"])
            if data["recovered"] is True:
                # Same epoch, and the reply's offset is not behind the client.
                assert data["epoch"] == event.since["epoch"]
                assert data["offset"] >= event.since["offset"]
                if data["offset"] > event.since["offset"]:
                    stats.recovered_with_replay += 1
                else:
                    stats.recovered_nothing_missed += 1
                # The position stays: the replayed messages must continue it.
            else:
                assert data["recovered"] is False
                assert not _must_have_recovered(event, truth, history), (
                    f"{tab.name} was told recovered: false, but the history still held "
                    f"everything after {event.since} at t={event.at}: {data}"
                )
                stats.not_recovered += 1
                if data["epoch"] != event.since["epoch"]:
                    stats.epoch_changes += 1
                position = (data["epoch"], data["offset"])  # reload
        else:
            assert position is not None
            # No gap, no duplicate, no epoch switch without being told.
            assert (event.epoch, event.offset) == (position[0], position[1] + 1), (
                f"{tab.name} at {position} received {event}"
            )
            assert by_position[event.epoch, event.offset].data == event.data
            position = (event.epoch, event.offset)
    # It ends with everything: the last message was published after every tab
    # was back in the room.
    last = truth[-1]
    assert position == (last.epoch, last.offset), f"{tab.name} ended at {position}, room at {last}"


#: Actions of a schedule.
_tab = st.integers(0, 3)
_action = st.one_of(
    st.tuples(st.just("publish"), _tab),
    st.tuples(st.just("publish"), _tab),
    st.tuples(st.just("server"), st.just(0)),
    st.tuples(st.just("close"), _tab),
    st.tuples(st.just("vanish"), _tab),
    st.tuples(st.just("reconnect"), _tab),
    st.tuples(st.just("reconnect"), _tab),
    st.tuples(st.just("yield"), st.integers(1, 8)),
    st.tuples(st.just("sleep"), st.sampled_from([0.5, 1.5, 4.0, 11.0])),
    st.tuples(st.just("other"), st.just(0)),
    st.tuples(st.just("burst"), st.integers(1, 6)),
)


@attrs.frozen
class Plan:
    tabs: int
    history: HistoryConfig
    presence: bool
    actions: list[tuple[str, int | float]]


@st.composite
def _plans(draw: st.DrawFn) -> Plan:
    return Plan(
        tabs=draw(st.integers(2, 4)),
        history=HistoryConfig(
            max_messages=draw(st.integers(1, 8)),
            max_age=draw(st.sampled_from([None, 3.0, 10.0])),
            max_bytes=None,
            rooms=draw(st.sampled_from([1, 100])),
        ),
        presence=draw(st.booleans()),
        actions=draw(st.lists(_action, max_size=40)),
    )


async def _apply(
    action: tuple[str, int | float],
    hub: Hub,
    tabs: list[Tab],
    nursery: trio.Nursery,
    ids: Iterator[int],
) -> None:
    kind, arg = action
    if kind in ("publish", "close", "vanish", "reconnect"):
        tab = tabs[int(arg) % len(tabs)]
        if kind == "publish" and tab.state == "up":
            assert tab.client is not None
            n = next(ids)
            # Pipelined: the reply is not awaited, so publishes race everything else.
            await tab.client.send(
                {"type": "publish", "room": "r", "data": {"n": n}, "ref": f"p{n}"}
            )
        elif kind in ("close", "vanish") and tab.state == "up":
            tab.state = "closing"
            tab.how = kind
            tab.stop.set()
        elif kind == "reconnect" and tab.state == "down":
            tab.state = "connecting"
            nursery.start_soon(_tab_connection, hub, tab)
    elif kind == "server":
        await hub.publish("r", {"n": next(ids)})
    elif kind == "burst":
        # Server-side publishes in the background, racing whatever comes next.
        for _ in range(int(arg)):
            nursery.start_soon(hub.publish, "r", {"n": next(ids)})
    elif kind == "other":
        # With HistoryConfig(rooms=1) this forgets "r" if nobody is in it.
        await hub.publish("other", {"n": next(ids)})
    elif kind == "yield":
        for _ in range(int(arg)):
            await trio.lowlevel.checkpoint()
    else:
        await trio.sleep(float(arg))


async def _run_plan(plan: Plan, stats: Stats) -> None:
    backplane = RecordingBackplane(plan.history)
    hub = Hub(
        authenticate=by_query,
        backplane=backplane,
        config=HubConfig(publish_burst=100_000, presence=plan.presence),
        connection_config=TEST_CONFIG,
    )
    tabs = [Tab(f"t{i}") for i in range(plan.tabs)]
    ids = itertools.count(1)
    with trio.fail_after(3_000):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            for tab in tabs:
                tab.state = "connecting"
                nursery.start_soon(_tab_connection, hub, tab)
            await trio.testing.wait_all_tasks_blocked()
            for action in plan.actions:
                await _apply(action, hub, tabs, nursery, ids)
            # Everybody comes back, one more message, and everybody has it.
            while not all(tab.state == "up" for tab in tabs):
                for tab in tabs:
                    if tab.state == "down":
                        tab.state = "connecting"
                        nursery.start_soon(_tab_connection, hub, tab)
                await trio.testing.wait_all_tasks_blocked()
            await hub.publish("r", {"n": next(ids)})
            await trio.testing.wait_all_tasks_blocked()
            for tab in tabs:
                tab.state = "closing"
                tab.stop.set()
            await trio.testing.wait_all_tasks_blocked()
            assert all(tab.state == "down" for tab in tabs)
            nursery.cancel_scope.cancel()
    truth = backplane.order("r")
    check_room_order(truth)
    for tab in tabs:
        check_tab(tab, truth, plan.history, stats)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=_plans())
def test_recovery_property(plan: Plan) -> None:
    trio.run(_run_plan, plan, Stats(), clock=trio.testing.MockClock(autojump_threshold=0))


def test_recovery_long_schedules() -> None:
    """Seeded schedules, longer than hypothesis's; every outcome occurs."""
    stats = Stats()
    actions = [
        ("publish", 0),
        ("publish", 0),
        ("publish", 0),
        ("server", 0),
        ("close", 0),
        ("vanish", 0),
        ("reconnect", 0),
        ("reconnect", 0),
        ("yield", 0),
        ("sleep", 0),
        ("other", 0),
        ("burst", 0),
    ]
    for seed in range(20):
        rng = random.Random(seed)
        schedule: list[tuple[str, int | float]] = []
        for _ in range(300):
            kind = rng.choice(actions)[0]
            if kind in ("publish", "close", "vanish", "reconnect"):
                schedule.append((kind, rng.randrange(5)))
            elif kind in ("yield", "burst"):
                schedule.append((kind, rng.randint(1, 10)))
            elif kind == "sleep":
                schedule.append((kind, rng.choice([0.2, 1.0, 3.0, 9.0])))
            else:
                schedule.append((kind, 0))
        plan = Plan(
            tabs=5,
            history=HistoryConfig(
                max_messages=rng.choice([3, 6, 12]),
                max_age=rng.choice([None, 8.0]),
                max_bytes=None,
                rooms=rng.choice([1, 100]),
            ),
            presence=seed % 2 == 0,
            actions=schedule,
        )
        trio.run(_run_plan, plan, stats, clock=trio.testing.MockClock(autojump_threshold=0))
    # The schedules exercise every answer, so the property is not vacuous.
    assert stats.recovered_with_replay > 10
    assert stats.recovered_nothing_missed > 0
    assert stats.not_recovered > 0
    assert stats.epoch_changes > 0


# -- slow consumer (4001) ------------------------------------------------------------

#: A small outbox: a client that stops reading overflows it after ~20 messages.
# No burst allowance: the slow client is closed as soon as its outbox is full.
SMALL_OUTBOX = attrs.evolve(
    TEST_CONFIG, outbox_max_bytes=4_096, batch_max_bytes=4_096, outbox_burst_bytes=4_096
)
PAD = "x" * 100


async def read_messages_until_close(wire: MemoryClient) -> CloseFrame:
    """Read frames until the close frame (the client reads again)."""
    with trio.fail_after(60):
        while True:
            frame = await wire.receive_frame()
            if isinstance(frame, CloseFrame):
                return frame


async def test_slow_consumer_closed_4001_recovers_every_message(
    autojump_clock: trio.abc.Clock,
) -> None:
    backplane = RecordingBackplane()
    hub = Hub(authenticate=by_query, backplane=backplane, connection_config=SMALL_OUTBOX)
    async with open_test_client(hub, user="writer") as writer, trio.open_nursery() as nursery:
        await writer.join("r")
        # The slow client on a raw wire that buffers one frame: when it stops
        # reading, the server's writer blocks and its outbox fills up.
        stream, wire = memory_stream_pair(HandshakeRequest("/ws", "user=slow"), capacity=1)
        slow = await nursery.start(functools.partial(serve_connection, stream, hub))
        await wire.wait_accepted()
        await wire.send(json.dumps({"type": "join", "room": "r", "ref": "j"}))
        # It reads its hello, its join reply and the first messages...
        for n in range(1, 4):
            await writer.publish("r", {"n": n, "pad": PAD})
            while len(room_messages(wire_messages(wire), "r")) < n:
                await wire.receive_frame()
        join_reply = next(m for m in wire_messages(wire) if m["type"] == "reply")
        epoch = join_reply["data"]["epoch"]
        # ...then stops reading. Publishing goes on, the outbox overflows: 4001.
        n = 3
        while slow.close_record is None:
            n += 1
            await writer.publish("r", {"n": n, "pad": PAD})
        assert slow.close_record.code == 4001
        assert n > 10
        for _ in range(5):  # published while it is away
            n += 1
            await writer.publish("r", {"n": n, "pad": PAD})
        # It reads again: everything accepted before the overflow, then the 4001.
        assert await read_messages_until_close(wire) == CloseFrame(4001, "slow consumer")
        before = room_messages(wire_messages(wire), "r")
        truth = backplane.order("r")
        assert_gapless(before, truth[: len(before)])
        assert len(before) < n
        # It reconnects with since = the last offset it saw, and gets the rest.
        last = before[-1]["offset"]
        async with open_test_client(hub, user="slow") as again:
            data = await again.join("r", since={"epoch": epoch, "offset": last})
            assert data == {"room": "r", "epoch": epoch, "offset": n, "recovered": True}
            for _ in range(3):  # and live messages follow the replayed ones
                n += 1
                await writer.publish("r", {"n": n, "pad": PAD})
            await trio.testing.wait_all_tasks_blocked()
            after = room_messages(again.messages, "r")
        assert_gapless(before + after, backplane.order("r"))
        assert [m["data"]["n"] for m in before + after] == list(range(1, n + 1))
        nursery.cancel_scope.cancel()


async def test_replay_larger_than_the_outbox_is_refused_whole(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Recovery is never partial: if the missed messages cannot all be queued at
    once (they would overflow the connection's outbox), none are, and the
    client is told ``recovered: false``."""
    backplane = RecordingBackplane()
    hub = Hub(authenticate=by_query, backplane=backplane, connection_config=SMALL_OUTBOX)
    async with open_test_client(hub, user="a") as a:
        position = await a.join("r")
        await a.close()
    for n in range(1, 41):  # ~6.5 KB, more than the 4 KB outbox
        await hub.publish("r", {"n": n, "pad": PAD})
    async with open_test_client(hub, user="a") as a:
        since = {"epoch": position["epoch"], "offset": 0}
        data = await a.join("r", since=since)
        assert data == {"room": "r", "epoch": position["epoch"], "offset": 40, "recovered": False}
        await a.assert_nothing_received()
        # A client that missed less than the outbox holds recovers.
        data = await a.join("s", since=None)
        await hub.publish("r", {"n": 41, "pad": PAD})
        await a.expect("message", offset=41)
    async with open_test_client(hub, user="b") as b:
        data = await b.join("r", since={"epoch": position["epoch"], "offset": 30})
        assert data["recovered"] is True
        got = [(await b.expect("message"))["offset"] for _ in range(11)]
        assert got == list(range(31, 42))
        await b.assert_nothing_received()


# -- drain (1012) and a new process sharing the history -------------------------------


async def test_drain_then_reconnect_to_a_new_hub_loses_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Clients of a draining hub come back with ``since`` to its successor.

    The successor is a new :class:`Hub` on the same backplane: in process,
    that is how a restart that keeps the rooms' history looks (with Redis it
    is another process). A :class:`LocalBackplane` delivers to the hub
    attached last, so the successor starts once the old hub has drained, as
    a restarted process would; clients that come back earlier are refused
    with 503 and retry. Publishes, from clients and from the server, go on
    throughout. Every client ends with every message, in order.
    """
    backplane = RecordingBackplane()

    def new_hub() -> Hub:
        return Hub(
            authenticate=by_query,
            backplane=backplane,
            config=HubConfig(reconnect_min_ms=200, reconnect_max_ms=1_500, retry_after=1),
            connection_config=attrs.evolve(TEST_CONFIG, close_timeout=1.0),
        )

    current = [new_hub()]
    names = [f"c{i}" for i in range(8)]
    sequences: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    joins: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    closes: dict[str, list[int]] = {name: [] for name in names}
    refused: list[int] = []
    go = trio.Event()  # everybody is in: start publishing
    quiet = trio.Event()  # stop publishing
    finished = trio.Event()  # leave
    ids = itertools.count(1)

    async def client(name: str, task_status: trio.TaskStatus[None]) -> None:
        since: dict[str, Any] | None = None
        delay = 0.0
        while True:
            await trio.sleep(delay)
            try:
                async with open_test_client(current[0], user=name) as c:
                    data = await c.join("r", since=since)
                    joins[name].append(data)
                    if since is None:
                        task_status.started()
                    while c.closed is None and not finished.is_set():
                        if go.is_set() and not quiet.is_set():
                            try:
                                await c.send(
                                    {"type": "publish", "room": "r", "data": {"n": next(ids)}}
                                )
                            except AssertionError:
                                pass  # closed meanwhile: the loop ends
                        await trio.sleep(0.37)
            except HandshakeRejected as exc:  # the old hub drains (503): try again
                refused.append(exc.status)
                delay = 1.0
                continue
            messages = c.messages
            sequences[name].extend(room_messages(messages, "r"))
            if finished.is_set():
                return
            assert c.closed is not None
            closes[name].append(c.closed.code)
            shutdown = [m for m in messages if m["type"] == "shutdown"]
            assert len(shutdown) == 1
            delay = shutdown[0]["reconnect_after_ms"] / 1000
            last = sequences[name][-1] if sequences[name] else data
            since = {"epoch": last["epoch"], "offset": last["offset"]}

    async def server_publisher() -> None:
        while not quiet.is_set():
            await current[0].publish("r", {"n": next(ids)})
            await trio.sleep(0.23)

    async with trio.open_nursery() as nursery:
        for name in names:
            await nursery.start(client, name)
        go.set()
        nursery.start_soon(server_publisher)
        await trio.sleep(2.0)
        assert await current[0].drain(grace=4.0) == 0
        current[0] = new_hub()  # the restarted process, same history
        while not all(len(joins[name]) == 2 for name in names):
            await trio.sleep(0.5)
        await trio.sleep(2.0)  # publishing goes on with everybody on the new hub
        quiet.set()
        await trio.testing.wait_all_tasks_blocked()
        finished.set()
    truth = backplane.order("r")
    check_room_order(truth)
    assert len(truth) > 50
    assert refused  # some came back while the old hub still drained...
    assert set(refused) == {503}  # ...and were told to come back later
    for name in names:
        assert closes[name] == [1012]
        first, second = joins[name]
        assert first["offset"] == 0
        assert second["recovered"] is True, (name, second)
        assert_gapless(sequences[name], truth)


# -- the bounds of the history ---------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "pause", "recoverable"),
    [
        # max_messages: the oldest of 5 missed messages was pushed out.
        (HistoryConfig(max_messages=4), 0.0, False),
        (HistoryConfig(max_messages=5), 0.0, True),
        # max_age: messages held for 10 s (inclusive) after they were published.
        (HistoryConfig(max_age=10.0), 10.0, True),
        (HistoryConfig(max_age=10.0), 10.5, False),
        # max_bytes: each message is ~120 bytes encoded.
        (HistoryConfig(max_bytes=500), 0.0, False),
        (HistoryConfig(max_bytes=700), 0.0, True),
    ],
)
async def test_history_bounds_decide_recovery(
    autojump_clock: trio.abc.Clock, history: HistoryConfig, pause: float, recoverable: bool
) -> None:
    backplane = RecordingBackplane(history)
    hub = Hub(authenticate=by_query, backplane=backplane, connection_config=TEST_CONFIG)
    async with open_test_client(hub, user="a") as a:
        start = await a.join("r")
        await hub.publish("r", {"n": 1, "pad": "y" * 40})
        await a.expect("message", offset=1)
        since = {"epoch": start["epoch"], "offset": 1}
    for n in range(2, 7):  # missed while away
        await hub.publish("r", {"n": n, "pad": "y" * 40})
    (newest,) = await hub.history("r", 1)
    assert 100 < len(json.dumps(newest, separators=(",", ":"))) < 140
    await trio.sleep(pause)
    async with open_test_client(hub, user="a") as a:
        data = await a.join("r", since=since)
        assert data["recovered"] is recoverable
        assert (data["epoch"], data["offset"]) == (start["epoch"], 6)
        if recoverable:
            offsets = [(await a.expect("message"))["offset"] for _ in range(5)]
            assert offsets == [2, 3, 4, 5, 6]
        await a.assert_nothing_received()  # never partial
        # Either way, live messages continue from the reply's offset.
        await hub.publish("r", {"n": 7})
        await a.expect("message", offset=7, data={"n": 7})


async def test_a_forgotten_room_comes_back_with_a_new_epoch(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``HistoryConfig(rooms=...)``: rooms nobody is in are forgotten (least
    recently used first); a forgotten room's order starts over under a new
    epoch, and a ``since`` from the old epoch is not recovered."""
    hub = Hub(
        authenticate=by_query,
        backplane=LocalBackplane(HistoryConfig(rooms=2)),
        connection_config=TEST_CONFIG,
    )
    async with open_test_client(hub, user="a") as a:
        old = await a.join("r")
        await a.publish("r", "hello")
        await a.expect("message", offset=1)
        await a.join("keep")  # a room with a member is never forgotten
        await a.leave("r")
        await hub.publish("s", "other")  # "r" is the least recently used idle room...
        await hub.publish("t", "other")  # ...and goes
        data = await a.join("r", since={"epoch": old["epoch"], "offset": 1})
        assert data["recovered"] is False
        assert data["epoch"] != old["epoch"]
        assert data["offset"] == 0
        await a.assert_nothing_received()
        assert await a.publish("r", "again") == 1
        await a.expect("message", offset=1, epoch=data["epoch"])


async def test_history_is_readable_server_side(autojump_clock: trio.abc.Clock) -> None:
    hub = Hub(
        authenticate=by_query,
        backplane=LocalBackplane(HistoryConfig(max_messages=3)),
        connection_config=TEST_CONFIG,
    )
    assert await hub.history("r") == []
    async with open_test_client(hub, user="a") as a:
        data = await a.join("r")
        for n in range(1, 6):
            await a.publish("r", {"n": n})
    history = await hub.history("r", limit=2)
    assert history == [
        {
            "type": "message",
            "room": "r",
            "offset": n,
            "epoch": data["epoch"],
            "from": "a",
            "data": {"n": n},
        }
        for n in (4, 5)
    ]
    assert [m["offset"] for m in await hub.history("r")] == [3, 4, 5]  # max_messages=3
