"""Abuse on the wire: the handshake's limits, protocol errors, compression bombs.

Each attack is reproduced with a raw socket on 127.0.0.1 against both
transports: ``chatcore serve`` (hypercorn) as a process, and
:func:`chatcore.serve_websocket` (trio-websocket) in this process. Each test
asserts what the attacker gets (HTTP status and body, or close code and
reason), what the server keeps (open connections; memory for the bomb) and
that a bystander is still served. The pure parts (the head scanner, the
bounded inflater, the hypercorn hooks) are tested without a network at the
end. Every wait is bounded; every loop is bounded in count.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path

import attrs
import pytest
import trio
import wsproto.extensions
from test_serve_cli import chatcore_serve, http_get, url_of
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, TextMessage
from wsproto.frame_protocol import CloseReason, FrameProtocol

from chatcore import Config, HandshakeLimits, Hub, HubConfig, Reject, serve_websocket
from chatcore._wire_guard import (
    AnsweringConnection,
    BoundedPerMessageDeflate,
    DeclinedPerMessageDeflate,
    answer_protocol_errors,
    bounded_deflate,
    install_deflate,
)
from chatcore.sansio import (
    RequestHeadScanner,
    check_request_head,
    check_websocket_key,
)
from chatcore.testing import open_test_client
from chatcore.transports._asgi_stream import screen_request

pytestmark = pytest.mark.slow

TRANSPORTS = ["hypercorn", "lean", "trio-websocket"]
MIB = 1 << 20


# -- a raw WebSocket client ------------------------------------------------------------------


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    stretched = (key * (len(payload) // 4 + 1))[: len(payload)]
    xored = int.from_bytes(payload, "big") ^ int.from_bytes(stretched, "big")
    return xored.to_bytes(len(payload), "big")


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """One frame as a client would write it (``rsv``: 4 = RSV1, 2 = RSV2, 1 = RSV3)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(payload, key)


