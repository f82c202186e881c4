"""Chaos: many clients joining, leaving, publishing and disconnecting at random.

Each run is a seeded random schedule on virtual time: actors open connections
(as users that share tabs), send joins, leaves, publishes and the odd bad
frame without waiting for answers, and end each connection in one of the ways a
connection ends in production (a close frame, a vanished link, a kick of the
whole user from the server side, an application close). An admin task
publishes, broadcasts, moves connections in and out of a server-managed room
and kicks users meanwhile.

Afterwards:

- nothing escaped (the nursery exited; no error was logged; every task the
  run started has ended);
- the registry is empty (no session, user or room) and every reservation was
  released (each user can open its full quota again, up to the hub's capacity);
- what each connection received is consistent with what it asked for: per
  room, messages arrive only while joined, at consecutive offsets starting
  right after the offset its join reply announced, in the join reply's epoch;
  in the server-managed room, offsets strictly increase within an epoch.
"""

from __future__ import annotations

import collections
import logging
import random
from typing import Any

import pytest
import trio
import trio.testing

from chatcore import (
    HandshakeRejected,
    HandshakeRequest,
    HistoryConfig,
    Hub,
    HubConfig,
    Identity,
    LocalBackplane,
    Reject,
)
from chatcore._pacer import pacer
from chatcore.sansio import TokenBucket
from chatcore.testing import TestClient, open_test_client, open_test_clients

ROOMS = ["a", "b", "c", "d"]
SERVER_ROOM = "srv"
USERS = [f"u{i}" for i in range(8)]
PER_USER = 4
ACTORS = 30


async def by_query(request: HandshakeRequest) -> Identity | str | Reject:
    await trio.lowlevel.checkpoint()
    user = request.query.get("user")
    return Reject(401, b"who are you?") if user is None else user


#: Every request the test sends: ref -> (what, room, virtual time it was sent).
Sent = dict[str, tuple[str, str, float]]


def check_consistent(
    messages: list[dict[str, Any]],
    sent: Sent,
    config: HubConfig,
    opened: float,
    codes: collections.Counter[str],
) -> int:
    """Replay one connection's arrivals against the requests it sent.

    Replies and messages share one FIFO per connection, and the server handles
    one connection's requests in order, so the client sees them in the order
    the server produced them, and can work out the answer each request must
    get: the same frame budget as the server's (every join, leave and publish
    frame pays its cost, at the virtual time it was sent, which is when the
    server read it on the mock clock; an unknown type is a bad frame and pays
    nothing), and the rooms its join replies granted. Returns how
    many room messages were checked.
    """
    joined: dict[str, tuple[str, int]] = {}  # room -> (epoch, last offset seen)
    server_room: tuple[str, int] = ("", 0)  # (epoch, last offset) in the server's room
    bucket = TokenBucket(config.publish_rate, config.publish_burst, opened)
    checked = 0
    for message in messages:
        kind = message["type"]
        if kind == "reply":
            what, room, sent_at = sent.pop(message["ref"])
            code = message["error"]["code"] if message["status"] == "error" else None
            codes[code or "ok"] += 1
            if what != "bad" and not bucket.take(sent_at, config.frame_costs[what]):
                assert code == "rate_limited", message
            elif what == "join":
                if room in joined or len(joined) < config.max_rooms_per_connection - 1:
                    assert code is None, message
                elif len(joined) == config.max_rooms_per_connection - 1:
                    # The server may have put this connection in its own room,
                    # which takes the last slot.
                    assert code in (None, "too_many_rooms"), message
                else:
                    assert code == "too_many_rooms", message
                if code is None:
                    data = message["data"]
                    if room in joined:  # already a member: the position it has seen
                        assert (data["epoch"], data["offset"]) == joined[room], message
                    joined[room] = (data["epoch"], data["offset"])
            elif what == "leave":
                assert code is None, message
                joined.pop(room, None)
            elif what == "publish":
                if room not in joined:
                    assert code == "not_joined", message
                else:
                    assert code is None, message
                    # Its own message comes next in this room, at this offset.
                    assert message["data"]["offset"] > joined[room][1], message
            else:
                assert (what, code) == ("bad", "unknown_type"), message
        elif kind == "message":
            room = message["room"]
            checked += 1
            if room == SERVER_ROOM:
                # Joined and left by the server, without replies: offsets only
                # increase within an epoch (the room may empty out, be forgotten
                # and come back with a new epoch, starting again at 1).
                epoch, last = server_room
                if message["epoch"] == epoch:
                    assert message["offset"] > last, message
                server_room = (message["epoch"], message["offset"])
                continue
            assert room in joined, f"a message for {room!r} while not joined: {message}"
            epoch, last = joined[room]
            assert (message["epoch"], message["offset"]) == (epoch, last + 1), message
            joined[room] = (epoch, last + 1)
        else:
            assert kind in {"error", "typing"}, message
    return checked


