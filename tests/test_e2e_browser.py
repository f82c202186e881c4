"""The example chat app end to end: ``chatcore serve`` in a subprocess, real Chromium.

The server is ``chatcore serve examples.chat.app:app`` on a free 127.0.0.1
port, started and stopped by its PID (SIGTERM: the graceful drain). The
browser is the system's headless Chromium (Debian package ``chromium``)
driven by Playwright's *sync* API, so these are plain (non-Trio) tests.
Every wait is bounded. On failure the pages are screenshotted into the test's
``tmp_path`` and the server's log is printed.

The server runs with ``CHAT_PRESENCE_GRACE=1``: a user who closed their tab
leaves the member lists after 1 s instead of 5. A page that must lose its
connection without the server or the browser closing it goes through a
:class:`TcpRelay` the test can cut.

Skipped only when Chromium or Playwright is missing, and never in CI
(``CI=true``): there a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from examples.chat.token import token_for

pytestmark = pytest.mark.slow
pytest_plugins = ("tests.redis_server",)

ROOT = Path(__file__).resolve().parent.parent
#: Debian's Chromium, found on PATH (a PATH without it is a machine without it).
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI", "").lower() == "true"
SECRET = "e2e-secret-do-not-use"

#: Bounds, in seconds.
START_TIMEOUT = 30.0  # the server answers /healthz
STOP_TIMEOUT = 30.0  # the server exits after SIGTERM (drain grace is below 10 s)
WAIT = 15.0  # anything a page should show
RECONNECT_WAIT = 60.0  # pages back to "open" after a restart (server delay + backoff)
#: The presence grace window of the test server, in seconds.
PRESENCE_GRACE = 1.0


def _chatcore_command() -> str:
    beside = Path(sys.executable).parent / "chatcore"
    found = str(beside) if beside.exists() else shutil.which("chatcore")
    if found is None:  # pragma: no cover  (the package is installed for the tests)
        pytest.fail("the chatcore command is not installed (pip install -e .)")
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChatServer:
    """``chatcore serve examples.chat.app:app`` on one port, by PID.

    Can be stopped and started again on the same port (a restart).
    """

    def __init__(self, port: int, log_dir: Path, *options: str) -> None:
        self.port = port
        self.options = options
        self.url = f"http://127.0.0.1:{port}"
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        """Start the server; return once ``/healthz`` answers 200."""
        assert self.process is None, "already running"
        log = self.log_dir / f"server-{len(self.logs) + 1}.log"
        self.logs.append(log)
        env = dict(
            os.environ,
            CHAT_SECRET=SECRET,
            CHAT_PRESENCE_GRACE=str(PRESENCE_GRACE),
            PYTHONUNBUFFERED="1",
        )
        env.pop("CHAT_ORIGINS", None)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    _chatcore_command(),
                    "serve",
                    "examples.chat.app:app",
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    *self.options,
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                status, _ = self.get("/healthz")
            except OSError:
                status = None
            if status == 200:
                return
            time.sleep(0.1)
        pytest.fail(f"the server did not answer /healthz within {START_TIMEOUT:g}s:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM the server and wait until it exits; returns its exit status."""
        process, self.process = self.process, None
        assert process is not None, "not running"
        process.send_signal(signal.SIGCONT)  # in case a test paused it
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            pytest.fail(f"the server ignored SIGTERM for {STOP_TIMEOUT:g}s:\n{self.log()}")

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path``: (status, body), 4xx/5xx included."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()

    def log(self) -> str:
        """Everything the server processes printed, for failure messages."""
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')}" for path in self.logs
        )

    def health(self) -> dict[str, Any]:
        """``/healthz``, decoded."""
        return dict(json.loads(self.get("/healthz")[1]))


