"""The hub against real connections: handshake policy, protocol v1, server API, drain.

Every test drives the real connection actor through
:func:`chatcore.testing.open_test_client` (or the raw in-memory wire when the
client must misbehave) on Trio's virtual clock, and asserts what a client can
observe: the frames it received, close codes, HTTP refusals, and what the
registry holds (``hub.statistics()``, ``hub.sessions()``, ``hub.room()``).

Where each code documented in docs/protocol.md is produced
----------------------------------------------------------

Handshake refusals (HTTP status):

- 401: ``test_authenticate_answers`` (Reject, invalid user ids),
  ``test_origin_allow_list`` (no Origin, hook refuses)
- 403: ``test_origin_allow_list`` (foreign Origin), ``test_authenticate_answers``
- 429: ``test_per_user_limit_at_the_boundary``, ``test_per_address_limit``
- 500: ``test_authenticate_hook_raising_is_500``
- 503: ``test_max_connections_is_503_with_retry_after``, ``test_draining_refuses_with_503``,
  ``test_drain_shutdown_then_1012_spread_over_grace``

Error codes (``error.code``):

- ``bad_json``, ``bad_message``, ``unknown_type``: ``test_bad_frames_10_answered_11th_closes_1008``
- ``unknown_type``: ``test_unknown_type``
- ``not_joined``: ``test_leave_then_publish_is_not_joined``
- ``forbidden``: ``test_authorize_join_false_is_forbidden``,
  ``test_on_publish_transforms_and_refuses``
- ``rate_limited``: ``test_rate_limit_burst_then_refill``
- ``too_many_rooms``: ``test_max_rooms_per_connection``
- ``at_capacity``: ``test_abuse_hub.py::test_rooms_per_process_are_capped``
- ``too_many_new_rooms``: ``test_abuse_hub.py::test_new_rooms_per_user_are_rate_limited``
- ``internal``: ``test_app_handler_crash_answers_internal_and_closes_1011``

Close codes (server-initiated):

- 1000: ``test_close_1000_client_and_app``
- 1003: ``test_binary_frame_closes_1003``
- 1007: ``test_hub_fanout.py::test_invalid_utf8_closes_1007_over_loopback`` (a str
  cannot carry invalid UTF-8, so only a real socket can produce it)
- 1008: ``test_bad_frames_10_answered_11th_closes_1008``, ``test_rate_limit_abuse_closes_1008``
- 1009: ``test_message_size_limit_1009``
- 1011: ``test_app_handler_crash_answers_internal_and_closes_1011``
- 1012: ``test_drain_shutdown_then_1012_spread_over_grace``
- 1013: ``test_app_sheds_load_with_1013`` (the hub itself answers capacity with 503
  at the handshake; 1013 is the application's close for an open connection)
- 4000: ``test_heartbeat_timeout_4000``
- 4001: ``test_hub_fanout.py::test_slow_consumer_durable_is_closed_4001``
- 4002: ``test_disconnect_user_closes_every_tab_4002``
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from unittest.mock import ANY

import pytest
import trio
import trio.testing

from chatcore import (
    BackplaneError,
    BackplaneSink,
    CloseCause,
    Config,
    Connection,
    ConnectionClosed,
    ConnectionState,
    Delivery,
    ErrorReply,
    HandlerHealth,
    HandshakeRejected,
    HandshakeRequest,
    HistoryConfig,
    Hub,
    HubConfig,
    Identity,
    LocalBackplane,
    PeerGone,
    Reject,
    RoomStatistics,
    ServedHandler,
    Session,
    serve_connection,
)
from chatcore.sansio import AppMessage
from chatcore.testing import RequestFailed, TestClient, open_test_client, open_test_clients
from chatcore.transports import CloseFrame, MemoryClient, TextFrame, memory_stream_pair

# -- helpers -------------------------------------------------------------------


async def by_query(request: HandshakeRequest) -> Identity | str | Reject:
    """The example app's authentication: ``?user=<id>``, else 401."""
    await trio.lowlevel.checkpoint()
    user = request.query.get("user")
    if user is None:
        return Reject(401, b"who are you?")
    return user


def make_hub(**options: Any) -> Hub:
    options.setdefault("authenticate", by_query)
    return Hub(**options)


async def refused(hub: Hub, **options: Any) -> HandshakeRejected:
    """Connect and return the refusal (fails the test if accepted)."""
    with pytest.raises(HandshakeRejected) as info:
        async with open_test_client(hub, **options):
            pass  # pragma: no cover  (the handshake must be refused)
    return info.value


@asynccontextmanager
async def open_stalled_client(
    hub: Hub, user: str
) -> AsyncIterator[tuple[Connection, MemoryClient]]:
    """A raw client whose "socket" holds one frame and that reads nothing by itself.

    Its ``hello`` fills the socket, so the connection's writer blocks on the
    next frame and whatever follows stays in the outbox until the test reads
    the wire (:func:`read_until_quiet`).
    """
    stream, wire = memory_stream_pair(HandshakeRequest("/ws", f"user={user}"), capacity=1)
    async with trio.open_nursery() as nursery:
        connection: Connection = await nursery.start(serve_connection, stream, hub)
        await wire.wait_accepted()
        yield connection, wire
        nursery.cancel_scope.cancel()


async def read_until_quiet(wire: MemoryClient) -> list[dict[str, Any]]:
    """Read a raw wire until nothing more arrives for a (virtual) second; decoded."""
    messages: list[dict[str, Any]] = []
    while True:
        with trio.move_on_after(1):
            frame = await wire.receive_frame()
            assert isinstance(frame, TextFrame), frame
            messages.extend(json.loads(line) for line in frame.text.split("\n"))
            continue
        return messages


async def drain_messages(client: TestClient) -> list[dict[str, Any]]:
    """Everything buffered once all tasks are blocked (consumed)."""
    await trio.testing.wait_all_tasks_blocked()
    taken = []
    while client.messages:
        taken.append(await client.receive())
    return taken


# -- authenticate and admission --------------------------------------------------


async def test_authenticate_sees_path_query_headers_cookies_client(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[HandshakeRequest] = []

    async def authenticate(request: HandshakeRequest) -> Identity:
        await trio.lowlevel.checkpoint()
        seen.append(request)
        return Identity("alice", data={"roles": ["admin"]})

    hub = make_hub(authenticate=authenticate)
    headers = [
        ("Origin", "https://chat.example"),
        ("Cookie", "sid=abc123; theme=dark"),
        ("Authorization", "Bearer t0k3n"),
    ]
    async with open_test_client(
        hub,
        path="/chat/ws",
        query={"token": "xyz", "v": "1"},
        headers=headers,
        client=("10.1.2.3", 40404),
    ) as alice:
        assert alice.hello["user"] == "alice"
        session = hub.session(alice.connection_id)
        assert session is not None
        assert session.identity == Identity("alice", data={"roles": ["admin"]})
        assert alice.connection.identity is session.identity
    [request] = seen
    assert request.path == "/chat/ws"
    assert request.query == {"token": "xyz", "v": "1"}
    assert request.origin == "https://chat.example"
    assert request.header("authorization") == "Bearer t0k3n"
    assert request.cookies == {"sid": "abc123", "theme": "dark"}
    assert request.client == ("10.1.2.3", 40404)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (Reject(401, b"bad token"), 401),
        (Reject(403, b"banned"), 403),
        ("", 401),
        ("has space", 401),
        ("x" * 65, 401),
        ("bad/slash", 401),
        (Identity("no!"), 401),
        (42, 401),
    ],
)
async def test_authenticate_answers(
    autojump_clock: trio.abc.Clock, answer: object, status: int
) -> None:
    async def authenticate(request: HandshakeRequest) -> Any:
        await trio.lowlevel.checkpoint()
        return answer

    hub = make_hub(authenticate=authenticate)
    rejection = await refused(hub)
    assert rejection.status == status
    if isinstance(answer, Reject):
        assert rejection.body == answer.body
    assert hub.statistics().rejected_handshakes == 1
    assert hub.statistics().connections == 0