async def run_chaos(seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    config = HubConfig(
        max_connections_per_user=PER_USER,
        max_connections=len(USERS) * PER_USER,
        max_rooms_per_connection=3,
        # Low enough that bursts of publishes run out of tokens.
        publish_rate=5.0,
        publish_burst=8,
        # Not modelled here (it depends on every connection of a user):
        # tests/test_abuse_hub.py covers it.
        new_rooms_per_user=None,
    )
    hub = Hub(
        authenticate=by_query,
        config=config,
        # The backplane keeps the order of 2 rooms: rooms that empty out are
        # soon forgotten and come back with new epochs.
        backplane=LocalBackplane(HistoryConfig(rooms=2)),
    )
    counts = {"connections": 0, "refused": 0, "messages": 0, "kicks": 0}
    codes: collections.Counter[str] = collections.Counter()
    ref_numbers = iter(range(10**9))

    async def attempt(client: TestClient, message: dict[str, Any]) -> bool:
        """Send; False once the connection turned out to be closed."""
        if client.closed is not None:
            return False
        try:
            await client.send(message)
        except AssertionError:
            await client.expect_closed()  # it must really be closed
            return False
        return True

    async def one_connection(client: TestClient) -> None:
        opened = trio.current_time()
        sent: Sent = {}
        for _ in range(rng.randint(1, 40)):
            await trio.sleep(rng.choice([0, 0, 0.001, 0.05, 0.3]))
            action = rng.random()
            room = rng.choice(ROOMS)
            ref = f"r{next(ref_numbers)}"
            if action < 0.25:
                message = {"type": "join", "room": room, "ref": ref}
                sent[ref] = ("join", room, trio.current_time())
            elif action < 0.4:
                message = {"type": "leave", "room": room, "ref": ref}
                sent[ref] = ("leave", room, trio.current_time())
            elif action < 0.97:
                message = {"type": "publish", "room": room, "data": ref, "ref": ref}
                sent[ref] = ("publish", room, trio.current_time())
            else:
                message = {"type": "no-such-type", "ref": ref}
                sent[ref] = ("bad", room, trio.current_time())
            if not await attempt(client, message):
                break
        ending = rng.choice(["close", "close", "vanish", "kick", "app", "stay"])
        if ending == "close":
            await client.close()
        elif ending == "vanish":
            client.vanish()
        elif ending == "kick":
            counts["kicks"] += 1
            await hub.disconnect_user(str(client.user))  # all of this user's tabs
        elif ending == "app":
            session = hub.session(client.connection_id)
            if session is not None:
                session.close_nowait(rng.choice([1000, 1011, 4002]), "app says bye")
        await trio.testing.wait_all_tasks_blocked()
        # Replies to requests the server never read (it closed first) are missing;
        # everything that did arrive must be consistent.
        counts["messages"] += check_consistent(client.messages, sent, config, opened, codes)

    async def actor() -> None:
        for _ in range(rng.randint(1, 5)):
            user = rng.choice(USERS)
            try:
                async with open_test_client(hub, user=user) as client:
                    counts["connections"] += 1
                    await one_connection(client)
            except HandshakeRejected as exc:
                if exc.status != 429:  # the per-user limit; nothing else refuses
                    raise
                counts["refused"] += 1
            await trio.sleep(rng.choice([0, 0.01, 0.5]))

    async def admin(done: trio.Event) -> None:
        while not done.is_set():
            await trio.sleep(rng.choice([0.001, 0.05, 0.2]))
            action = rng.random()
            sessions = hub.sessions()
            if action < 0.3:
                await hub.publish(rng.choice([*ROOMS, SERVER_ROOM]), {"from": "admin"})
            elif action < 0.5:
                await hub.broadcast(rng.choice(ROOMS), {"type": "typing"}, key="typing")
            elif action < 0.7 and sessions:
                await hub.join(rng.choice(sessions).id, SERVER_ROOM)
            elif action < 0.85 and sessions:
                hub.leave(rng.choice(sessions).id, SERVER_ROOM)
            elif action < 0.9:
                counts["kicks"] += 1
                await hub.disconnect_user(rng.choice(USERS))

    pacer()  # the run's pacer: two tasks shared by every connection, for the run's life
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    with trio.fail_after(3_600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(admin, done)
            async with trio.open_nursery() as actors:
                for _ in range(ACTORS):
                    actors.start_soon(actor)
            done.set()
    await trio.testing.wait_all_tasks_blocked()
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before

    stats = hub.statistics()
    assert (stats.connections, stats.users, stats.rooms) == (0, 0, 0)
    assert hub.sessions() == []
    assert hub.rooms() == []
    assert all(hub.sessions_of(user) == [] for user in USERS)
    assert stats.published > 0
    # Every reservation was released: every user's whole quota, which is the
    # hub's whole capacity, is admitted again.
    async with open_test_clients(hub, [user for user in USERS for _ in range(PER_USER)]):
        assert hub.statistics().connections == len(USERS) * PER_USER
    # Every answer a request can get was given (and checked) at least once.
    assert set(codes) == {"ok", "not_joined", "rate_limited", "too_many_rooms", "unknown_type"}
    return counts


@pytest.mark.parametrize("seed", range(4))
async def test_chaos_leaves_nothing_behind(
    seed: int, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="chatcore")
    counts = await run_chaos(seed)
    # The run really exercised things.
    assert counts["connections"] > ACTORS
    assert counts["messages"] > 100
    assert counts["kicks"] > 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