class TcpRelay:
    """A TCP relay from a port of its own on 127.0.0.1 to the server's.

    :meth:`cut` drops every relayed connection at once (both sides see the TCP
    connection end, no WebSocket close frame) and turns new ones away until
    :meth:`restore`: a network failure, as the browser and the server see it.
    One thread accepts; each connection has two pumping threads.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.up = True
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def cut(self) -> None:
        """Drop every relayed connection and refuse new ones until :meth:`restore`."""
        self.up = False
        with self._lock:
            for sock in self._sockets:
                _drop(sock)

    def restore(self) -> None:
        """Relay new connections again."""
        self.up = True

    def close(self) -> None:
        """Stop listening and drop everything."""
        self.cut()
        _drop(self.listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.up:
                _drop(client)
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _drop(client)
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join(timeout=10)
        with self._lock:
            self._sockets -= {client, upstream}
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until either ends; then end both."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    _drop(source)
    _drop(sink)


def _drop(sock: socket.socket) -> None:
    """End a socket's connection now: RST on close, and wake its blocked readers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ChatServer]:
    """A running example server on a free port (stopped at the end).

    Extra ``chatcore serve`` options come from indirect parametrization:
    ``@pytest.mark.parametrize("server", [("--opt", "value")], indirect=True)``.
    """
    failed_before = request.session.testsfailed
    options = getattr(request, "param", ())
    chat_server = ChatServer(free_port(), tmp_path, *options)
    chat_server.start()
    yield chat_server
    if chat_server.process is not None:
        chat_server.stop()
    if request.session.testsfailed > failed_before:
        print(chat_server.log())


@pytest.fixture
def relay(server: ChatServer) -> Iterator[TcpRelay]:
    """A :class:`TcpRelay` to the server (open a page on ``relay.url`` to use it)."""
    tcp_relay = TcpRelay(server.port)
    yield tcp_relay
    tcp_relay.close()


def ws_url(server: ChatServer, query: str) -> str:
    return f"ws://127.0.0.1:{server.port}/ws?{query}"


def credentials(user: str) -> str:
    return f"user={user}&token={token_for(user, SECRET)}"


# -- over HTTP and WebSocket, no browser ---------------------------------------


def test_health_and_page_over_http(server: ChatServer) -> None:
    status, body = server.get("/healthz")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["draining"] is False
    assert isinstance(health["connections"], int)
    assert isinstance(health["rooms"], int)
    status, body = server.get("/")
    assert status == 200
    assert b'<script type="module" src="/app.js">' in body
    assert server.get("/chatcore.js")[0] == 200  # served by ASGIApp itself
    status, body = server.get("/favicon.svg")
    assert (status, body[:4]) == (200, b"<svg")
    assert b'href="/favicon.svg"' in server.get("/")[1]
    assert server.get("/nope")[0] == 404


@pytest.mark.parametrize(
    ("query", "origin", "status"),
    [
        ("user=alice&token=wrong", None, 401),
        ("token=x", None, 401),
        (credentials("alice"), "http://evil.example", 403),
    ],
)
def test_handshake_refusals_over_http(
    server: ChatServer, query: str, origin: str | None, status: int
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server, query), origin=origin, open_timeout=10)
    assert refused.value.response.status_code == status


def test_chat_over_websocket(server: ChatServer) -> None:
    own = f"http://127.0.0.1:{server.port}"
    with (
        connect(ws_url(server, credentials("alice")), origin=own, open_timeout=10) as alice,
        connect(ws_url(server, credentials("bob")), open_timeout=10) as bob,
    ):
        inbox = {"alice": messages(alice), "bob": messages(bob)}  # presence skipped
        for ws, user in ((alice, "alice"), (bob, "bob")):
            hello = next(inbox[user])
            assert (hello["type"], hello["user"]) == ("hello", user)
            ws.send(json.dumps({"type": "join", "room": "lobby", "ref": 1}))
            assert next(inbox[user])["status"] == "ok"
        health = json.loads(server.get("/healthz")[1])
        assert (health["connections"], health["rooms"]) == (2, 1)
        alice.send(json.dumps({"type": "publish", "room": "lobby", "data": {"text": "hi"}}))
        message = next(inbox["bob"])
        assert (message["type"], message["from"], message["data"]) == (
            "message",
            "alice",
            {"text": "hi"},
        )