@pytest.mark.parametrize("answer", ["alice", "x" * 64, "A.b_c-9", Identity("alice", {"k": 1})])
async def test_authenticate_accepts_str_and_identity(
    autojump_clock: trio.abc.Clock, answer: str | Identity
) -> None:
    async def authenticate(request: HandshakeRequest) -> str | Identity:
        await trio.lowlevel.checkpoint()
        return answer

    hub = make_hub(authenticate=authenticate)
    user = answer if isinstance(answer, str) else answer.user
    async with open_test_client(hub) as client:
        assert client.hello["user"] == user
        [session] = hub.sessions()
        assert session.user == user
        assert session.identity == (answer if isinstance(answer, Identity) else Identity(user))
    assert hub.statistics().rejected_handshakes == 0


async def test_default_authenticate_is_anonymous(autojump_clock: trio.abc.Clock) -> None:
    hub = Hub()
    async with open_test_client(hub) as one, open_test_client(hub) as two:
        assert one.hello["user"].startswith("anonymous-")
        assert one.hello["user"] != two.hello["user"]


async def test_authenticate_hook_raising_is_500(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async def authenticate(request: HandshakeRequest) -> str:
        await trio.lowlevel.checkpoint()
        if request.query.get("user") == "boom":
            raise RuntimeError("database down")
        return request.query["user"]

    hub = make_hub(authenticate=authenticate)
    assert (await refused(hub, user="boom")).status == 500
    assert "database down" in caplog.text
    # The server keeps serving everyone else.
    async with open_test_client(hub, user="fine") as fine:
        await fine.ping()
    assert hub.statistics().connections == 0


async def test_authenticate_slower_than_the_handshake_timeout_is_503(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def authenticate(request: HandshakeRequest) -> str:
        await trio.sleep(3600)  # a stuck identity provider
        return "never"  # pragma: no cover

    hub = make_hub(authenticate=authenticate, connection_config=Config(handshake_timeout=2))
    start = trio.current_time()
    assert (await refused(hub)).status == 503
    assert trio.current_time() - start == pytest.approx(2)
    assert hub.statistics().connections == 0


async def test_origin_allow_list(autojump_clock: trio.abc.Clock) -> None:
    calls: list[str | None] = []

    async def authenticate(request: HandshakeRequest) -> str | Reject:
        await trio.lowlevel.checkpoint()
        calls.append(request.origin)
        token = request.query.get("token")
        return "alice" if token == "good" else Reject(401, b"bad token")

    hub = make_hub(
        authenticate=authenticate,
        config=HubConfig(allowed_origins={"https://chat.example"}),
    )
    foreign = await refused(hub, query="token=good", headers=[("Origin", "https://evil.example")])
    assert foreign.status == 403
    assert calls == []  # refused before the app's hook ran
    async with open_test_client(
        hub, query="token=good", headers=[("Origin", "https://chat.example")]
    ) as browser:
        assert browser.hello["user"] == "alice"
    # No Origin: not a browser; the hook alone judges it.
    async with open_test_client(hub, query="token=good") as script:
        assert script.hello["user"] == "alice"
    assert (await refused(hub, query="token=bad")).status == 401
    assert calls == ["https://chat.example", None, None]


async def test_per_user_limit_at_the_boundary(autojump_clock: trio.abc.Clock) -> None:
    assert HubConfig().max_connections_per_user == 20
    limit = 3
    hub = make_hub(config=HubConfig(max_connections_per_user=limit))
    async with AsyncExitStack() as stack:
        tabs = [
            await stack.enter_async_context(open_test_client(hub, user="alice"))
            for _ in range(limit)
        ]  # the N-th is accepted
        over = await refused(hub, user="alice")  # the N+1-th is not
        assert over.status == 429
        async with open_test_client(hub, user="bob"):  # other users are unaffected
            pass
        await tabs[0].close()
        await trio.testing.wait_all_tasks_blocked()
        async with open_test_client(hub, user="alice") as again:  # a slot came free
            await again.ping()
        assert len(hub.sessions_of("alice")) == limit - 1
    assert hub.statistics().rejected_handshakes == 1


async def test_per_user_default_limit_is_20(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_clients(hub, ["carol"] * 20):
        assert (await refused(hub, user="carol")).status == 429


async def test_per_address_limit(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub(config=HubConfig(max_connections_per_address=2))
    async with AsyncExitStack() as stack:
        for i in range(2):
            await stack.enter_async_context(
                open_test_client(hub, user=f"u{i}", client=("192.0.2.1", 1000 + i))
            )
        over = await refused(hub, user="u9", client=("192.0.2.1", 2000))
        assert over.status == 429
        async with open_test_client(hub, user="u9", client=("192.0.2.2", 2000)):
            pass  # another address
    async with open_test_client(hub, user="u9", client=("192.0.2.1", 3000)):
        pass  # released when they closed


async def test_per_address_limit_is_off_by_default(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_clients(hub, [f"u{i}" for i in range(30)], client=("192.0.2.1", 1)):
        assert hub.statistics().connections == 30


async def test_max_connections_is_503_with_retry_after(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub(config=HubConfig(max_connections=2, retry_after=7))
    async with open_test_clients(hub, ["a", "b"]):
        assert (await refused(hub, user="c")).status == 503
        # The same decision, seen by a transport: the Retry-After header.
        decision = await hub.authenticate(HandshakeRequest("/ws", "user=c"))
        assert isinstance(decision, Reject)
        assert decision.status == 503
        assert ("retry-after", "7") in decision.headers
    async with open_test_client(hub, user="c"):
        pass


async def test_draining_refuses_with_503(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="early") as early:
        hub.start_draining()
        assert hub.draining
        assert (await refused(hub, user="late")).status == 503
        await early.ping()  # already-open connections are not affected by admission
    decision = await hub.authenticate(HandshakeRequest("/ws", "user=late"))
    assert isinstance(decision, Reject)
    assert decision.status == 503
    assert ("retry-after", "5") in decision.headers


# -- protocol v1 ---------------------------------------------------------------------


async def test_hello_shape(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub(connection_config=Config(heartbeat_interval=7.5, heartbeat_timeout=3.25))
    async with open_test_client(hub, user="alice") as alice:
        assert alice.hello == {
            "type": "hello",
            "protocol": 1,
            "connection_id": alice.connection.id,
            "user": "alice",
            "heartbeat": {"interval_ms": 7500, "timeout_ms": 3250},
        }
        first = alice.frames[0]
        assert isinstance(first, TextFrame)
        assert json.loads(first.text) == alice.hello  # the first frame is hello alone


@pytest.mark.parametrize("ref", ["r-1", 7, 0])
async def test_replies_echo_the_ref(autojump_clock: trio.abc.Clock, ref: str | int) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice") as alice:
        await alice.send({"type": "join", "room": "lobby", "ref": ref})
        reply = await alice.expect_reply(ref, status="ok")
        assert reply["data"] == {"room": "lobby", "epoch": ANY, "offset": 0}
        await alice.send({"type": "ping", "ref": ref})
        await alice.expect_reply(ref, status="ok")
        await alice.send({"type": "publish", "room": "lobby", "data": "hi", "ref": ref})
        assert (await alice.expect_reply(ref, status="ok"))["data"] == {"offset": 1}
        await alice.expect("message", room="lobby", offset=1)
        await alice.send({"type": "leave", "room": "lobby", "ref": ref})
        assert (await alice.expect_reply(ref, status="ok"))["data"] == {"room": "lobby"}
        await alice.assert_nothing_received()


async def test_publisher_gets_its_reply_before_its_own_message(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub()
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        await alice.join("lobby")
        await bob.join("lobby")
        for n in range(1, 4):
            await alice.send({"type": "publish", "room": "lobby", "data": n, "ref": f"p{n}"})
        for n in range(1, 4):
            # Strictly next: the reply, then the message, nothing in between.
            await alice.expect("reply", ref=f"p{n}", status="ok", data={"offset": n})
            await alice.expect("message", room="lobby", offset=n, from_="alice", data=n)
            await bob.expect("message", room="lobby", offset=n, from_="alice", data=n)
        await alice.assert_nothing_received()
        await bob.assert_nothing_received()


async def test_join_offset_is_last_assigned_and_first_message_is_1(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub()
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        joined = await alice.join("lobby")
        assert joined["offset"] == 0
        epoch = joined["epoch"]
        assert isinstance(epoch, str)
        assert epoch
        assert await alice.publish("lobby", "one") == 1
        assert await alice.publish("lobby", "two") == 2
        assert await alice.publish("lobby", "three") == 3
        assert await bob.join("lobby") == {"room": "lobby", "epoch": epoch, "offset": 3}
        await alice.publish("lobby", "four")
        await bob.expect("message", room="lobby", offset=4, epoch=epoch, from_="alice")
        room = hub.room("lobby")
        assert room is not None
        assert room.statistics() == RoomStatistics("lobby", 2, 2, 4, epoch)


async def test_leave_then_publish_is_not_joined(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        await alice.join("lobby")
        await bob.join("lobby")
        await alice.leave("lobby")
        with pytest.raises(RequestFailed) as info:
            await alice.publish("lobby", "hello?")
        assert info.value.code == "not_joined"
        await bob.assert_nothing_received()  # nothing was published
        room = hub.room("lobby")
        assert room is not None
        assert room.statistics().members == 1
        assert room.statistics().offset == 0
        # Never joined at all: the same answer, as an error without a ref.
        await alice.send({"type": "publish", "room": "other", "data": 1})
        await alice.expect_error("not_joined")


async def test_max_rooms_per_connection(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub(config=HubConfig(max_rooms_per_connection=2))
    async with open_test_client(hub, user="alice") as alice:
        await alice.join("a")
        await alice.join("b")
        with pytest.raises(RequestFailed) as info:
            await alice.join("c")
        assert info.value.code == "too_many_rooms"
        assert hub.room("c") is None
        await alice.join("a")  # already a member: not a new room
        await alice.leave("a")
        await alice.join("c")
        session = hub.session(alice.connection_id)
        assert session is not None
        assert session.rooms == {"b", "c"}


async def test_authorize_join_false_is_forbidden(autojump_clock: trio.abc.Clock) -> None:
    asked: list[tuple[str, str]] = []

    async def authorize_join(session: Session, room: str) -> bool:
        await trio.lowlevel.checkpoint()
        asked.append((session.user, room))
        return not room.startswith("admin:") or session.user == "root"

    hub = make_hub(authorize_join=authorize_join)
    async with open_test_clients(hub, ["alice", "root"]) as (alice, root):
        with pytest.raises(RequestFailed) as info:
            await alice.join("admin:ops")
        assert info.value.code == "forbidden"
        assert hub.room("admin:ops") is None
        await root.join("admin:ops")
        await alice.join("lobby")
        with pytest.raises(RequestFailed):
            await alice.publish("admin:ops", "let me in")
        await root.assert_nothing_received()
    assert asked == [("alice", "admin:ops"), ("root", "admin:ops"), ("alice", "lobby")]


async def test_authorize_join_raising_error_reply_answers_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def authorize_join(session: Session, room: str) -> bool:
        await trio.lowlevel.checkpoint()
        raise ErrorReply("forbidden", "members only")

    hub = make_hub(authorize_join=authorize_join)
    async with open_test_client(hub, user="alice") as alice:
        reply = await alice.request("join", room="club")
        assert reply["error"] == {"code": "forbidden", "message": "members only"}
        await alice.ping()  # the connection stays open
        assert hub.room("club") is None


async def test_on_publish_transforms_and_refuses(autojump_clock: trio.abc.Clock) -> None:
    async def on_publish(session: Session, room: str, data: Any) -> Any:
        await trio.lowlevel.checkpoint()
        if data == "spam":
            raise ErrorReply("forbidden", "no spam")
        return {"text": str(data).upper(), "by": session.user, "room": room}

    hub = make_hub(on_publish=on_publish)
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        await alice.join("lobby")
        await bob.join("lobby")
        assert await alice.publish("lobby", "hi") == 1
        expected = {"text": "HI", "by": "alice", "room": "lobby"}
        await bob.expect("message", offset=1, data=expected)
        reply = await alice.request("publish", room="lobby", data="spam")
        assert reply["status"] == "error"
        assert reply["error"] == {"code": "forbidden", "message": "no spam"}
        assert await alice.publish("lobby", "again") == 2  # the refusal took no offset
        await bob.expect(
            "message", offset=2, data={"text": "AGAIN", "by": "alice", "room": "lobby"}
        )
        await alice.expect("message", offset=1)
        await alice.expect("message", offset=2)
        await alice.assert_nothing_received()
        await bob.assert_nothing_received()


async def test_app_handler_reply_and_error_reply(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    got: list[AppMessage] = []

    @hub.on("add")
    async def add(session: Session, message: AppMessage) -> Any:
        await trio.lowlevel.checkpoint()
        got.append(message)
        a, b = message.fields.get("a"), message.fields.get("b")
        if not isinstance(a, int) or not isinstance(b, int):
            raise ErrorReply("bad_message", "a and b must be integers")
        return {"sum": a + b, "user": session.user}

    with pytest.raises(ValueError, match="built-in"):
        hub.on("publish")

    async with open_test_client(hub, user="alice") as alice:
        reply = await alice.request("add", a=2, b=3, extra="ignored")
        assert reply == {
            "type": "reply",
            "ref": ANY,
            "status": "ok",
            "data": {"sum": 5, "user": "alice"},
        }
        reply = await alice.request("add", a="x", b=3)
        assert reply["error"] == {"code": "bad_message", "message": "a and b must be integers"}
        await alice.send({"type": "add", "a": 1, "b": 1})  # no ref: no reply
        await alice.assert_nothing_received()
        assert len(got) == 3
        assert got[0].type == "add"
        assert got[0].fields["extra"] == "ignored"
        # ErrorReply is not a bad frame: 20 of them keep the connection open.
        for _ in range(20):
            assert (await alice.request("add"))["status"] == "error"
        await alice.ping()


async def test_app_handler_crash_answers_internal_and_closes_1011(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = make_hub()

    @hub.on("crash")
    async def crash(session: Session, message: AppMessage) -> None:
        await trio.lowlevel.checkpoint()
        raise ZeroDivisionError("handler bug")

    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        await alice.join("lobby")
        await bob.join("lobby")
        await alice.send({"type": "crash", "ref": "c1"})
        reply = await alice.expect("reply", ref="c1", status="error")
        assert reply["error"]["code"] == "internal"
        assert "handler bug" not in json.dumps(reply)  # no internals leak to the client
        close = await alice.expect_closed(1011)
        assert close.code == 1011
        # Logged once, with the connection id.
        records = [r for r in caplog.records if "raised" in r.getMessage()]
        assert len(records) == 1
        assert alice.connection.id in records[0].getMessage()
        # Everyone else is served as before.
        await trio.testing.wait_all_tasks_blocked()
        assert hub.session(alice.connection_id) is None
        assert await bob.publish("lobby", "still here") == 1
        await bob.expect("message", offset=1)
        async with open_test_client(hub, user="carol") as carol:
            await carol.join("lobby")


async def test_unknown_type(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice") as alice:
        reply = await alice.request("dance")
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "unknown_type"
        await alice.send({"type": "dance"})
        await alice.expect_error("unknown_type")


async def test_bad_frames_10_answered_11th_closes_1008(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice") as alice:
        await alice.send_text("{not json")
        await alice.expect_error("bad_json")
        await alice.send_text("[1, 2]")
        await alice.expect_error("bad_message")
        await alice.send({"type": "join", "ref": 3})  # no room: a reply, it had a ref
        assert (await alice.expect_reply(3, status="error"))["error"]["code"] == "bad_message"
        await alice.send({"type": "join", "room": "bad room!", "ref": 4})
        assert (await alice.expect_reply(4, status="error"))["error"]["code"] == "bad_message"
        await alice.send({"type": "publish", "room": "r", "ref": 5})  # no data
        assert (await alice.expect_reply(5, status="error"))["error"]["code"] == "bad_message"
        await alice.send({"ref": 6})  # no type
        assert (await alice.expect_reply(6, status="error"))["error"]["code"] == "bad_message"
        await alice.send({"type": "ping", "ref": True})  # a ref of the wrong type
        await alice.expect_error("bad_message")
        for n in range(8, 11):
            await alice.send({"type": "nope", "ref": n})
            assert (await alice.expect_reply(n, status="error"))["error"]["code"] == "unknown_type"
        await alice.ping()  # ten bad frames answered; still open
        await alice.send_text("{still not json")  # the 11th within 60 s
        await alice.expect_closed(1008)
        await alice.assert_nothing_received()  # closed without an answer to the 11th
        assert alice.connection.close_record is not None
        assert alice.connection.close_record.cause is CloseCause.PROTOCOL


async def test_bad_frames_spread_over_more_than_60s_do_not_close(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice") as alice:
        for _ in range(10):
            await alice.send_text("nope")
            await alice.expect_error("bad_json")
        await trio.sleep(60.001)
        for _ in range(10):  # the first ten are out of the window
            await alice.send_text("nope")
            await alice.expect_error("bad_json")
        await trio.sleep(60.001)
        # A steady trickle (at most 9 in any 60 s) never closes.
        for _ in range(30):
            await trio.sleep(6.7)
            await alice.send_text("nope")
            await alice.expect_error("bad_json")
        assert alice.closed is None
        await alice.ping()


async def test_not_joined_and_rate_limited_are_not_bad_frames(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice") as alice:
        for _ in range(9):
            await alice.send_text("x")
            await alice.expect_error("bad_json")
        for _ in range(30):
            assert (await alice.request("publish", room="r", data=1))["error"]["code"] == (
                "not_joined"
            )
        # Those publishes spent tokens too (every publish frame does); let the
        # bucket refill on virtual time.
        await trio.sleep(2.0)
        await alice.join("r")  # a join costs a token too: 39 are left
        for _ in range(39):
            await alice.publish("r", 1)
        assert len(await drain_messages(alice)) == 39
        for _ in range(30):
            assert (await alice.request("publish", room="r", data=1))["error"]["code"] == (
                "rate_limited"
            )
        await alice.send_text("x")  # the 10th bad frame: still answered
        await alice.expect_error("bad_json")
        await trio.sleep(1.0)  # a ping costs half a token
        await alice.ping()
        await alice.send_text("x")  # the 11th closes
        await alice.expect_closed(1008)


async def test_rate_limit_burst_then_refill(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        await alice.join("r")
        await bob.join("r")
        await trio.sleep(1.0)  # the join's token is back
        start = trio.current_time()
        for n in range(1, 41):  # the burst
            assert await alice.publish("r", n) == n
        with pytest.raises(RequestFailed) as info:
            await alice.publish("r", "too fast")
        assert info.value.code == "rate_limited"
        assert trio.current_time() == start  # no refill happened meanwhile
        await trio.sleep(0.5)  # 20/s: ten tokens
        for n in range(41, 51):
            assert await alice.publish("r", n) == n
        with pytest.raises(RequestFailed) as info:
            await alice.publish("r", "too fast")
        assert info.value.code == "rate_limited"
        await trio.sleep(10)  # refills to the burst, not beyond
        for n in range(51, 91):
            assert await alice.publish("r", n) == n
        assert (await alice.request("publish", room="r", data=0))["error"]["code"] == (
            "rate_limited"
        )
        # Refused messages were dropped: no offset, nobody received them.
        received = [m["offset"] for m in await drain_messages(bob)]
        assert received == list(range(1, 91))
        room = hub.room("r")
        assert room is not None
        assert room.statistics().offset == 90


async def test_rate_limit_abuse_closes_1008(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        await trio.sleep(1.0)  # the join's token is back
        for _ in range(40):
            await alice.publish("r", 0)
        start = trio.current_time()
        for _ in range(200):  # 200 rate_limited answers within 60 s
            reply = await alice.request("publish", room="r", data=0)
            assert reply["error"]["code"] == "rate_limited"
        assert trio.current_time() == start
        await alice.send({"type": "publish", "room": "r", "data": 0, "ref": "x"})
        await alice.expect_closed(1008)
        assert [m["type"] for m in alice.messages] == ["message"] * 40


async def test_rate_limit_answers_spread_over_the_window_do_not_close(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Joins and pings free here: only the publishes draw on the one token.
    config = HubConfig(publish_rate=0.001, publish_burst=1, frame_costs={"join": 0, "ping": 0})
    hub = make_hub(config=config)
    async with open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        await alice.publish("r", 0)
        for _ in range(150):
            assert (await alice.request("publish", room="r", data=0))["status"] == "error"
        await trio.sleep(61)
        for _ in range(150):
            assert (await alice.request("publish", room="r", data=0))["status"] == "error"
        await alice.ping()


async def test_join_since_recovers_from_history(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub(backplane=LocalBackplane(HistoryConfig(rooms=1)))
    async with open_test_client(hub, user="alice") as alice:
        joined = await alice.join("r")
        epoch = joined["epoch"]
        await alice.publish("r", "a")
        await alice.publish("r", "b")
        await alice.expect("message", offset=1)
        await alice.expect("message", offset=2)
        await alice.leave("r")
        # Nothing missed: recovered, nothing replayed.
        assert (await alice.join("r", since={"epoch": epoch, "offset": 2}))["recovered"] is True
        await alice.assert_nothing_received()
        await alice.leave("r")
        # Two missed: replayed after the reply, in order.
        data = await alice.join("r", since={"epoch": epoch, "offset": 0})
        assert data == {"room": "r", "epoch": epoch, "offset": 2, "recovered": True}
        await alice.expect("message", offset=1, data="a")
        await alice.expect("message", offset=2, data="b")
        await alice.leave("r")
        # Another epoch, or a position from the future: not recovered, nothing sent.
        assert (await alice.join("r", since={"epoch": "other", "offset": 2}))["recovered"] is False
        await alice.leave("r")
        assert (await alice.join("r", since={"epoch": epoch, "offset": 3}))["recovered"] is False
        await alice.assert_nothing_received()
        await alice.leave("r")
        await alice.join("s")  # the backplane keeps one room: r's order is forgotten
        await alice.leave("s")
        data = await alice.join("r", since={"epoch": epoch, "offset": 2})
        assert data["recovered"] is False
        assert data["epoch"] != epoch
        assert data["offset"] == 0
        # Without since: no "recovered" field.
        assert "recovered" not in await alice.join("t")
        # A malformed since is a bad frame.
        reply = await alice.request("join", room="u", since={"epoch": epoch})
        assert reply["error"]["code"] == "bad_message"


async def test_a_room_with_members_keeps_its_order_while_others_come_and_go(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The backplane forgets only rooms without members (HistoryConfig.rooms=1 here)."""
    hub = make_hub(backplane=LocalBackplane(HistoryConfig(rooms=1)))
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        epoch = (await alice.join("r"))["epoch"]
        assert await alice.publish("r", "one") == 1
        # Other rooms opened here (by a client, by the server) and published to.
        # Each in the epoch its join announced.
        s_epoch = (await bob.join("s"))["epoch"]
        assert await bob.publish("s", "x") == 1
        await bob.expect("message", room="s", epoch=s_epoch, offset=1)
        await bob.leave("s")
        assert await hub.join(bob.connection_id, "t")
        t_room = hub.room("t")
        assert t_room is not None
        t_epoch = t_room.epoch
        assert await hub.publish("t", "y") == 1
        await bob.expect("message", room="t", epoch=t_epoch, offset=1)
        assert hub.leave(bob.connection_id, "t")
        assert await hub.publish("u", "z") == 1
        # r's order went on: same epoch, next offset; its members saw no restart.
        assert await alice.publish("r", "two") == 2
        await alice.expect("message", room="r", epoch=epoch, offset=1, data="one")
        await alice.expect("message", room="r", epoch=epoch, offset=2, data="two")
        data = await bob.join("r", since={"epoch": epoch, "offset": 0})
        assert data == {"room": "r", "epoch": epoch, "offset": 2, "recovered": True}
        await bob.expect("message", offset=1)
        await bob.expect("message", offset=2)
        # The rooms without members were forgotten (bounded): s comes back anew.
        assert (await bob.join("s"))["offset"] == 0


class GatedReplay(LocalBackplane):
    """A local backplane whose :meth:`replay` waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.replaying = trio.Event()
        self.gate = trio.Event()
        self.replays: list[tuple[int, int]] = []

    async def replay(self, room: str, epoch: str, after: int, upto: int) -> Any:
        self.replays.append((after, upto))
        self.replaying.set()
        await self.gate.wait()
        return await super().replay(room, epoch, after, upto)


@pytest.mark.parametrize("publisher", ["member", "server"])
async def test_messages_published_during_a_recovery_follow_the_replay(
    publisher: str, autojump_clock: trio.abc.Clock
) -> None:
    """No gap, no duplicate: the replay, then what was published meanwhile, then live.

    ``member``: another member here keeps the room open and publishes; ``server``:
    nobody else is in the room here, the joining room alone hears the messages.
    """
    backplane = GatedReplay()
    hub = make_hub(backplane=backplane)
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        epoch = (await alice.join("r"))["epoch"]
        await alice.leave("r")
        if publisher == "member":
            await bob.join("r")

        async def publish(data: str) -> int:
            if publisher == "member":
                return await bob.publish("r", data)
            return await hub.publish("r", data)

        for n in (1, 2, 3):
            assert await publish(f"m{n}") == n
        await alice.send(
            {"type": "join", "room": "r", "since": {"epoch": epoch, "offset": 1}, "ref": "j"}
        )
        with trio.fail_after(1):
            await backplane.replaying.wait()
        # The replay of 2..3 is running: 4 and 5 are published meanwhile.
        assert await publish("m4") == 4
        assert await publish("m5") == 5
        await trio.testing.wait_all_tasks_blocked()
        await alice.assert_nothing_received()  # not a member yet: nothing live
        backplane.gate.set()
        reply = await alice.expect_reply("j", status="ok")
        assert reply["data"] == {"room": "r", "epoch": epoch, "offset": 5, "recovered": True}
        for n in (2, 3, 4, 5):
            await alice.expect("message", room="r", epoch=epoch, offset=n, data=f"m{n}")
        await alice.assert_nothing_received()
        # What arrived during the first replay was fetched by a second one.
        assert backplane.replays == [(1, 3), (3, 5)]
        # Live from here on, right after the replay.
        assert await publish("m6") == 6
        await alice.expect("message", room="r", offset=6, data="m6")
        await alice.assert_nothing_received()
        room = hub.room("r")
        assert room is not None
        assert room.statistics().members == (2 if publisher == "member" else 1)


@pytest.mark.parametrize("bound", ["bytes", "messages"])
async def test_recovery_larger_than_the_free_outbox_is_not_recovered(
    bound: str, autojump_clock: trio.abc.Clock
) -> None:
    """Never partial: a replay that would overflow the joiner's outbox is refused whole."""
    small = (
        Config(outbox_max_bytes=2_048, batch_max_bytes=2_048)
        if bound == "bytes"
        else Config(outbox_max_messages=8)
    )
    hub = make_hub()
    async with (
        open_test_client(hub, user="alice", config=small) as alice,
        open_test_client(hub, user="bob") as bob,
    ):
        epoch = (await alice.join("r"))["epoch"]
        await alice.leave("r")
        await bob.join("r")
        pad = "x" * 200 if bound == "bytes" else ""
        for n in range(1, 21):  # ~4.5 KiB, 20 messages: over either bound
            assert await bob.publish("r", {"n": n, "pad": pad}) == n
        data = await alice.join("r", since={"epoch": epoch, "offset": 0})
        assert data == {"room": "r", "epoch": epoch, "offset": 20, "recovered": False}
        await trio.testing.wait_all_tasks_blocked()
        await alice.assert_nothing_received()  # nothing replayed, not even a part
        assert alice.connection.close_record is None  # and not a slow consumer
        # Still joined: live messages follow.
        assert await bob.publish("r", {"n": 21, "pad": pad}) == 21
        await alice.expect("message", offset=21)
        await alice.assert_nothing_received()
        # A recovery that fits is replayed whole.
        await alice.leave("r")
        assert await bob.publish("r", {"n": 22, "pad": pad}) == 22
        assert await bob.publish("r", {"n": 23, "pad": pad}) == 23
        data = await alice.join("r", since={"epoch": epoch, "offset": 21})
        assert data["recovered"] is True
        await alice.expect("message", offset=22)
        await alice.expect("message", offset=23)
        await alice.assert_nothing_received()


class FlakyBackplane(LocalBackplane):
    """A local backplane that raises :class:`BackplaneError` where the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.down: set[str] = set()

    def _check(self, operation: str) -> None:
        if operation in self.down:
            raise BackplaneError(f"{operation}: backplane down")

    async def publish(self, room: str, sender: str | None, data: Any, nonce: str | None) -> Any:
        await trio.lowlevel.checkpoint()
        self._check("publish")
        return await super().publish(room, sender, data, nonce)

    async def position(self, room: str) -> Any:
        await trio.lowlevel.checkpoint()
        self._check("position")
        return await super().position(room)

    async def replay(self, room: str, epoch: str, after: int, upto: int) -> Any:
        await trio.lowlevel.checkpoint()
        self._check("replay")
        return await super().replay(room, epoch, after, upto)


async def test_publish_when_the_backplane_is_down_is_unavailable(
    autojump_clock: trio.abc.Clock,
) -> None:
    backplane = FlakyBackplane()
    hub = make_hub(backplane=backplane)
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        for client in (alice, bob):
            await client.join("r")
        assert await alice.publish("r", "before") == 1
        for client in (alice, bob):
            await client.expect("message", offset=1)
        backplane.down.add("publish")
        reply = await alice.request("publish", room="r", data="lost")
        assert reply["status"] == "error"
        assert reply["error"] == {"code": "unavailable", "message": "publish: backplane down"}
        with pytest.raises(BackplaneError):
            await hub.publish("r", "server")
        await trio.testing.wait_all_tasks_blocked()
        for client in (alice, bob):
            await client.assert_nothing_received()  # nothing was sequenced
            assert client.closed is None  # the connections stay up
        assert hub.statistics().published == 1
        # Back up: the order goes on with no gap.
        backplane.down.clear()
        assert await alice.publish("r", "after") == 2
        for client in (alice, bob):
            await client.expect("message", offset=2, data="after")


@pytest.mark.parametrize("failing", ["position", "replay"])
async def test_join_when_the_backplane_is_down_is_unavailable(
    failing: str, autojump_clock: trio.abc.Clock
) -> None:
    """``position``: the first join here cannot learn where the room stands;
    ``replay``: a recovering join cannot read the history."""
    backplane = FlakyBackplane()
    hub = make_hub(backplane=backplane)
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        epoch = (await alice.join("r"))["epoch"]
        await alice.leave("r")
        if failing == "replay":
            await bob.join("r")  # the room's position is known here
        assert await hub.publish("r", "missed") == 1
        backplane.down.add(failing)
        reply = await alice.request("join", room="r", since={"epoch": epoch, "offset": 0}, ref="j")
        assert reply == {
            "type": "reply",
            "ref": "j",
            "status": "error",
            "error": {"code": "unavailable", "message": f"{failing}: backplane down"},
        }
        # Not a member: no message reaches it, publishing is not_joined.
        assert (await alice.request("publish", room="r", data="x"))["error"]["code"] == (
            "not_joined"
        )
        assert await hub.publish("r", "unheard") == 2
        await trio.testing.wait_all_tasks_blocked()
        await alice.assert_nothing_received()
        assert alice.closed is None
        assert hub.session(alice.connection_id) is not None
        assert "r" not in hub.session(alice.connection_id).rooms  # type: ignore[union-attr]
        if failing == "position":
            assert hub.rooms() == []  # nothing left behind
            with pytest.raises(BackplaneError):
                await hub.join(alice.connection_id, "r")
            assert hub.rooms() == []
        else:
            room = hub.room("r")
            assert room is not None
            assert room.statistics().members == 1
        # Back up: the same join recovers everything.
        backplane.down.clear()
        data = await alice.join("r", since={"epoch": epoch, "offset": 0})
        assert data == {"room": "r", "epoch": epoch, "offset": 2, "recovered": True}
        await alice.expect("message", offset=1, data="missed")
        await alice.expect("message", offset=2, data="unheard")
        await alice.assert_nothing_received()


async def test_binary_frame_closes_1003(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice") as alice:
        await alice.send_bytes(b'{"type":"ping"}')
        await alice.expect_closed(1003)


async def test_message_size_limit_1009(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice") as alice:
        head = '{"type":"ping","ref":1,"pad":"'
        exact = head + "x" * (65_536 - len(head) - 2) + '"}'
        assert len(exact.encode()) == 65_536
        await alice.send_text(exact)  # at the limit: accepted and answered
        await alice.expect_reply(1, status="ok")
        await alice.send_text(exact[:-2] + 'x"}')  # one byte more
        await alice.expect_closed(1009)


async def test_heartbeat_timeout_4000(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub(connection_config=Config(heartbeat_interval=2, heartbeat_timeout=1))
    async with (
        open_test_client(hub, user="mute", answer_pings=False) as mute,
        open_test_client(hub, user="alive") as alive,
    ):
        await mute.expect("ping", timeout=3)
        await mute.expect_closed(4000, timeout=2)
        await trio.sleep(30)
        assert alive.closed is None  # answering pings keeps it open
        await alive.ping()


async def test_close_1000_client_and_app(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()

    @hub.on("bye")
    async def bye(session: Session, message: AppMessage) -> None:
        await trio.lowlevel.checkpoint()
        session.close_nowait()

    async with open_test_client(hub, user="alice") as alice:
        assert (await alice.close()).code == 1000
    async with open_test_client(hub, user="bob") as bob:
        await bob.send({"type": "bye"})
        await bob.expect_closed(1000)
    assert hub.statistics().connections == 0


async def test_app_sheds_load_with_1013(autojump_clock: trio.abc.Clock) -> None:
    async def on_connect(session: Session) -> None:
        await trio.lowlevel.checkpoint()
        if len(session.hub.sessions()) > 2:
            session.close_nowait(1013, "busy, try again later")

    hub = make_hub(on_connect=on_connect)
    async with open_test_clients(hub, ["a", "b"]), open_test_client(hub, user="c") as c:
        frame = await c.expect_closed(1013)
        assert frame.reason == "busy, try again later"


# -- server-side API -------------------------------------------------------------


async def test_hub_publish_from_the_server(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    # A room without members still has an order.
    assert await hub.publish("news", {"n": 1}) == 1
    assert hub.room("news") is None  # no members
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        joined = await alice.join("news")
        assert joined["offset"] == 1
        await bob.join("news")
        assert await hub.publish("news", {"n": 2}) == 2
        assert await hub.publish("news", {"n": 3}, sender="bot") == 3
        for client in (alice, bob):
            await client.expect("message", room="news", offset=2, from_=None, data={"n": 2})
            await client.expect("message", room="news", offset=3, from_="bot", data={"n": 3})
            await client.assert_nothing_received()
        with pytest.raises(ValueError, match="invalid room"):
            await hub.publish("not a room", 1)
        # Data that cannot be encoded raises and leaves no gap in the order.
        with pytest.raises(TypeError, match="not JSON serializable"):
            await hub.publish("news", {"not json": object()})
        with pytest.raises(ValueError, match="not JSON compliant"):
            await hub.publish("news", float("nan"))
        assert await hub.publish("news", "next") == 4
        await alice.expect("message", offset=4, data="next")
    assert hub.statistics().published == 4


async def test_broadcast_ephemeral_coalesces_by_key(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with (
        open_test_client(hub, user="alice") as alice,
        open_stalled_client(hub, "bob") as (_, bob),
        open_stalled_client(hub, "carol") as (_, carol),
    ):
        await alice.join("lobby")
        for wire in (bob, carol):
            await wire.send(json.dumps({"type": "join", "room": "lobby", "ref": 1}))
        # Their writers now hold the join replies, blocked on a full socket:
        # every broadcast below stays in their outboxes until they read.
        await trio.testing.wait_all_tasks_blocked()
        room = hub.room("lobby")
        assert room is not None
        assert room.statistics().members == 3
        alice_session = hub.session(alice.connection_id)
        before = hub.statistics().delivered
        for n in range(5):
            await hub.broadcast(
                "lobby",
                {"type": "typing", "user": "alice", "n": n},
                key="typing:alice",
                exclude=alice_session,
            )
        stats = hub.statistics()
        assert stats.delivered - before == 2 * 5  # bob's and carol's outboxes, each time
        assert stats.coalesced == 2 * 4  # n=1..4 each replaced the queued one
        assert stats.published == 0  # outside the room's order
        assert room.offset == 0
        # Without a key nothing is coalesced; durable delivery may be asked for.
        await hub.broadcast("lobby", {"type": "presence"}, delivery=Delivery.DURABLE)
        await hub.broadcast("lobby", {"type": "presence"})
        assert hub.statistics().coalesced == 2 * 4
        await alice.expect("presence")  # excluded from typing, not from these
        await alice.expect("presence")
        await alice.assert_nothing_received()
        for wire in (bob, carol):
            got = await read_until_quiet(wire)
            assert [m["type"] for m in got] == ["hello", "reply", "typing", "presence", "presence"]
            assert got[2] == {"type": "typing", "user": "alice", "n": 4}  # latest wins
        # A room nobody is in: nobody gets anything.
        before = hub.statistics().delivered
        await hub.broadcast("nobody-here", {"type": "x"})
        assert hub.statistics().delivered == before
        await alice.assert_nothing_received()
        for wire in (bob, carol):
            assert await read_until_quiet(wire) == []


async def test_send_to_user_reaches_every_tab_and_no_other_user(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub()
    users = [f"user{i}" for i in range(50)]
    async with open_test_clients(hub, [u for u in users for _ in range(3)]) as tabs:
        assert hub.statistics().connections == 150
        assert hub.statistics().users == 50
        for user in users:
            await hub.send_to_user(user, {"type": "note", "to": user})
        # Each tab got exactly one note, its user's: every tab of the user got
        # it, and no other user did.
        for tab in tabs:
            await tab.expect("note", to=tab.user)
        for tab in tabs:
            await tab.assert_nothing_received()
        assert hub.statistics().delivered == 150
        await hub.send_to_user("ghost", {"type": "note"})
        assert hub.statistics().delivered == 150
        for tab in tabs:
            await tab.assert_nothing_received()
        assert {s.id for s in hub.sessions_of("user7")} == {
            t.connection_id for t in tabs if t.user == "user7"
        }


async def test_send_to_connection(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_clients(hub, ["alice", "alice", "bob"]) as (tab1, tab2, bob):
        assert hub.send_to_connection(tab2.connection_id, {"type": "only", "to": "tab2"})
        await tab2.expect("only", to="tab2")
        for other in (tab1, tab2, bob):
            await other.assert_nothing_received()
        assert not hub.send_to_connection("no-such-id", {"type": "x"})
        gone = tab1.connection_id
        await tab1.close()
        await trio.testing.wait_all_tasks_blocked()
        assert not hub.send_to_connection(gone, {"type": "x"})


async def test_disconnect_user_closes_every_tab_4002(autojump_clock: trio.abc.Clock) -> None:
    closed: list[tuple[str, int]] = []

    def on_disconnect(session: Session, record: Any) -> None:
        closed.append((session.user, record.code))

    hub = make_hub(on_disconnect=on_disconnect)
    async with open_test_clients(hub, ["alice", "alice", "alice", "bob"]) as (*tabs, bob):
        for client in (*tabs, bob):
            await client.join("lobby")
        await hub.disconnect_user("alice", reason="kicked by admin")
        for tab in tabs:
            frame = await tab.expect_closed(4002)
            assert frame.reason == "kicked by admin"
        await trio.testing.wait_all_tasks_blocked()
        assert hub.sessions_of("alice") == []
        assert closed == [("alice", 4002)] * 3
        assert bob.closed is None
        room = hub.room("lobby")
        assert room is not None
        assert room.statistics().members == 1
        assert await bob.publish("lobby", "alone") == 1
        await bob.expect("message", offset=1, data="alone")
        await hub.disconnect_user("alice")  # no tab left: nothing happens
        await hub.disconnect_user("nobody")
        await trio.testing.wait_all_tasks_blocked()
        assert bob.closed is None
        await bob.assert_nothing_received()
        assert closed == [("alice", 4002)] * 3


async def test_server_side_join_and_leave(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
        assert await hub.join(alice.connection_id, "news")
        assert await hub.join(alice.connection_id, "news")  # idempotent
        room = hub.room("news")
        assert room is not None
        assert room.statistics().members == 1
        await hub.publish("news", "headline")
        await alice.expect("message", room="news", offset=1, data="headline")
        await bob.assert_nothing_received()
        # The client can use the membership the server gave it.
        assert await alice.publish("news", "reply") == 2
        assert hub.leave(alice.connection_id, "news")
        assert not hub.leave(alice.connection_id, "news")
        assert hub.room("news") is None
        await hub.publish("news", "unheard")
        await alice.expect("message", offset=2)
        await alice.assert_nothing_received()
        assert not await hub.join("no-such-id", "news")
        assert not hub.leave("no-such-id", "news")
        with pytest.raises(ValueError, match="invalid room"):
            await hub.join(alice.connection_id, "")


async def test_statistics_snapshots(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    assert hub.statistics() == hub.statistics().__class__(0, 0, 0, 0, 0, 0, 0, 0, 0)
    async with open_test_clients(hub, ["alice", "alice", "bob"]) as (a1, a2, bob):
        await a1.join("r1")
        await a2.join("r1")
        await bob.join("r1")
        await bob.join("r2")
        await a1.publish("r1", "x")
        before = hub.statistics()
        assert before.connections == 3
        assert before.users == 2
        assert before.rooms == 2
        assert before.published == 1
        assert before.delivered == 3  # the room message to its three members
        assert sorted(hub.rooms()) == ["r1", "r2"]
        r1 = hub.room("r1")
        assert r1 is not None
        assert r1.statistics() == RoomStatistics("r1", 3, 2, 1, r1.epoch)
        stats = a1.connection.statistics()
        assert stats.state is ConnectionState.OPEN
        assert stats.messages_received == 2  # join, publish
        # hello, two replies, one message; the reply and the message may share a frame.
        assert stats.messages_queued == 4
        assert stats.outbox_messages == 0
        assert stats.outbox_bytes == 0
        # Snapshots are frozen values.
        await bob.leave("r2")
        assert before.rooms == 2
        assert hub.statistics().rooms == 1
        assert repr(hub) == "<Hub connections=3 users=2 rooms=1>"


async def test_registry_empty_after_everyone_leaves(autojump_clock: trio.abc.Clock) -> None:
    limit = 3
    hub = make_hub(config=HubConfig(max_connections_per_user=limit, max_connections=7))
    async with AsyncExitStack() as stack:
        tabs = [
            await stack.enter_async_context(open_test_client(hub, user=user))
            for user in ["alice"] * limit + ["bob"] * limit
        ]
        for n, tab in enumerate(tabs):
            await tab.join(f"room{n % 4}")
        assert (await refused(hub, user="alice")).status == 429
        carol = await stack.enter_async_context(open_test_client(hub, user="carol"))
        assert (await refused(hub, user="dave")).status == 503
        await carol.close()
        # Every way out: a close frame, a vanished link, a kick, an app close.
        await tabs[0].close()
        tabs[1].vanish()
        await hub.disconnect_user("bob")
        tabs[2].connection.close_nowait(4002)
        for tab in tabs[3:]:
            await tab.expect_closed(4002)
    await trio.testing.wait_all_tasks_blocked()
    stats = hub.statistics()
    assert (stats.connections, stats.users, stats.rooms) == (0, 0, 0)
    assert hub.sessions() == []
    assert hub.rooms() == []
    assert hub.sessions_of("alice") == []
    # The reservations went too: a user at the limit and the hub at capacity admit again.
    async with open_test_clients(hub, ["alice"] * limit + ["bob"] * limit + ["dave"]):
        assert hub.statistics().connections == 7


# -- drain -----------------------------------------------------------------------


async def test_drain_shutdown_then_1012_spread_over_grace(autojump_clock: trio.abc.Clock) -> None:
    cfg = HubConfig(reconnect_min_ms=1_000, reconnect_max_ms=3_000)
    hub = make_hub(config=cfg, connection_config=Config(close_timeout=2.0))
    n, grace = 10, 8.0
    async with open_test_clients(hub, [f"u{i}" for i in range(n)]) as members:
        for member in members:
            await member.join("lobby")
        start = trio.current_time()
        closed_at: list[float] = []
        reconnect: list[int] = []
        refusals: list[int] = []

        async def watch(client: TestClient) -> None:
            shutdown = await client.expect("shutdown", timeout=grace)
            reconnect.append(shutdown["reconnect_after_ms"])
            await client.expect_closed(1012, timeout=grace)
            closed_at.append(trio.current_time() - start)

        async def knock() -> None:
            await trio.sleep(1.0)
            refusals.append((await refused(hub, user="late")).status)

        async with trio.open_nursery() as nursery:
            for member in members:
                nursery.start_soon(watch, member)
            nursery.start_soon(knock)
            left = await hub.drain(grace)
        took = trio.current_time() - start
    assert left == 0
    assert refusals == [503]
    assert len(reconnect) == n
    assert all(cfg.reconnect_min_ms <= ms <= cfg.reconnect_max_ms for ms in reconnect)
    assert len(set(reconnect)) > 1  # jittered per connection
    # Closes spread evenly over grace - close_timeout = 6 s, in order.
    spread = grace - 2.0
    assert sorted(closed_at) == pytest.approx([spread * i / n for i in range(n)], abs=1e-6)
    assert took <= grace
    stats = hub.statistics()
    assert (stats.connections, stats.users, stats.rooms) == (0, 0, 0)


async def test_drain_shuts_down_a_connection_accepted_just_before_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    decided = trio.Event()
    registering = trio.Event()

    async def authenticate(request: HandshakeRequest) -> str:
        await trio.lowlevel.checkpoint()
        decided.set()  # accepted; the connection registers once `registering` is set
        return "late"

    hub = make_hub(authenticate=authenticate)
    handle = hub.handle

    async def handle_later(connection: Connection) -> None:
        await registering.wait()
        await handle(connection)

    hub.handle = handle_later  # type: ignore[method-assign]
    seen: list[TestClient] = []

    async def connect() -> None:
        async with open_test_client(hub) as late:
            seen.append(late)
            await late.expect("shutdown")
            await late.expect_closed(1012)

    async def register_during_the_drain() -> None:
        await trio.testing.wait_all_tasks_blocked()  # the drain is waiting
        registering.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect)
        await decided.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert hub.sessions() == []  # accepted, not registered yet
        nursery.start_soon(register_during_the_drain)
        left = await hub.drain(8.0)
        # drain returned only once the late connection had closed too.
        assert left == 0
        [late] = seen
        assert late.connection.state is ConnectionState.CLOSED
        assert hub.statistics().connections == 0


async def test_drain_returns_at_once_when_empty(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    start = trio.current_time()
    assert await hub.drain(8.0) == 0
    assert trio.current_time() == start
    assert hub.draining


async def test_drain_bounds_a_client_that_never_answers_the_close(
    autojump_clock: trio.abc.Clock,
) -> None:
    close_timeout = 3.0
    hub = make_hub(connection_config=Config(close_timeout=close_timeout))
    stream, wire = memory_stream_pair(HandshakeRequest("/ws", "user=mute"))
    async with trio.open_nursery() as nursery:
        mute = await nursery.start(serve_connection, stream, hub)
        await wire.wait_accepted()  # and then never reads or answers anything
        async with open_test_client(hub, user="polite") as polite:
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            with trio.fail_after(10):
                left = await hub.drain(grace=8.0)
            took = trio.current_time() - start
            await polite.expect("shutdown")
            await polite.expect_closed(1012)
    assert left == 0
    # The mute one was asked first (t=0) and aborted at its close deadline.
    assert took == pytest.approx(close_timeout)
    assert mute.state is ConnectionState.CLOSED
    assert mute.close_record is not None
    assert mute.close_record.code == 1012
    # What reached its wire: hello, shutdown, the close frame; then the link was cut.
    while True:
        try:
            await wire.receive_frame()
        except PeerGone:
            break
    kinds = [json.loads(f.text)["type"] if isinstance(f, TextFrame) else f for f in wire.frames]
    assert kinds == ["hello", "shutdown", CloseFrame(1012, "service restart")]
    assert hub.statistics().connections == 0


# -- golden path: streaming a reply from a task the connection owns ---------------


def streaming_hub(log: list[str], chunks: int = 5) -> Hub:
    """The seed's pattern: ``ask`` starts a task that streams bot events."""
    hub = make_hub()
    stream_ids = itertools.count(1)

    @hub.on("ask")
    async def ask(session: Session, message: AppMessage) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        stream = f"s{next(stream_ids)}"
        session.start_soon(answer, session, stream, str(message.fields.get("text", "")))
        return {"stream": stream}

    async def answer(session: Session, stream: str, question: str) -> None:
        try:
            await session.send({"type": "bot", "stream": stream, "event": "started"})
            log.append("started")
            for n in range(chunks):
                await trio.sleep(1.0)  # the model thinks
                await session.send(
                    {"type": "bot", "stream": stream, "event": "chunk", "text": f"{question}-{n}"}
                )
                log.append(f"chunk {n}")
            await session.send({"type": "bot", "stream": stream, "event": "completed"})
            log.append("completed")
        except BaseException as exc:
            log.append(f"finally: {type(exc).__name__}")
            raise

    return hub


async def test_streaming_reply_reaches_only_the_asker_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    hub = streaming_hub(log)
    async with open_test_clients(hub, ["alice", "alice", "bob"]) as (asker, other_tab, bob):
        for client in (asker, other_tab, bob):
            await client.join("lobby")
        await asker.publish("lobby", "/ask why?")
        reply = await asker.request("ask", text="why")
        stream = reply["data"]["stream"]
        await asker.expect("message", offset=1)
        await asker.expect("bot", stream=stream, event="started")
        for n in range(5):
            await asker.expect("bot", stream=stream, event="chunk", text=f"why-{n}")
        await asker.expect("bot", stream=stream, event="completed")
        await asker.assert_nothing_received()
        for client in (other_tab, bob):  # not the user's other tab, not the room
            await client.expect("message", offset=1)
            await client.assert_nothing_received()
        assert log == ["started", *(f"chunk {n}" for n in range(5)), "completed"]
        # The asker keeps using the connection meanwhile and afterwards.
        await asker.ping()


async def test_two_streams_interleave_but_each_stays_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = streaming_hub([], chunks=4)
    async with open_test_client(hub, user="alice") as alice:
        await alice.send({"type": "ask", "text": "a", "ref": 1})
        await alice.send({"type": "ask", "text": "b", "ref": 2})
        await trio.sleep(10)
        events = await drain_messages(alice)
        streams = {e["data"]["stream"]: e["ref"] for e in events if e["type"] == "reply"}
        assert len(streams) == 2
        for stream in streams:
            mine = [e["event"] for e in events if e.get("stream") == stream]
            assert mine == ["started", "chunk", "chunk", "chunk", "chunk", "completed"]


async def test_closing_mid_stream_cancels_the_task_and_nothing_follows(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    hub = streaming_hub(log)
    async with open_test_client(hub, user="alice") as alice:
        await alice.request("ask", text="q")
        await alice.expect("bot", event="started")
        await alice.expect("bot", event="chunk", text="q-0")
        await alice.expect("bot", event="chunk", text="q-1")
        await trio.sleep(0.5)  # between two chunks
        assert (await alice.close()).code == 1000
    assert log == ["started", "chunk 0", "chunk 1", "finally: Cancelled"]
    await trio.sleep(60)  # long past the end of the stream: nothing else ran
    assert log[-1] == "finally: Cancelled"
    assert isinstance(alice.frames[-1], CloseFrame)
    assert hub.statistics().connections == 0


async def test_kick_mid_stream_leaves_nothing_after_the_close_frame_on_the_wire(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    hub = streaming_hub(log)
    stream, wire = memory_stream_pair(HandshakeRequest("/ws", "user=alice"))
    async with trio.open_nursery() as nursery:
        connection = await nursery.start(serve_connection, stream, hub)
        await wire.wait_accepted()
        await wire.send(json.dumps({"type": "ask", "text": "q", "ref": 1}))

        async def kick_after_two_chunks() -> None:
            while log[-1:] != ["chunk 1"]:
                await trio.sleep(0.1)
            await hub.disconnect_user("alice")

        nursery.start_soon(kick_after_two_chunks)
        lines: list[str] = []
        while True:
            frame = await wire.receive_frame()  # a close frame is answered, like a browser
            if isinstance(frame, CloseFrame):
                break
            assert isinstance(frame, TextFrame)
            lines.extend(frame.text.split("\n"))
    await trio.sleep(60)
    assert log == ["started", "chunk 0", "chunk 1", "finally: Cancelled"]
    events = [json.loads(line) for line in lines]
    assert [e.get("event", e["type"]) for e in events] == [
        "hello",
        "reply",
        "started",
        "chunk",
        "chunk",
    ]
    assert frame == CloseFrame(4002, "")
    assert wire.frames[-1] == frame  # nothing after the close frame
    with pytest.raises(PeerGone):
        await wire.receive_frame()
    assert connection.state is ConnectionState.CLOSED
    with pytest.raises(ConnectionClosed):
        connection.send_nowait({"type": "late"})


async def test_a_stream_that_sends_after_the_close_was_recorded_ends_quietly(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = make_hub()
    outcome: list[str] = []

    @hub.on("ask")
    async def ask(session: Session, message: AppMessage) -> None:
        await trio.lowlevel.checkpoint()

        async def answer() -> None:
            session.close_nowait(4002, "enough")  # recorded; cancellation not yet here
            try:
                session.send_nowait({"type": "bot", "event": "late"})
            except ConnectionClosed as exc:
                outcome.append(f"send_nowait: {exc.record.code}")
            await session.send({"type": "bot", "event": "late"})  # raises, ends the task
            outcome.append("not reached")  # pragma: no cover

        session.start_soon(answer)

    async with open_test_client(hub, user="alice") as alice:
        await alice.send({"type": "ask"})
        await alice.expect_closed(4002)  # not 1011: the task ended with its connection
        await alice.assert_nothing_received()
    assert outcome == ["send_nowait: 4002"]
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_the_hub_declares_the_contracts_it_implements() -> None:
    """A backplane's sink and a server's handler: both seen through public protocols."""
    backplane = LocalBackplane()
    hub = Hub(authenticate=by_query, backplane=backplane, config=HubConfig(retry_after=7))
    assert isinstance(hub, BackplaneSink)
    assert isinstance(hub, ServedHandler)
    assert hub.retry_after == 7
    async with open_test_client(hub, user="alice") as alice:
        await alice.join("r")
        assert hub.health() == HandlerHealth(connections=1, rooms=1, draining=False)
        hub.start_draining()
        assert hub.health() == HandlerHealth(connections=1, rooms=1, draining=True)
        decision = await hub.authenticate(HandshakeRequest("/ws", "user=bob"))
        assert decision == Reject(
            503, b"server is draining; reconnect shortly", (("retry-after", "7"),)
        )
