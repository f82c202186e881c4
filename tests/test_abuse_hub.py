"""The hub under abuse: each attack reproduced with bounded loops, in memory, on virtual time.

Each test asserts what the server keeps (``hub.statistics()``, the history's
bytes), what the attacker gets (error codes, close codes) and that a bystander
is still served. The attacks that need a real process (RSS, a real ``chatcore
serve``) run through ``bench/abuse.py --quick`` in ``test_bench_smoke.py``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from chatcore import (
    HandshakeRequest,
    HistoryConfig,
    Hub,
    HubConfig,
    LocalBackplane,
    Reject,
    Session,
)
from chatcore.sansio import AppMessage, Delivery, OutboundMessage, encode
from chatcore.sansio._budget import FrameBudget, Spend
from chatcore.sansio._history import History, HistoryBudget, held_size
from chatcore.testing import TestClient, open_test_client
from chatcore.transports import TextFrame

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

#: A 64 KB (UTF-8) message of emoji, as the hoarder sent (under the 64 KiB frame limit).
EMOJI_64K = "😀" * 16_000


async def by_query(request: HandshakeRequest) -> str | Reject:
    await trio.lowlevel.checkpoint()
    user = request.query.get("user")
    return Reject(401, b"who?") if user is None else user


def chat_hub(config: HubConfig, backplane: LocalBackplane | None = None) -> Hub:
    """A hub with the example's ``typing`` and ``history`` handlers."""
    hub = Hub(authenticate=by_query, config=config, backplane=backplane)

    @hub.on("typing")
    async def typing(session: Session, message: AppMessage) -> None:
        room = str(message.fields.get("room"))
        await hub.broadcast(
            room,
            {"type": "typing", "room": room, "user": session.user},
            key=f"typing:{room}:{session.user}",
            exclude=session,
        )

    @hub.on("history")
    async def history(session: Session, message: AppMessage) -> dict[str, Any]:
        return {"messages": await hub.history(str(message.fields.get("room")), 50)}

    return hub


@asynccontextmanager
async def clients(hub: Hub, users: list[str]) -> AsyncIterator[list[TestClient]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_test_client(hub, user=u)) for u in users]


async def flood(client: TestClient, message: dict[str, Any], count: int) -> int:
    """Send ``message`` up to ``count`` times; how many went before the server closed."""
    for sent in range(count):
        try:
            await client.send(message)
        except AssertionError as exc:  # the test client's "connection is closed"
            if "closed" not in str(exc):
                raise
            return sent
    return count


async def drain(client: TestClient) -> list[dict[str, Any]]:
    await trio.testing.wait_all_tasks_blocked()
    taken = []
    while client.messages:
        taken.append(await client.receive())
    return taken


# -- 1. memory: history budget, room caps --------------------------------------------


