"""The transport conformance suite: one contract, checked the same way everywhere.

A transport is correct when :func:`check_message_stream` passes for it. The
suite drives a server-side :class:`~chatcore.MessageStream` against a client
that speaks the :class:`TransportPeer` protocol, and checks what the
connection actor relies on: messages both ways and in order, close frames
exactly once with the right code, one ``PeerGone`` signal for every way a
peer can go, single-shot handshake answers, and that an interrupted send
never leaves a corrupt stream behind.

Two pair factories come with it: :func:`open_memory_pair` (the in-memory
transport, with a :class:`~chatcore.testing.MemoryPeer` as the client) and
:func:`open_trio_websocket_pair` (trio-websocket on a loopback socket, with a
:class:`~chatcore.testing.WebSocketPeer` on the other end).
``docs/transports.md`` shows how to run the suite on a new transport.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, TypeVar

import trio

from .._config import Config
from .._exceptions import HandshakeRejected, LocalProtocolError, PeerGone, RemoteProtocolError
from .._transport import MessageStream
from ..sansio import HandshakeRequest
from ..transports._lean import LeanStream, drop_socket, read_request_head
from ..transports._memory import CloseFrame, TextFrame, memory_stream_pair
from ..transports._trio_websocket import open_trio_websocket_stream
from ._peers import Frame, MemoryPeer, TransportPeer, WebSocketPeer

__all__ = [
    "MESSAGE_STREAM_CHECKS",
    "PairFactory",
    "check_message_stream",
    "open_lean_pair",
    "open_memory_pair",
    "open_trio_websocket_pair",
]


class PairFactory(Protocol):
    """What :func:`check_message_stream` needs: a way to make connected pairs.

    Called with a request target, headers and offered subprotocols, it returns
    an async context manager that yields ``(server, client)``: the server's
    :class:`~chatcore.MessageStream` with the handshake received and not yet
    answered, and the client. Leaving the context releases both.
    """

    def __call__(
        self,
        *,
        target: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
    ) -> AbstractAsyncContextManager[tuple[MessageStream, TransportPeer]]: ...


# -- pair factories ------------------------------------------------------------------


@asynccontextmanager
async def open_memory_pair(
    *,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    capacity: int = 64,
) -> AsyncIterator[tuple[MessageStream, TransportPeer]]:
    """A :class:`PairFactory` for the in-memory transport.

    Args:
        target: Path and query string of the handshake.
        headers: Handshake headers (names are lowercased, as transports do).
        subprotocols: Offered subprotocols.
        capacity: Frames buffered per direction.
    """
    path, _, query = target.partition("?")
    request = HandshakeRequest(
        path=path,
        query_string=query,
        headers=tuple((name.lower(), value) for name, value in headers),
        client=("127.0.0.1", 1),
        subprotocols=tuple(subprotocols),
    )
    server, client = memory_stream_pair(request, capacity=capacity)
    try:
        yield server, MemoryPeer(client)
    finally:
        await server.abort()


@asynccontextmanager
async def open_trio_websocket_pair(
    *,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    config: Config | None = None,
    buffer_size: int | None = 65_536,
) -> AsyncIterator[tuple[MessageStream, TransportPeer]]:
    """A :class:`PairFactory` for trio-websocket over a loopback TCP connection.

    The server side comes from :func:`~chatcore.transports.open_trio_websocket_stream`;
    the client is a :class:`WebSocketPeer`.

    Args:
        target: Path and query string of the handshake.
        headers: Extra handshake headers.
        subprotocols: Offered subprotocols.
        config: The server's bounds (default :class:`~chatcore.Config` ``()``).
        buffer_size: Kernel buffer sizes (client receive, server send), so a
            client that stops reading stalls the server after little data;
            ``None`` keeps the kernel's defaults.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        peer = await WebSocketPeer.connect(
            "127.0.0.1",
            port,
            target,
            headers=headers,
            subprotocols=subprotocols,
            receive_buffer=buffer_size,
        )
        server_stream = await listeners[0].accept()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
    if buffer_size is not None:
        server_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
    try:
        async with open_trio_websocket_stream(server_stream, config=config) as server:
            yield server, peer
    finally:
        await peer.aclose()


