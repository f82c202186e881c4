"""The example chat app (examples/chat), in memory with :mod:`chatcore.testing`.

Every test runs the hub's real ``authenticate`` hook and handlers through
:func:`chatcore.testing.open_test_client`. The secret is the module global
``examples.chat.app.SECRET`` (read from ``CHAT_SECRET`` at import); the
``secret`` fixture sets it for each test, ``dev_mode`` clears it. The hub is
the example's module-level one, shared by all tests, so each test uses a room
of its own. The bot sleeps between chunks; ``autojump_clock`` makes that free.

Presence is on in the example, so every join also sends ``presence_state`` to
the joiner and ``presence_diff`` to the others: :func:`join` takes those, so a
test sees only what it is about.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import trio

from chatcore import ConnectionClosed, HandshakeRejected, HandshakeRequest, Identity, Reject
from chatcore.testing import TestClient, open_test_client
from examples.chat import app as chat
from examples.chat.pages import Pages
from examples.chat.token import token_for

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-do-not-use"
#: How a page served at http://127.0.0.1:8000/ opens its WebSocket.
OWN = [("host", "127.0.0.1:8000"), ("origin", "http://127.0.0.1:8000")]

_rooms = itertools.count(1)


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """The server runs with ``CHAT_SECRET=SECRET`` and no extra origins."""
    monkeypatch.setattr(chat, "SECRET", SECRET)
    monkeypatch.setattr(chat, "EXTRA_ORIGINS", frozenset())
    return SECRET


@pytest.fixture
def dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs without ``CHAT_SECRET``."""
    monkeypatch.setattr(chat, "SECRET", None)


@pytest.fixture
def room() -> str:
    """A room no other test uses (the hub is shared and keeps room offsets)."""
    return f"test-room-{next(_rooms)}"


def credentials(user: str) -> str:
    """The query string a client with a valid token sends."""
    return f"user={user}&token={token_for(user, SECRET)}"


@asynccontextmanager
async def connect(user: str, **options: Any) -> AsyncIterator[TestClient]:
    """A test client of the example's hub, signed in as ``user`` with a valid token."""
    async with open_test_client(chat.hub, query=credentials(user), **options) as client:
        yield client


async def join(room: str, *clients: TestClient) -> dict[str, Any]:
    """Join ``clients`` to ``room`` in turn, taking the presence messages that causes.

    Each joiner gets ``presence_state``; the clients already in the room get a
    ``presence_diff`` naming it (the clients are of different users). Returns
    the last join's reply data.
    """
    joined: dict[str, Any] = {}
    for i, client in enumerate(clients):
        joined = await client.join(room)
        await client.expect("presence_state", room=room)
        for earlier in clients[:i]:
            await earlier.expect("presence_diff", room=room, joins={client.user: [ANY]}, leaves={})
    return joined