async def test_hoarding_rooms_keeps_history_within_the_budget(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The hoarder's pattern: several connections of one user join a room,
    # publish 64 KiB of emoji each, leave, and move on to the next room.
    budget = 2 * 1024 * 1024
    backplane = LocalBackplane(HistoryConfig(total_bytes=budget))
    hub = chat_hub(HubConfig(new_rooms_per_user=None), backplane)
    async with clients(hub, ["bob"]) as [bob]:
        await bob.join("lobby")
        for n in range(3):
            await bob.publish("lobby", f"hello {n}")
        async with clients(hub, ["mallory"] * 4) as hoarders:
            for room in range(60):  # 60 rooms x 4 x 64 KiB = 15 MiB offered
                name = f"hoard-{room}"
                for client in hoarders:
                    await client.join(name)
                for client in hoarders:
                    await client.publish(name, EMOJI_64K)
                for client in hoarders:
                    await client.leave(name)
                    await drain(client)
                await trio.sleep(0.5)  # the hoarder paces itself under the rate limit
                assert backplane.history_bytes <= budget
        # Rooms without members went first: the bystander's room kept all of it.
        assert [m["data"] for m in await hub.history("lobby")] == [f"hello {n}" for n in range(3)]
        await bob.ping()
        stats = hub.statistics()
        assert (stats.connections, stats.rooms) == (1, 1)
    assert backplane.history_bytes <= budget
    # The budget counts what the texts take in memory: a 64 KiB emoji text
    # is 16,384 four-byte characters.
    assert backplane.history_bytes >= 7 * held_size(encode({"data": EMOJI_64K}))


async def test_rooms_with_members_are_trimmed_only_after_every_idle_room_is_gone(
    autojump_clock: trio.abc.Clock,
) -> None:
    message_size = held_size(encode({"data": EMOJI_64K}))
    backplane = LocalBackplane(HistoryConfig(total_bytes=3 * message_size))
    hub = chat_hub(HubConfig(), backplane)
    async with clients(hub, ["alice", "bob"]) as [alice, bob]:
        await alice.join("idle")
        await alice.publish("idle", EMOJI_64K)
        await alice.leave("idle")
        await bob.join("busy")
        await bob.publish("busy", "a")
        await bob.publish("busy", EMOJI_64K)
        assert backplane.rooms_kept == 2
        await bob.publish("busy", EMOJI_64K)  # over: the idle room is forgotten
        assert backplane.rooms_kept == 1
        assert len(await hub.history("busy")) == 3
        await bob.publish("busy", EMOJI_64K)  # over again: busy's history is emptied
        assert await hub.history("busy") == []
        assert backplane.history_bytes == 0
        # Its order stays: the next message continues the offsets.
        assert await bob.publish("busy", "b") == 5


def test_history_budget_counts_memory_and_returns_to_zero() -> None:
    budget = HistoryBudget(None)
    history = History(10, max_bytes=1_000_000, budget=budget)
    ascii_text = encode({"data": "x" * 1000})
    wide_text = encode({"data": "x" * 1000 + "😀"})
    history.append(1, ascii_text, 0.0)
    history.append(2, wide_text, 0.0)
    # One emoji makes the whole text four bytes per character in memory.
    assert held_size(wide_text) > 3 * held_size(ascii_text)
    assert budget.held == held_size(ascii_text) + held_size(wide_text)
    for offset in range(3, 13):  # count trimming gives back what it drops
        history.append(offset, ascii_text, 0.0)
    assert budget.held == 10 * held_size(ascii_text)
    history.clear()
    assert budget.held == 0
    assert not budget.over


async def test_new_rooms_per_user_are_rate_limited(autojump_clock: trio.abc.Clock) -> None:
    hub = chat_hub(HubConfig(new_rooms_per_user=3, new_room_window=60.0))
    async with clients(hub, ["bob", "mallory", "mallory", "carol"]) as [bob, m1, m2, carol]:
        await bob.join("lobby")
        for n in range(3):
            await m1.join(f"r{n}")
            await m1.leave(f"r{n}")
        reply = await m2.request("join", room="r3")  # the same user on another tab
        assert reply["error"]["code"] == "too_many_new_rooms"
        await m2.join("lobby")  # a room someone is in is not new
        await carol.join("r3")  # another user is not affected
        await m2.join("r3")  # nor is a room carol opened
        assert hub.statistics().refused_rooms == 1
        await trio.sleep(61)
        await m1.join("r4")
        await bob.ping()


async def test_rooms_per_process_are_capped(autojump_clock: trio.abc.Clock) -> None:
    hub = chat_hub(HubConfig(max_rooms=2))
    async with clients(hub, ["alice", "bob"]) as [alice, bob]:
        await alice.join("a")
        await bob.join("b")
        assert (await alice.request("join", room="c"))["error"]["code"] == "at_capacity"
        await alice.join("b")  # an open room is not a new one
        await bob.leave("b")
        await alice.leave("a")
        await alice.join("c")
        assert hub.rooms() == ["b", "c"]


@pytest.mark.slow
async def test_redis_keeps_each_room_within_its_bytes_and_count(
    redis_server: RedisServer,
) -> None:
    from chatcore.redis import RedisBackplane

    history = HistoryConfig(max_messages=100, max_age=None, max_bytes=10_000)
    backplane = RedisBackplane(redis_server.url, history=history, prefix="abuse")
    async with trio.open_nursery() as nursery:
        await nursery.start(backplane.run)
        with trio.fail_after(20):
            await backplane.wait_connected()
            for _ in range(60):  # 60 x ~1.1 KB into a 10 KB room
                await backplane.publish("big", "u", "😀" * 250, None)
            kept = await backplane.recent("big", 1_000)
            assert 0 < sum(item.message.nbytes for item in kept) <= 10_000
            assert [item.offset for item in kept] == list(range(61 - len(kept), 61))
            for _ in range(300):  # 300 small ones into a 100-message room
                await backplane.publish("many", "u", "x", None)
            kept = await backplane.recent("many", 1_000)
            assert 100 <= len(kept) <= 100 + 64
            assert kept[-1].offset == 300
            # One message larger than the room's bytes is not kept at all.
            await backplane.publish("big", "u", "x" * 20_000, None)
            assert await backplane.recent("big", 1_000) == []
            await backplane.publish("big", "u", "y", None)
            assert [item.offset for item in await backplane.recent("big", 10)] == [62]
        nursery.cancel_scope.cancel()


# -- 2. every frame has a cost --------------------------------------------------------


async def test_typing_flood_is_bounded_and_closed_1008(autojump_clock: trio.abc.Clock) -> None:
    # 2,000 typing frames into a room of 20: unbounded, 38,000 deliveries.
    members = 20
    hub = chat_hub(HubConfig())
    async with clients(hub, ["mallory"] + [f"m{n}" for n in range(members - 1)]) as room:
        mallory, others = room[0], room[1:]
        for client in room:
            await client.join("room")
        async with clients(hub, ["bob"]) as [bob]:
            await bob.join("elsewhere")
            before = hub.statistics().delivered
            sent = await flood(mallory, {"type": "typing", "room": "room"}, 2_000)
            await mallory.expect_closed(1008)
            assert sent < 400
            deliveries = hub.statistics().delivered - before
            # At most the budget's 40 tokens of typing reached the room (each
            # also costs 0.2 for its 20 members), plus the refusals answered.
            assert deliveries <= 40 * (members - 1) + sent
            refused = [m for m in await drain(mallory) if m.get("code") == "rate_limited"]
            assert len(refused) == 200
            assert hub.statistics().rate_limited == 201
            for other in others:
                assert len([m for m in await drain(other) if m["type"] == "typing"]) <= 40
            await bob.ping()  # the bystander is served


async def test_handlers_declare_their_cost(autojump_clock: trio.abc.Clock) -> None:
    hub = chat_hub(HubConfig())

    @hub.on("expensive", cost=5)
    async def expensive(session: Session, message: AppMessage) -> str:
        await trio.lowlevel.checkpoint()
        return "done"

    async with open_test_client(hub, user="alice") as alice:
        answers = [(await alice.request("expensive"))["status"] for _ in range(9)]
        assert answers == ["ok"] * 8 + ["error"]
        reply = await alice.request("expensive")
        assert reply["error"] == {"code": "rate_limited", "message": "sending too fast"}
        await trio.sleep(0.25)  # 20 tokens/s: five are back
        assert (await alice.request("expensive"))["status"] == "ok"
    with pytest.raises(ValueError, match="cost"):
        hub.on("free", cost=-1)


async def test_ephemeral_fan_out_is_charged_to_the_sender(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Each typing costs 1, plus one token per member it reaches here (11).
    hub = chat_hub(HubConfig(ephemeral_deliveries_per_token=1))
    async with clients(hub, ["mallory"] + [f"m{n}" for n in range(10)]) as room:
        for client in room:
            await client.join("room")
        before = hub.statistics().delivered
        for _ in range(6):
            await room[0].send({"type": "typing", "room": "room"})
        answers = await drain(room[0])
        assert [m.get("code") for m in answers] == ["rate_limited"] * 2
        assert hub.statistics().delivered - before == 4 * 10
    # From the server side (no sender), broadcasts are not charged to anyone.
    async with clients(hub, ["alice"]) as [alice]:
        await alice.join("room")
        for n in range(100):
            await hub.broadcast("room", {"type": "typing", "n": n}, delivery=Delivery.DURABLE)
        assert len(await drain(alice)) == 100


async def test_history_requests_are_charged_by_what_they_return(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = chat_hub(HubConfig())
    async with clients(hub, ["alice"]) as [alice]:
        await alice.join("r")
        for _ in range(4):
            await alice.publish("r", "x" * 60_000)
            await trio.sleep(1)
        await drain(alice)
        # 114 KB of requests once made 550 MB of answers: now each ~240 KB
        # answer costs ~15 tokens on top of its own.
        for _ in range(100):
            await alice.send({"type": "history", "room": "r", "ref": "h"})
        answers = await drain(alice)
        served = [m for m in answers if m.get("status") == "ok"]
        assert len(served) == 3
        assert len(served[0]["data"]["messages"]) == 4
        assert all(m["error"]["code"] == "rate_limited" for m in answers if m not in served)
        await trio.sleep(20)  # the debt is paid back, the budget refilled
        assert (await alice.request("history", room="r"))["status"] == "ok"


async def test_ping_and_pong_floods_close_1008(autojump_clock: trio.abc.Clock) -> None:
    hub = chat_hub(HubConfig())
    async with clients(hub, ["alice", "bob", "bob"]) as [alice, bob, bob2]:
        for _ in range(80):  # half a token each: the burst
            await alice.ping()
        assert (await alice.request("ping"))["error"]["code"] == "rate_limited"
        # Pongs are refused silently (nothing to answer) but still counted.
        assert await flood(bob, {"type": "pong"}, 1_000) < 1_000
        await bob.expect_closed(1008)
        assert await drain(bob) == []
        await bob2.ping()  # the same user's other connection has its own budget


def test_frame_costs_are_the_defaults_overridden_and_checked() -> None:
    costs = HubConfig(frame_costs={"ping": 2}).frame_costs
    assert dict(costs) == {"publish": 1, "join": 1, "leave": 1, "ping": 2, "pong": 0.1}
    with pytest.raises(ValueError, match="must be >= 0"):
        HubConfig(frame_costs={"join": -1})
    with pytest.raises(ValueError, match="not built-in"):
        HubConfig(frame_costs={"typing": 1})


async def test_leave_is_paid_for_too(autojump_clock: trio.abc.Clock) -> None:
    hub = chat_hub(HubConfig(publish_burst=2, frame_costs={"leave": 2}))
    async with clients(hub, ["alice"]) as [alice]:
        await alice.join("r")
        reply = await alice.request("leave", room="r")
        assert reply["error"] == {"code": "rate_limited", "message": "leaving too fast"}
        assert hub.rooms() == ["r"]
        await trio.sleep(1)
        await alice.leave("r")
        assert hub.rooms() == []


def test_frame_budget_verdicts_and_debt() -> None:
    budget = FrameBudget(
        rate=10, burst=4, abuse_limit=1, abuse_window=60, reply_bytes_per_token=100, now=0
    )
    assert budget.spend(4, 0) is Spend.OK
    assert budget.spend(1, 0) is Spend.REFUSED
    assert budget.spend(1, 0) is Spend.ABUSE
    budget.charge_bytes(100, 1.0)  # the first 100 bytes are free
    assert budget.tokens(1.0) == pytest.approx(4)
    budget.charge_bytes(1_100, 1.0)  # ten more tokens: a debt of six
    assert budget.tokens(1.0) == pytest.approx(-6)
    assert budget.spend(0.5, 1.5) is not Spend.OK
    assert budget.spend(0.5, 1.7) is Spend.OK
    with pytest.raises(ValueError, match="reply_bytes_per_token"):
        FrameBudget(rate=1, burst=1, abuse_limit=1, abuse_window=1, reply_bytes_per_token=0, now=0)


# -- 4. JSON: UTF-8 out, lone surrogates and huge integers in ------------------------


async def test_emoji_go_out_as_utf8(autojump_clock: trio.abc.Clock) -> None:
    hub = chat_hub(HubConfig())
    async with clients(hub, ["alice"]) as [alice]:
        await alice.join("r")
        await alice.publish("r", "😀" * 100)
        message = await alice.expect("message")
        assert message["data"] == "😀" * 100
        [text] = [
            f.text for f in alice.frames if isinstance(f, TextFrame) and '"message"' in f.text
        ]
        assert "😀" * 100 in text
        assert "\\ud83d" not in text
        assert len(text.encode()) < 1_000  # escaped, the emoji alone took 1,200 bytes


@pytest.mark.parametrize(
    "data",
    ['"\\ud800"', '"a\\udc00b"', '{"\\uDBFF": 1}', '["ok", ["\\ud83d"]]'],
)
async def test_lone_surrogates_are_bad_message(autojump_clock: trio.abc.Clock, data: str) -> None:
    hub = chat_hub(HubConfig())
    async with clients(hub, ["alice"]) as [alice]:
        await alice.join("r")
        await alice.send_text(f'{{"type":"publish","room":"r","data":{data},"ref":1}}')
        reply = await alice.expect("reply")
        assert reply["error"] == {
            "code": "bad_message",
            "message": "a string holds a lone surrogate (not UTF-8)",
        }
        # A well-formed pair is an emoji, not a surrogate.
        await alice.send_text('{"type":"publish","room":"r","data":"\\ud83d\\ude00","ref":2}')
        assert (await alice.expect("reply"))["status"] == "ok"
        assert (await alice.expect("message"))["data"] == "😀"


async def test_integers_python_refuses_get_a_clear_answer(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = chat_hub(HubConfig())
    async with clients(hub, ["alice"]) as [alice]:
        await alice.join("r")
        await alice.send_text('{"type":"publish","room":"r","data":' + "9" * 4_301 + "}")
        error = await alice.expect_error("bad_json")
        assert error["message"] == "integers of more than 4300 digits are not accepted"
        await alice.publish("r", int("9" * 4_300))  # the limit itself is fine
        assert (await alice.expect("message"))["data"] == int("9" * 4_300)


def test_a_lone_surrogate_from_the_server_side_is_escaped_not_lost() -> None:
    message: OutboundMessage = encode({"type": "message", "data": "\ud800"})
    assert json.loads(message.text)["data"] == "\ud800"
    assert message.nbytes == len(message.text.encode())


async def test_the_sweep_gives_back_the_memory_of_rooms_nobody_comes_back_to(
    autojump_clock: trio.abc.Clock,
) -> None:
    backplane = LocalBackplane(HistoryConfig(max_age=60))
    hub = chat_hub(HubConfig(), backplane)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        async with clients(hub, ["bob", "mallory"]) as [bob, mallory]:
            await bob.join("lobby")
            await bob.publish("lobby", "hi")
            for n in range(5):
                await mallory.join(f"gone-{n}")
                await mallory.publish(f"gone-{n}", EMOJI_64K)
                await mallory.leave(f"gone-{n}")
            epoch = (await mallory.join("gone-0"))["epoch"]
            await mallory.leave("gone-0")
            assert backplane.history_bytes > 5 * 64_000
            await trio.sleep(70)  # past max_age, and a sweep (every 6 s)
            assert backplane.history_bytes == 0
            # The rooms' order stays: whoever missed nothing still recovers.
            assert backplane.rooms_kept == 6
            joined = await mallory.join("gone-0", since={"epoch": epoch, "offset": 1})
            assert joined["recovered"] is True
            assert await bob.publish("lobby", "again") == 2
        nursery.cancel_scope.cancel()


async def test_a_large_sweep_hands_free_memory_back(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chatcore._backplane

    released: list[float] = []
    monkeypatch.setattr(
        chatcore._backplane, "release_free_memory", lambda: released.append(trio.current_time())
    )
    backplane = LocalBackplane(HistoryConfig(max_age=60))
    hub = chat_hub(HubConfig(), backplane)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        for n in range(140):  # about 9 MiB in rooms without members
            await hub.publish(f"r{n}", EMOJI_64K)
        assert backplane.history_bytes > 8 * 2**20
        await trio.sleep(59)
        assert released == []
        await trio.sleep(10)
        assert backplane.history_bytes == 0
        assert len(released) == 1
        nursery.cancel_scope.cancel()


def test_release_free_memory_is_glibc_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    from chatcore import _memory

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert (_memory._malloc_trim.__wrapped__() is not None) == glibc
    assert _memory.release_free_memory() == glibc
    monkeypatch.setattr(_memory.sys, "platform", "darwin")
    assert _memory._malloc_trim.__wrapped__() is None
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: None)
    assert _memory.release_free_memory() is False
