"""The ASGI transport and ``ASGIApp``, in process: no sockets, virtual time.

:mod:`_asgi_driver` plays hypercorn's role at the ASGI boundary (its quirks
included), so each hypercorn trap has a deterministic test here; the same
traps against a real hypercorn are in ``test_hypercorn.py``.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from _asgi_driver import ASGIWebSocketDriver, UnexpectedMessageError, open_asgi_pair

from chatcore import (
    Accept,
    CloseCause,
    CloseRecord,
    Config,
    Connection,
    ConnectionHandler,
    HandshakeRequest,
    Hub,
    HubConfig,
    Identity,
    LocalProtocolError,
    PeerGone,
    Reject,
    Session,
    _server,
)
from chatcore._backplane import LocalBackplane
from chatcore._server import refuse_asgi_websocket, serve_asgi_websocket
from chatcore.asgi import ASGIApp
from chatcore.testing import MESSAGE_STREAM_CHECKS, check_message_stream
from chatcore.transports import CloseFrame, TextFrame
from chatcore.transports._asgi_stream import (
    LINGER,
    ASGIStream,
    request_from_scope,
)

#: Conformance checks whose contract hypercorn cannot give (see
#: docs/deploy.md and the deviation tests below):
#: the client's close code is not forwarded; returning from the application
#: (the only way to drop the link) makes hypercorn send a 1011 close frame,
#: or HTTP 500 before the handshake was answered.
HYPERCORN_DEVIATIONS = {"peer_close", "abort", "abort_before_answer"}

TEST_CONFIG = Config(heartbeat_interval=3600.0, heartbeat_timeout=60.0, close_timeout=5.0)


def ws_scope(**changes: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "websocket",
        "scheme": "ws",
        "path": "/ws",
        "query_string": b"token=abc&x=1",
        "headers": [
            (b"Host", b"example.test"),
            (b"origin", b"http://example.test"),
            (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "client": ["10.0.0.7", 5555],
        "subprotocols": ["chat.v1"],
        "extensions": {"websocket.http.response": {}},
    }
    scope.update(changes)
    return scope


# -- the edge: ASGI dicts become a HandshakeRequest ------------------------------------


def test_request_from_scope_converts_everything() -> None:
    request = request_from_scope(ws_scope())
    assert request == HandshakeRequest(
        path="/ws",
        query_string="token=abc&x=1",
        headers=(
            ("host", "example.test"),
            ("origin", "http://example.test"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ),
        client=("10.0.0.7", 5555),
        subprotocols=("chat.v1",),
        scheme="ws",
    )
    assert request.query == {"token": "abc", "x": "1"}
    assert all(isinstance(v, str) for _, v in request.headers)


@pytest.mark.parametrize(("scheme", "expected"), [("wss", "wss"), ("https", "wss"), ("ws", "ws")])
def test_request_scheme(scheme: str, expected: str) -> None:
    assert request_from_scope(ws_scope(scheme=scheme)).scheme == expected


def test_request_without_optional_fields() -> None:
    request = request_from_scope({"type": "websocket", "path": "/ws"})
    assert (request.client, request.headers, request.subprotocols, request.scheme) == (
        None,
        (),
        (),
        "ws",
    )


@pytest.mark.parametrize(
    "scope",
    [
        {"type": "http", "path": "/"},
        {"type": "websocket"},
        {"type": "websocket", "path": "/", "headers": [(b"x", None)]},
        {"type": "websocket", "path": "/", "client": ["h"]},
    ],
)
def test_malformed_scope(scope: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="scope"):
        request_from_scope(scope)


# -- the conformance suite, on the in-memory hypercorn ------------------------------


@pytest.mark.parametrize("check", sorted(set(MESSAGE_STREAM_CHECKS) - HYPERCORN_DEVIATIONS))
async def test_conformance_hypercorn_semantics(check: str, autojump_clock: Any) -> None:
    await check_message_stream(open_asgi_pair, checks=[check])


async def test_conformance_peer_close_on_a_server_that_reports_codes(autojump_clock: Any) -> None:
    # A spec-following ASGI server reports the client's code; the adapter forwards it.
    await check_message_stream(
        partial(open_asgi_pair, forward_close_codes=True), checks=["peer_close"]
    )


async def test_deviation_peer_close_code_is_unknown(autojump_clock: Any) -> None:
    """Rule 5: hypercorn reports 1006 for any client close; the stream says 'no code'."""
    async with open_asgi_pair() as (server, client):
        await server.accept()
        await client.wait_accepted()
        await client.close(4100, "bye")
        gone = await _raises_peer_gone(server.receive())
        assert (gone.code, gone.reason) == (None, "")
        # hypercorn still answers the client's close frame with its code.
        assert await client.receive_frame() == CloseFrame(4100, "bye")


async def test_deviation_abort_of_an_open_stream(autojump_clock: Any) -> None:
    """Dropping the link means returning from the app: hypercorn then sends 1011."""
    async with open_asgi_pair() as (server, client):
        await server.accept()
        await client.wait_accepted()
        await server.abort()
        assert server.accepted
        assert await frames_until_closed(client) == [CloseFrame(1011, "")]


async def test_deviation_abort_before_answer(autojump_clock: Any) -> None:
    from chatcore import HandshakeRejected

    async with open_asgi_pair() as (server, client):
        await server.abort()
        with pytest.raises(HandshakeRejected) as refused:
            await client.wait_accepted()
        assert refused.value.status == 500


async def _raises_peer_gone(call: Awaitable[object]) -> PeerGone:
    try:
        await call
    except PeerGone as exc:
        return exc
    raise AssertionError("expected PeerGone")


# -- the adapter translates every server error into PeerGone ------------------------


def failing_send(exc: BaseException) -> Callable[[dict[str, Any]], Awaitable[None]]:
    async def send(message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        if message["type"] != "websocket.accept":
            raise exc

    return send


async def never_receive() -> dict[str, Any]:
    await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.mark.parametrize(
    "exc",
    [
        UnexpectedMessageError("websocket.send in state CLOSED"),
        AttributeError("'WSStream' object has no attribute 'connection'"),
        trio.BusyResourceError("another task is currently sending data on this SocketStream"),
        trio.BrokenResourceError(),
        ConnectionResetError(),
    ],
)
async def test_server_errors_become_peer_gone(exc: BaseException) -> None:
    stream = ASGIStream(ws_scope(), never_receive, failing_send(exc))
    await stream.accept()
    gone = await _raises_peer_gone(stream.send("hi"))
    assert gone.code is None
    assert gone.__cause__ is exc
    # Broken from now on: nothing more is handed to the server.
    await _raises_peer_gone(stream.send("again"))
    await _raises_peer_gone(stream.close(1000))
    await stream.abort()


async def test_close_then_send_never_reaches_the_server() -> None:
    sent: list[str] = []
    disconnect = trio.Event()

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(message["type"])
        if message["type"] == "websocket.close":
            disconnect.set()

    stream = ASGIStream(ws_scope(), receive, send)
    await stream.accept()
    await stream.close(1000)
    await _raises_peer_gone(stream.send("late"))
    await _raises_peer_gone(stream.close(1000))  # done: no second close frame
    assert sent == ["websocket.accept", "websocket.close"]


async def test_receive_is_never_called_after_disconnect() -> None:
    """Rule 2: hypercorn's receive blocks forever after the disconnect."""
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.lowlevel.checkpoint()
            return {"type": "websocket.disconnect", "code": 1006}
        await trio.sleep_forever()  # what hypercorn does
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()

    stream = ASGIStream(ws_scope(), receive, send)
    await stream.accept()
    with trio.fail_after(1):
        await _raises_peer_gone(stream.receive())
        await _raises_peer_gone(stream.receive())
        await _raises_peer_gone(stream.close(1000))
        assert await stream.linger(10.0)
    assert calls == 1


