"""Presence: who is in a room, per user, with a grace window.

With ``HubConfig(presence=True)`` a joining connection gets
``presence_state`` (every user present, with one meta per connection) after
its join reply and after any replayed messages; members then get one
``presence_diff`` per user who appears or goes. A user goes only when their
last connection in the room is gone *and* ``presence_grace`` seconds passed,
so a reload, a network blip or a deploy does not flap. Diffs are ephemeral
and coalesced per (room, user): a member that falls behind gets each user's
latest change only.

Every test runs on virtual time with ``hub.run()`` started (it runs the grace
timer). Most use one hub; the drain and crash tests use :class:`Cluster`, two
hubs in one process on a shared in-memory bus (a third backplane, written
with public names only) that share the rooms' order, history and presence
the way the Redis backplane shares them across processes.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from _bus_backplane import BusBackplane, MemoryBus
from conftest import TEST_CONFIG

from chatcore import (
    HandshakeRequest,
    Hub,
    HubConfig,
    Identity,
    Reject,
    Session,
    serve_connection,
)
from chatcore.testing import TestClient, open_test_client
from chatcore.transports import TextFrame, memory_stream_pair

GRACE = 5.0

# -- helpers -------------------------------------------------------------------------


async def by_query(request: HandshakeRequest) -> Identity | str | Reject:
    """The example app's authentication: ``?user=<id>``."""
    await trio.lowlevel.checkpoint()
    user = request.query.get("user")
    return Reject(401, b"who are you?") if user is None else user


def presence_hub(**options: Any) -> Hub:
    options.setdefault("authenticate", by_query)
    options.setdefault("config", HubConfig(presence=True, presence_grace=GRACE))
    options.setdefault("connection_config", TEST_CONFIG)
    return Hub(**options)


@asynccontextmanager
async def running(*hubs: Hub) -> AsyncIterator[trio.Nursery]:
    """Run the hubs' background work (the grace timer) for the block."""
    async with trio.open_nursery() as nursery:
        for hub in hubs:
            await nursery.start(hub.run)
        yield nursery
        nursery.cancel_scope.cancel()


def me(client: TestClient, **meta: Any) -> dict[str, Any]:
    """The meta others see for ``client``'s connection."""
    return {"connection_id": client.connection_id, **meta}


