"""chatcore.client against a real ``chatcore serve`` process.

The server is the example chat (``examples.chat.app:app``, with a secret, so
tokens matter) started by PID on a free 127.0.0.1 port, and restarted on the
same port where a test says so (see ``ChatServer`` in
``tests/test_e2e_browser.py``). With ``--redis-url`` (a real redis-server, see
``tests/redis_server.py``) the room's history outlives the process: a restart
in the middle of a stream loses nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from chatcore import HandshakeRejected
from chatcore.client import (
    ChatClient,
    Connected,
    ConnectFailed,
    ConnectionLost,
    Disconnected,
    Event,
    Joined,
    Message,
    PresenceState,
    RequestFailed,
    ServerMessage,
    Shutdown,
    open_client,
)
from examples.chat.token import token_for
from tests.test_e2e_browser import SECRET, ChatServer, free_port

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow
pytest_plugins = ("tests.redis_server",)

WAIT = 20.0  # any one expectation
#: Quick reconnects: the tests restart servers.
FAST = {"min_delay": 0.05, "max_delay": 0.5, "seed": 7}


@asynccontextmanager
async def chat_server(tmp_path: Path, *options: str) -> AsyncIterator[ChatServer]:
    server = ChatServer(free_port(), tmp_path, *options)
    await trio.to_thread.run_sync(server.start)
    try:
        yield server
    finally:
        if server.process is not None:
            await trio.to_thread.run_sync(server.stop)


def url(server: ChatServer, user: str, token: str | None = None) -> str:
    return f"ws://127.0.0.1:{server.port}/ws?user={user}&token={token or token_for(user, SECRET)}"


async def next_event(client: ChatClient, kind: type[Any], **fields: Any) -> Any:
    """The next event of ``kind`` with these fields (others are skipped)."""
    with trio.fail_after(WAIT):
        async for event in client.events():
            if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
                return event
    raise AssertionError(f"the client closed before a {kind.__name__}")


async def test_join_publish_with_acknowledgement_and_presence(tmp_path: Path) -> None:
    async with (
        chat_server(tmp_path) as server,
        open_client(url(server, "alice"), **FAST) as alice,
        open_client(url(server, "bob"), **FAST) as bob,
    ):
        assert (alice.user, alice.status) == ("alice", "open")
        assert "alice open rooms=0" in repr(alice)
        assert await next_event(alice, Connected, user="alice")
        joined = await alice.join("lobby")
        assert (joined.room, joined.offset, joined.recovered, joined.reset) == (
            "lobby",
            0,
            None,
            True,
        )
        assert await next_event(alice, Joined, room="lobby") == joined
        state = await next_event(alice, PresenceState, room="lobby")
        assert set(state.users) == {"alice"}
        await bob.join("lobby")

        offset = await alice.publish("lobby", {"text": "hi bob"})
        assert offset == 1
        message = await next_event(bob, Message, room="lobby")
        assert (message.offset, message.sender, message.data) == (1, "alice", {"text": "hi bob"})
        assert bob.rooms["lobby"].offset == 1
        with trio.fail_after(WAIT):
            while set(alice.presence["lobby"]) != {"alice", "bob"}:
                await trio.sleep(0.02)

        # An application request with a reply, and an application message.
        assert await alice.request("history", {"room": "lobby"}) == {
            "messages": [
                {
                    "type": "message",
                    "room": "lobby",
                    "offset": 1,
                    "epoch": joined.epoch,
                    "from": "alice",
                    "data": {"text": "hi bob"},
                }
            ]
        }
        assert await bob.send({"type": "typing", "room": "lobby"})
        typing = await next_event(alice, ServerMessage, type="typing")
        assert typing.fields == {"room": "lobby", "user": "bob"}

        with pytest.raises(RequestFailed) as refused:
            await alice.publish("garden", "not joined")
        assert refused.value.code == "not_joined"
        await alice.leave("lobby")
        assert "lobby" not in alice.rooms

    # Closed for good when the block ended: requests fail at once.
    assert alice.status == "closed"
    with trio.fail_after(1), pytest.raises(ConnectionLost, match="closed"):
        await alice.publish("lobby", "after the end")


async def test_a_wrong_token_is_refused_at_once(tmp_path: Path) -> None:
    async with chat_server(tmp_path) as server:
        with trio.fail_after(WAIT), pytest.raises(HandshakeRejected) as refused:
            async with open_client(url(server, "mallory", "wrong"), **FAST):
                pytest.fail("signed in with a wrong token")  # pragma: no cover
        assert refused.value.status == 401


async def test_no_server_gives_up_after_the_sign_in_attempts() -> None:
    client_url = f"ws://127.0.0.1:{free_port()}/ws?user=nobody"
    with trio.fail_after(WAIT), pytest.raises(ConnectFailed, match="3 attempts"):
        async with open_client(client_url, max_sign_in_attempts=3, **FAST):
            pytest.fail("connected to nothing")  # pragma: no cover


async def test_a_restart_without_redis_is_a_reset(tmp_path: Path) -> None:
    async with chat_server(tmp_path) as server, open_client(url(server, "alice"), **FAST) as alice:
        first = await alice.join("lobby")
        await alice.publish("lobby", "before")
        await trio.to_thread.run_sync(server.stop)
        shutdown = await next_event(alice, Shutdown)
        assert 0.5 <= shutdown.reconnect_after <= 5
        gone = await next_event(alice, Disconnected)
        assert (gone.code, gone.reconnect_in) == (1012, shutdown.reconnect_after)
        await trio.to_thread.run_sync(server.start)
        # Rejoined by itself, with `since`: the new process cannot recover.
        rejoined = await next_event(alice, Joined, room="lobby")
        assert (rejoined.recovered, rejoined.reset, rejoined.offset) == (False, True, 0)
        assert rejoined.epoch != first.epoch
        assert alice.connections == 2
        assert await alice.publish("lobby", "after") == 1


async def test_a_restart_mid_stream_loses_nothing_with_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    count = 60
    async with (
        chat_server(tmp_path, "--redis-url", redis_server.url) as server,
        open_client(url(server, "reader"), **FAST) as reader,
        open_client(url(server, "writer"), **FAST) as writer,
    ):
        await reader.join("stream")
        await writer.join("stream")
        acknowledged: dict[int, int] = {}  # offset -> number
        received: list[Message] = []
        restarted = trio.Event()

        async def write() -> None:
            for number in range(count):
                if number == count // 3:
                    await restart()
                while True:
                    try:
                        acknowledged[await writer.publish("stream", number)] = number
                        break
                    except (ConnectionLost, trio.TooSlowError):
                        await writer.wait_connected()  # lost with the connection: again

        async def restart() -> None:
            await trio.to_thread.run_sync(server.stop)
            await trio.to_thread.run_sync(server.start)
            restarted.set()

        async def read() -> None:
            async for event in reader.events():
                if isinstance(event, Message):
                    received.append(event)
                    done = len(received) >= count and restarted.is_set()
                    if done and set(acknowledged) <= {m.offset for m in received}:
                        return

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                nursery.start_soon(read)

    assert reader.connections == 2
    assert writer.connections == 2
    offsets = [m.offset for m in received]
    assert offsets == list(range(1, len(offsets) + 1))  # every offset once, in order
    assert {m.epoch for m in received} == {received[0].epoch}  # Redis kept the room
    by_offset = {m.offset: m.data for m in received}
    assert all(by_offset[offset] == number for offset, number in acknowledged.items())
    assert sorted(set(by_offset.values())) == list(range(count))  # nothing lost


def test_events_are_frozen() -> None:
    event: Event = Message("lobby", "e", 1, "alice", "hi")
    with pytest.raises(AttributeError):
        event.offset = 2  # type: ignore[misc]