@cache
def bomb(inflated: int = 200 * MIB) -> bytes:
    """A permessage-deflate payload of ``inflated`` bytes of ``a`` (about 1/1000 of it)."""
    compressor = zlib.compressobj(wbits=-15)
    chunk = b"a" * MIB
    data = b"".join(compressor.compress(chunk) for _ in range(inflated // MIB))
    data += compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # the empty block every message ends with (RFC 7692, 7.2.1)


def request_head(
    *,
    target: str = "/ws",
    key: str | None = "dGhlIHNhbXBsZSBub25jZQ==",
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@attrs.frozen
class Response:
    status: int
    head: bytes
    body: bytes


@attrs.define
class RawClient:
    """A client that writes whatever bytes a test wants and reads the server's answer."""

    stream: trio.SocketStream
    buffer: bytearray = attrs.field(factory=bytearray)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> bool:
        """Write ``data``; False if the server closed before it all went out."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return False
        self.buffer += data
        return bool(data)

    async def response(self) -> Response:
        """The server's HTTP response head (and body, by ``content-length``)."""
        for _ in range(1000):
            if b"\r\n\r\n" in self.buffer:
                break
            if not await self._fill():
                raise AssertionError(f"no complete response: {bytes(self.buffer)!r}")
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.lower().split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip() == b"content-length":
                length = int(value)
        for _ in range(1000):
            if len(self.buffer) >= length or not await self._fill():
                break
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return Response(status, head, body)

    async def close_frame(self) -> tuple[int, str] | None:
        """Read frames up to the server's close frame: its code and reason.

        ``None`` if the TCP connection ended without one (a client sees 1006).
        """
        for _ in range(10_000):
            parsed = _take_frame(self.buffer)
            if parsed is not None:
                opcode, payload = parsed
                if opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                    return code, payload[2:].decode()
                continue  # a data frame (the hub's hello) or a ping
            if not await self._fill():
                return None
        raise AssertionError("too many frames before the close frame")

    async def aclose(self) -> None:
        await self.stream.aclose()


def _take_frame(buffer: bytearray) -> tuple[int, bytes] | None:
    """Remove one complete server frame (unmasked) from ``buffer``."""
    if len(buffer) < 2:
        return None
    size, offset = buffer[1] & 0x7F, 2
    if size == 126:
        if len(buffer) < 4:
            return None
        size, offset = struct.unpack("!H", buffer[2:4])[0], 4
    elif size == 127:
        if len(buffer) < 10:
            return None
        size, offset = struct.unpack("!Q", buffer[2:10])[0], 10
    if len(buffer) < offset + size:
        return None
    opcode = buffer[0] & 0x0F
    payload = bytes(buffer[offset : offset + size])
    del buffer[: offset + size]
    return opcode, payload


@asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(port)
    try:
        yield client
    finally:
        await client.aclose()


async def open_websocket(port: int, *, deflate: bool = False) -> RawClient:
    """A raw client whose handshake was accepted (101)."""
    client = await RawClient.connect(port)
    extra = (("Sec-WebSocket-Extensions", "permessage-deflate"),) if deflate else ()
    await client.send(request_head(extra=extra))
    response = await client.response()
    assert response.status == 101, response
    assert (b"permessage-deflate" in response.head.lower()) == deflate
    return client


# -- the two transports ----------------------------------------------------------------------


@attrs.define
class Target:
    """A running server: its port, and what it still holds."""

    transport: str
    port: int
    # The open connections of an in-process server (None: ask /healthz).
    connections: Callable[[], int] | None = None
    pid: int | None = None

    async def open_connections(self) -> int:
        if self.connections is not None:
            return self.connections()
        status, health = await http_get(self.port, "/healthz")
        assert status == 200
        return int(health["connections"])

    def memory(self) -> tuple[int, int]:
        """The server process's resident and peak resident memory, in bytes."""
        assert self.pid is not None
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
        )
        return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


@asynccontextmanager
async def serving(transport: str, tmp_path: Path, *options: str) -> AsyncIterator[Target]:
    """``chatcore serve`` (either engine) as a process, or ``serve_websocket`` in this process."""
    if transport in ("hypercorn", "lean"):
        engine = ("--engine", transport)
        async with chatcore_serve(
            "tests._serve_targets:app", *engine, *options, tmp_path=tmp_path
        ) as server:
            yield Target(transport, server.port, pid=server.pid)
        return
    hub = Hub(config=HubConfig(max_connections_per_user=10**6))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_websocket, hub, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        yield Target(transport, port, lambda: hub.health().connections)
        nursery.cancel_scope.cancel()


async def assert_bystander_served(port: int) -> None:
    """A well-behaved client joins, publishes and receives its own message."""
    async with open_test_client(url_of(port), timeout=10) as client:
        await client.join("lobby")
        offset = await client.publish("lobby", {"text": "still here"})
        message = await client.expect("message", room="lobby")
        assert message["offset"] == offset


async def wait_connections(target: Target, count: int) -> None:
    """Until the server holds ``count`` connections (closes finish asynchronously)."""
    for _ in range(200):
        if await target.open_connections() == count:
            return
        await trio.sleep(0.05)
    assert await target.open_connections() == count


# -- the handshake: 414 / 431 / 400 ----------------------------------------------------------

_KEY_15 = base64.b64encode(b"x" * 15).decode()
#: What each kind of bad head gets: (status, start of the body).
HANDSHAKE_CASES: dict[str, tuple[bytes, int, bytes]] = {
    "request line of 17 KB": (
        request_head(target="/ws?x=" + "a" * 17_000),
        414,
        b"request line too long (limit 8192 bytes)",
    ),
    "200 headers": (
        request_head(extra=tuple((f"x-h{i}", "v") for i in range(200))),
        431,
        b"too many header lines (limit 128)",
    ),
    "a header line of 9 KB": (
        request_head(extra=(("x-big", "b" * 9_000),)),
        431,
        b"header line too long (limit 8192 bytes)",
    ),
    "a head of 21 KB": (
        request_head(extra=tuple((f"x-h{i}", "c" * 7_000) for i in range(3))),
        431,
        b"request head too large (limit 16384 bytes)",
    ),
    "two keys": (
        request_head(extra=(("Sec-WebSocket-Key", "AQIDBAUGBwgJCgsMDQ4PEA=="),)),
        400,
        b"more than one Sec-WebSocket-Key header",
    ),
    "the key abc": (
        request_head(key="abc"),
        400,
        b"Sec-WebSocket-Key is not the base64 encoding of 16 bytes",
    ),
    "a key of 15 bytes": (
        request_head(key=_KEY_15),
        400,
        b"Sec-WebSocket-Key is not the base64 encoding of 16 bytes",
    ),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bad_handshakes_get_their_status(transport: str, tmp_path: Path) -> None:
    async with serving(transport, tmp_path) as target:
        with trio.fail_after(30):
            got = {}
            for name, (head, _, _) in HANDSHAKE_CASES.items():
                async with raw_client(target.port) as client:
                    await client.send(head)
                    response = await client.response()
                    got[name] = (response.status, response.body.rstrip(b"\n"))
                    # The server closes the connection after a refusal.
                    assert await client.close_frame() is None
            expected = {name: (status, body) for name, (_, status, body) in HANDSHAKE_CASES.items()}
            assert got == expected
            # A plain HTTP request gets the same limits.
            async with raw_client(target.port) as client:
                await client.send(
                    f"GET /healthz?x={'a' * 17_000} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
                )
                response = await client.response()
                assert (response.status, response.body) == (414, HANDSHAKE_REFUSAL_414.body)
            await assert_bystander_served(target.port)
            await wait_connections(target, 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_missing_key_is_400(transport: str, tmp_path: Path) -> None:
    # Both servers' own HTTP layers refuse it (hypercorn and wsproto), with no body.
    async with serving(transport, tmp_path) as target:
        with trio.fail_after(30):
            async with raw_client(target.port) as client:
                await client.send(request_head(key=None))
                assert (await client.response()).status == 400
            await assert_bystander_served(target.port)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_head_that_never_ends_is_431_at_the_bound(transport: str, tmp_path: Path) -> None:
    """A head trickled in 1 KiB pieces is refused once it passes 16 KiB, not buffered on."""
    async with serving(transport, tmp_path) as target:
        with trio.fail_after(30):
            async with raw_client(target.port) as client:
                sent = 0

                async def trickle() -> None:
                    nonlocal sent
                    head = request_head()[:-2]  # without the blank line that would end it
                    await client.send(head)
                    sent = len(head)
                    for i in range(64):  # 64 KiB at most, four times the bound
                        await trio.sleep(0.01)  # separate reads on the server
                        # Counted before the send returns: the server may read
                        # this piece and answer before this task runs again.
                        sent += 1024
                        if not await client.send(f"x-pad{i:02}: {'p' * 1012}\r\n".encode()):
                            return

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    response = await client.response()
                    answered_at = sent
                    nursery.cancel_scope.cancel()
            assert response.status == 431
            assert 16 * 1024 <= answered_at <= 24 * 1024
            await assert_bystander_served(target.port)


# -- protocol errors: 1002 / 1007 with a reason ----------------------------------------------

_UTF8_REASON = "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
#: What each kind of bad frame gets: (frame, close code, reason).
PROTOCOL_CASES: dict[str, tuple[bytes, int, str]] = {
    "unmasked frame": (
        frame(0x1, b"hi", masked=False),
        1002,
        "server received unexpected unmasked frame",
    ),
    "reserved bit RSV2": (frame(0x1, b"hi", rsv=2), 1002, "Reserved bit set unexpectedly"),
    "unknown opcode 0x3": (frame(0x3, b"hi"), 1002, "Invalid opcode 0x3"),
    "ping of 126 bytes": (frame(0x9, b"p" * 126), 1002, "Control frame with payload len > 125"),
    "close code 999": (frame(0x8, struct.pack("!H", 999)), 1002, "CLOSE with invalid code"),
    "close code 1005": (
        frame(0x8, struct.pack("!H", 1005)),
        1002,
        "remote CLOSE with local-only reason",
    ),
    "continuation first": (frame(0x0, b"hi"), 1002, "unexpected CONTINUATION"),
    "invalid UTF-8": (frame(0x1, b"\xff\xfe"), 1007, _UTF8_REASON),
    # Compression was not negotiated (off by default), so RSV1 is reserved too.
    "compressed without deflate": (frame(0x1, b"hi", rsv=4), 1002, "Reserved bit set unexpectedly"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_protocol_errors_are_answered_with_a_close_frame(
    transport: str, tmp_path: Path
) -> None:
    async with serving(transport, tmp_path) as target:
        with trio.fail_after(30):
            got = {}
            for name, (bad, _, _) in PROTOCOL_CASES.items():
                client = await open_websocket(target.port)
                try:
                    await client.send(bad)
                    got[name] = await client.close_frame()
                finally:
                    await client.aclose()
            expected = {name: (code, reason) for name, (_, code, reason) in PROTOCOL_CASES.items()}
            assert got == expected
            await assert_bystander_served(target.port)
            await wait_connections(target, 0)


# -- the compression bomb ------------------------------------------------------------------------


async def send_bomb(port: int) -> tuple[int, str] | None:
    """One connection with permessage-deflate sends a 200 MB bomb; the server's close frame."""
    client = await open_websocket(port, deflate=True)
    try:
        async with trio.open_nursery() as nursery:
            # The server may close while the frame is still being written.
            nursery.start_soon(client.send, frame(0x1, bomb(), rsv=4))
            answer = await client.close_frame()
            nursery.cancel_scope.cancel()
        return answer
    finally:
        await client.aclose()


async def test_a_compression_bomb_is_1009_before_it_costs_memory(tmp_path: Path) -> None:
    async with serving("hypercorn", tmp_path, "--compression") as target:
        with trio.fail_after(60):
            assert len(bomb()) < 250_000  # 200 MB of text in about 200 KB on the wire
            await assert_bystander_served(target.port)
            before, _ = target.memory()
            too_big = (1009, "message too big: inflates past 65536 bytes")
            assert await send_bomb(target.port) == too_big
            results: list[tuple[int, str] | None] = []

            async def one() -> None:
                results.append(await send_bomb(target.port))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)
            assert results == [too_big] * 4
            after, peak = target.memory()
            await assert_bystander_served(target.port)
            await wait_connections(target, 0)
    # Without the bound, each bomb took ~200 MB at its peak (four at once:
    # +610 MB). Now five cost a few hundred KB; 8 MiB each is a generous bound.
    assert peak - before < 5 * 8 * MIB, (before, peak, after)
    assert after - before < 5 * 8 * MIB


# -- the bounded inflater, back to back with wsproto (no network) --------------------------------


def _deflate_pair(limit: int) -> tuple[Connection, FrameProtocol]:
    """A server connection with bounded deflate, and a client-side frame writer."""
    server_extension = bounded_deflate(limit)()
    assert server_extension.accept("permessage-deflate") is not None
    server = Connection(ConnectionType.SERVER, [server_extension])
    client_extension = wsproto.extensions.PerMessageDeflate()
    client_extension.finalize("permessage-deflate")
    return server, FrameProtocol(client=True, extensions=[client_extension])


def _events(server: Connection, data: bytes) -> list[Event]:
    server.receive_data(data)
    return list(server.events())


def _text(events: list[Event]) -> str:
    return "".join(event.data for event in events if isinstance(event, TextMessage))


def test_bounded_deflate_passes_a_message_at_the_limit_and_fails_one_byte_over() -> None:
    server, client = _deflate_pair(1000)
    assert _text(_events(server, bytes(client.send_data("a" * 1000)))) == "a" * 1000
    # Context takeover: the next messages use the same window, still bounded each.
    assert _text(_events(server, bytes(client.send_data("b" * 999)))) == "b" * 999
    events = _events(server, bytes(client.send_data("c" * 1001)))
    assert events == [
        CloseConnection(
            code=CloseReason.MESSAGE_TOO_BIG, reason="message too big: inflates past 1000 bytes"
        )
    ]


def test_bounded_deflate_counts_a_message_across_its_frames() -> None:
    server, client = _deflate_pair(1000)
    data = bytes(client.send_data("d" * 600, fin=False)) + bytes(client.send_data("d" * 600))
    events = _events(server, data)
    assert isinstance(events[-1], CloseConnection)
    assert events[-1].code == CloseReason.MESSAGE_TOO_BIG
    assert len(_text(events)) <= 1000


def test_bounded_deflate_never_inflates_much_past_the_limit() -> None:
    # The whole 200 MB bomb in one chunk: zlib is asked for limit + 1 bytes.
    server, _ = _deflate_pair(65_536)
    events = _events(server, frame(0x1, bomb(), rsv=4))
    assert len(_text(events)) <= 65_536
    assert isinstance(events[-1], CloseConnection)
    assert events[-1].code == CloseReason.MESSAGE_TOO_BIG


def test_bounded_deflate_rejects_corrupt_data_with_1007() -> None:
    server, _ = _deflate_pair(1000)
    events = _events(server, frame(0x1, b"\xff\xff\xff\xff", rsv=4))
    assert [type(e) for e in events] == [CloseConnection]
    assert events[0].code == CloseReason.INVALID_FRAME_PAYLOAD_DATA  # type: ignore[attr-defined]


def test_bounded_deflate_classes() -> None:
    assert bounded_deflate(1000) is bounded_deflate(1000)
    assert bounded_deflate(1000).max_message_bytes == 1000
    assert repr(bounded_deflate(1000)()).endswith("; max_message_bytes=1000>")
    assert issubclass(bounded_deflate(1000), BoundedPerMessageDeflate)
    assert DeclinedPerMessageDeflate().accept("permessage-deflate") is None
    with pytest.raises(ValueError, match="must be > 0"):
        bounded_deflate(0)


def test_uncompressed_messages_pass_a_bounded_deflate_untouched() -> None:
    server, _ = _deflate_pair(10)
    assert _text(_events(server, frame(0x1, b"x" * 100))) == "x" * 100


# -- the hypercorn hooks (they fail if hypercorn stops looking the names up) ---------------------


def test_answering_connection_turns_a_parse_failure_into_a_close_to_answer() -> None:
    server = AnsweringConnection(ConnectionType.SERVER)
    events = _events(server, frame(0x3, b"x"))
    assert events == [CloseConnection(code=1002, reason="Invalid opcode 0x3")]
    states = [server.state]
    # What hypercorn sends for it: the close frame with that code and reason.
    answer = server.send(events[0].response())  # type: ignore[attr-defined]
    assert answer == bytes(
        FrameProtocol(client=False, extensions=[]).close(1002, "Invalid opcode 0x3")
    )
    states.append(server.state)
    assert states == [ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED]
    # A real close from the peer is left alone.
    peer = AnsweringConnection(ConnectionType.SERVER)
    assert _events(peer, frame(0x8, struct.pack("!H", 1000))) == [
        CloseConnection(code=1000, reason="")
    ]
    assert peer.state is ConnectionState.REMOTE_CLOSING


def test_hypercorn_builds_its_websocket_connections_from_the_rebound_names() -> None:
    from hypercorn.protocol.ws_stream import Handshake

    headers = [
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-extensions", b"permessage-deflate"),
    ]
    previous = answer_protocol_errors(True)
    try:
        install_deflate(True, 4096)
        _, response, connection = Handshake(headers, "1.1").accept(None, [])
        assert type(connection) is AnsweringConnection
        assert (b"sec-websocket-extensions", b"permessage-deflate") in response
        extensions = connection._proto.extensions
        assert [type(e) for e in extensions] == [bounded_deflate(4096)]
        install_deflate(False, 4096)
        _, response, connection = Handshake(headers, "1.1").accept(None, [])
        assert not any(name == b"sec-websocket-extensions" for name, _ in response)
        assert answer_protocol_errors(False) is True
        _, _, connection = Handshake(headers, "1.1").accept(None, [])
        assert type(connection) is Connection
    finally:
        install_deflate(True, 65_536)
        answer_protocol_errors(previous)


def test_hooks_refuse_a_hypercorn_that_moved_the_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from hypercorn.protocol import ws_stream

    monkeypatch.delattr(ws_stream, "Connection")
    monkeypatch.setattr(ws_stream, "PerMessageDeflate", object())
    with pytest.raises(RuntimeError, match="protocol errors"):
        answer_protocol_errors(True)
    with pytest.raises(RuntimeError, match="permessage-deflate"):
        install_deflate(True, 65_536)


# -- the head scanner and checks (no network) ------------------------------------------------


def _scan(
    data: bytes, *, pieces: int = 1, limits: HandshakeLimits | None = None
) -> RequestHeadScanner:
    scanner = RequestHeadScanner(limits or HandshakeLimits())
    step = max(1, -(-len(data) // pieces))
    for start in range(0, len(data), step):
        scanner.feed(data[start : start + step])
    return scanner


@pytest.mark.parametrize("pieces", [1, 7, 1000])
def test_scanner_passes_a_normal_head_in_any_pieces(pieces: int) -> None:
    head = request_head(extra=(("Cookie", "c" * 4000),))
    scanner = _scan(head + frame(0x1, b"after the head"), pieces=pieces)
    assert scanner.complete
    assert scanner.refusal is None
    assert "complete" in repr(scanner)


@pytest.mark.parametrize("pieces", [1, 9, 5000])
@pytest.mark.parametrize(
    "name", sorted(set(HANDSHAKE_CASES) - {"two keys", "the key abc", "a key of 15 bytes"})
)
def test_scanner_refuses_each_excess_in_any_pieces(name: str, pieces: int) -> None:
    head, status, body = HANDSHAKE_CASES[name]
    scanner = _scan(head, pieces=pieces)
    assert scanner.refusal is not None
    assert (scanner.refusal.status, scanner.refusal.body.rstrip(b"\n")) == (status, body)
    assert not scanner.complete
    assert "refused" in repr(scanner)
    # Once refused, it reads nothing more.
    assert scanner.feed(b"\r\n\r\n") is scanner.refusal


def test_scanner_bounds_are_exact() -> None:
    limits = HandshakeLimits(
        max_request_line_bytes=20, max_header_line_bytes=10, max_headers=2, max_head_bytes=60
    )
    line = b"GET /" + b"a" * 6 + b" HTTP/1.1"  # 20 bytes
    assert _scan(line + b"\r\nab: 123456\r\n\r\n", limits=limits).complete
    assert _scan(line[:-1] + b"1a\r\n", limits=limits).refusal.status == 414  # type: ignore[union-attr]
    assert _scan(line + b"\nab: 1234567\n", limits=limits).refusal.status == 431  # type: ignore[union-attr]
    assert _scan(line + b"\r\na: 1\r\nb: 2\r\nc: 3\r\n", limits=limits).refusal.status == 431  # type: ignore[union-attr]
    # Bare LF line ends, and a CR that arrives in one piece and its LF in the next.
    scanner = RequestHeadScanner(limits)
    for piece in (line, b"\r", b"\nab: 123456\r", b"\n", b"\r", b"\n"):
        assert scanner.feed(piece) is None
    assert scanner.complete
    # Blank lines before the request line are skipped but count toward the head.
    assert _scan(b"\r\n" * 31, limits=limits).refusal.status == 431  # type: ignore[union-attr]
    assert "reading" in repr(RequestHeadScanner(limits))


def test_check_request_head_matches_the_scanner() -> None:
    limits = HandshakeLimits()
    for name, (head, status, body) in HANDSHAKE_CASES.items():
        if status == 400:
            continue
        request_line, *lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")
        target = request_line.split(b" ")[1]
        headers = [tuple(line.split(b": ", 1)) for line in lines]
        refusal = check_request_head(target, headers, limits)  # type: ignore[arg-type]
        assert refusal is not None, name
        assert (refusal.status, refusal.body.rstrip(b"\n")) == (status, body), name
    assert check_request_head(b"/ws", [(b"host", b"x")], limits) is None


def test_check_websocket_key() -> None:
    good = ("Sec-WebSocket-Key", " dGhlIHNhbXBsZSBub25jZQ== ")
    assert check_websocket_key([good]) is None
    for headers, reason in (
        ([], b"missing Sec-WebSocket-Key header\n"),
        ([good, good], b"more than one Sec-WebSocket-Key header\n"),
        (
            [("sec-websocket-key", "abc")],
            b"Sec-WebSocket-Key is not the base64 encoding of 16 bytes\n",
        ),
        (
            [("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ")],
            b"Sec-WebSocket-Key is not the base64 encoding of 16 bytes\n",
        ),
        (
            [("sec-websocket-key", "dGhlIHNhbXBsZSBub25j\u00e9Q==")],
            b"Sec-WebSocket-Key is not the base64 encoding of 16 bytes\n",
        ),
    ):
        refusal = check_websocket_key(headers)
        assert refusal is not None
        assert (refusal.status, refusal.body) == (400, reason)


def test_handshake_limits_are_validated() -> None:
    assert Config().handshake_limits == HandshakeLimits(8_192, 8_192, 128, 16_384)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="must be an int > 0"):
            HandshakeLimits(max_headers=bad)  # type: ignore[arg-type]


def test_screen_request_reads_the_asgi_scope() -> None:
    limits = HandshakeLimits()
    key = (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")
    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "headers": [key]}
    assert screen_request(scope, limits) is None
    # The query string counts toward the request line.
    long_query = {**scope, "query_string": b"t=" + b"q" * 8_200}
    assert screen_request(long_query, limits) == HANDSHAKE_REFUSAL_414
    # HTTP/2 WebSockets (RFC 8441) carry no key; HTTP/1.1 ones must.
    assert screen_request({**scope, "headers": [], "http_version": "2"}, limits) is None
    missing = screen_request({**scope, "headers": []}, limits)
    assert missing is not None
    assert (missing.status, missing.body) == (400, b"missing Sec-WebSocket-Key header\n")
    # Plain HTTP requests get the head limits, not the key check.
    assert screen_request({**scope, "type": "http", "headers": []}, limits) is None
    assert screen_request({**long_query, "type": "http"}, limits) == HANDSHAKE_REFUSAL_414
    malformed = screen_request({**scope, "headers": [(b"x", None)]}, limits)
    assert malformed is not None
    assert (malformed.status, malformed.body) == (400, b"malformed request\n")


HANDSHAKE_REFUSAL_414 = Reject(414, b"request line too long (limit 8192 bytes)\n")


# -- ASGIApp in memory: the refusal happens before any connection starts --------------------


@pytest.mark.parametrize(
    ("headers", "status", "body"),
    [
        (
            [("sec-websocket-key", "abc")],
            400,
            b"Sec-WebSocket-Key is not the base64 encoding of 16 bytes\n",
        ),
        ([(f"x-h{i}", "v") for i in range(200)], 431, b"too many header lines (limit 128)\n"),
    ],
)
async def test_asgi_app_refuses_before_the_hub_sees_the_handshake(
    headers: list[tuple[str, str]], status: int, body: bytes, nursery: trio.Nursery
) -> None:
    from _asgi_driver import ASGIWebSocketDriver

    from chatcore.asgi import ASGIApp

    hub = Hub()
    driver = ASGIWebSocketDriver(ASGIApp(hub), target="/ws", headers=headers)
    with trio.fail_after(10):
        await nursery.start(driver.run)
        await driver.app_returned.wait()
    assert driver.refusal is not None
    assert (driver.refusal.status, driver.refusal.body) == (status, body)
    assert hub.health().connections == 0
    assert hub.statistics().rejected_handshakes == 0  # the hub never saw it


def test_set_compression_refuses_a_hypercorn_that_moved_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hypercorn.protocol import ws_stream

    from chatcore._serve import set_compression

    monkeypatch.setattr(ws_stream, "PerMessageDeflate", object())
    with pytest.raises(RuntimeError, match="run with compression disabled"):
        set_compression(True)
    with pytest.raises(RuntimeError, match="run with compression enabled"):
        set_compression(False)


async def test_a_client_that_resets_after_an_oversized_head_harms_nothing(tmp_path: Path) -> None:
    async with serving("trio-websocket", tmp_path) as target:
        with trio.fail_after(30):
            for _ in range(3):
                client = await RawClient.connect(target.port)
                await client.send(request_head(target="/ws?x=" + "a" * 17_000))
                # Reset at once: the server's answer or its draining read fails.
                client.stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                await client.aclose()
            await assert_bystander_served(target.port)
            await wait_connections(target, 0)


def test_chatcore_serve_gives_hypercorn_the_head_bound() -> None:
    from chatcore._serve import hypercorn_config
    from chatcore.asgi import ASGIApp

    limits = HandshakeLimits(max_head_bytes=4_096)
    config = hypercorn_config(ASGIApp(Hub(), config=Config(handshake_limits=limits)))
    assert config.h11_max_incomplete_size == 4_096
    assert hypercorn_config(ASGIApp(Hub())).h11_max_incomplete_size == 16_384