@asynccontextmanager
async def open_lean_pair(
    *,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    config: Config | None = None,
    buffer_size: int | None = 65_536,
) -> AsyncIterator[tuple[MessageStream, TransportPeer]]:
    """A :class:`PairFactory` for the lean engine's transport over loopback TCP.

    The server side is a :class:`~chatcore.transports.LeanStream` on the
    accepted socket; the client is a :class:`WebSocketPeer`.

    Args:
        target: Path and query string of the handshake.
        headers: Extra handshake headers.
        subprotocols: Offered subprotocols.
        config: The server's bounds (default :class:`~chatcore.Config` ``()``).
        buffer_size: Kernel buffer sizes (client receive, server send), as
            for :func:`open_trio_websocket_pair`; ``None`` keeps the defaults.
    """
    cfg = config or Config()
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        peer = await WebSocketPeer.connect(
            "127.0.0.1",
            listener.getsockname()[1],
            target,
            headers=headers,
            subprotocols=subprotocols,
            receive_buffer=buffer_size,
        )
        await trio.lowlevel.wait_readable(listener)
        sock, _ = listener.accept()
    finally:
        drop_socket(listener, graceful=True)
    sock.setblocking(False)
    if buffer_size is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
    try:
        with trio.fail_after(cfg.handshake_timeout):
            head = await read_request_head(sock, cfg.handshake_limits)
        server = LeanStream(sock, head, cfg.max_message_bytes)
        try:
            yield server, peer
        finally:
            await server.abort()
    finally:
        drop_socket(sock, graceful=False)
        await peer.aclose()


# -- the checks ----------------------------------------------------------------------

_E = TypeVar("_E", bound=BaseException)
_Check = Callable[[PairFactory], Awaitable[None]]
_CHECKS: dict[str, _Check] = {}


def _check(fn: _Check) -> _Check:
    _CHECKS[fn.__name__.removeprefix("_check_")] = fn
    return fn


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


async def _raises(kind: type[_E], what: str, call: Callable[[], Awaitable[object]]) -> _E:
    """Await ``call()`` and return the ``kind`` exception it must raise."""
    try:
        await call()
    except kind as exc:
        return exc
    except Exception as exc:
        raise AssertionError(f"{what}: expected {kind.__name__}, got {exc!r}") from exc
    raise AssertionError(f"{what}: expected {kind.__name__}, nothing was raised")


async def _returns_or_peer_gone(what: str, call: Callable[[], Awaitable[object]]) -> None:
    try:
        await call()
    except PeerGone:
        pass
    except Exception as exc:
        raise AssertionError(f"{what}: may only raise PeerGone, raised {exc!r}") from exc


async def _no_raise(what: str, call: Callable[[], Awaitable[object]]) -> None:
    try:
        await call()
    except Exception as exc:
        raise AssertionError(f"{what}: must never raise, raised {exc!r}") from exc


async def _accepted(server: MessageStream, client: TransportPeer) -> None:
    await server.accept()
    _expect(await client.wait_accepted() is None, "no subprotocol was selected")


async def _expect_link_dropped(client: TransportPeer, what: str) -> None:
    """The client reads to the end: complete text frames at most, then PeerGone."""
    while True:
        try:
            frame = await client.receive_frame()
        except PeerGone:
            return
        _expect(not isinstance(frame, CloseFrame), f"{what}: unexpected close frame {frame}")


def _close_frames(client: TransportPeer) -> list[CloseFrame]:
    return [f for f in client.frames if isinstance(f, CloseFrame)]


@_check
async def _check_handshake_request(make_pair: PairFactory) -> None:
    """Path, query, headers and subprotocols reach the request; the choice reaches the client."""
    async with make_pair(
        target="/chat/room?user=ann&x=1",
        headers=[("X-Chatcore-Test", "yes"), ("Origin", "http://example.test")],
        subprotocols=["chat.v1", "chat.v2"],
    ) as (server, client):
        request = server.request
        _expect(request.path == "/chat/room", f"path: {request.path!r}")
        _expect(request.query_string == "user=ann&x=1", f"query: {request.query_string!r}")
        _expect(request.query == {"user": "ann", "x": "1"}, f"query: {request.query!r}")
        _expect(request.header("x-chatcore-test") == "yes", f"headers: {request.headers!r}")
        _expect(request.origin == "http://example.test", f"origin: {request.origin!r}")
        _expect(
            all(name == name.lower() for name, _ in request.headers),
            f"header names must be lowercase: {request.headers!r}",
        )
        _expect(
            request.subprotocols == ("chat.v1", "chat.v2"),
            f"subprotocols: {request.subprotocols!r}",
        )
        await server.accept(subprotocol="chat.v2")
        selected = await client.wait_accepted()
        _expect(selected == "chat.v2", f"selected subprotocol: {selected!r}")