async def test_accept_checks_what_hypercorn_would_choke_on() -> None:

    async def send(message: dict[str, Any]) -> None:  # pragma: no cover
        raise AssertionError(f"nothing may be sent: {message}")

    stream = ASGIStream(ws_scope(), never_receive, send)
    with pytest.raises(LocalProtocolError, match="not offered"):
        await stream.accept(subprotocol="chat.v9")
    with pytest.raises(LocalProtocolError, match="cannot be set"):
        await stream.accept(headers=(("Sec-WebSocket-Protocol", "x"),))
    assert not stream.answered  # still answerable: the actor refuses with 500


async def test_disconnect_codes_are_forwarded_only_when_real() -> None:
    for code, expected in ((1006, None), (1005, None), (4100, 4100)):
        messages = [{"type": "websocket.disconnect", "code": code, "reason": "r"}]

        async def receive(messages: list[dict[str, Any]] = messages) -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            return messages.pop()

        stream = ASGIStream(ws_scope(), receive, failing_send(AssertionError()))
        await stream.accept()
        gone = await _raises_peer_gone(stream.receive())
        assert gone.code == expected


# -- ASGIApp: WebSocket routes through the in-memory hypercorn -------------------------


class Scripted(ConnectionHandler):
    """A plain handler: echoes, or runs a script for the test."""

    def __init__(
        self,
        script: Callable[[Connection], Awaitable[None]] | None = None,
        accept: Accept | Reject | None = None,
    ) -> None:
        self.script = script
        self.accept = accept or Accept("anon")
        self.records: list[CloseRecord] = []

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        await trio.lowlevel.checkpoint()
        return self.accept

    async def handle(self, connection: Connection) -> None:
        if self.script is not None:
            await self.script(connection)
            return
        async for text in connection:
            connection.send_nowait({"type": "echo", "text": text})

    def connection_closed(self, connection: Connection) -> None:
        assert connection.close_record is not None
        self.records.append(connection.close_record)