@asynccontextmanager
async def hub_running() -> AsyncIterator[None]:
    """The hub's background work (presence's grace timer), as a server runs it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(chat.hub.run)
        yield
        nursery.cancel_scope.cancel()


async def refusal(query: str, headers: list[tuple[str, str]] | None = None) -> HandshakeRejected:
    """Connect with ``query``/``headers``; return the refusal (fail if accepted)."""
    with pytest.raises(HandshakeRejected) as refused:
        async with open_test_client(chat.hub, query=query, headers=headers or []):
            pass  # pragma: no cover  (the test fails here: the handshake was accepted)
    return refused.value


# -- who may connect ------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["", "token=abc", "user=", "user=no%20spaces", "user=" + "x" * 65, "user=%C3%A9"],
)
async def test_no_valid_user_is_refused_with_401(query: str) -> None:
    refused = await refusal(query)
    assert refused.status == 401
    assert b"user" in refused.body


@pytest.mark.parametrize(
    "query",
    [
        "user=alice",
        "user=alice&token=",
        "user=alice&token=deadbeef",
        f"user=alice&token={token_for('bob', SECRET)}",
        f"user=alice&token={token_for('alice', 'another-secret')}",
        f"user=alice&token={token_for('alice', SECRET).upper()}",
    ],
    ids=["missing", "empty", "garbage", "other-user", "other-secret", "uppercase"],
)
async def test_bad_token_is_refused_with_401(query: str) -> None:
    refused = await refusal(query)
    assert refused.status == 401
    assert b"token" in refused.body


async def test_good_token_is_accepted() -> None:
    async with connect("alice") as alice:
        assert alice.user == "alice"
        assert alice.hello["protocol"] == 1


async def test_dev_mode_accepts_any_valid_name_without_token(dev_mode: None) -> None:
    async with open_test_client(chat.hub, query="user=bob") as bob:
        assert bob.user == "bob"
    async with open_test_client(chat.hub, query="user=carol&token=whatever") as carol:
        assert carol.user == "carol"
    assert (await refusal("user=not%20valid")).status == 401
    assert (await refusal("")).status == 401


async def test_foreign_origin_is_refused_with_403() -> None:
    headers = [("host", "127.0.0.1:8000"), ("origin", "http://evil.example")]
    refused = await refusal(credentials("alice"), headers)
    assert refused.status == 403
    # Same host, other scheme or port: another origin.
    for origin in ("https://127.0.0.1:8000", "http://127.0.0.1:8001", "http://localhost:8000"):
        headers = [("host", "127.0.0.1:8000"), ("origin", origin)]
        assert (await refusal(credentials("alice"), headers)).status == 403


async def test_own_origin_is_accepted() -> None:
    async with connect("alice", headers=OWN) as alice:
        assert alice.user == "alice"


async def test_a_bad_token_is_401_even_from_the_own_origin() -> None:
    assert (await refusal("user=alice&token=nope", OWN)).status == 401


async def test_origin_without_host_is_refused() -> None:
    refused = await refusal(credentials("alice"), [("origin", "http://127.0.0.1:8000")])
    assert refused.status == 403


async def test_extra_origins_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "EXTRA_ORIGINS", frozenset({"https://chat.example.com"}))
    headers = [("host", "127.0.0.1:8000"), ("origin", "https://chat.example.com")]
    async with connect("alice", headers=headers) as alice:
        assert alice.user == "alice"


@pytest.mark.parametrize(
    ("scheme", "host", "origin", "accepted"),
    [
        ("ws", "127.0.0.1:8000", "http://127.0.0.1:8000", True),
        ("wss", "chat.example.com", "https://chat.example.com", True),
        ("wss", "chat.example.com", "http://chat.example.com", False),
        ("ws", "chat.example.com", "https://chat.example.com", False),
    ],
)
async def test_own_origin_follows_the_scheme(
    scheme: str, host: str, origin: str, accepted: bool
) -> None:
    # The in-memory client always says ws://; the hook is a plain function.
    request = HandshakeRequest(
        "/ws",
        credentials("alice"),
        (("host", host), ("origin", origin)),
        ("127.0.0.1", 50_000),
        scheme=scheme,
    )
    answer = await chat.authenticate(request)
    if accepted:
        assert answer == Identity("alice")
    else:
        assert isinstance(answer, Reject)
        assert answer.status == 403


# -- rooms and messages ---------------------------------------------------------


async def test_join_and_publish_text_and_objects(room: str) -> None:
    async with connect("alice") as alice, connect("bob") as bob:
        joined = await join(room, alice, bob)
        assert joined["room"] == room
        first = await alice.publish(room, "hello, bob")
        second = await alice.publish(room, {"text": "and an object"})
        assert second == first + 1
        for client in (alice, bob):
            await client.expect(
                "message", room=room, offset=first, from_="alice", data="hello, bob"
            )
            await client.expect(
                "message", room=room, offset=second, from_="alice", data={"text": "and an object"}
            )
        await alice.assert_nothing_received()
        await bob.assert_nothing_received()


async def test_publish_before_join_is_refused(room: str) -> None:
    async with connect("alice") as alice:
        reply = await alice.request("publish", room=room, data="hi")
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "not_joined"


# -- typing ---------------------------------------------------------------------


async def test_typing_reaches_the_others_but_not_the_sender(room: str) -> None:
    async with connect("alice") as alice, connect("bob") as bob, connect("carol") as carol:
        before = (await join(room, alice, bob, carol))["offset"]

        await alice.send({"type": "typing", "room": room})
        for client in (bob, carol):
            typing = await client.expect("typing", room=room, user="alice")
            assert "offset" not in typing  # outside the room's order
        await alice.assert_nothing_received()

        # Ephemeral: it took no offset, so the next message is the very next one.
        offset = await bob.publish(room, "typed")
        assert offset == before + 1


async def test_typing_with_a_ref_gets_a_reply(room: str) -> None:
    async with connect("alice") as alice, connect("bob") as bob:
        await join(room, alice, bob)
        reply = await alice.request("typing", room=room)
        assert reply["status"] == "ok"
        await bob.expect("typing", room=room, user="alice")


@pytest.mark.parametrize("fields", [{"room": "elsewhere"}, {}, {"room": 7}, {"room": "a b"}])
async def test_typing_outside_a_joined_room_is_refused(room: str, fields: dict[str, Any]) -> None:
    async with connect("alice") as alice, connect("bob") as bob:
        await join(room, alice, bob)
        reply = await alice.request("typing", **fields)
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "not_joined"
        await bob.assert_nothing_received()


# -- the bot --------------------------------------------------------------------


async def bot_stream(client: TestClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read until the bot's ``completed``: (the bot events, the other messages)."""
    events: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    while not events or events[-1]["event"] != "completed":
        message = await client.receive()
        (events if message["type"] == "bot" else others).append(message)
    return events, others


