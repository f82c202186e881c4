"""chatcore.testing.TestClient against a small protocol-speaking handler.

The Hub is tested with this client elsewhere; here the server side is
``EchoRooms``, a few lines of docs/protocol.md, so these tests pin down the client
itself: hello, ref matching, JSON Lines, pings, failure messages, timeouts on
virtual time, close handling and clean-up.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any
from unittest.mock import ANY

import pytest
import trio
import trio.testing

from chatcore import (
    Accept,
    CloseCause,
    Config,
    Connection,
    ConnectionHandler,
    HandshakeRejected,
    HandshakeRequest,
    OutboundMessage,
    Reject,
    serve_websocket,
)
from chatcore.testing import RequestFailed, TestClient, open_test_client, open_test_clients
from chatcore.transports import CloseFrame, TextFrame


def raw(text: str) -> OutboundMessage:
    """An outbound message with exactly this text (may be anything)."""
    return OutboundMessage(text, len(text.encode()))


class EchoRooms(ConnectionHandler):
    """A protocol-speaking app small enough to trust.

    Authenticates by ``?user=`` (401 without, 403 for ``banned``); answers
    join/leave/publish/ping with replies by ref; delivers publishes to the
    room's members as ``message`` with offsets 1, 2, ...; and obeys test
    commands: ``noise`` (n messages, then the reply), ``say`` (raw texts),
    ``close`` (close with a code), ``crash`` (raise), ``ignore`` (no answer).
    """

    def __init__(self, *, first: str = "hello") -> None:
        self.first = first
        self.rooms: defaultdict[str, set[Connection]] = defaultdict(set)
        self.offsets: Counter[str] = Counter()
        self.requests: list[HandshakeRequest] = []
        self.closed: list[Connection] = []

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        await trio.lowlevel.checkpoint()
        self.requests.append(request)
        user = request.query.get("user")
        if not user:
            return Reject(401, b"who are you?")
        if user == "banned":
            return Reject(403, b"go away")
        return Accept(identity=user)

    async def handle(self, connection: Connection) -> None:
        connection.send_nowait(
            {
                "type": self.first,
                "protocol": 1,
                "connection_id": connection.id,
                "user": connection.identity,
                "heartbeat": {"interval_ms": 25000, "timeout_ms": 20000},
            }
        )
        async for text in connection:
            message = json.loads(text)
            await self.dispatch(connection, message)

    async def dispatch(self, connection: Connection, message: dict[str, Any]) -> None:
        kind, ref, room = message["type"], message.get("ref"), message.get("room", "")

        def ok(data: object = None) -> None:
            connection.send_nowait({"type": "reply", "ref": ref, "status": "ok", "data": data})

        if kind == "join":
            self.rooms[room].add(connection)
            ok({"room": room, "epoch": "e1", "offset": self.offsets[room]})
        elif kind == "leave":
            self.rooms[room].discard(connection)
            ok()
        elif kind == "publish":
            if connection not in self.rooms[room]:
                error = {"code": "not_joined", "message": f"join {room} first"}
                connection.send_nowait(
                    {"type": "reply", "ref": ref, "status": "error", "error": error}
                )
                return
            self.offsets[room] += 1
            offset = self.offsets[room]
            ok({"offset": offset})
            for member in self.rooms[room]:
                member.send_nowait(
                    {
                        "type": "message",
                        "room": room,
                        "offset": offset,
                        "epoch": "e1",
                        "from": connection.identity,
                        "data": message["data"],
                    }
                )
        elif kind == "ping":
            ok()
        elif kind == "noise":
            for n in range(message["count"]):
                connection.send_nowait({"type": "noise", "n": n})
            ok("after the noise")
        elif kind == "say":
            for text in message["texts"]:
                connection.send_nowait(raw(text))
        elif kind == "close":
            await connection.close(message["code"], message.get("reason", ""))
        elif kind == "crash":
            raise RuntimeError("handler bug")
        elif kind in ("ignore", "pong"):
            pass
        else:
            connection.send_nowait({"type": "error", "code": "unknown_type", "message": kind})

    def connection_closed(self, connection: Connection) -> None:
        for members in self.rooms.values():
            members.discard(connection)
        self.closed.append(connection)


@pytest.fixture
def app() -> EchoRooms:
    return EchoRooms()


# -- connecting ----------------------------------------------------------------


async def test_hello_is_received_and_exposed(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        assert isinstance(client, TestClient)
        assert client.hello["type"] == "hello"
        assert client.hello["protocol"] == 1
        assert client.connection_id == client.connection.id
        assert client.user == "alice"
        assert client.connection.identity == "alice"
        assert client.messages == []  # hello was consumed
        assert client.closed is None
        assert "alice" in repr(client)
        assert "OPEN" in repr(client)


async def test_handshake_carries_user_path_query_headers_and_client(app: EchoRooms) -> None:
    async with open_test_client(
        app,
        user="alice",
        path="/chat",
        query={"token": "t 1"},
        headers=[("Origin", "https://example.com")],
        client=("10.0.0.7", 4242),
    ):
        pass
    (request,) = app.requests
    assert request.path == "/chat"
    assert request.query == {"token": "t 1", "user": "alice"}
    assert request.origin == "https://example.com"
    assert request.client == ("10.0.0.7", 4242)


async def test_query_string_and_default_client_addresses(app: EchoRooms) -> None:
    async with open_test_client(app, query="?user=bob&x=1") as bob:
        assert bob.user == "bob"
    async with open_test_client(app, user="carol"):
        pass
    first, second = app.requests
    assert first.query == {"user": "bob", "x": "1"}
    assert first.client is not None
    assert second.client is not None
    assert first.client[0] == second.client[0] == "127.0.0.1"
    assert first.client != second.client  # one port per client


async def test_user_given_twice_is_refused(app: EchoRooms) -> None:
    with pytest.raises(ValueError, match="either"):
        async with open_test_client(app, user="a", query="user=b"):
            pass  # pragma: no cover
    assert app.requests == []


@pytest.mark.parametrize(
    ("query", "status", "body"), [("", 401, b"who"), ("user=banned", 403, b"go")]
)
async def test_handshake_rejection_raises_with_status(
    app: EchoRooms, query: str, status: int, body: bytes
) -> None:
    # pytest.raises(HandshakeRejected) itself checks it is not an ExceptionGroup.
    with pytest.raises(HandshakeRejected) as info:
        async with open_test_client(app, query=query):
            pytest.fail("the block must not run")  # pragma: no cover
    assert info.value.status == status
    assert info.value.body.startswith(body)
    assert len(app.closed) == 1  # connection_closed runs for a refusal too


async def test_first_message_must_be_hello() -> None:
    with pytest.raises(AssertionError, match="expected a 'hello' message") as info:
        async with open_test_client(EchoRooms(first="welcome"), user="alice"):
            pytest.fail("the block must not run")  # pragma: no cover
    assert "'welcome'" in str(info.value)


# -- requests and replies ---------------------------------------------------------


async def test_request_takes_its_reply_and_leaves_interleaved_messages(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        reply = await client.request("noise", count=3)
        assert reply == {"type": "reply", "ref": 1, "status": "ok", "data": "after the noise"}
        assert [m["n"] for m in client.messages] == [0, 1, 2]
        for n in range(3):
            await client.expect("noise", n=n)
        # Fresh refs; an explicit ref is used as given.
        assert (await client.request("ping"))["ref"] == 2
        assert (await client.request("ping", ref="mine"))["ref"] == "mine"


async def test_request_finds_a_reply_behind_other_messages(app: EchoRooms) -> None:
    async with open_test_clients(app, ["alice", "bob"]) as (alice, bob):
        await alice.join("lobby")
        await bob.join("lobby")
        # Bob's publish lands in alice's buffer before her own reply arrives.
        await bob.publish("lobby", "from bob")
        await bob.expect("message", offset=1)
        assert await alice.publish("lobby", "from alice") == 2
        await alice.expect("message", offset=1, from_="bob", data="from bob")
        await alice.expect("message", offset=2, from_="alice", data="from alice")
        await alice.assert_nothing_received()


async def test_join_leave_publish_ping(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        assert await client.join("lobby") == {"room": "lobby", "epoch": "e1", "offset": 0}
        assert await client.publish("lobby", {"text": "hi"}) == 1
        message = await client.expect("message", room="lobby", offset=1, data={"text": "hi"})
        assert message["from"] == "alice"
        assert await client.join("lobby", since={"epoch": "e1", "offset": 1}) == {
            "room": "lobby",
            "epoch": "e1",
            "offset": 1,
        }
        assert await client.leave("lobby") is None
        await client.ping()
        await client.assert_nothing_received()


async def test_error_reply_raises_reply_error(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        with pytest.raises(RequestFailed) as info:
            await client.publish("lobby", "hi")
        assert info.value.code == "not_joined"
        assert info.value.message == "join lobby first"
        assert info.value.reply["status"] == "error"
        # request() returns error replies as values.
        reply = await client.request("publish", room="lobby", data="hi")
        assert reply["error"]["code"] == "not_joined"


async def test_expect_reply_and_expect_error(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.send({"type": "ping", "ref": "p1"})
        await client.expect_reply("p1", status="ok")
        await client.send({"type": "publish", "ref": 7, "room": "x", "data": 1})
        with pytest.raises(AssertionError, match="status: expected 'ok', got 'error'"):
            await client.expect_reply(7, status="ok")
        await client.send({"type": "bogus"})
        await client.expect_error("unknown_type")
        await client.send({"type": "ping", "ref": 8})
        await client.expect_reply(8)


# -- framing ----------------------------------------------------------------------


async def test_a_frame_of_json_lines_becomes_several_messages(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        lines = '{"type":"a"}\n\n{"type":"b","x":1}\n{"type":"c"}'
        await client.send({"type": "say", "texts": [lines]})
        await client.expect("a")
        await client.expect("b", x=1)
        await client.expect("c")
        assert TextFrame(lines) in client.frames  # it was one frame on the wire
        await client.assert_nothing_received()


@pytest.mark.parametrize(
    ("text", "complaint"),
    [("not json", "is not JSON"), ("[1, 2]", "is not an object"), ('{"no": "type"}', "'type'")],
)
async def test_a_non_message_from_the_server_fails_the_next_wait(
    app: EchoRooms, text: str, complaint: str
) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.send({"type": "say", "texts": [text]})
        with pytest.raises(AssertionError, match="invalid message") as info:
            await client.receive()
        assert complaint in str(info.value)


async def test_a_non_message_fails_assert_nothing_received(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.send({"type": "say", "texts": ["garbage"]})
        with pytest.raises(AssertionError, match="invalid message: 'garbage' is not JSON"):
            await client.assert_nothing_received()
        await client.assert_nothing_received()  # reported once


async def test_an_unread_non_message_fails_on_exit(app: EchoRooms) -> None:
    async def garbage_then_closed() -> None:
        async with open_test_client(app, user="alice") as client:
            await client.send({"type": "say", "texts": ["garbage"]})
            await client.send({"type": "close", "code": 1000})
            await trio.testing.wait_all_tasks_blocked()
            assert client.closed is not None  # so the exit's own close has nothing to wait for

    with pytest.raises(AssertionError, match="is not JSON"):
        await garbage_then_closed()
    assert len(app.closed) == 1


# -- heartbeat ----------------------------------------------------------------------


FAST_HEARTBEAT = Config(heartbeat_interval=1.0, heartbeat_timeout=1.0)


async def test_pings_are_answered_and_not_buffered(
    app: EchoRooms, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_test_client(app, user="alice", config=FAST_HEARTBEAT) as client:
        start = trio.current_time()
        await trio.sleep(10.5)
        assert trio.current_time() - start == pytest.approx(10.5)
        pings = [f for f in client.frames if f == TextFrame('{"type":"ping"}')]
        assert len(pings) >= 9
        assert client.connection.statistics().messages_received >= 9  # the pongs
        assert client.closed is None
        await client.assert_nothing_received()


async def test_without_auto_pong_pings_are_buffered_and_the_server_gives_up(
    app: EchoRooms, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_test_client(
        app, user="alice", config=FAST_HEARTBEAT, answer_pings=False
    ) as client:
        await client.expect("ping")
        await client.send({"type": "pong"})  # answering by hand keeps it alive
        await client.expect("ping")
        frame = await client.expect_closed(4000)
        assert frame.reason == "heartbeat timeout"
        await client.assert_nothing_received()  # the close was expected


# -- failure messages and timeouts -------------------------------------------------------


async def test_expect_mismatch_explains_what_arrived(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.request("noise", count=3)
        with pytest.raises(AssertionError) as info:
            await client.expect("noise", n=5, colour="red")
        text = str(info.value)
        assert "expected a 'noise' message with n=5, colour='red'" in text
        assert 'got {"type": "noise", "n": 0}' in text
        assert "n: expected 5, got 0" in text
        assert "colour: expected 'red', missing" in text
        assert "buffered (2)" in text
        assert '{"type": "noise", "n": 2}' in text
        with pytest.raises(AssertionError, match="type: expected 'message', got 'noise'"):
            await client.expect("message")
        await client.expect("noise", n=ANY)
        await client.assert_nothing_received()


async def test_receive_times_out_on_virtual_time(
    app: EchoRooms, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_test_client(app, user="alice", timeout=2) as client:
        start = trio.current_time()
        with pytest.raises(AssertionError, match=r"timed out \(3s\) waiting for a message"):
            await client.receive(timeout=3)
        assert trio.current_time() - start == pytest.approx(3)
        with pytest.raises(AssertionError, match=r"timed out \(2s\) waiting for a 'message'"):
            await client.expect("message", room="lobby")
        assert trio.current_time() - start == pytest.approx(5)


async def test_request_timeout_says_what_was_awaited_and_buffered(
    app: EchoRooms, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_test_client(app, user="alice", timeout=1) as client:
        await client.send({"type": "say", "texts": ['{"type":"typing"}']})
        with pytest.raises(AssertionError) as info:
            await client.request("ignore")
        text = str(info.value)
        assert "timed out (1s) waiting for the reply to 'ignore' with ref=1" in text
        assert 'buffered (1):\n  {"type": "typing"}' in text


async def test_assert_nothing_received_fails_when_something_arrived(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.assert_nothing_received()
        # Not awaited for: only assert_nothing_received lets the server run.
        await client.send({"type": "say", "texts": ['{"type":"late"}']})
        with pytest.raises(AssertionError, match="expected nothing") as info:
            await client.assert_nothing_received()
        assert '{"type": "late"}' in str(info.value)
        await client.expect("late")
        await client.assert_nothing_received()


async def test_assert_nothing_received_fails_on_an_unexpected_close(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.send({"type": "close", "code": 4002, "reason": "kicked"})
        with pytest.raises(AssertionError, match="closed: code 4002 'kicked'"):
            await client.assert_nothing_received()


# -- closing ----------------------------------------------------------------------------


async def test_expect_closed_checks_the_code(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.send({"type": "close", "code": 4002, "reason": "kicked"})
        frame = await client.expect_closed(4002)
        assert frame == CloseFrame(4002, "kicked")
        assert client.closed == frame
        with pytest.raises(AssertionError, match="closed with 4002 'kicked'"):
            await client.expect_closed(1000)
        with pytest.raises(AssertionError, match="connection closed"):
            await client.receive()
        with pytest.raises(AssertionError, match="the connection is closed"):
            await client.send({"type": "ping"})
    assert app.closed[0].close_record is not None
    assert app.closed[0].close_record.code == 4002


async def test_messages_before_the_close_stay_buffered(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.send({"type": "say", "texts": ['{"type":"bye"}']})
        await client.send({"type": "crash"})
        await client.expect_closed(1011)
        await client.expect("bye")


async def test_expect_closed_times_out_while_open(
    app: EchoRooms, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_test_client(app, user="alice") as client:
        with pytest.raises(AssertionError, match=r"timed out \(1s\) waiting for the connection"):
            await client.expect_closed(timeout=1)


async def test_binary_frame_is_closed_with_1003(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.send_bytes(b"\x00")
        await client.expect_closed(1003)


async def test_exit_closes_and_connection_closed_has_run(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.join("lobby")
        connection = client.connection
        assert app.closed == []
    assert app.closed == [connection]
    assert app.rooms["lobby"] == set()
    assert client.closed == CloseFrame(1000, "")
    record = connection.close_record
    assert record is not None
    assert (record.code, record.cause) == (1000, CloseCause.PEER)


async def test_close_waits_for_the_answer_and_is_idempotent(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        assert await client.close(4100, "done") == CloseFrame(4100, "done")
        assert await client.close() == CloseFrame(4100, "done")
        await client.assert_nothing_received()
    record = app.closed[0].close_record
    assert record is not None
    assert record.code == 4100


async def test_vanish_is_a_lost_connection(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        client.vanish()
        assert await client.expect_closed(1006) == CloseFrame(1006, "connection lost")
        assert (await client.connection.wait_closed()).code == 1006


async def test_an_error_in_the_block_propagates_unwrapped_and_cleans_up(app: EchoRooms) -> None:
    with pytest.raises(KeyError, match="from the test"):
        async with open_test_client(app, user="alice"):
            raise KeyError("from the test")
    (connection,) = app.closed
    record = connection.close_record
    assert record is not None
    assert record.code == 1006  # the link was dropped, as when a test process dies


async def test_open_test_clients_closes_all(app: EchoRooms) -> None:
    async with open_test_clients(app, ["alice", "bob", "carol"]) as clients:
        assert [c.user for c in clients] == ["alice", "bob", "carol"]
        assert len({c.connection_id for c in clients}) == 3
    assert len(app.closed) == 3


async def test_cancellation_leaves_nothing_behind(
    app: EchoRooms, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.move_on_after(1) as scope:
        async with open_test_client(app, user="alice") as client:
            await client.receive(timeout=float("inf"))
    assert scope.cancelled_caught
    assert len(app.closed) == 1


class SlowToFinish(EchoRooms):
    """Shields a long clean-up from the close (an application bug)."""

    async def handle(self, connection: Connection) -> None:
        try:
            await super().handle(connection)
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(30)


async def test_exit_reports_a_server_side_that_does_not_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = SlowToFinish()
    with pytest.raises(AssertionError, match="did not finish within 2s after the close"):
        async with open_test_client(app, user="alice", timeout=2):
            pass
    assert len(app.closed) == 1  # it did finish, 30 virtual seconds later


async def test_failure_messages_stay_short(app: EchoRooms) -> None:
    async with open_test_client(app, user="alice") as client:
        await client.send({"type": "say", "texts": [json.dumps({"type": "big", "x": "y" * 1000})]})
        await client.request("noise", count=12)
        with pytest.raises(AssertionError) as info:
            await client.expect("small")
        text = str(info.value)
        assert f'got {{"type": "big", "x": "{"y" * 200}' in text
        assert "y" * 300 not in text
        assert "buffered (12)" in text
        assert text.count('"type": "noise"') == 10
        assert "... and 2 more" in text


class NeverReads(EchoRooms):
    async def handle(self, connection: Connection) -> None:
        connection.send_nowait({"type": "hello", "connection_id": connection.id})
        await trio.sleep_forever()


async def test_send_times_out_when_the_server_stops_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_client(NeverReads(), user="alice", timeout=1) as client:

        async def flood() -> None:
            for _ in range(1000):  # more than the server's inbox and the link buffer
                await client.send({"type": "ping"})

        with pytest.raises(AssertionError, match=r"timed out after 1s sending .*not reading"):
            await flood()


class SlowToAuthenticate(EchoRooms):
    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        await trio.sleep(3)
        return await super().authenticate(request)


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    app = SlowToAuthenticate()
    with pytest.raises(AssertionError, match="did not answer the handshake within 2s"):
        async with open_test_client(app, user="alice", timeout=2):
            pytest.fail("the block must not run")  # pragma: no cover
    assert len(app.closed) == 1


# -- the same client over a real WebSocket ------------------------------------------------


@pytest.fixture
async def url(app: EchoRooms, nursery: trio.Nursery) -> str:
    """``EchoRooms`` served by trio-websocket on 127.0.0.1; its ``ws://`` URL."""
    listeners = await nursery.start(serve_websocket, app, "127.0.0.1", 0)
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/ws"