async def drive(app: ASGIApp, nursery: trio.Nursery, **kwargs: Any) -> ASGIWebSocketDriver:
    kwargs.setdefault("target", "/ws")
    driver = ASGIWebSocketDriver(app, **kwargs)
    await nursery.start(driver.run)
    return driver


async def frames_until_closed(driver: ASGIWebSocketDriver) -> list[Any]:
    frames = []
    while True:
        try:
            frames.append(await driver.receive_frame())
        except PeerGone:
            return frames


async def test_app_serves_a_hub(nursery: trio.Nursery, autojump_clock: Any) -> None:
    hub = Hub(connection_config=TEST_CONFIG)
    driver = await drive(ASGIApp(hub), nursery, target="/ws?x=1")
    await driver.wait_accepted()
    hello = json.loads(await driver.receive_text())
    assert hello["type"] == "hello"
    await driver.send_text(json.dumps({"type": "join", "room": "r", "ref": 1}))
    reply = json.loads(await driver.receive_text())
    assert reply["status"] == "ok"
    assert hub.statistics().rooms == 1
    await driver.close(1000)
    assert await frames_until_closed(driver) == [CloseFrame(1000, "")]
    await driver.app_returned.wait()
    assert driver.app_errors == []
    assert hub.statistics().connections == 0


