"""The transport conformance suite, run on every built-in transport.

Each check is its own test, so a failure names the transport and the check.
The memory transport runs on the autojump clock; trio-websocket runs on a
real loopback socket (the suite's waits are a fraction of a second there).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from chatcore import MessageStream, PeerGone, RemoteProtocolError
from chatcore.testing import (
    MESSAGE_STREAM_CHECKS,
    TransportPeer,
    WebSocketPeer,
    check_message_stream,
    open_lean_pair,
    open_memory_pair,
    open_trio_websocket_pair,
)
from chatcore.transports import CloseFrame, TextFrame


@pytest.mark.parametrize("check", MESSAGE_STREAM_CHECKS)
async def test_memory_transport(check: str, autojump_clock: trio.testing.MockClock) -> None:
    await check_message_stream(open_memory_pair, checks=[check])


@pytest.mark.parametrize("check", MESSAGE_STREAM_CHECKS)
async def test_trio_websocket_transport(check: str) -> None:
    await check_message_stream(open_trio_websocket_pair, checks=[check], check_timeout=5)


@pytest.mark.parametrize("check", MESSAGE_STREAM_CHECKS)
async def test_lean_transport(check: str) -> None:
    await check_message_stream(open_lean_pair, checks=[check], check_timeout=5)


async def test_whole_suite_in_one_call(autojump_clock: trio.testing.MockClock) -> None:
    await check_message_stream(open_memory_pair)


async def test_unknown_check_name() -> None:
    with pytest.raises(KeyError, match="no_such_check"):
        await check_message_stream(open_memory_pair, checks=["no_such_check"])


class _SwallowsPeerClose(MessageStream):
    """A broken transport: it reports the peer's close as a vanished link."""

    def __init__(self, inner: MessageStream) -> None:
        self.request = inner.request
        self._inner = inner

    async def accept(
        self, *, subprotocol: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        await self._inner.accept(subprotocol=subprotocol, headers=headers)

    async def reject(
        self, status: int, *, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        await self._inner.reject(status, body=body, headers=headers)

    async def receive(self) -> str | bytes:
        try:
            return await self._inner.receive()
        except PeerGone:
            raise PeerGone(None) from None

    async def send(self, text: str) -> None:
        await self._inner.send(text)

    async def close(self, code: int, reason: str = "") -> None:
        await self._inner.close(code, reason)

    async def abort(self) -> None:
        await self._inner.abort()


@asynccontextmanager
async def _broken_pair(
    *,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
) -> AsyncIterator[tuple[MessageStream, TransportPeer]]:
    async with open_memory_pair(target=target, headers=headers, subprotocols=subprotocols) as (
        server,
        client,
    ):
        yield _SwallowsPeerClose(server), client


async def test_the_suite_catches_a_broken_transport(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(AssertionError, match=r"peer_close: PeerGone\(None, ''\)"):
        await check_message_stream(_broken_pair, checks=["peer_close"])


# -- the peers themselves ------------------------------------------------------------------


async def test_websocket_peer_reads_a_close_frame_that_came_with_other_frames() -> None:
    """Text frames and the close frame in one read: three frames, not a "corrupt stream".

    wsproto moves to REMOTE_CLOSING while it parses the whole read; the peer
    must still tell a real close frame from a parse failure.
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = WebSocketPeer(client_stream)
    server = WSConnection(ConnectionType.SERVER)
    with trio.fail_after(1):
        await peer.send_request("/ws")
        server.receive_data(await server_stream.receive_some())
        assert isinstance(next(server.events()), Request)
        await server_stream.send_all(
            server.send(AcceptConnection())
            + server.send(TextMessage(data="a"))
            + server.send(TextMessage(data="b"))
            + server.send(CloseConnection(code=1012, reason="bye"))
        )
        assert await peer.wait_accepted() is None
        frames = [await peer.receive_frame() for _ in range(3)]
    assert frames == [TextFrame("a"), TextFrame("b"), CloseFrame(1012, "bye")]


async def test_websocket_peer_reports_corrupt_framing() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = WebSocketPeer(client_stream)
    server = WSConnection(ConnectionType.SERVER)
    with trio.fail_after(1):
        await peer.send_request("/ws")
        server.receive_data(await server_stream.receive_some())
        next(server.events())
        await server_stream.send_all(server.send(AcceptConnection()) + b"\x81\x02\xff\xfe")
        assert await peer.wait_accepted() is None
        with pytest.raises(RemoteProtocolError, match="invalid framing from the server"):
            await peer.receive_frame()