async def test_over_a_socket_the_client_speaks_the_same_protocol(app: EchoRooms, url: str) -> None:
    with trio.fail_after(10):
        async with open_test_clients(url, ["alice", "bob"], query="x=1") as (alice, bob):
            assert alice.user == "alice"
            assert alice.connection_id not in ("", bob.connection_id)
            await alice.join("r")
            await bob.join("r")
            offset = await alice.publish("r", {"text": "hi"})
            await alice.expect("message", room="r", offset=offset, from_="alice")
            await bob.expect("message", room="r", offset=offset, data={"text": "hi"})
            with pytest.raises(RequestFailed) as info:
                await bob.publish("elsewhere", 1)
            assert info.value.code == "not_joined"
            with pytest.raises(AttributeError, match="over a socket"):
                _ = alice.connection
        assert app.requests[0].query == {"x": "1", "user": "alice"}
        assert app.requests[0].path == "/ws"
        with trio.fail_after(5):
            while len(app.closed) < 2:  # the server notices the closes by itself
                await trio.sleep(0.01)
        assert sorted(c.close_record.code for c in app.closed if c.close_record) == [1000, 1000]


async def test_over_a_socket_refusals_closes_and_resets(app: EchoRooms, url: str) -> None:
    with trio.fail_after(10):
        with pytest.raises(HandshakeRejected) as info:
            async with open_test_client(url, user="banned"):
                pass  # pragma: no cover
        assert (info.value.status, info.value.body) == (403, b"go away")
        async with open_test_client(url, user="alice") as alice:
            await alice.send({"type": "close", "code": 4002, "reason": "kicked"})
            assert await alice.expect_closed(4002) == CloseFrame(4002, "kicked")
        async with open_test_client(url, user="bob") as bob:
            bob.vanish()  # a TCP reset: the server records a lost connection
            assert (await bob.expect_closed(1006)).code == 1006
        while len(app.closed) < 3:  # the server notices the reset by itself
            await trio.sleep(0.01)
        codes = [c.close_record.code for c in app.closed if c.close_record]
        assert codes == [1008, 4002, 1006]  # the refusal is recorded as 1008


async def test_a_url_is_checked() -> None:
    with pytest.raises(ValueError, match="expected a ws://host:port/path URL"):
        async with open_test_client("http://127.0.0.1:1/ws"):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="in memory only"):
        async with open_test_client("ws://127.0.0.1:1/ws", config=Config()):
            pass  # pragma: no cover


async def test_address_is_what_the_server_sees(app: EchoRooms, url: str) -> None:
    async with open_test_client(app, user="a", client=("192.0.2.7", 4711)) as in_memory:
        assert in_memory.address == ("192.0.2.7", 4711)
    with trio.fail_after(10):
        async with open_test_client(url, user="b") as over_tcp:
            host, port = over_tcp.address or ("", 0)
            assert host == "127.0.0.1"
            assert app.requests[-1].client == (host, port)