@pytest.mark.parametrize(
    ("reject", "status"),
    [
        (Reject(401, b"who are you"), 401),
        (Reject(403, b"origin not allowed"), 403),
        (Reject(429, b"too many"), 429),
        (Reject(503, b"busy", (("retry-after", "5"),)), 503),
    ],
)
async def test_refusals_are_http_responses_with_a_body(
    reject: Reject, status: int, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    handler = Scripted(accept=reject)
    driver = await drive(ASGIApp(handler, config=TEST_CONFIG), nursery)
    await driver.app_returned.wait()
    refusal = driver.refusal
    assert refusal is not None
    assert (refusal.status, refusal.body) == (status, reject.body)
    headers = dict(refusal.headers)
    assert headers[b"content-length"] == str(len(reject.body)).encode()
    for name, value in reject.headers:
        assert headers[name.encode()] == value.encode()
    assert driver.app_errors == []
    assert driver.state == "HTTPCLOSED"  # one answer: the denial, never a bare 403


async def test_refusal_without_the_denial_extension(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    driver = await drive(
        ASGIApp(Scripted(accept=Reject(401, b"no")), config=TEST_CONFIG),
        nursery,
        denial_extension=False,
    )
    await driver.app_returned.wait()
    assert driver.refusal is not None
    assert driver.refusal.status == 403
    assert driver.app_errors == []


async def test_other_websocket_paths_get_404(nursery: trio.Nursery, autojump_clock: Any) -> None:
    handler = Scripted()
    driver = await drive(ASGIApp(handler, config=TEST_CONFIG), nursery, target="/elsewhere")
    await driver.app_returned.wait()
    assert driver.refusal is not None
    assert (driver.refusal.status, driver.refusal.body) == (404, b"not found")
    assert handler.records == []  # no connection was started


async def test_draining_refuses_with_503_and_retry_after(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    hub = Hub(config=HubConfig(retry_after=7), connection_config=TEST_CONFIG)
    app = ASGIApp(hub)
    app.start_draining()
    assert hub.draining
    driver = await drive(app, nursery)
    await driver.app_returned.wait()
    refusal = driver.refusal
    assert refusal is not None
    assert refusal.status == 503
    assert dict(refusal.headers)[b"retry-after"] == b"7"


async def test_handler_crash_is_1011_and_never_escapes(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    async def crash(connection: Connection) -> None:
        await connection.receive()
        raise RuntimeError("handler bug")

    handler = Scripted(crash)
    driver = await drive(ASGIApp(handler, config=TEST_CONFIG), nursery)
    await driver.wait_accepted()
    await driver.send_text("boom")
    assert await frames_until_closed(driver) == [CloseFrame(1011, "internal error")]
    await driver.app_returned.wait()
    assert driver.app_errors == []
    assert [r.cause for r in handler.records] == [CloseCause.INTERNAL]


async def test_unoffered_subprotocol_is_refused_with_500(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    # Given to hypercorn, it would switch to CONNECTED, raise, and crash the
    # whole server when the app returns; the stream refuses it before that.
    handler = Scripted(accept=Accept("anon", subprotocol="chat.v9"))
    driver = await drive(ASGIApp(handler, config=TEST_CONFIG), nursery, subprotocols=["chat.v1"])
    await driver.app_returned.wait()
    assert driver.refusal is not None
    assert driver.refusal.status == 500
    assert driver.app_errors == []
    assert [r.code for r in handler.records] == [1011]


async def test_app_waits_for_the_disconnect_after_a_close(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    """Rule 1: after the close frame, the app returns only once the client answered."""
    closed = trio.Event()

    async def close_at_once(connection: Connection) -> None:
        await connection.close(4002, "kicked")
        closed.set()

    driver = await drive(ASGIApp(Scripted(close_at_once), config=TEST_CONFIG), nursery)
    await driver.wait_accepted()
    await trio.sleep(1.0)  # the client does not read: no answer to the close
    assert not driver.app_returned.is_set()
    frame = await driver.receive_frame()  # answers the close, like a browser
    assert frame == CloseFrame(4002, "kicked")
    with trio.fail_after(0.1):
        await driver.app_returned.wait()


async def close_at_once(connection: Connection) -> None:
    await connection.close(1000)


async def test_app_lingers_boundedly(nursery: trio.Nursery, autojump_clock: Any) -> None:
    """A client that never answers the close: close_timeout, then the whole linger, then return.

    The actor gives up on the close handshake after ``close_timeout`` and
    aborts; the app then still waits ``LINGER`` for ``websocket.disconnect``
    (returning earlier can crash hypercorn), and not a moment longer.
    """
    driver = await drive(ASGIApp(Scripted(close_at_once), config=TEST_CONFIG), nursery)
    await driver.wait_accepted()
    start = trio.current_time()
    with trio.fail_after(TEST_CONFIG.close_timeout + LINGER + 1):
        await driver.app_returned.wait()
    waited = trio.current_time() - start
    assert waited == pytest.approx(TEST_CONFIG.close_timeout + LINGER)


async def test_linger_ends_at_the_disconnect(nursery: trio.Nursery, autojump_clock: Any) -> None:
    """A client that answers the close late (during the linger): the app returns right then."""
    driver = await drive(ASGIApp(Scripted(close_at_once), config=TEST_CONFIG), nursery)
    await driver.wait_accepted()
    start = trio.current_time()
    late = TEST_CONFIG.close_timeout + LINGER / 2
    await trio.sleep(late)
    assert not driver.app_returned.is_set()  # still lingering, past close_timeout
    with trio.fail_after(1):
        assert await driver.receive_frame() == CloseFrame(1000, "")  # answered, like a browser
        await driver.app_returned.wait()
    assert trio.current_time() - start == pytest.approx(late)


async def test_cancellation_closes_with_1012_without_waiting(autojump_clock: Any) -> None:
    """The server cancelling the app (graceful timeout) still sends 1012, then returns at once."""
    handler = Scripted()
    driver = ASGIWebSocketDriver(ASGIApp(handler, config=TEST_CONFIG), target="/ws")
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await driver.wait_accepted()
        start = trio.current_time()
        nursery.cancel_scope.cancel()  # the app and hypercorn's reader, together
    assert trio.current_time() - start < 0.1
    assert driver.frames == []
    assert await driver.receive_frame() == CloseFrame(1012, "server shutting down")
    assert [r.code for r in handler.records] == [1012]


# -- ASGIApp: HTTP and lifespan ------------------------------------------------------------


async def call_http(
    app: ASGIApp, path: str, method: str = "GET"
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    start, body = sent
    assert start["type"] == "http.response.start"
    assert body["type"] == "http.response.body"
    return start["status"], dict(start["headers"]), body["body"]


async def test_health_reports_the_hub(nursery: trio.Nursery, autojump_clock: Any) -> None:
    hub = Hub(connection_config=TEST_CONFIG)
    app = ASGIApp(hub)
    driver = await drive(app, nursery)
    await driver.wait_accepted()
    await driver.receive_text()  # hello
    await driver.send_text(json.dumps({"type": "join", "room": "r", "ref": 1}))
    await driver.receive_text()
    status, headers, body = await call_http(app, "/healthz")
    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"status": "ok", "connections": 1, "rooms": 1, "draining": False}
    app.start_draining()
    status, headers, body = await call_http(app, "/healthz")
    assert status == 503
    assert json.loads(body) == {
        "status": "draining",
        "connections": 1,
        "rooms": 1,
        "draining": True,
    }
    assert headers[b"retry-after"] == b"5"
    status, headers, body = await call_http(app, "/healthz", "HEAD")
    assert (status, body) == (503, b"")
    assert int(headers[b"content-length"]) > 0


async def test_health_method_and_fallbacks() -> None:
    calls: list[str] = []

    async def static(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"static"})

    assert (await call_http(ASGIApp(Scripted()), "/healthz", "POST"))[0] == 405
    assert (await call_http(ASGIApp(Scripted()), "/index.html"))[0] == 404
    app = ASGIApp(Scripted(), http_app=static, health_path="/ready")
    assert await call_http(app, "/index.html") == (200, {}, b"static")
    assert (await call_http(app, "/ready"))[0] == 200
    assert calls == ["/index.html"]


class RunRecordingHub(Hub):
    """A hub whose background work is observable (or fails to start)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(connection_config=TEST_CONFIG)
        self.fail = fail
        self.events: list[str] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise OSError("backplane unreachable")
        self.events.append("started")
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.events.append("stopped")


async def run_lifespan(app: ASGIApp, events: list[str]) -> list[str]:
    """Play hypercorn's lifespan: startup, then (if it completed) shutdown."""
    sent: list[str] = []
    phases = iter(["lifespan.startup", "lifespan.shutdown"])

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if sent == ["lifespan.startup.complete"]:
            events.append("serving")
        return {"type": next(phases)}

    async def send(message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)
    return sent


async def test_lifespan_runs_the_hub_from_startup_to_shutdown() -> None:
    hub = RunRecordingHub()
    sent = await run_lifespan(ASGIApp(hub), hub.events)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert hub.events == ["started", "serving", "stopped"]
    plain: list[str] = []
    assert await run_lifespan(ASGIApp(Scripted()), plain) == sent


async def test_lifespan_reports_a_hub_that_cannot_start(caplog: pytest.LogCaptureFixture) -> None:
    hub = RunRecordingHub(fail=True)
    assert await run_lifespan(ASGIApp(hub), hub.events) == ["lifespan.startup.failed"]
    assert "failed to start" in caplog.text


async def test_health_reports_a_degraded_backplane() -> None:
    class Unreachable(LocalBackplane):
        @property
        def degraded(self) -> bool:
            return True

    app = ASGIApp(Hub(backplane=Unreachable(), connection_config=TEST_CONFIG))
    status, _, body = await call_http(app, "/healthz")
    assert (status, json.loads(body)["status"]) == (200, "degraded")
    app.start_draining()
    status, _, body = await call_http(app, "/healthz")
    assert (status, json.loads(body)["status"]) == (503, "draining")


async def test_health_can_report_not_ready_while_degraded() -> None:
    class Unreachable(LocalBackplane):
        down = True

        @property
        def degraded(self) -> bool:
            return self.down

    backplane = Unreachable()
    app = ASGIApp(
        Hub(backplane=backplane, connection_config=TEST_CONFIG), unready_when_degraded=True
    )
    status, _, body = await call_http(app, "/healthz")
    assert (status, json.loads(body)["status"]) == (503, "degraded")
    assert not app.health().ready
    backplane.down = False
    status, _, body = await call_http(app, "/healthz")
    assert (status, json.loads(body)["status"]) == (200, "ok")


async def test_unknown_scope_type() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        await ASGIApp(Scripted())({"type": "webtransport"}, never_receive, failing_send(OSError()))


def test_constructor_validation() -> None:
    with pytest.raises(TypeError, match="not a chatcore ConnectionHandler"):
        ASGIApp(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path"):
        ASGIApp(Scripted(), path="ws")
    app = ASGIApp(Scripted())
    with pytest.raises(TypeError, match=r"expected a chatcore\.Config"):
        app.config = {}  # type: ignore[assignment]
    app.config = TEST_CONFIG
    assert app.config is TEST_CONFIG
    assert ASGIApp(Hub(connection_config=TEST_CONFIG)).config is TEST_CONFIG
    assert ASGIApp(Hub(config=HubConfig(retry_after=9))).retry_after == 9
    assert "Scripted" in repr(app)


# -- draining a plain handler ---------------------------------------------------------------


async def test_drain_plain_handler(nursery: trio.Nursery, autojump_clock: Any) -> None:
    handler = Scripted()
    app = ASGIApp(handler, config=TEST_CONFIG)
    drivers = [await drive(app, nursery) for _ in range(3)]
    for driver in drivers:
        await driver.wait_accepted()
    await trio.testing.wait_all_tasks_blocked()
    assert app.health().connections == 3

    async def answer(driver: ASGIWebSocketDriver) -> None:
        assert await frames_until_closed(driver) == [CloseFrame(1012, "service restart")]

    for driver in drivers:
        nursery.start_soon(answer, driver)
    assert await app.drain(grace=8.0) == 0
    assert app.draining
    assert app.health().connections == 0
    assert [r.code for r in handler.records] == [1012, 1012, 1012]


async def test_drain_hub_sends_shutdown_first(nursery: trio.Nursery, autojump_clock: Any) -> None:
    hub = Hub(connection_config=TEST_CONFIG)
    app = ASGIApp(hub)
    driver = await drive(app, nursery)
    await driver.wait_accepted()
    await driver.receive_text()  # hello
    left = 0

    async def drain() -> None:
        nonlocal left
        left = await app.drain(grace=3.0)

    nursery.start_soon(drain)
    shutdown = json.loads(await driver.receive_text())
    assert shutdown["type"] == "shutdown"
    assert await frames_until_closed(driver) == [CloseFrame(1012, "service restart")]
    await driver.app_returned.wait()
    assert left == 0


async def test_identity_reaches_the_hub(nursery: trio.Nursery, autojump_clock: Any) -> None:
    async def authenticate(request: HandshakeRequest) -> Identity:
        await trio.lowlevel.checkpoint()
        assert request.query["token"] == "t1"
        assert request.header("origin") == "http://example.test"
        return Identity("ann")

    seen: list[str] = []

    async def on_connect(session: Session) -> None:
        await trio.lowlevel.checkpoint()
        seen.append(session.user)

    hub = Hub(authenticate=authenticate, on_connect=on_connect, connection_config=TEST_CONFIG)
    driver = await drive(
        ASGIApp(hub),
        nursery,
        target="/ws?token=t1",
        headers=[("Origin", "http://example.test")],
    )
    await driver.wait_accepted()
    assert json.loads(await driver.receive_text())["user"] == "ann"
    assert seen == ["ann"]
    assert isinstance(driver.frames[0], TextFrame)
    assert math.isinf(driver.user_timeout)


# -- edges of the adapter ---------------------------------------------------------------------


class Recorder:
    """ASGI receive/send fakes: scripted incoming events, recorded outgoing ones."""

    def __init__(self, *incoming: dict[str, Any], fail_send: BaseException | None = None) -> None:
        self.incoming = list(incoming)
        self.sent: list[dict[str, Any]] = []
        self.fail_send = fail_send

    async def receive(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if not self.incoming:
            await trio.sleep_forever()
        return self.incoming.pop(0)

    async def send(self, message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_send is not None:
            raise self.fail_send
        self.sent.append(message)


async def test_stream_repr_follows_its_state() -> None:
    io = Recorder({"type": "websocket.disconnect", "code": 1006})
    stream = ASGIStream(ws_scope(), io.receive, io.send)
    assert "handshake" in repr(stream)
    await stream.accept()
    assert "open" in repr(stream)
    await _raises_peer_gone(stream.receive())
    assert stream.disconnected
    assert "disconnected" in repr(stream)
    broken = ASGIStream(ws_scope(), io.receive, io.send)
    await broken.abort()
    assert "broken" in repr(broken)


async def test_receive_errors_mean_the_peer_is_gone() -> None:
    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        raise trio.EndOfChannel

    stream = ASGIStream(ws_scope(), receive, Recorder().send)
    await stream.accept()
    await _raises_peer_gone(stream.receive())
    assert stream.disconnected
    await _raises_peer_gone(stream.send("x"))


async def test_refusals_when_the_client_is_gone_are_moot() -> None:
    """A refusal the server cannot deliver neither raises nor hangs, and releases the stream."""
    io = Recorder(fail_send=ConnectionResetError())
    stream = ASGIStream(ws_scope(), io.receive, io.send)
    with trio.fail_after(1):
        await stream.reject(403, body=b"no")  # the client left: no exception
        await stream.wait_released()  # the app may return now
        await stream.abort()
    assert io.sent == []  # nothing was delivered
    assert stream.answered
    assert not stream.accepted
    assert "broken" in repr(stream)
    with pytest.raises(LocalProtocolError, match="answered"):
        await stream.accept()  # the handshake was answered once, by the refusal
    await _raises_peer_gone(stream.send("x"))


async def test_close_before_accept_is_an_http_refusal() -> None:
    io = Recorder()
    stream = ASGIStream(ws_scope(), io.receive, io.send)
    await stream.close(1012, "restarting")
    assert [m["type"] for m in io.sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert io.sent[0]["status"] == 503
    assert io.sent[1]["body"] == b"restarting"
    await stream.close(1012)  # already answered: nothing more
    assert len(io.sent) == 2


async def test_a_client_gone_before_the_connect_event() -> None:
    io = Recorder({"type": "websocket.disconnect", "code": 1006})
    await serve_asgi_websocket(ws_scope(), io.receive, io.send, Scripted(), config=TEST_CONFIG)
    assert io.sent == []


async def test_a_malformed_scope_is_refused_with_400() -> None:
    io = Recorder({"type": "websocket.connect"})
    scope = ws_scope(client=["only-a-host"])
    await serve_asgi_websocket(scope, io.receive, io.send, Scripted(), config=TEST_CONFIG)
    assert io.sent[0]["status"] == 400


async def test_an_internal_error_is_contained(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_actor(*args: Any, **kwargs: Any) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("a chatcore bug")

    monkeypatch.setattr(_server, "serve_connection", broken_actor)
    io = Recorder({"type": "websocket.connect"})
    await serve_asgi_websocket(ws_scope(), io.receive, io.send, Scripted(), config=TEST_CONFIG)
    assert io.sent[0]["status"] == 500  # refused, and nothing escaped
    assert "unexpected error" in caplog.text


async def test_refusing_a_client_that_left_never_raises() -> None:
    io = Recorder({"type": "websocket.connect"}, fail_send=ConnectionResetError())
    await refuse_asgi_websocket(ws_scope(), io.receive, io.send, 404)
    gone = Recorder({"type": "websocket.disconnect", "code": 1006})
    await refuse_asgi_websocket(ws_scope(), gone.receive, gone.send, 404)
    assert gone.sent == []


# Every test here runs on trio's clock (mostly the autojump clock, where a
# deadlock with no deadline would hang instead of failing): bound them all.
def _bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def bounded(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(60):
            await test(*args, **kwargs)

    return bounded


for _name, _test in list(globals().items()):
    if _name.startswith("test_") and inspect.iscoroutinefunction(_test):
        globals()[_name] = _bounded(_test)