@pytest.mark.parametrize("data", ["/ask what is trio?", {"text": "/ask what is trio?"}])
async def test_bot_streams_to_the_asker_only(
    room: str, data: Any, autojump_clock: trio.abc.Clock
) -> None:
    async with connect("alice") as alice, connect("bob") as bob:
        await join(room, alice, bob)
        offset = await alice.publish(room, data)

        events, others = await bot_stream(alice)
        # The question is published to the room like any message.
        assert others == [
            {
                "type": "message",
                "room": room,
                "offset": offset,
                "epoch": others[0]["epoch"],
                "from": "alice",
                "data": data,
            }
        ]
        # started, several chunks, completed: one stream, in order.
        assert [e["event"] for e in events] == ["started"] + ["chunk"] * (len(events) - 2) + [
            "completed"
        ]
        assert len(events) >= 5
        assert len({e["stream"] for e in events}) == 1
        assert {e["room"] for e in events} == {room}  # the page shows it in that room
        answer = "".join(e["text"] for e in events[1:-1])
        assert answer.startswith("You asked: what is trio?")

        # Bob sees the question, never the answer (however long we wait).
        await bob.expect("message", room=room, offset=offset, from_="alice", data=data)
        await trio.sleep(30)
        await bob.assert_nothing_received()
        await alice.assert_nothing_received()


async def test_each_question_gets_its_own_stream(room: str, autojump_clock: trio.abc.Clock) -> None:
    async with connect("alice") as alice:
        await join(room, alice)
        await alice.publish(room, "/ask one")
        first, _ = await bot_stream(alice)
        await alice.publish(room, "/ask two")
        second, _ = await bot_stream(alice)
        assert first[0]["stream"] != second[0]["stream"]


@pytest.mark.parametrize("data", ["/ask", "/asking", "ask me", {"text": 5}, ["/ask x"], None])
async def test_other_messages_do_not_start_the_bot(
    room: str, data: Any, autojump_clock: trio.abc.Clock
) -> None:
    async with connect("alice") as alice:
        await join(room, alice)
        offset = await alice.publish(room, data)
        await alice.expect("message", offset=offset, data=data)
        await trio.sleep(30)
        await alice.assert_nothing_received()


async def test_a_long_question_gives_a_bounded_stream(
    room: str, autojump_clock: trio.abc.Clock
) -> None:
    async with connect("alice") as alice:
        await join(room, alice)
        await alice.publish(room, "/ask " + "word " * 5_000)
        start = trio.current_time()
        events, _ = await bot_stream(alice)
        assert len(events) < 100
        assert trio.current_time() - start < 10