@_check
async def _check_text_both_ways(make_pair: PairFactory) -> None:
    """A text message each way arrives unchanged (non-ASCII included)."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await client.send_text("héllo ✓ 🙂")
        got = await server.receive()
        _expect(got == "héllo ✓ 🙂", f"server received {got!r}")
        await server.send("wörld ✓ 🙂")
        frame = await client.receive_frame()
        _expect(frame == TextFrame("wörld ✓ 🙂"), f"client received {frame!r}")


@_check
async def _check_binary_in(make_pair: PairFactory) -> None:
    """A binary frame is received as ``bytes`` (the actor closes with 1003)."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await client.send_bytes(b"\x00\x01\xfe\xff")
        got = await server.receive()
        _expect(got == b"\x00\x01\xfe\xff", f"server received {got!r}")


@_check
async def _check_order(make_pair: PairFactory) -> None:
    """Many messages each way, sent concurrently, arrive complete and in order."""
    count = 300
    async with make_pair() as (server, client):
        await _accepted(server, client)
        received_by_server: list[str | bytes] = []
        received_by_client: list[Frame] = []

        async def server_sends() -> None:
            for i in range(count):
                await server.send(f"s{i}")

        async def client_sends() -> None:
            for i in range(count):
                await client.send_text(f"c{i}")

        async def server_receives() -> None:
            for _ in range(count):
                received_by_server.append(await server.receive())

        async def client_receives() -> None:
            for _ in range(count):
                received_by_client.append(await client.receive_frame())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_sends)
            nursery.start_soon(client_sends)
            nursery.start_soon(server_receives)
            nursery.start_soon(client_receives)
        _expect(received_by_server == [f"c{i}" for i in range(count)], "client->server order")
        _expect(
            received_by_client == [TextFrame(f"s{i}") for i in range(count)],
            "server->client order",
        )


@_check
async def _check_large_messages(make_pair: PairFactory) -> None:
    """Messages of tens of KiB (under the default 64 KiB limit) go both ways."""
    inbound = "ü" * 20_000 + "x" * 20_000  # 60,000 UTF-8 bytes
    outbound = "y" * 200_000
    async with make_pair() as (server, client):
        await _accepted(server, client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_text, inbound)
            got = await server.receive()
        _expect(got == inbound, f"server received {len(got)} chars, not the message")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send, outbound)
            frame = await client.receive_frame()
        _expect(frame == TextFrame(outbound), "client did not receive the large message")


@_check
async def _check_server_close(make_pair: PairFactory) -> None:
    """close(code, reason): the client sees that close frame once; then the stream is done."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.close, 4002, "kicked")
            frame = await client.receive_frame()
        _expect(frame == CloseFrame(4002, "kicked"), f"client received {frame!r}")
        await _raises(PeerGone, "client receive after the close", client.receive_frame)
        _expect(len(_close_frames(client)) == 1, f"close frames: {client.frames!r}")
        await _raises(PeerGone, "send after close", lambda: server.send("late"))
        await _raises(PeerGone, "receive after close", server.receive)
        await _returns_or_peer_gone("second close", lambda: server.close(1000))
        await _no_raise("abort after close", server.abort)
        await _no_raise("second abort", server.abort)
        _expect(len(_close_frames(client)) == 1, "a second close frame was sent")


@_check
async def _check_peer_close(make_pair: PairFactory) -> None:
    """The peer's close: PeerGone with its code and reason, answered with one close frame."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await client.close(4100, "bye")
        gone = await _raises(PeerGone, "receive after the peer's close", server.receive)
        _expect((gone.code, gone.reason) == (4100, "bye"), f"PeerGone{(gone.code, gone.reason)}")
        again = await _raises(PeerGone, "second receive", server.receive)
        _expect(again.code == 4100, f"second PeerGone code {again.code}")
        frame = await client.receive_frame()
        _expect(frame == CloseFrame(4100, "bye"), f"the close answer was {frame!r}")
        await _raises(PeerGone, "client receive after the close handshake", client.receive_frame)
        await _raises(PeerGone, "send after the peer's close", lambda: server.send("late"))
        await _returns_or_peer_gone("close after the peer's close", lambda: server.close(1000))
        await _no_raise("abort", server.abort)
        _expect(len(_close_frames(client)) == 1, f"close frames: {client.frames!r}")