def diff(
    room: str, joins: Mapping[str, Any] | None = None, leaves: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A ``presence_diff`` message."""
    return {
        "type": "presence_diff",
        "room": room,
        "joins": dict(joins or {}),
        "leaves": dict(leaves or {}),
    }


@attrs.define
class View:
    """A client's picture of who is present, built from what it received.

    Strict: a join of a user already shown, or a leave of a user not shown,
    is a flap (or a lost message) and fails the test.
    """

    name: str
    users: dict[str, list[dict[str, Any]]] | None = None
    diffs: int = 0

    def apply(self, message: dict[str, Any]) -> None:
        if message["type"] == "presence_state":
            self.users = dict(message["users"])
        elif message["type"] == "presence_diff":
            assert self.users is not None, f"{self.name}: a diff before presence_state"
            changed = list(message["joins"]) + list(message["leaves"])
            assert len(changed) == 1, f"{self.name}: one user per diff, got {message}"
            self.diffs += 1
            for user in message["leaves"]:
                assert user in self.users, f"{self.name}: leave of absent {user}: {message}"
                del self.users[user]
            for user, metas in message["joins"].items():
                assert user not in self.users, f"{self.name}: join of present {user}: {message}"
                self.users[user] = metas

    async def take(self, client: TestClient) -> None:
        """Apply everything ``client`` has buffered (presence messages only)."""
        while client.messages:
            message = await client.receive()
            assert message["type"] in ("presence_state", "presence_diff"), message
            self.apply(message)


# -- presence_state ------------------------------------------------------------------


async def test_presence_state_on_join(autojump_clock: trio.abc.Clock) -> None:
    hub = presence_hub()
    async with running(hub), open_test_client(hub, user="alice") as alice:
        data = await alice.join("r")
        assert data == {"room": "r", "epoch": data["epoch"], "offset": 0}
        # Right after the reply: the room's presence, the joiner included.
        await alice.expect("presence_state", room="r", users={"alice": [me(alice)]})
        async with open_test_client(hub, user="bob") as bob:
            await bob.join("r")
            await bob.expect(
                "presence_state", room="r", users={"alice": [me(alice)], "bob": [me(bob)]}
            )
            await bob.assert_nothing_received()  # not its own join
            assert await alice.receive() == diff("r", joins={"bob": [me(bob)]})
            assert await alice.publish("r", "hi") == 1
            await alice.expect("message", offset=1)
            await bob.expect("message", offset=1)
            # With since: the reply, the replayed messages, then presence_state.
            async with open_test_client(hub, user="carol") as carol:
                await carol.join("r", since={"epoch": data["epoch"], "offset": 0})
                await carol.expect("message", offset=1, data="hi")
                await carol.expect(
                    "presence_state",
                    room="r",
                    users={"alice": [me(alice)], "bob": [me(bob)], "carol": [me(carol)]},
                )
                for member in (alice, bob):
                    assert await member.receive() == diff("r", joins={"carol": [me(carol)]})
                # Server side: the same picture.
                assert hub.presence("r") == {
                    "alice": [me(alice)],
                    "bob": [me(bob)],
                    "carol": [me(carol)],
                }
                assert hub.presence("elsewhere") == {}
                assert hub.online_users() == {"alice", "bob", "carol"}
                # Joining again is idempotent: a reply, no second presence_state.
                await carol.join("r")
                await carol.assert_nothing_received()
            # A server-side join sends presence_state too.
            assert await hub.join(bob.connection_id, "s")
            await bob.expect("presence_state", room="s", users={"bob": [me(bob)]})


# -- leaving: the last connection, after the grace window ------------------------------


async def test_multi_tab_user_leaves_after_the_last_tab_and_the_grace(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = presence_hub()
    async with running(hub), open_test_client(hub, user="bob") as bob:
        await bob.join("r")
        await bob.expect("presence_state")
        async with open_test_client(hub, user="alice") as tab1:
            await tab1.join("r")
            assert await bob.receive() == diff("r", joins={"alice": [me(tab1)]})
            async with open_test_client(hub, user="alice") as tab2:
                await tab2.join("r")
                await tab2.expect(
                    "presence_state", users={"bob": [me(bob)], "alice": [me(tab1), me(tab2)]}
                )
                await trio.sleep(1)
                await bob.assert_nothing_received()  # another tab: not a change of who
                await tab1.close()
                await trio.sleep(3 * GRACE)
                await bob.assert_nothing_received()  # alice is still here (tab2)
                assert hub.presence("r")["alice"] == [me(tab2)]
                await tab2.close()
                gone = trio.current_time()
            # Still present during the grace window...
            await trio.sleep(GRACE - 0.01)
            await bob.assert_nothing_received()
            assert hub.presence("r")["alice"] == [me(tab2)]
            # ...and gone when it has passed, with the meta she was last present with.
            assert await bob.receive() == diff("r", leaves={"alice": [me(tab2)]})
            assert trio.current_time() == gone + GRACE
            assert hub.presence("r") == {"bob": [me(bob)]}
            assert hub.online_users() == {"bob"}


async def test_reconnect_within_the_grace_sends_no_diff(autojump_clock: trio.abc.Clock) -> None:
    hub = presence_hub()
    async with running(hub), open_test_client(hub, user="bob") as bob:
        await bob.join("r")
        await bob.expect("presence_state")
        async with open_test_client(hub, user="alice") as alice:
            await alice.join("r")
            await alice.expect("presence_state")
            await bob.expect("presence_diff")
            alice.vanish()  # the network dropped
        # Back each time within the grace window (a blip, then page reloads).
        for pause in (GRACE - 0.5, 0.1, GRACE - 0.01):
            await trio.sleep(pause)
            async with open_test_client(hub, user="alice") as alice:
                await alice.join("r")
                # She sees herself and bob, as always.
                await alice.expect("presence_state", users={"bob": [me(bob)], "alice": [me(alice)]})
                await trio.sleep(1)
        await trio.sleep(GRACE - 0.01)
        async with open_test_client(hub, user="alice") as alice:
            await alice.join("r")
            await trio.sleep(10 * GRACE)
            await bob.assert_nothing_received()  # no leave, no join: no flapping
        # Back only after the grace window: a leave, then a join.
        await trio.sleep(GRACE)
        assert (await bob.receive())["leaves"] == {"alice": [me(alice)]}
        async with open_test_client(hub, user="alice") as alice:
            await alice.join("r")
            assert await bob.receive() == diff("r", joins={"alice": [me(alice)]})


async def test_leave_message_waits_out_the_grace_too(autojump_clock: trio.abc.Clock) -> None:
    """An explicit ``leave`` ends presence like a close: after the grace window,
    so switching rooms back and forth does not flap either. Two users going at
    the same instant are two diffs (one per user)."""
    hub = presence_hub()
    async with (
        running(hub),
        open_test_client(hub, user="bob") as bob,
        open_test_client(hub, user="alice") as alice,
        open_test_client(hub, user="carol") as carol,
    ):
        view = View("bob")
        await bob.join("r")
        await alice.join("r")
        await carol.join("r")
        await trio.testing.wait_all_tasks_blocked()
        await view.take(bob)
        assert set(view.users or {}) == {"alice", "bob", "carol"}
        await alice.leave("r")
        await carol.leave("r")
        await alice.join("r")  # back within the grace: nothing
        await alice.leave("r")
        await trio.sleep(GRACE - 0.01)
        await bob.assert_nothing_received()
        await trio.sleep(0.01)
        first, second = await bob.receive(), await bob.receive()
        assert {json.dumps(first), json.dumps(second)} == {
            json.dumps(diff("r", leaves={"alice": [me(alice)]})),
            json.dumps(diff("r", leaves={"carol": [me(carol)]})),
        }
        view.apply(first)
        view.apply(second)
        assert view.users == hub.presence("r") == {"bob": [me(bob)]}


# -- many users: every member's picture matches the server's ---------------------------


@attrs.define(eq=False)
class Tab:
    """A browser tab, one connection at a time (run by :func:`_tab`)."""

    user: str
    client: TestClient | None = None
    view: View | None = None
    how: str = "close"
    stop: trio.Event = attrs.Factory(trio.Event)
    gone: trio.Event = attrs.Factory(trio.Event)


async def _tab(hub: Hub, tab: Tab, name: str, task_status: trio.TaskStatus[None]) -> None:
    tab.stop, tab.gone = trio.Event(), trio.Event()
    try:
        async with open_test_client(hub, user=tab.user) as client:
            tab.client, tab.view = client, View(name)
            await client.join("r")
            task_status.started()
            await tab.stop.wait()
            if tab.how == "vanish":
                client.vanish()
            elif tab.how == "leave":
                await client.leave("r")
    finally:
        tab.client = tab.view = None
        tab.gone.set()


async def test_many_users_joining_and_leaving_keep_every_view_right(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Seeded random joins, closes, vanishes, leaves and pauses; at each pause
    every member's view (presence_state + diffs, applied strictly) equals the
    server's, and the server's equals the model: a user is present while they
    have a connection in the room or left less than the grace window ago."""
    rng = random.Random(7)
    hub = presence_hub()
    users = [f"u{i}" for i in range(5)]
    tabs = [Tab(users[i % len(users)]) for i in range(9)]
    left_at: dict[str, float] = {}  # user -> when their last tab left
    checks = 0
    async with running(hub) as nursery:
        for step in range(300):
            tab = rng.choice(tabs)
            action = rng.random()
            if tab.client is None and action < 0.5:
                await nursery.start(_tab, hub, tab, f"{tab.user}/{step}")
            elif tab.client is not None and action < 0.3:
                tab.how = rng.choice(["close", "vanish", "leave"])
                tab.stop.set()
                await tab.gone.wait()
                if not any(t.client is not None and t.user == tab.user for t in tabs):
                    left_at[tab.user] = trio.current_time()
            elif action > 0.85:
                await trio.sleep(rng.choice([0.3, 1.7, 2.9, 4.1, 6.3]))
                now = trio.current_time()
                if any(abs(now - (t + GRACE)) < 1e-6 for t in left_at.values()):
                    continue  # exactly at a deadline: either answer is right
                await trio.testing.wait_all_tasks_blocked()
                live = {t.user for t in tabs if t.client is not None}
                model = live | {u for u, t in left_at.items() if now < t + GRACE}
                assert set(hub.presence("r")) == model
                for t in tabs:
                    if t.client is not None:
                        assert t.view is not None
                        await t.view.take(t.client)
                        assert t.view.users is not None
                        assert set(t.view.users) == model, t.view.name
                        await t.client.assert_nothing_received()
                checks += 1
        for tab in tabs:
            tab.stop.set()
    assert checks > 20
    assert set(left_at) == set(users)


# -- presence_meta, presence off -------------------------------------------------------


async def test_presence_meta_shows_in_state_and_diffs(autojump_clock: trio.abc.Clock) -> None:
    def device(session: Session) -> dict[str, Any]:
        return {"device": session.connection.request.query.get("device", "?")}

    hub = presence_hub(presence_meta=device)
    async with (
        running(hub),
        open_test_client(hub, user="bob", query={"device": "desk"}) as bob,
    ):
        await bob.join("r")
        await bob.expect("presence_state", users={"bob": [me(bob, device="desk")]})
        async with open_test_client(hub, user="alice", query={"device": "phone"}) as alice:
            await alice.join("r")
            await alice.expect(
                "presence_state",
                users={"bob": [me(bob, device="desk")], "alice": [me(alice, device="phone")]},
            )
            assert await bob.receive() == diff("r", joins={"alice": [me(alice, device="phone")]})
            assert hub.presence("r")["alice"] == [me(alice, device="phone")]
        await trio.sleep(GRACE)
        assert await bob.receive() == diff("r", leaves={"alice": [me(alice, device="phone")]})


async def test_presence_off_sends_nothing(autojump_clock: trio.abc.Clock) -> None:
    hub = presence_hub(config=HubConfig())  # presence=False is the default
    assert hub.config.presence is False
    async with running(hub), open_test_client(hub, user="bob") as bob:
        await bob.join("r")
        async with open_test_client(hub, user="alice") as alice:
            await alice.join("r")
            await trio.sleep(1)
            assert hub.presence("r") == {}
        await trio.sleep(2 * GRACE)
        await bob.assert_nothing_received()
        assert hub.online_users() == {"bob"}  # who is connected here


# -- coalescing: a member that falls behind ----------------------------------------------


async def test_diffs_coalesce_per_user_for_a_member_that_falls_behind(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = presence_hub()
    async with running(hub), trio.open_nursery() as nursery:
        # A member whose socket buffers one frame and who stops reading; one
        # frame per message (no batched wake-ups), so what sits where is known.
        stream, wire = memory_stream_pair(HandshakeRequest("/ws", "user=slow"), capacity=1)
        unbatched = attrs.evolve(TEST_CONFIG, batch_delay=0)
        await nursery.start(functools.partial(serve_connection, stream, hub, config=unbatched))
        await wire.wait_accepted()
        await wire.send(json.dumps({"type": "join", "room": "r", "ref": 1}))
        await trio.testing.wait_all_tasks_blocked()
        async with open_test_client(hub, user="alice") as alice:
            await alice.join("r")  # alice: join...
        async with open_test_client(hub, user="bob") as bob:
            await bob.join("r")
            await trio.sleep(GRACE + 0.01)  # ...and alice's leave replaces it, in its place
            assert hub.statistics().coalesced >= 1
            # The member reads again: each user's latest change only.
            messages: list[dict[str, Any]] = []
            with trio.fail_after(5):
                while len(messages) < 5:
                    frame = await wire.receive_frame()
                    assert isinstance(frame, TextFrame)
                    messages.extend(json.loads(line) for line in frame.text.split("\n"))
            assert [m["type"] for m in messages] == [
                "hello",
                "reply",
                "presence_state",
                "presence_diff",
                "presence_diff",
            ]
            view = View("slow")
            for message in messages[2:]:
                if message["type"] == "presence_diff" and message["leaves"]:
                    # A leave of someone it never saw join: a client ignores it.
                    assert message == diff("r", leaves={"alice": [me(alice)]})
                    continue
                view.apply(message)
            assert view.users is not None
            assert set(view.users) == set(hub.presence("r")) == {"slow", "bob"}
        nursery.cancel_scope.cancel()


async def test_a_member_that_rejoins_while_behind_ends_with_the_right_view(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Coalescing never moves anything ahead of a ``presence_state``.

    A member whose outbox is backed up leaves and rejoins. A diff queued
    before its rejoin must not be replaced by a later change of the same user
    (the change would then come *before* the fresh presence_state and be
    overwritten by it: a user shown forever), and the second presence_state
    must not replace the first one (it would then come before the leave, and
    the rejoin would get none)."""
    hub = presence_hub()
    async with (
        running(hub),
        trio.open_nursery() as nursery,
        open_test_client(hub, user="x") as x,
    ):
        await x.join("r")
        stream, wire = memory_stream_pair(HandshakeRequest("/ws", "user=m"), capacity=1)
        await nursery.start(serve_connection, stream, hub)
        await wire.wait_accepted()
        await wire.send(json.dumps({"type": "ping", "ref": 0}))
        await trio.testing.wait_all_tasks_blocked()  # m's writer is stuck: a backlog forms
        await wire.send(json.dumps({"type": "join", "room": "r", "ref": 1}))
        await trio.testing.wait_all_tasks_blocked()
        async with open_test_client(hub, user="y") as y:
            await y.join("r")  # "y joined" queued for m
            await trio.testing.wait_all_tasks_blocked()
            await wire.send(json.dumps({"type": "leave", "room": "r", "ref": 2}))
            await wire.send(json.dumps({"type": "join", "room": "r", "ref": 3}))
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(GRACE + 1)  # y is gone
        assert set(hub.presence("r")) == {"x", "m"}
        messages: list[dict[str, Any]] = []
        while not any(m["type"] == "presence_diff" and m["leaves"] for m in messages):
            frame = await wire.receive_frame()
            assert isinstance(frame, TextFrame)
            messages.extend(json.loads(line) for line in frame.text.split("\n"))
        # What m makes of it, as a client would: a reply to its join starts
        # over, presence_state replaces, diffs apply.
        users: dict[str, Any] = {}
        for message in messages:
            if message["type"] == "reply" and message["ref"] in (2, 3):
                users = {}
            elif message["type"] == "presence_state":
                users = dict(message["users"])
            elif message["type"] == "presence_diff":
                for user in message["leaves"]:
                    users.pop(user, None)
                users.update(message["joins"])
        assert set(users) == set(hub.presence("r")) == {"x", "m"}
        nursery.cancel_scope.cancel()


# -- several nodes: drain and crash ---------------------------------------------------


class Cluster:
    """Hubs in one process that share rooms' order, history and presence.

    Each hub runs on its own node of a :class:`MemoryBus` (a backplane made
    of public names only, tests/_bus_backplane.py), the way the Redis
    backplane shares them across processes.
    """

    def __init__(self) -> None:
        self.bus = MemoryBus()

    def hub(self, name: str, **options: Any) -> Hub:
        return presence_hub(backplane=self.bus.node(name), **options)

    @staticmethod
    def _node(hub: Hub) -> BusBackplane:
        assert isinstance(hub.backplane, BusBackplane)
        return hub.backplane

    def crash(self, hub: Hub) -> None:
        """The node stops: it hears nothing, and nobody hears from it."""
        self.bus.crash(self._node(hub))

    def lease_expired(self, hub: Hub) -> None:
        """Tell the live nodes that ``hub``'s node is gone (its lease ran out)."""
        self.bus.lease_expired(self._node(hub))


async def test_presence_crosses_nodes(autojump_clock: trio.abc.Clock) -> None:
    cluster = Cluster()
    a, b = cluster.hub("a"), cluster.hub("b")
    async with (
        running(a, b),
        open_test_client(b, user="bob") as bob,
        open_test_client(a, user="alice") as alice,
    ):
        await bob.join("r")
        await bob.expect("presence_state", users={"bob": [me(bob)]})
        await alice.join("r")
        await alice.expect("presence_state", users={"alice": [me(alice)], "bob": [me(bob)]})
        assert await bob.receive() == diff("r", joins={"alice": [me(alice)]})
        assert a.presence("r") == b.presence("r")
        assert await alice.publish("r", "hi") == 1
        await bob.expect("message", offset=1, data="hi")
        await alice.close()
        await trio.sleep(GRACE)
        assert await bob.receive() == diff("r", leaves={"alice": [me(alice)]})
        assert a.presence("r") == b.presence("r") == {"bob": [me(bob)]}


@pytest.mark.parametrize("late", [False, True])
async def test_no_flapping_across_a_drain(autojump_clock: trio.abc.Clock, late: bool) -> None:
    """Node a drains (1012); its clients come back to node b within the grace
    window: members see no leave and no join. Control (``late``): clients
    that come back only after the grace window are seen leaving and joining.
    """
    cluster = Cluster()
    config = HubConfig(
        presence=True, presence_grace=GRACE, reconnect_min_ms=200, reconnect_max_ms=1_500
    )
    connection_config = attrs.evolve(TEST_CONFIG, close_timeout=1.0)
    a = cluster.hub("a", config=config, connection_config=connection_config)
    b = cluster.hub("b", config=config, connection_config=connection_config)
    states: list[dict[str, Any]] = []
    done = trio.Event()

    async def tab(user: str, task_status: trio.TaskStatus[None]) -> None:
        async with open_test_client(a, user=user) as first:
            await first.join("r")
            task_status.started()
            await first.expect_closed(1012)
            (shutdown,) = [m for m in first.messages if m["type"] == "shutdown"]
        await trio.sleep(shutdown["reconnect_after_ms"] / 1000 + (2 * GRACE if late else 0))
        async with open_test_client(b, user=user) as again:
            await again.join("r")
            states.append(await again.expect("presence_state"))
            await done.wait()

    async with (
        running(a, b),
        open_test_client(b, user="bob") as bob,
        trio.open_nursery() as nursery,
    ):
        view = View("bob")
        await bob.join("r")
        for user in ("alice", "alice", "carol"):  # alice has two tabs
            await nursery.start(tab, user)
        await trio.testing.wait_all_tasks_blocked()
        await view.take(bob)
        assert view.users is not None
        assert set(view.users) == {"bob", "alice", "carol"}
        seen = view.diffs
        assert await a.drain(grace=2.0) == 0
        await trio.sleep(2 * GRACE + 2.0)  # everybody is back
        assert len(states) == 3
        # The old node is gone for good; its lease runs out.
        cluster.crash(a)
        cluster.lease_expired(a)
        await trio.sleep(3 * GRACE)
        await trio.testing.wait_all_tasks_blocked()
        await view.take(bob)
        await bob.assert_nothing_received()
        assert set(view.users) == set(b.presence("r")) == {"bob", "alice", "carol"}
        if late:
            assert view.diffs - seen == 4  # alice and carol left, then joined again
        else:
            assert view.diffs == seen  # nothing at all: no flapping
            for state in states:  # those back first saw the others (in grace) too
                assert set(state["users"]) == {"bob", "alice", "carol"}
        done.set()


@pytest.mark.parametrize("back_elsewhere", [False, True])
async def test_a_crashed_nodes_users_leave_after_its_lease_and_the_grace(
    autojump_clock: trio.abc.Clock, back_elsewhere: bool
) -> None:
    """A node that dies says nothing; the others keep its users until its
    lease expires, then give them the grace window like any leaver. A user
    who reconnected to another node meanwhile never leaves."""
    lease = 15.0
    cluster = Cluster()
    a, b = cluster.hub("a"), cluster.hub("b")
    async with running(a, b), open_test_client(b, user="bob") as bob:
        await bob.join("r")
        await bob.expect("presence_state")
        async with open_test_client(a, user="alice") as alice:
            await alice.join("r")
            assert await bob.receive() == diff("r", joins={"alice": [me(alice)]})
            cluster.crash(a)
            crashed = trio.current_time()
            alice.vanish()  # its connections die with it
        if back_elsewhere:
            await trio.sleep(3.0)
            async with open_test_client(b, user="alice") as again:
                await again.join("r")
                await trio.sleep(lease - 3.0)
                cluster.lease_expired(a)
                await trio.sleep(3 * GRACE)
                await bob.assert_nothing_received()
                assert set(b.presence("r")) == {"alice", "bob"}
        else:
            await trio.sleep(lease)
            await bob.assert_nothing_received()  # a silent node's users stay listed
            assert set(b.presence("r")) == {"alice", "bob"}
            cluster.lease_expired(a)
            await trio.sleep(GRACE - 0.01)
            await bob.assert_nothing_received()
            assert await bob.receive() == diff("r", leaves={"alice": [me(alice)]})
            assert trio.current_time() == crashed + lease + GRACE
