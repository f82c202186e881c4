"""The lean engine in process: HTTP routes, refusals, close codes, drain.

Real sockets on 127.0.0.1 with port 0; every wait is bounded. The process
level (SIGTERM, workers, a stalled client) is in ``test_serve_cli.py``, which
runs those tests on both engines; the transport contract is checked by the
conformance suite (``test_conformance.py``).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import pytest
import trio

import chatcore.metrics
from chatcore import Config, Hub, HubConfig, LocalProtocolError
from chatcore._lean_serve import MAX_BODY_BYTES, LeanServer, serve_lean
from chatcore.asgi import ASGIApp, ASGIReceive, ASGIScope, ASGISend
from chatcore.metrics import ConnectionMetrics
from chatcore.testing import WebSocketPeer, open_lean_pair, open_test_client
from chatcore.transports import CloseFrame, LeanStream, TextFrame
from chatcore.transports._lean import text_frame

TIMEOUT = 10


async def echo_body(scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
    """An ``http_app`` that answers with the request body, streamed in two parts."""
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": body[:3], "more_body": True})
    await send({"type": "http.response.body", "body": body[3:], "more_body": False})


async def crash(scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
    raise RuntimeError("the http_app crashed")


@asynccontextmanager
async def lean_server(
    app: ASGIApp | None = None, *, grace: float = 2.0
) -> AsyncIterator[tuple[LeanServer, int]]:
    app = app or ASGIApp(Hub(), http_app=echo_body)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            server: LeanServer = await nursery.start(
                functools.partial(serve_lean, app, [listener], drain_grace=grace, signals=())
            )
            yield server, listener.getsockname()[1]
            nursery.cancel_scope.cancel()
    finally:
        listener.close()


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read to EOF: status, headers (lowercase names), body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65_536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    if headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while body:
            size_text, _, rest = body.partition(b"\r\n")
            size = int(size_text, 16)
            decoded += rest[:size]
            body = rest[size + 2 :]
        body = decoded
    return int(lines[0].split()[1]), headers, body


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def upgrade(
    path: str = "/ws", *, version: str = "13", key: str = "dGhlIHNhbXBsZSBub25jZQ=="
) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    ).encode()


async def read_until_gone(peer: WebSocketPeer) -> list[object]:
    frames: list[object] = []
    while True:
        try:
            frames.append(await peer.receive_frame())
        except Exception:
            return frames


# -- plain HTTP ------------------------------------------------------------------------------


async def test_http_routes_of_the_app() -> None:
    with trio.fail_after(TIMEOUT):
        async with lean_server() as (_, port):
            status, headers, body = await exchange(port, get("/healthz"))
            assert status == 200
            assert json.loads(body)["status"] == "ok"
            assert headers["connection"] == "close"
            status, headers, body = await exchange(port, get("/healthz", "HEAD"))
            assert (status, body) == (200, b"")
            status, headers, body = await exchange(port, get("/chatcore.js"))
            assert status == 200
            assert b"ChatcoreClient" in body or b"class" in body
            payload = b"hello body"
            status, _, body = await exchange(
                port,
                get("/anything", "POST", f"Content-Length: {len(payload)}\r\n") + payload,
            )
            assert (status, body) == (201, payload)


async def test_http_bad_requests_get_their_status() -> None:
    with trio.fail_after(TIMEOUT):
        async with lean_server() as (_, port):
            status, _, _ = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
            assert status == 400
            status, _, body = await exchange(
                port, get("/", extra="X-Big: " + "a" * 20_000 + "\r\n")
            )
            assert status == 431, body
            status, _, body = await exchange(port, get("/" + "a" * 9_000))
            assert status == 414, body  # Config.handshake_limits, as on the other engines
            big = MAX_BODY_BYTES + 1
            status, _, _ = await exchange(
                port, get("/x", "POST", f"Content-Length: {big}\r\n") + b"x" * big
            )
            assert status == 413


async def test_an_http_app_that_raises_gets_500_and_serving_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with lean_server(ASGIApp(Hub(), http_app=crash)) as (_, port):
            status, _, _ = await exchange(port, get("/x"))
            assert status == 500
            status, _, _ = await exchange(port, get("/healthz"))
            assert status == 200
    assert "the http_app crashed" in caplog.text


async def test_one_access_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "chatcore.access")
    with trio.fail_after(TIMEOUT):
        async with lean_server() as (_, port):
            await exchange(port, get("/x%0a%1b?q='1'", extra="User-Agent: evil\x1b[31m\x07\r\n"))
            await exchange(port, upgrade("/elsewhere"))
    lines = [r.getMessage() for r in caplog.records if r.name == "chatcore.access"]
    assert len(lines) == 2
    # The same line as on hypercorn: the target as the client sent it (still
    # percent-encoded), every client-controlled field escaped, never raw.
    assert "\x1b" not in lines[0]
    assert "\x07" not in lines[0]
    assert " \"GET /x%0a%1b?q='1' HTTP/1.1\" 201 " in lines[0]
    assert lines[0].endswith('"evil\\x1b[31m\\x07"')
    assert ' "GET /elsewhere WS" 404 ' in lines[1]


# -- WebSocket handshakes ----------------------------------------------------------------------


async def test_handshake_refusals() -> None:
    with trio.fail_after(TIMEOUT):
        async with lean_server() as (_, port):
            assert (await exchange(port, upgrade("/elsewhere")))[0] == 404
            status, headers, _ = await exchange(port, upgrade(version="12"))
            assert (status, headers["sec-websocket-version"]) == (426, "13")
            assert (await exchange(port, upgrade(key="short")))[0] == 400


async def test_a_client_that_sends_no_request_is_dropped() -> None:
    app = ASGIApp(Hub(), config=Config(handshake_timeout=0.2))
    with trio.fail_after(TIMEOUT):
        async with lean_server(app) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                # Reset after handshake_timeout, without a response.
                with pytest.raises(trio.BrokenResourceError, match="reset"):
                    await stream.receive_some(100)
            while server.clients:
                await trio.sleep(0.01)


# -- connections ---------------------------------------------------------------------------------


async def test_hub_messages_and_close_codes() -> None:
    with trio.fail_after(TIMEOUT):
        async with lean_server() as (_, port):
            url = f"ws://127.0.0.1:{port}/ws"
            async with open_test_client(url) as ann, open_test_client(url) as bob:
                await ann.join("r")
                await bob.join("r")
                await ann.send({"type": "publish", "room": "r", "data": "hi"})
                assert (await bob.expect("message"))["data"] == "hi"
            peer = await WebSocketPeer.connect("127.0.0.1", port, "/ws")
            await peer.wait_accepted()
            await peer.send_raw_frame(0x1, b"ok \xff\xfe not utf-8")
            frames = await read_until_gone(peer)
            assert [f.code for f in frames if isinstance(f, CloseFrame)] == [1007]
            await peer.aclose()
            peer = await WebSocketPeer.connect("127.0.0.1", port, "/ws")
            await peer.wait_accepted()
            assert isinstance(await peer.receive_frame(), TextFrame)  # the hub's hello
            await peer.close(4321, "bye")
            frames = await read_until_gone(peer)
            assert CloseFrame(4321, "bye") in frames
            await peer.aclose()


def _server_side_h11_connections() -> int:
    return sum(
        1 for o in gc.get_objects() if isinstance(o, h11.Connection) and o.our_role is h11.SERVER
    )


async def test_an_open_connection_keeps_no_http_state() -> None:
    # Once the handshake is answered nothing holds the server's h11 connection
    # (about 2 KiB per idle connection).
    before = _server_side_h11_connections()
    with trio.fail_after(TIMEOUT):
        async with lean_server() as (_, port):
            url = f"ws://127.0.0.1:{port}/ws"
            async with open_test_client(url) as ann, open_test_client(url) as bob:
                await ann.join("r")
                await bob.join("r")
                assert _server_side_h11_connections() == before
                await ann.send({"type": "publish", "room": "r", "data": "still served"})
                assert (await bob.expect("message"))["data"] == "still served"


async def test_an_oversize_message_gets_1009() -> None:
    app = ASGIApp(Hub(), config=Config(max_message_bytes=1_000))
    with trio.fail_after(TIMEOUT):
        async with lean_server(app) as (_, port):
            peer = await WebSocketPeer.connect("127.0.0.1", port, "/ws")
            await peer.wait_accepted()
            await peer.send_text("x" * 1_500)  # over the limit: the actor closes
            frames = await read_until_gone(peer)
            assert [f.code for f in frames if isinstance(f, CloseFrame)] == [1009]
            await peer.aclose()
            peer = await WebSocketPeer.connect("127.0.0.1", port, "/ws")
            await peer.wait_accepted()
            await peer.send_raw_frame(0x1, b"y" * 2_500, fin=False)  # over twice: the transport
            frames = await read_until_gone(peer)
            assert [f.code for f in frames if isinstance(f, CloseFrame)] == [1009]
            await peer.aclose()


async def test_drain_sends_shutdown_then_1012_and_refuses_newcomers() -> None:
    hub = Hub(config=HubConfig(reconnect_min_ms=10, reconnect_max_ms=20))
    with trio.fail_after(TIMEOUT):
        async with lean_server(ASGIApp(hub), grace=1.0) as (server, port):
            url = f"ws://127.0.0.1:{port}/ws"
            async with open_test_client(url) as ann:
                await ann.join("r")
                hub.start_draining()
                status, headers, _ = await exchange(port, upgrade())
                assert status == 503
                assert "retry-after" in headers
                server.request_shutdown()
                closed = await ann.expect_closed(timeout=5)
                assert closed.code == 1012
                assert any(m["type"] == "shutdown" for m in ann.messages)
            assert server.shutting_down
            assert "stopping" in repr(server)
            assert hub.health().connections == 0


# -- the transport's own details ----------------------------------------------------------------


def test_text_frames_use_the_shortest_length_encoding() -> None:
    assert text_frame(b"x" * 125)[:2] == bytes((0x81, 125))
    assert text_frame(b"x" * 300)[:4] == bytes((0x81, 126, 1, 44))
    assert text_frame(b"x" * 70_000)[:10] == bytes((0x81, 127, 0, 0, 0, 0, 0, 1, 17, 112))
    assert len(text_frame(b"x" * 70_000)) == 70_010


async def test_fragmented_messages_are_reassembled_and_pings_answered() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_lean_pair(target="/ws?a=1") as (server, client):
            assert isinstance(server, LeanStream)
            assert "'/ws' handshake" in repr(server)
            await server.accept()
            await client.wait_accepted()
            assert isinstance(client, WebSocketPeer)
            await client.send_raw_frame(0x1, "hé".encode(), fin=False)
            await client.send_raw_frame(0x9, b"ping in between")  # answered, not a message
            await client.send_raw_frame(0x0, b"llo", fin=True)
            await client.send_raw_frame(0x2, b"\x00\x01", fin=False)
            await client.send_raw_frame(0x0, b"\x02", fin=True)
            assert await server.receive() == "héllo"
            assert await server.receive() == b"\x00\x01\x02"
            await server.send("still fine")
            assert await client.receive_frame() == TextFrame("still fine")
            assert "open" in repr(server)


async def test_accept_refuses_what_the_handshake_owns() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_lean_pair(subprotocols=["a"]) as (server, _):
            with pytest.raises(LocalProtocolError, match="not offered"):
                await server.accept(subprotocol="b")
            with pytest.raises(LocalProtocolError, match="cannot be set"):
                await server.accept(headers=(("Sec-WebSocket-Accept", "x"),))
            with pytest.raises(LocalProtocolError, match="cannot be set"):
                await server.accept(headers=(("connection", "close"),))
            await server.accept(subprotocol="a", headers=(("x-served-by", "lean"),))


async def test_malformed_upgrade_requests_get_400() -> None:
    base = "Host: t\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    with trio.fail_after(TIMEOUT):
        async with lean_server() as (_, port):
            for request in (
                f"POST /ws HTTP/1.1\r\n{base}Connection: Upgrade\r\n{key}Content-Length: 0\r\n\r\n",
                f"GET /ws HTTP/1.0\r\n{base}Connection: Upgrade\r\n{key}\r\n",
                f"GET /ws HTTP/1.1\r\n{base}Connection: keep-alive\r\n{key}\r\n",
            ):
                status, _, body = await exchange(port, request.encode())
                assert status == 400, body


async def test_refused_handshakes_are_counted_in_the_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    observed = ConnectionMetrics()
    monkeypatch.setattr(chatcore.metrics, "_metrics", observed)
    try:
        with trio.fail_after(TIMEOUT):
            async with lean_server() as (_, port):
                assert (await exchange(port, upgrade("/elsewhere")))[0] == 404
                assert (await exchange(port, upgrade(key="abc")))[0] == 400
    finally:
        observed.close()
    assert observed.handshakes == {404: 1, 400: 1}