@_check
async def _check_crossing_closes(make_pair: PairFactory) -> None:
    """Both sides close at once: the server's close ends, the client sees one close frame."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await client.close(4004, "client")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_returns_or_peer_gone, "crossing close", lambda: server.close(4003))
            frame = await client.receive_frame()
        _expect(
            isinstance(frame, CloseFrame) and frame.code in (4003, 4004),
            f"client received {frame!r}",
        )
        await _raises(PeerGone, "client receive after the close", client.receive_frame)
        _expect(len(_close_frames(client)) == 1, f"close frames: {client.frames!r}")
        await _no_raise("abort", server.abort)


@_check
async def _check_peer_vanishes(make_pair: PairFactory) -> None:
    """A peer that drops the link: PeerGone(None) from a pending receive, send and close."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        gone: list[PeerGone] = []

        async def receive() -> None:
            gone.append(await _raises(PeerGone, "receive after vanish", server.receive))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await client.vanish()
        _expect(gone[0].code is None, f"vanish gave code {gone[0].code}")
        sent = await _raises(PeerGone, "send after vanish", lambda: server.send("x"))
        _expect(sent.code is None, f"send after vanish gave code {sent.code}")
        await _raises(PeerGone, "close after vanish", lambda: server.close(1000))
        await _no_raise("abort after vanish", server.abort)


@_check
async def _check_abort(make_pair: PairFactory) -> None:
    """abort() drops the link at once: a pending receive ends, the client sees no close."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await server.send("before")
        gone: list[PeerGone] = []

        async def receive() -> None:
            gone.append(await _raises(PeerGone, "receive during abort", server.receive))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await _no_raise("abort", server.abort)
        _expect(gone[0].code is None, f"receive during abort gave code {gone[0].code}")
        await _no_raise("second abort", server.abort)
        await _expect_link_dropped(client, "after abort")
        await _raises(PeerGone, "send after abort", lambda: server.send("x"))
        await _raises(PeerGone, "close after abort", lambda: server.close(1000))


@_check
async def _check_answer_once(make_pair: PairFactory) -> None:
    """A handshake is answered once: accept twice, or reject after accept, is refused."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        await _raises(LocalProtocolError, "second accept", server.accept)
        await _raises(LocalProtocolError, "reject after accept", lambda: server.reject(403))
        await client.send_text("still open")
        got = await server.receive()
        _expect(got == "still open", f"server received {got!r}")


@_check
async def _check_reject(make_pair: PairFactory) -> None:
    """reject(status, body): the client sees the status and body, then the link closes."""
    async with make_pair() as (server, client):
        await server.reject(403, body=b"origin not allowed")
        refusal = await _raises(HandshakeRejected, "wait_accepted", client.wait_accepted)
        _expect(refusal.status == 403, f"status {refusal.status}")
        _expect(refusal.body == b"origin not allowed", f"body {refusal.body!r}")
        await _raises(LocalProtocolError, "accept after reject", server.accept)
        await _raises(LocalProtocolError, "second reject", lambda: server.reject(403))
        # The link is closed by reject() itself, before abort().
        await _expect_link_dropped(client, "after reject")
        await _no_raise("abort after reject", server.abort)


@_check
async def _check_reject_without_body(make_pair: PairFactory) -> None:
    """A refusal with headers and no body."""
    async with make_pair() as (server, client):
        await server.reject(503, headers=(("retry-after", "5"),))
        refusal = await _raises(HandshakeRejected, "wait_accepted", client.wait_accepted)
        _expect((refusal.status, refusal.body) == (503, b""), f"refusal {refusal!r}")


@_check
async def _check_abort_before_answer(make_pair: PairFactory) -> None:
    """abort() during the handshake: the client learns the link is gone."""
    async with make_pair() as (server, client):
        await _no_raise("abort", server.abort)
        await _raises(PeerGone, "wait_accepted after abort", client.wait_accepted)


@_check
async def _check_peer_leaves_during_handshake(make_pair: PairFactory) -> None:
    """The client vanishes before the answer: accept raises PeerGone, or receive does."""
    async with make_pair() as (server, client):
        await client.vanish()
        try:
            await server.accept()
        except PeerGone:
            pass
        else:
            gone = await _raises(PeerGone, "receive after the client left", server.receive)
            _expect(gone.code is None, f"code {gone.code}")
        await _no_raise("abort", server.abort)


