"""Presence and recovery across hubs, each on its own RedisBackplane, on a real Redis.

Every hub runs ``hub.run()`` (its backplane, the gap repair, the presence
timer and the announcements on the ``bus`` channel); clients are the
in-memory test client. Presence across nodes: ``presence_state`` lists users
of other hubs, ``presence_diff`` joins and leaves reach every hub, a user
with tabs on two hubs leaves only when the last one closes plus the grace
window, a node killed with SIGKILL has its users leave after its lease and
the grace window, a drain whose clients reconnect to another hub within the
grace window sends nothing, and a Redis restart ends with the same presence on
every hub. Recovery: a client that leaves one hub and comes back to a third
gets exactly what was published on a second one meanwhile.

Real time (Redis is real), with a short lease and grace window, and every
test bounded by ``trio.fail_after``. Without ``redis-server`` the tests are
skipped (failed with ``CI=true``), see ``tests/redis_server.py``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
from conftest import TEST_CONFIG

from chatcore import HandshakeRequest, Hub, HubConfig, Identity, Reject, Session
from chatcore.redis import RedisBackplane
from chatcore.testing import TestClient, open_test_client

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

pytestmark = pytest.mark.slow

#: The grace window (s): long enough for a reconnect, short for the test's budget.
GRACE = 1.0
#: The node lease (s), refreshed every third of it.
NODE_TTL = 1.5
#: Every test's bound (s).
BUDGET = 20.0

#: Short bounds, so faults are noticed and repaired within a test's budget.
FAST: dict[str, Any] = {
    "request_timeout": 1.0,
    "command_timeout": 0.4,
    "heartbeat_interval": 0.1,
    "reconnect_initial": 0.02,
    "reconnect_max": 0.2,
    "unsubscribe_linger": 0.2,
    "node_ttl": NODE_TTL,
}


# -- helpers ---------------------------------------------------------------------------------------


async def by_query(request: HandshakeRequest) -> Identity | str | Reject:
    await trio.lowlevel.checkpoint()
    user = request.query.get("user")
    return Reject(401, b"who?") if user is None else user


def device(session: Session) -> dict[str, Any]:
    """Presence meta: the ``device`` query parameter (to see metas cross nodes)."""
    return {"device": session.connection.request.query.get("device", "web")}


def presence_config() -> HubConfig:
    return HubConfig(
        presence=True,
        presence_grace=GRACE,
        publish_rate=1_000,
        publish_burst=1_000,
        reconnect_min_ms=50,
        reconnect_max_ms=200,
    )


@asynccontextmanager
async def open_hubs(
    url: str, count: int, *, options: Mapping[int, Mapping[str, Any]] | None = None
) -> AsyncIterator[list[Hub]]:
    """``count`` running hubs with presence on, node ids hub0, hub1, ...

    ``options[i]`` overrides backplane settings of hub ``i``.
    """
    async with trio.open_nursery() as nursery:
        hubs = []
        for i in range(count):
            settings = {**FAST, **(options or {}).get(i, {})}
            backplane = RedisBackplane(url, node_id=f"hub{i}", **settings)
            hub = Hub(
                authenticate=by_query,
                backplane=backplane,
                config=presence_config(),
                connection_config=TEST_CONFIG,
                presence_meta=device,
            )
            await nursery.start(hub.run)
            with trio.fail_after(5):
                await backplane.wait_connected()
            hubs.append(hub)
        yield hubs
        nursery.cancel_scope.cancel()


def client(hub: Hub, user: str, **query: str) -> AbstractAsyncContextManager[TestClient]:
    return open_test_client(hub, user=user, query=query, timeout=10)


async def eventually(check: Callable[[], object], within: float = 5.0) -> float:
    """Poll ``check`` until true; returns how long it took."""
    start = trio.current_time()
    with trio.move_on_after(within):
        while not check():
            await trio.sleep(0.005)
        return trio.current_time() - start
    raise AssertionError(f"not true within {within} s")


async def barrier(hubs: list[Hub], *clients: TestClient) -> None:
    """Instead of a pause before checking that nothing arrived: every hub sends
    each client a marker on the bus presence events travel on; the markers
    must be the next messages, so nothing that was sent before them is pending."""
    for hub in hubs:
        for member in clients:
            assert member.user is not None
            await hub.send_to_user(member.user, {"type": "marker"})
    for member in clients:
        for _ in hubs:
            await member.expect("marker")


def meta(client: TestClient, device: str = "web") -> dict[str, Any]:
    return {"device": device, "connection_id": client.connection_id}


def diff(
    joins: Mapping[str, Any] | None = None, leaves: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "type": "presence_diff",
        "room": "r",
        "joins": dict(joins or {}),
        "leaves": dict(leaves or {}),
    }


def users(hub: Hub) -> set[str]:
    return set(hub.presence("r"))


def ids(hub: Hub, user: str) -> set[str]:
    return {m["connection_id"] for m in hub.presence("r").get(user, [])}


def agree(hubs: list[Hub], expected: set[str]) -> Callable[[], bool]:
    """Every hub has the same presence of ``r``, with exactly ``expected`` users."""
    return lambda: (
        all(h.presence("r") == hubs[0].presence("r") for h in hubs) and users(hubs[0]) == expected
    )


@attrs.define
class View:
    """A client's picture of who is present, built only from what it received.

    Strict: a join of a user already shown or a leave of a user not shown is
    a flap (or a lost message) and fails the test.
    """

    name: str
    users: dict[str, list[dict[str, Any]]] | None = None
    diffs: list[dict[str, Any]] = attrs.Factory(list)

    def apply(self, message: dict[str, Any]) -> None:
        assert message["type"] in ("presence_state", "presence_diff"), message
        if message["type"] == "presence_state":
            self.users = dict(message["users"])
            return
        assert self.users is not None, f"{self.name}: a diff before presence_state"
        assert len(message["joins"]) + len(message["leaves"]) == 1, message
        self.diffs.append(message)
        for user in message["leaves"]:
            assert user in self.users, f"{self.name}: leave of absent {user}: {message}"
            del self.users[user]
        for user, metas in message["joins"].items():
            assert user not in self.users, f"{self.name}: join of present {user}: {message}"
            self.users[user] = metas

    async def take(self, client: TestClient) -> None:
        """Apply everything ``client`` has received so far."""
        while client.messages:
            self.apply(await client.receive())

    async def take_through_markers(self, client: TestClient, markers: int) -> None:
        """Apply what arrives until ``markers`` markers came (see :func:`barrier`)."""
        while markers:
            message = await client.receive()
            if message["type"] == "marker":
                markers -= 1
            else:
                self.apply(message)

    async def settle(self, client: TestClient, expected: set[str], within: float = 5.0) -> None:
        """Apply what arrives until the view shows exactly ``expected``."""
        with trio.move_on_after(within):
            while True:
                await self.take(client)
                if self.users is not None and set(self.users) == expected:
                    return
                await trio.sleep(0.005)
        raise AssertionError(f"{self.name} shows {self.users}, not {expected}, after {within} s")


async def joined(client: TestClient, view: View | None = None) -> View:
    """Join ``r``; the view starts from the ``presence_state`` that follows."""
    view = view or View(str(client.user))
    await client.join("r")
    view.apply(await client.expect("presence_state", room="r"))
    return view


# -- presence across hubs --------------------------------------------------------------------------


async def test_presence_state_and_diffs_cross_hubs(redis_server: RedisServer) -> None:
    with trio.fail_after(BUDGET):
        async with (
            open_hubs(redis_server.url, 3) as hubs,
            client(hubs[0], "alice", device="phone") as alice,
            client(hubs[1], "bob") as bob,
            client(hubs[2], "carol") as carol,
        ):
            h0, h1, h2 = hubs
            await alice.join("r")
            await alice.expect("presence_state", users={"alice": [meta(alice, "phone")]})
            await eventually(agree(hubs, {"alice"}))
            # A joiner on another hub is told about alice, meta included.
            await bob.join("r")
            await bob.expect(
                "presence_state", users={"alice": [meta(alice, "phone")], "bob": [meta(bob)]}
            )
            assert await alice.receive() == diff(joins={"bob": [meta(bob)]})
            await eventually(agree(hubs, {"alice", "bob"}))
            await carol.join("r")
            await carol.expect(
                "presence_state",
                users={"alice": [meta(alice, "phone")], "bob": [meta(bob)], "carol": [meta(carol)]},
            )
            for member in (alice, bob):
                assert await member.receive() == diff(joins={"carol": [meta(carol)]})
            await eventually(agree(hubs, {"alice", "bob", "carol"}))
            assert h2.online_users() == h0.online_users() == {"alice", "bob", "carol"}
            # bob goes: the others hear it once the grace window has passed.
            await bob.close()
            gone = trio.current_time()
            await trio.sleep(GRACE * 0.6)
            assert alice.messages == carol.messages == []
            assert users(h0) == users(h2) == {"alice", "bob", "carol"}  # in grace
            for member in (alice, carol):
                assert await member.receive() == diff(leaves={"bob": [meta(bob)]})
            assert trio.current_time() - gone >= GRACE
            await eventually(agree(hubs, {"alice", "carol"}))
            assert h0.online_users() == h1.online_users() == {"alice", "carol"}
            await barrier(hubs, alice, carol)
            assert alice.messages == carol.messages == []


async def test_a_user_with_tabs_on_two_hubs_leaves_after_the_last_tab_and_the_grace(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(BUDGET):
        async with (
            open_hubs(redis_server.url, 3) as hubs,
            client(hubs[2], "carol") as carol,
            client(hubs[0], "alice") as tab0,
            client(hubs[1], "alice") as tab1,
        ):
            view = await joined(carol)
            await tab0.join("r")
            await view.settle(carol, {"alice", "carol"})
            await eventually(agree(hubs, {"alice", "carol"}))
            await tab1.join("r")  # a second tab, on another hub: not a change of who
            await eventually(lambda: all(len(ids(h, "alice")) == 2 for h in hubs))
            await tab0.close()
            await eventually(lambda: all(ids(h, "alice") == {tab1.connection_id} for h in hubs))
            await trio.sleep(2 * GRACE)
            await view.take(carol)
            assert len(view.diffs) == 1  # alice's one join
            assert all(ids(h, "alice") == {tab1.connection_id} for h in hubs)
            await tab1.close()
            gone = trio.current_time()
            await trio.sleep(GRACE * 0.6)
            await view.take(carol)
            assert len(view.diffs) == 1
            assert all("alice" in users(h) for h in hubs)
            assert await carol.receive() == diff(leaves={"alice": [meta(tab1)]})
            assert trio.current_time() - gone >= GRACE
            await eventually(agree(hubs, {"carol"}))


# -- a node that dies without a word ---------------------------------------------------------------

#: A hub in its own process, with one client (alice, in room ``r``) whose
#: connection id it prints; it runs until killed.
NODE_SCRIPT = """
import sys
import trio
from chatcore import Hub, HubConfig
from chatcore.redis import RedisBackplane
from chatcore.testing import open_test_client