def messages(ws: Any) -> Iterator[dict[str, Any]]:
    """The messages arriving on ``ws`` (a frame holds JSON lines), but presence; 10 s per frame."""
    while True:
        for line in ws.recv(timeout=10).split("\n"):
            message = json.loads(line)
            if message["type"] not in ("presence_state", "presence_diff"):
                yield message


# -- in Chromium -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (the Debian package), one per module."""
    if shutil.which("chromium") is None:
        reason = "chromium is missing (apt-get install chromium) - needed for browser tests"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:  # pragma: no cover
        if IN_CI:
            pytest.fail("CI=true: playwright is not installed (pip install -e '.[dev]')")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    expect.set_options(timeout=WAIT * 1000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


OpenPage = Callable[..., Any]


@pytest.fixture
def open_page(
    browser: Any, server: ChatServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OpenPage]:
    """``open_page("alice")``: the chat page, signed in, in a browser context of its own.

    On failure, every page is screenshotted into ``tmp_path`` and its console
    log is printed.
    """
    # The call phase's report is logged before fixtures are torn down, so a
    # failure shows up in the session's count by then (no conftest hook needed).
    failed_before = request.session.testsfailed
    opened: list[tuple[str, Any, Any, list[str]]] = []

    def open_page(
        user: str,
        query: str | None = None,
        url: str | None = None,
        viewport: dict[str, int] | None = None,
    ) -> Any:
        """``query``: the page's query string (default: sign in, join "lobby");
        ``url``: where the page is (default: the server); ``viewport``: its size."""
        context = browser.new_context(**({"viewport": viewport} if viewport else {}))
        page = context.new_page()
        page.set_default_timeout(WAIT * 1000)
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
        opened.append((user, context, page, console))
        if query is None:
            query = f"{credentials(user)}&room=lobby"
        page.goto(f"{url or server.url}/?{query}")
        if "user=" in query:
            record_events(page)
        return page

    yield open_page

    failed = request.session.testsfailed > failed_before
    for user, context, page, console in opened:
        if failed:
            try:
                page.screenshot(path=str(tmp_path / f"{user}.png"), full_page=True)
            except Exception as exc:  # the page may be what broke
                print(f"screenshot of {user}'s page failed: {exc}")
            print(f"--- {user}'s console\n" + "\n".join(console))
        context.close()
    if failed:
        print(f"screenshots in {tmp_path}")


def record_events(page: Any) -> None:
    """Keep what the page's client hears in ``window.events``, as ``[name, detail]``."""
    page.evaluate(
        """() => {
            window.events = [];
            for (const name of ["shutdown", "close", "joined", "reset", "bot", "status"]) {
                window.chat.addEventListener(name, (e) => window.events.push([name, e.detail]));
            }
        }"""
    )


def expect_joined(page: Any, room: str = "lobby") -> None:
    from playwright.sync_api import expect

    expect(page.get_by_test_id("status")).to_have_text("open")
    expect(page.get_by_test_id("room-title")).to_have_text(room)


def say(page: Any, text: str) -> None:
    """Type ``text`` and click Send (a real click: the button must be visible,
    enabled, and the topmost element where it is drawn)."""
    page.locator("#text").fill(text)
    page.get_by_role("button", name="Send").click()


def expect_message(page: Any, user: str, text: str) -> None:
    from playwright.sync_api import expect

    line = page.get_by_test_id("messages").locator("li", has_text=text)
    expect(line).to_have_count(1)
    expect(line.locator(".from")).to_have_text(user)
    expect(line.locator(".text")).to_have_text(text)


def expect_texts(page: Any, texts: list[str]) -> None:
    """The page shows exactly these messages, in this order (so: once each);
    messages kept from before the server lost the room (greyed) do not count."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("messages").locator("li:not(.earlier) .text")).to_have_text(texts)


def screenshot(page: Any, name: str) -> None:
    """Save a screenshot for the docs when CHATCORE_SCREENSHOTS names a directory."""
    directory = os.environ.get("CHATCORE_SCREENSHOTS")
    if directory:
        page.screenshot(path=str(Path(directory) / f"{name}.png"))


def events(page: Any, name: str) -> list[Any]:
    return [detail for event, detail in page.evaluate("window.events") if event == name]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what}")
        time.sleep(0.05)


def test_two_users_chat_in_a_room(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    alice, bob = open_page("alice"), open_page("bob")
    expect_joined(alice)
    expect_joined(bob)
    expect(alice.get_by_test_id("me")).to_have_text("signed in as alice")

    alice.locator("#text").fill("hello from alice")  # typing...
    expect(bob.get_by_test_id("typing")).to_have_text("alice is typing…")
    screenshot(bob, "chat-typing")
    alice.get_by_role("button", name="Send").click()
    expect_message(bob, "alice", "hello from alice")
    # Her message is there: the typing line went with it (not 3 s later).
    assert bob.get_by_test_id("typing").text_content() == ""
    expect_message(alice, "alice", "hello from alice")
    expect(alice.get_by_test_id("typing")).to_have_text("")  # nobody told alice about herself

    say(bob, "hi alice")
    expect_message(alice, "bob", "hi alice")
    expect_message(bob, "bob", "hi alice")


def test_bot_streams_to_the_asker_only(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    alice, bob = open_page("alice"), open_page("bob")
    expect_joined(alice)
    expect_joined(bob)

    say(alice, "/ask what is trio?")
    expect_message(bob, "alice", "/ask what is trio?")
    bot = alice.get_by_test_id("bot")
    expect(bot).to_have_attribute("data-completed", re.compile(r"^\d+$"))
    expect(bot).to_contain_text("bot: You asked: what is trio?")
    streamed = events(alice, "bot")
    assert [e["event"] for e in streamed][:2] == ["started", "chunk"]
    assert streamed[-1] == {
        "type": "bot",
        "room": "lobby",
        "stream": int(bot.get_attribute("data-completed")),
        "event": "completed",
    }

    # Anything the bot had sent bob would be queued before bob's own next message.
    say(bob, "did the bot talk to me?")
    expect_message(bob, "bob", "did the bot talk to me?")
    expect(bob.get_by_test_id("bot")).to_be_hidden()
    expect(bob.get_by_test_id("bot")).to_have_text("")
    assert events(bob, "bot") == []


def two_pages_said_before_the_restart(open_page: OpenPage) -> tuple[Any, Any]:
    """alice and bob in the lobby; alice said "before the restart"; events cleared."""
    alice, bob = open_page("alice"), open_page("bob")
    expect_joined(alice)
    expect_joined(bob)
    say(alice, "before the restart")
    expect_message(bob, "alice", "before the restart")
    for page in (alice, bob):
        page.evaluate("window.events = []")
    return alice, bob


def test_pages_reconnect_by_themselves_after_a_restart(
    open_page: OpenPage, server: ChatServer
) -> None:
    from playwright.sync_api import expect

    alice, bob = two_pages_said_before_the_restart(open_page)

    assert server.stop() == 0, server.log()
    for page in (alice, bob):
        # The drain: `shutdown` with a delay, then 1012 (later attempts to
        # reconnect to the stopped server fail with 1006). The page waits.
        page.wait_for_function("window.events.some(([name]) => name === 'close')")
        heard = [name for name, _ in page.evaluate("window.events") if name != "status"]
        assert heard[:2] == ["shutdown", "close"], heard
        assert isinstance(events(page, "shutdown")[0]["reconnect_after_ms"], int)
        assert events(page, "close")[0]["code"] == 1012
        expect(page.get_by_test_id("status")).to_have_text("reconnecting")
        page.evaluate("window.events = []")

    server.start()  # the same port
    for page in (alice, bob):
        expect(page.get_by_test_id("status")).to_have_text("open", timeout=RECONNECT_WAIT * 1000)
        # The client rejoins its rooms by itself, with `since`. The new process
        # has an empty history and a new epoch: it cannot recover.
        page.wait_for_function(
            "window.events.some(([name, d]) => name === 'joined' && d.room === 'lobby')"
        )
        [joined] = events(page, "joined")
        assert (joined["recovered"], joined["reset"], joined["offset"]) == (False, True, 0)
    say(alice, "after the restart")
    expect_message(bob, "alice", "after the restart")
    say(bob, "welcome back")
    expect_message(alice, "bob", "welcome back")
    # The pages reloaded the room from the server (`history`): what it has, once
    # each, in order; what only the old process had is kept apart (greyed, above
    # a line), with a notice saying it could not be recovered.
    for page in (alice, bob):
        expect_texts(page, ["after the restart", "welcome back"])
        earlier = page.get_by_test_id("messages").locator("li.earlier .text")
        expect(earlier).to_have_text(["before the restart"])
        expect(page.get_by_test_id("room-notice")).to_contain_text("could not recover")
    screenshot(alice, "chat-after-restart")


def test_a_page_that_lost_its_connection_gets_every_missed_message_once(
    open_page: OpenPage, server: ChatServer, relay: TcpRelay
) -> None:
    from playwright.sync_api import expect

    alice = open_page("alice", url=relay.url)  # through the relay
    bob = open_page("bob")
    expect_joined(alice)
    expect_joined(bob)
    say(bob, "before the drop")
    expect_texts(alice, ["before the drop"])
    wait_until(lambda: server.health()["connections"] == 2, "both pages connected")
    alice.evaluate("window.events = []")

    relay.cut()  # the network fails: no close frame either way
    alice.wait_for_function(
        "window.events.some(([name, d]) => name === 'close' && d.code === 1006)"
    )
    expect(alice.get_by_test_id("status")).to_have_text("reconnecting")
    wait_until(lambda: server.health()["connections"] == 1, "the server noticed the drop")

    # Meanwhile bob says more than one server frame holds (256 KiB): the replay
    # to alice is split across frames. `pad` is not shown (the page shows `text`).
    missed = [f"missed {i}" for i in range(1, 9)]
    bob.evaluate(
        """async (texts) => {
            const pad = "x".repeat(40000);
            for (const text of texts) await window.chat.publish("lobby", { text, pad });
        }""",
        missed,
    )
    expect_texts(bob, ["before the drop", *missed])

    relay.restore()
    expect(alice.get_by_test_id("status")).to_have_text("open", timeout=RECONNECT_WAIT * 1000)
    alice.wait_for_function("window.events.some(([name]) => name === 'joined')")
    [joined] = events(alice, "joined")
    assert (joined["recovered"], joined["reset"]) == (True, False), joined
    expect_texts(alice, ["before the drop", *missed])
    assert events(alice, "reset") == []  # recovered by the replay, not by a reload

    say(bob, "and live again")
    expect_texts(alice, ["before the drop", *missed, "and live again"])
    expect_texts(bob, ["before the drop", *missed, "and live again"])


def test_the_member_list_shows_who_is_in_the_room(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    alice = open_page("alice")
    expect_joined(alice)
    members = alice.get_by_test_id("presence").locator("li")
    expect(members).to_have_text(["alice"])

    bob = open_page("bob")
    expect_joined(bob)
    expect(members).to_have_text(["alice", "bob"])
    expect(bob.get_by_test_id("presence").locator("li")).to_have_text(["alice", "bob"])

    bob.close()  # the tab goes: bob leaves once the grace window has passed
    expect(members).to_have_text(["alice"], timeout=(PRESENCE_GRACE + WAIT) * 1000)


def test_signing_in_and_joining_with_the_forms(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    page = open_page("carol", query="")
    expect(page.get_by_test_id("status")).to_have_text("idle")
    expect(page.get_by_test_id("login")).to_be_visible()
    expect(page.locator("#chat")).to_be_hidden()

    page.locator("#user").fill("carol")
    page.locator("#token").fill(token_for("carol", SECRET))
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_test_id("status")).to_have_text("open")
    expect(page.get_by_test_id("me")).to_have_text("signed in as carol")
    expect(page.get_by_test_id("login")).to_be_hidden()
    expect(page.locator("#chat")).to_be_visible()

    # Send and Leave appear once there is a room to send to or leave.
    expect(page.get_by_test_id("compose")).to_be_hidden()
    page.locator("#room").fill("garden")
    page.get_by_role("button", name="Join").click()
    expect(page.get_by_test_id("room-title")).to_have_text("garden")
    expect(page.locator("#rooms li.active")).to_have_text("garden")
    say(page, "anyone here?")
    expect_message(page, "carol", "anyone here?")

    page.get_by_role("button", name="Leave room").click()
    expect(page.locator("#rooms li")).to_have_count(0)
    expect(page.get_by_test_id("room-title")).to_have_text("")
    expect(page.get_by_test_id("compose")).to_be_hidden()


@pytest.mark.parametrize(
    "server", [("--heartbeat-interval", "1", "--heartbeat-timeout", "1")], indirect=True
)
def test_a_silent_server_is_noticed_and_the_page_reconnects(
    open_page: OpenPage, server: ChatServer
) -> None:
    from playwright.sync_api import expect

    alice = open_page("alice")
    expect_joined(alice)
    alice.evaluate("window.events = []")
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)  # the TCP connection stays up, the server says nothing
    try:
        # hello promised a ping every 1 s, answered within 1 s: silent for 2 s is gone.
        alice.wait_for_function(
            "window.events.some(([name, d]) => name === 'close' && d.code === 4000)"
        )
        expect(alice.get_by_test_id("status")).to_have_text("reconnecting")
    finally:
        os.kill(pid, signal.SIGCONT)
    expect(alice.get_by_test_id("status")).to_have_text("open", timeout=RECONNECT_WAIT * 1000)
    alice.wait_for_function("window.events.some(([name]) => name === 'joined')")
    say(alice, "back again")
    expect_message(alice, "alice", "back again")


def sign_in_with_the_form(page: Any, user: str, token: str) -> None:
    page.locator("#user").fill(user)
    page.locator("#token").fill(token)
    page.get_by_role("button", name="Connect").click()


def test_a_wrong_token_brings_the_form_back_with_a_message(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    page = open_page("mallory", query="")
    sign_in_with_the_form(page, "mallory", "not-the-token")
    # Every handshake is refused (401): after a few attempts the page gives up.
    error = page.get_by_test_id("login-error")
    expect(error).to_have_text(
        "Could not sign in: the server refused this name or token. Check them and connect again."
    )
    expect(page.get_by_test_id("status")).to_have_text("failed")
    expect(page.get_by_test_id("login")).to_be_visible()
    expect(page.locator("#chat")).to_be_hidden()
    expect(page.locator("#user")).to_have_value("mallory")  # kept, to correct
    screenshot(page, "sign-in-refused")

    page.locator("#token").fill(token_for("mallory", SECRET))
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_test_id("status")).to_have_text("open")
    expect(error).to_be_hidden()
    expect(page.get_by_test_id("me")).to_have_text("signed in as mallory")


def test_bad_names_get_the_pages_own_message(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    page = open_page("dave", query="")
    sign_in_with_the_form(page, "dave smith", "x")
    expect(page.get_by_test_id("login-error")).to_have_text(
        "A name is 1 to 64 letters, digits, dots, dashes or underscores."
    )
    expect(page.get_by_test_id("status")).to_have_text("idle")  # nothing was sent

    sign_in_with_the_form(page, "dave", token_for("dave", SECRET))
    expect(page.get_by_test_id("status")).to_have_text("open")
    page.locator("#room").fill("no spaces here")
    page.get_by_role("button", name="Join").click()
    expect(page.get_by_test_id("join-error")).to_have_text(
        "A room name is 1 to 64 letters, digits, or . _ : -"
    )
    expect(page.locator("#rooms li")).to_have_count(0)


def test_each_room_has_its_own_bot_panel(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    alice = open_page("alice")
    expect_joined(alice)
    say(alice, "/ask what is a nursery?")
    bot = alice.get_by_test_id("bot")
    expect(bot).to_have_attribute("data-completed", re.compile(r"^\d+$"))
    expect(bot).to_contain_text("bot: You asked: what is a nursery?")

    alice.locator("#room").fill("garden")
    alice.get_by_role("button", name="Join").click()
    expect(alice.get_by_test_id("room-title")).to_have_text("garden")
    expect(bot).to_be_hidden()  # the lobby's answer stays in the lobby

    alice.locator("#rooms li", has_text="lobby").click()
    expect(alice.get_by_test_id("room-title")).to_have_text("lobby")
    expect(bot).to_contain_text("bot: You asked: what is a nursery?")


PHONE = {"width": 375, "height": 740}


def test_every_control_works_with_real_clicks_on_a_phone(open_page: OpenPage) -> None:
    from playwright.sync_api import expect

    page = open_page("erin", query="", viewport=PHONE)
    sign_in_with_the_form(page, "erin", token_for("erin", SECRET))
    expect(page.get_by_test_id("status")).to_have_text("open")
    for room in ("lobby", "garden"):
        page.locator("#room").fill(room)
        page.get_by_role("button", name="Join").click()
        expect(page.get_by_test_id("room-title")).to_have_text(room)
    page.locator("#rooms li", has_text="lobby").click()
    expect(page.get_by_test_id("room-title")).to_have_text("lobby")
    say(page, "hello from a phone")
    expect_message(page, "erin", "hello from a phone")
    assert_laid_out(page, PHONE["width"])
    screenshot(page, "chat-phone")

    page.get_by_role("button", name="Leave room").click()
    expect(page.get_by_test_id("room-title")).to_have_text("garden")
    expect(page.locator("#rooms li")).to_have_text(["garden"])


def test_every_control_is_laid_out_on_a_desktop(open_page: OpenPage) -> None:
    alice, bob = open_page("alice"), open_page("bob")
    expect_joined(alice)
    expect_joined(bob)
    say(bob, "hi alice")
    expect_message(alice, "bob", "hi alice")
    assert_laid_out(alice, alice.viewport_size["width"])
    screenshot(alice, "chat-desktop")


def assert_laid_out(page: Any, width: int) -> None:
    """Nothing is wider than the page; no two visible controls overlap."""
    boxes = page.evaluate(
        """() => [...document.querySelectorAll("input, button, #rooms li")]
            .filter((e) => e.offsetParent !== null)
            .map((e) => {
                const r = e.getBoundingClientRect();
                return {name: e.id || e.textContent, x: r.x, y: r.y, w: r.width, h: r.height};
            })"""
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    assert len(boxes) >= 5, boxes
    for box in boxes:
        assert box["x"] >= 0, box
        assert box["x"] + box["w"] <= width, box
        assert box["w"] > 20, box
        assert box["h"] > 10, box
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, (a, b)


def test_with_redis_the_page_keeps_every_message_across_a_restart(
    open_page: OpenPage, server: ChatServer, redis_server: Any
) -> None:
    from playwright.sync_api import expect

    server.stop()  # the same server, on Redis: the room's history outlives the process
    server.options = ("--redis-url", redis_server.url)
    server.start()
    alice, bob = two_pages_said_before_the_restart(open_page)

    assert server.stop() == 0, server.log()
    server.start()
    for page in (alice, bob):
        expect(page.get_by_test_id("status")).to_have_text("open", timeout=RECONNECT_WAIT * 1000)
        page.wait_for_function(
            "window.events.some(([name, d]) => name === 'joined' && d.room === 'lobby')"
        )
        [joined] = events(page, "joined")
        assert (joined["recovered"], joined["reset"]) == (True, False), joined
    say(bob, "after the restart")
    for page in (alice, bob):
        expect_texts(page, ["before the restart", "after the restart"])
        expect(page.get_by_test_id("room-notice")).to_be_hidden()
        expect(page.get_by_test_id("messages").locator("li.earlier")).to_have_count(0)


def test_no_server_at_all_says_so(open_page: OpenPage, server: ChatServer) -> None:
    from playwright.sync_api import expect

    page = open_page("frank", query="")
    expect(page.get_by_test_id("login")).to_be_visible()
    assert server.stop() == 0, server.log()  # the page is loaded; its server is gone
    sign_in_with_the_form(page, "frank", token_for("frank", SECRET))
    expect(page.get_by_test_id("login-error")).to_have_text(
        "Could not sign in: the server is not reachable. Try again in a moment."
    )
    expect(page.get_by_test_id("status")).to_have_text("failed")
    expect(page.locator("#chat")).to_be_hidden()