@_check
async def _check_interrupted_send(make_pair: PairFactory) -> None:
    """A send cut short by a timeout never leaves a corrupt stream behind.

    The client stops reading; the server sends until a send blocks (buffering
    must be bounded), and the blocked send is cancelled. The transport may
    then be broken (the next send and close raise PeerGone and the link
    drops) or intact (a cancelled send sent nothing); either way the client
    reads only whole frames, and never a close frame after a partial one.
    """
    chunk = "z" * 65_536
    sent = 0
    async with make_pair() as (server, client):
        await _accepted(server, client)
        with trio.move_on_after(0.5) as stall:
            while sent < 4096:  # 256 MiB: more than any sane buffering
                await server.send(chunk)
                sent += 1
        _expect(stall.cancelled_caught, f"{sent} sends of 64 KiB never blocked")
        outcome: list[str] = []

        async def server_carries_on() -> None:
            try:
                await server.send("after")
                await server.close(1000, "done")
                outcome.append("closed")
            except PeerGone:
                outcome.append("broken")

        received: list[Frame] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_carries_on)
            while True:
                try:
                    frame = await client.receive_frame()
                except PeerGone:
                    break
                except RemoteProtocolError as exc:
                    raise AssertionError(f"the client got a corrupt stream: {exc}") from exc
                received.append(frame)
                if isinstance(frame, CloseFrame):
                    break
        if outcome == ["closed"]:
            # Intact: every chunk that was accepted, "after", then the close.
            _expect(
                received
                == [TextFrame(chunk)] * sent + [TextFrame("after"), CloseFrame(1000, "done")],
                f"an intact stream delivered {len(received)} frames, ending {received[-2:]!r:.200}",
            )
            await _raises(PeerGone, "client receive after the close", client.receive_frame)
        else:
            # Broken: whole chunks only (the partial one never completes), no close.
            intact = [TextFrame(chunk)] * len(received)
            _expect(received == intact, f"a broken stream delivered {received[-1:]!r:.200}")
            _expect(len(received) <= sent, f"client received {len(received)} of {sent} sent")
        await _no_raise("abort", server.abort)


@_check
async def _check_cancelled_close(make_pair: PairFactory) -> None:
    """close() waits for the peer's answer; cancelled, abort() still cleans up."""
    async with make_pair() as (server, client):
        await _accepted(server, client)
        with trio.move_on_after(0.2) as waited:
            await server.close(1000, "bye")
        _expect(waited.cancelled_caught, "close returned without the peer's close frame")
        await _no_raise("abort", server.abort)
        await _raises(PeerGone, "send after abort", lambda: server.send("x"))
        while True:
            try:
                await client.receive_frame()
            except PeerGone:
                break
        _expect(len(_close_frames(client)) <= 1, f"close frames: {client.frames!r}")


#: Names of the checks :func:`check_message_stream` runs, in order.
MESSAGE_STREAM_CHECKS: tuple[str, ...] = tuple(_CHECKS)


async def check_message_stream(
    make_pair: PairFactory,
    *,
    checks: Iterable[str] | None = None,
    check_timeout: float = 10.0,
) -> None:
    """Check that a transport keeps the :class:`~chatcore.MessageStream` contract.

    Each check opens a fresh pair with ``make_pair`` and drives both ends.
    Run it from a test; to see each check as its own test, parametrize over
    :data:`MESSAGE_STREAM_CHECKS`::

        @pytest.mark.parametrize("check", MESSAGE_STREAM_CHECKS)
        async def test_my_transport(check):
            await check_message_stream(open_my_pair, checks=[check])

    Some checks wait on real time (a send that must block, a close the peer
    never answers, up to about a second each), so a socket transport needs a
    few seconds for the whole suite; on ``autojump_clock`` the memory
    transport takes none.

    Args:
        make_pair: Makes ``(server stream, client peer)`` pairs (see :class:`PairFactory`).
        checks: Names from :data:`MESSAGE_STREAM_CHECKS` to run (default: all).
        check_timeout: Seconds each check may take.

    Raises:
        AssertionError: a check failed (the message names the check).
        KeyError: an unknown check name.
    """
    names = list(MESSAGE_STREAM_CHECKS if checks is None else checks)
    for name in names:
        if name not in _CHECKS:
            raise KeyError(f"unknown check {name!r}; known: {', '.join(MESSAGE_STREAM_CHECKS)}")
    for name in names:
        try:
            with trio.fail_after(check_timeout):
                await _CHECKS[name](make_pair)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        except trio.TooSlowError as exc:
            raise AssertionError(f"{name}: did not finish within {check_timeout} s") from exc
        except Exception as exc:
            raise AssertionError(f"{name}: raised {exc!r}") from exc