url, node_id, grace, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])


async def main():
    backplane = RedisBackplane(
        url, node_id=node_id, node_ttl=ttl, request_timeout=1.0, command_timeout=0.4,
        heartbeat_interval=0.1, reconnect_initial=0.02, reconnect_max=0.2,
    )
    hub = Hub(backplane=backplane, config=HubConfig(presence=True, presence_grace=grace))
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        with trio.fail_after(10):
            await backplane.wait_connected()
        async with open_test_client(hub, timeout=10) as alice:
            await alice.join("r")
            await alice.expect("presence_state")
            print(alice.user, alice.connection_id, flush=True)
            await trio.sleep_forever()


trio.run(main)
"""


async def read_line(process: trio.Process) -> str:
    assert process.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1024)
        assert chunk, "the node exited before it was ready"
        data += chunk
    return data.decode().strip()


@pytest.mark.parametrize("back_elsewhere", [False, True])
async def test_a_killed_nodes_users_leave_after_its_lease_and_the_grace(
    redis_server: RedisServer, back_elsewhere: bool
) -> None:
    """The node is SIGKILLed: it announces nothing. The others keep its users
    until its lease expires, then give them the grace window like any
    leaver. A user who reconnected to another hub meanwhile never leaves."""
    with trio.fail_after(BUDGET):
        async with (
            open_hubs(redis_server.url, 2) as hubs,
            client(hubs[0], "bob") as bob,
        ):
            view = await joined(bob)
            process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-c",
                    NODE_SCRIPT,
                    redis_server.url,
                    "dead",
                    str(GRACE),
                    str(NODE_TTL),
                ],
                stdout=subprocess.PIPE,
            )
            try:
                user, connection_id = (await read_line(process)).split()
                await view.settle(bob, {"bob", user})
                await eventually(agree(hubs, {"bob", user}))
                process.kill()
                killed = trio.current_time()
                await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode == -9
            assert view.users is not None
            assert view.users[user] == [{"connection_id": connection_id}]
            if back_elsewhere:
                async with client(hubs[1], user) as again:
                    await again.join("r")
                    # The dead node is reported down; its connection is dropped.
                    await eventually(
                        lambda: all("dead" not in h._presence.table.nodes for h in hubs)
                    )
                    await trio.sleep(GRACE + 0.3)
                    await view.take(bob)
                    assert len(view.diffs) == 1  # the user's first join only
                    assert all(ids(h, user) == {again.connection_id} for h in hubs)
                    await eventually(agree(hubs, {"bob", user}))
            else:
                # Not before its lease could expire (>= 2/3 of it after the
                # last refresh), plus the grace window.
                await trio.sleep(NODE_TTL * 2 / 3 + GRACE - 0.1)
                await view.take(bob)
                assert len(view.diffs) == 1
                assert all(user in users(h) for h in hubs)
                message = await bob.receive(timeout=NODE_TTL + GRACE + 2)
                took = trio.current_time() - killed
                assert message == diff(leaves={user: [{"connection_id": connection_id}]})
                assert NODE_TTL * 2 / 3 + GRACE <= took <= NODE_TTL * 4 / 3 + GRACE + 1.0
                await eventually(agree(hubs, {"bob"}))


# -- a drain whose clients come back elsewhere -----------------------------------------------------


@pytest.mark.parametrize("late", [False, True])
async def test_no_flapping_when_a_drained_hubs_clients_reconnect_elsewhere(
    redis_server: RedisServer, late: bool
) -> None:
    """Hub 0 drains (1012); its clients reconnect to hub 1 within the grace
    window: bob, on hub 2, sees no leave and no join. Control (``late``):
    clients that come back after the grace window are seen leaving and
    joining again."""
    states: list[dict[str, Any]] = []
    done = trio.Event()

    async def tab(hubs: list[Hub], user: str, task_status: trio.TaskStatus[None]) -> None:
        async with client(hubs[0], user) as first:
            await first.join("r")
            task_status.started()
            await first.expect_closed(1012)
            (shutdown,) = [m for m in first.messages if m["type"] == "shutdown"]
        await trio.sleep(shutdown["reconnect_after_ms"] / 1000 + (2 * GRACE if late else 0))
        async with client(hubs[1], user) as again:
            await again.join("r")
            states.append(await again.expect("presence_state"))
            await done.wait()

    with trio.fail_after(BUDGET):
        async with (
            open_hubs(redis_server.url, 3) as hubs,
            client(hubs[2], "bob") as bob,
            trio.open_nursery() as nursery,
        ):
            view = await joined(bob)
            for user in ("alice", "alice", "carol"):  # alice has two tabs
                await nursery.start(tab, hubs, user)
            await view.settle(bob, {"bob", "alice", "carol"})
            await eventually(agree(hubs, {"bob", "alice", "carol"}))
            seen = len(view.diffs)
            assert await hubs[0].drain(grace=0.5) == 0
            await eventually(lambda: len(states) == 3, within=3 * GRACE + 2)
            await trio.sleep(GRACE + 0.3)  # any leave would be out by now
            await view.take(bob)
            assert view.users is not None
            assert set(view.users) == {"bob", "alice", "carol"}
            await eventually(agree(hubs, {"bob", "alice", "carol"}))
            assert ids(hubs[2], "alice") == ids(hubs[1], "alice")
            if late:
                # Each of alice and carol left, then joined again.
                for user in ("alice", "carol"):
                    changes = [
                        "leave" if user in d["leaves"] else "join"
                        for d in view.diffs[seen:]
                        if user in d["leaves"] or user in d["joins"]
                    ]
                    assert changes == ["leave", "join"], (user, view.diffs[seen:])
                assert len(view.diffs) - seen == 4
            else:
                assert view.diffs[seen:] == []  # nothing at all: no flapping
                for state in states:  # those back first saw the others (in grace) too
                    assert set(state["users"]) == {"bob", "alice", "carol"}
            done.set()


# -- Redis restarts --------------------------------------------------------------------------------


@pytest.mark.parametrize("redis_server", [{"persistent": True}], indirect=True)
async def test_presence_is_the_same_on_every_hub_after_a_redis_restart(
    redis_server: RedisServer,
) -> None:
    """Redis restarts (with its data, so rooms keep their order). Hub 1
    reconnects late: what hub 0 announced before that never reached it, and
    its resync (re-announce, ask the others) makes every hub agree again."""
    slow = {"reconnect_initial": 2.0, "reconnect_max": 2.0}
    with trio.fail_after(BUDGET):
        async with (
            open_hubs(redis_server.url, 2, options={1: slow}) as hubs,
            client(hubs[0], "alice") as alice,
            client(hubs[1], "bob") as bob,
            client(hubs[0], "carol") as carol,
        ):
            h0, h1 = hubs
            views = [await joined(alice), await joined(bob)]
            await views[0].settle(alice, {"alice", "bob"})
            await views[1].settle(bob, {"alice", "bob"})
            await eventually(agree(hubs, {"alice", "bob"}))
            await redis_server.crash()
            await eventually(lambda: h0.backplane.degraded and h1.backplane.degraded)
            await redis_server.start()
            await eventually(lambda: not h0.backplane.degraded)
            # Hub 1 is still away: carol's join is published where it cannot hear it.
            assert h1.backplane.degraded
            await carol.join("r")
            await carol.expect("presence_state", users=h0.presence("r"))
            await eventually(lambda: not h0._presence.announcements)
            assert h1.backplane.degraded, "hub 1 came back too early to miss anything"
            assert users(h1) == {"alice", "bob"}
            await eventually(lambda: not h1.backplane.degraded, within=5)
            await eventually(agree(hubs, {"alice", "bob", "carol"}))
            await views[1].settle(bob, {"alice", "bob", "carol"})
            await views[0].settle(alice, {"alice", "bob", "carol"})
            await trio.sleep(GRACE + 0.3)
            for view, member in zip(views, (alice, bob), strict=True):
                await view.take(member)
                assert view.users == h0.presence("r") == h1.presence("r")


@pytest.mark.parametrize("redis_server", [{"persistent": True}], indirect=True)
async def test_a_leave_missed_while_away_is_not_kept_forever(redis_server: RedisServer) -> None:
    """As above, but a user leaves where the late hub cannot hear it: after its
    resync and the grace window, the late hub must not list them any more."""
    slow = {"reconnect_initial": 2.0, "reconnect_max": 2.0}
    with trio.fail_after(BUDGET):
        async with (
            open_hubs(redis_server.url, 2, options={1: slow}) as hubs,
            client(hubs[0], "alice") as alice,
            client(hubs[1], "bob") as bob,
        ):
            h0, h1 = hubs
            views = [await joined(alice), await joined(bob)]
            async with client(h0, "dave") as dave:
                await dave.join("r")
                await views[1].settle(bob, {"alice", "bob", "dave"})
                await eventually(agree(hubs, {"alice", "bob", "dave"}))
                await redis_server.crash()
                await eventually(lambda: h0.backplane.degraded and h1.backplane.degraded)
                await redis_server.start()
                await eventually(lambda: not h0.backplane.degraded)
                assert h1.backplane.degraded
            # dave's leave is published where hub 1 cannot hear it.
            await eventually(lambda: not h0._presence.announcements)
            assert h1.backplane.degraded, "hub 1 came back too early to miss anything"
            await eventually(lambda: not h1.backplane.degraded, within=5)
            await eventually(agree(hubs, {"alice", "bob"}), within=GRACE + 2)
            await views[0].settle(alice, {"alice", "bob"})
            await views[1].settle(bob, {"alice", "bob"})
            # Markers from every hub on the presence bus: whatever was sent
            # before them has been applied to the views once they are in.
            for hub in hubs:
                for member in (alice, bob):
                    await hub.send_to_user(str(member.user), {"type": "marker"})
            for view, member in zip(views, (alice, bob), strict=True):
                await view.take_through_markers(member, len(hubs))
                assert view.users == h0.presence("r") == h1.presence("r")


# -- recovery across hubs --------------------------------------------------------------------------


async def test_recovery_on_a_third_hub_of_what_a_second_one_published(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(BUDGET):
        async with (
            open_hubs(redis_server.url, 3) as (h0, h1, h2),
            client(h1, "writer") as writer,
        ):
            await writer.join("r")
            async with client(h0, "reader") as reader:
                first = await reader.join("r")
                for text in ("one", "two"):
                    await writer.publish("r", text)
                await reader.expect("presence_state")
                for offset in (1, 2):
                    await reader.expect("message", offset=offset, epoch=first["epoch"])
            for text in ("three", "four", "five"):
                await writer.publish("r", text)
            async with client(h2, "reader") as again:
                since = {"epoch": first["epoch"], "offset": 2}
                answer = await again.join("r", since=since)
                assert answer == {
                    "room": "r",
                    "epoch": first["epoch"],
                    "offset": 5,
                    "recovered": True,
                }
                for offset, text in ((3, "three"), (4, "four"), (5, "five")):
                    await again.expect(
                        "message", offset=offset, data=text, epoch=first["epoch"], from_="writer"
                    )
                # Presence after the replay; back within the grace window, so
                # the reader never left in anybody's eyes.
                state = await again.expect("presence_state")
                assert set(state["users"]) == {"writer", "reader"}
                assert await writer.publish("r", "six") == 6
                await again.expect("message", offset=6, data="six")
                await barrier([h0, h1, h2], again)
                assert again.messages == []
                assert [m["type"] for m in writer.messages].count("presence_diff") == 1