async def test_closing_the_asker_cancels_the_bot(
    room: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    outcomes: list[str] = []
    real_stream_answer = chat.stream_answer

    async def recording_stream_answer(*args: Any) -> None:
        try:
            await real_stream_answer(*args)
        except trio.Cancelled:
            outcomes.append("cancelled")
            raise
        except ConnectionClosed:  # pragma: no cover  (the bug this test is for)
            outcomes.append("sent after close")
            raise
        outcomes.append("completed")  # pragma: no cover  (ditto)

    monkeypatch.setattr(chat, "stream_answer", recording_stream_answer)

    async with connect("bob") as bob:
        await join(room, bob)
        async with connect("alice") as alice:
            await alice.join(room)
            await alice.expect("presence_state", room=room)
            await bob.expect("presence_diff", joins={"alice": [ANY]})
            await alice.publish(room, "/ask a question that takes a while to answer")
            await alice.expect("message", from_="alice")
            started = await alice.expect("bot", event="started")
            await alice.expect("bot", event="chunk", stream=started["stream"])
            await alice.close()
            # Nothing reached alice after her close frame.
            frames = alice.frames
            assert type(frames[-1]).__name__ == "CloseFrame"
            assert not any('"completed"' in str(frame) for frame in frames)
        # Leaving the block waited for alice's server side to finish: the bot is gone.
        assert outcomes == ["cancelled"]

        await bob.expect("message", from_="alice")
        await trio.sleep(30)
        await bob.assert_nothing_received()
        assert chat.hub.sessions_of("alice") == []


# -- history ----------------------------------------------------------------------


async def test_history_answers_the_latest_messages(room: str) -> None:
    async with connect("alice") as alice, connect("bob") as bob:
        await join(room, alice, bob)
        assert await alice.request("history", room=room) == {
            "type": "reply",
            "ref": ANY,
            "status": "ok",
            "data": {"messages": []},
        }
        for text in ("one", "two", "three"):
            await alice.publish(room, {"text": text})
        received = [await bob.expect("message", room=room) for _ in range(3)]
        # Exactly the messages the members received, oldest first.
        reply = await bob.request("history", room=room)
        assert reply["data"] == {"messages": received}
        assert [m["data"]["text"] for m in received] == ["one", "two", "three"]
        await bob.assert_nothing_received()


async def test_history_is_only_for_members(room: str) -> None:
    async with connect("alice") as alice, connect("bob") as bob:
        await join(room, alice)
        await alice.publish(room, "secret")
        for fields in ({"room": room}, {"room": "a b"}, {}):
            reply = await bob.request("history", **fields)
            assert reply["status"] == "error"
            assert reply["error"]["code"] == "not_joined"
        # Once a member, bob may read it.
        await bob.join(room)
        reply = await bob.request("history", room=room)
        assert [m["data"] for m in reply["data"]["messages"]] == ["secret"]


async def test_history_is_the_last_50(room: str, autojump_clock: trio.abc.Clock) -> None:
    async with connect("alice") as alice:
        await join(room, alice)
        for i in range(60):
            await alice.publish(room, i)
            await trio.sleep(0.1)  # within the rate limit
        reply = await alice.request("history", room=room)
        assert [m["data"] for m in reply["data"]["messages"]] == list(range(10, 60))


async def test_history_stays_within_its_byte_budget(
    room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "HISTORY_BYTES", 1_000)
    async with connect("alice") as alice:
        await join(room, alice)
        offsets = [await alice.publish(room, {"text": str(i), "pad": "x" * 200}) for i in range(10)]
        reply = await alice.request("history", room=room)
        messages = reply["data"]["messages"]
        # The newest that fit, with no gap: a suffix of the room's order.
        assert 2 <= len(messages) < 10
        assert [m["offset"] for m in messages] == offsets[-len(messages) :]
        assert len(json.dumps(messages, separators=(",", ":"))) <= 1_000


# -- presence ---------------------------------------------------------------------


async def test_presence_reaches_the_rooms_users(room: str, autojump_clock: trio.abc.Clock) -> None:
    grace = chat.hub.config.presence_grace
    async with hub_running(), connect("alice") as alice:
        await alice.join(room)
        state = await alice.expect("presence_state", room=room)
        assert state["users"] == {"alice": [{"connection_id": alice.connection_id}]}

        async with connect("bob") as bob:
            await bob.join(room)
            state = await bob.expect("presence_state", room=room)
            assert state["users"] == {
                "alice": [{"connection_id": alice.connection_id}],
                "bob": [{"connection_id": bob.connection_id}],
            }
            bob_meta = [{"connection_id": bob.connection_id}]
            await alice.expect("presence_diff", room=room, joins={"bob": bob_meta}, leaves={})

            # A second tab of bob's: nobody hears of it.
            async with connect("bob") as bob2:
                await bob2.join(room)
                await bob2.expect("presence_state", room=room)
            await trio.sleep(grace * 2)
            await alice.assert_nothing_received()

        # Bob's last tab is gone: he leaves once the grace window has passed.
        await trio.sleep(grace - 0.1)
        await alice.assert_nothing_received()
        diff = await alice.expect("presence_diff", room=room, joins={}, timeout=1)
        assert list(diff["leaves"]) == ["bob"]


def test_presence_grace_comes_from_the_environment() -> None:
    env = dict(os.environ, CHAT_PRESENCE_GRACE="1.5")
    done = subprocess.run(
        [sys.executable, "-c", "from examples.chat import app; print(app.hub.config)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "presence=True, presence_grace=1.5" in done.stdout


# -- the token command and the pages --------------------------------------------


def run_token_command(*args: str, secret: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CHAT_SECRET"}
    if secret is not None:
        env["CHAT_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "examples.chat.token", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_token_command_prints_the_hmac_of_the_name() -> None:
    done = run_token_command("alice", secret="s3cret")
    assert done.returncode == 0, done.stderr
    expected = hmac.new(b"s3cret", b"alice", hashlib.sha256).hexdigest()
    assert done.stdout == expected + "\n"
    assert token_for("alice", "s3cret") == expected


@pytest.mark.parametrize(
    ("args", "secret"), [(("alice",), None), (("alice",), ""), ((), "s"), (("a", "b"), "s")]
)
def test_token_command_usage(args: tuple[str, ...], secret: str | None) -> None:
    done = run_token_command(*args, secret=secret)
    assert done.returncode == 2
    assert done.stdout == ""
    # The module's own name: right wherever the file was copied to.
    assert "usage: CHAT_SECRET=... python -m examples.chat.token NAME" in done.stderr


async def get(path: str, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request to the example's page app: (status, headers, body)."""
    pages = Pages(ROOT / "examples" / "chat" / "static")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(dict(message))

    await pages({"type": "http", "method": method, "path": path}, receive, send)
    start, body = sent
    assert start["type"] == "http.response.start"
    assert body["type"] == "http.response.body"
    return start["status"], dict(start["headers"]), body["body"]


async def test_pages_serve_the_page_and_its_scripts() -> None:
    status, headers, body = await get("/")
    assert status == 200
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert b'<script type="module" src="/app.js">' in body
    assert body == (await get("/index.html"))[2]
    for path, ctype in [
        ("/app.js", b"text/javascript"),
        ("/style.css", b"text/css"),
        ("/favicon.svg", b"image/svg+xml"),
    ]:
        status, headers, body = await get(path)
        assert status == 200
        assert headers[b"content-type"].startswith(ctype)
        assert int(headers[b"content-length"]) == len(body) > 0


@pytest.mark.parametrize(
    "path",
    ["/nope", "/../app.py", "/static/app.js", "/app.py", "/token.py", "/chatcore.js"],
)
async def test_pages_answer_404_for_anything_else(path: str) -> None:
    status, _, body = await get(path)
    assert (status, body) == (404, b"not found")


async def test_pages_head_and_other_methods() -> None:
    status, headers, body = await get("/", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers[b"content-length"]) > 0
    status, _, _ = await get("/", method="POST")
    assert status == 405


# -- the tutorial (docs/tutorial.md) builds this example --------------------------

TUTORIAL = ROOT / "docs" / "tutorial.md"


def tutorial_blocks(marker: str) -> list[tuple[str, str]]:
    """(marker argument, code) of each fenced block right after ``<!-- MARKER ARG -->``."""
    pattern = rf"^<!-- {marker} (.+?) -->\n```\w*\n(.*?)^```"
    text = TUTORIAL.read_text(encoding="utf-8")
    return re.findall(pattern, text, re.MULTILINE | re.DOTALL)


def test_tutorial_excerpts_match_the_example() -> None:
    excerpts = tutorial_blocks("as in")
    assert len(excerpts) >= 7
    for path, code in excerpts:
        source = (ROOT / path).read_text(encoding="utf-8")
        assert code in source, f"docs/tutorial.md has a block that is not in {path}:\n{code}"


def test_tutorial_tests_pass(tmp_path: Path) -> None:
    ((_, code),) = tutorial_blocks("test:")
    (tmp_path / "test_chat.py").write_text(code, encoding="utf-8")
    (tmp_path / "chat").symlink_to(ROOT / "examples" / "chat")  # the reader's chat/
    env = {k: v for k, v in os.environ.items() if k not in ("CHAT_SECRET", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "trio_mode=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout
