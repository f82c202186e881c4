"""The connection actor, end to end over the in-memory transport, on virtual time.

Every test asserts on what can be observed from outside the actor: the frames
the client received (``MemoryClient.frames`` is the wire log), the recorded
close, the handler's hooks, statistics, logs and (virtual) time.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import attrs
import pytest
import trio
import trio.testing
from conftest import (
    TEST_CONFIG,
    Connect,
    RecordingHandler,
    close_frames,
    config,
    is_cancellation,
    read_all,
)

from chatcore import (
    Accept,
    CloseCause,
    CloseOutcome,
    CloseRecord,
    Connection,
    ConnectionClosed,
    ConnectionState,
    Delivery,
    HandshakeRejected,
    HandshakeRequest,
    OutboundMessage,
    OutboxFull,
    PeerGone,
    PushResult,
    Reject,
    encode,
)
from chatcore._pacer import WATCH_INTERVAL
from chatcore.transports import (
    CloseFrame,
    MemoryClient,
    MemoryStream,
    TextFrame,
    memory_stream_pair,
)

LOGGER = "chatcore.connection"


def msg(n: int | str, **extra: object) -> dict[str, object]:
    return {"type": "m", "n": n, **extra}


def text_of(n: int | str) -> str:
    return encode(msg(n)).text


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]


async def sleep_forever_handler(connection: Connection) -> None:
    await trio.sleep_forever()


async def make_writer_busy(conn: Connection, client: MemoryClient) -> None:
    """With a link of capacity 1 and a client that does not read: after this,
    frame "a" sits on the wire and the writer is blocked sending frame "b"."""
    conn.send_nowait(msg("a"))
    await trio.testing.wait_all_tasks_blocked()
    conn.send_nowait(msg("b"))
    await trio.testing.wait_all_tasks_blocked()
    assert conn.statistics().outbox_messages == 0  # the writer took "b"
    assert client.frames == []


# -- handshake ---------------------------------------------------------------


async def test_accept_stores_identity_and_subprotocol(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[HandshakeRequest] = []

    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        seen.append(request)
        await trio.sleep(1)
        return Accept(identity={"user": "alice"}, subprotocol="chat.v1")

    request = HandshakeRequest("/ws", query_string="token=t", subprotocols=("chat.v1",))
    stream, client = memory_stream_pair(request)
    conn, _ = await connect(
        RecordingHandler(authenticate=authenticate), stream_pair=(stream, client), accepted=False
    )
    assert conn.state is ConnectionState.CONNECTING
    with trio.fail_after(5):
        assert await client.wait_accepted() == "chat.v1"
    assert seen == [request]
    assert conn.request is request
    assert conn.identity == {"user": "alice"}
    assert conn.state is ConnectionState.OPEN
    assert conn.close_record is None


async def test_reject_refuses_with_status_and_body(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        await trio.lowlevel.checkpoint()
        return Reject(401, b"bad token", headers=(("www-authenticate", "Bearer"),))

    handler = RecordingHandler(authenticate=authenticate)
    served = await connect(handler, accepted=False)
    with trio.fail_after(1), pytest.raises(HandshakeRejected) as info:
        await served.client.wait_accepted()
    assert (info.value.status, info.value.body) == (401, b"bad token")
    with trio.fail_after(1):
        await served.finished.wait()
    conn = served.connection
    assert conn.state is ConnectionState.REJECTED
    assert conn.close_record == CloseRecord(1008, "bad token", CloseCause.REJECTED, 401)
    assert served.error is None
    assert handler.handle_calls == 0
    assert handler.closed == [(conn, conn.close_record, ConnectionState.REJECTED)]


async def test_authenticate_raising_is_500_and_logged_once(
    connect: Connect, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        await trio.lowlevel.checkpoint()
        raise KeyError("no such user")

    handler = RecordingHandler(authenticate=authenticate)
    served = await connect(handler, accepted=False, connection_id="c-auth")
    with trio.fail_after(1), pytest.raises(HandshakeRejected) as info:
        await served.client.wait_accepted()
    assert info.value.status == 500
    await served.finished.wait()
    record = served.connection.close_record
    assert record is not None
    assert (record.code, record.cause, record.http_status) == (1011, CloseCause.INTERNAL, 500)
    [logged] = errors(caplog)
    assert "c-auth" in logged.getMessage()
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], KeyError)
    assert served.error is None
    assert len(handler.closed) == 1


async def test_authenticate_too_slow_is_503_after_handshake_timeout(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    served = await connect(
        RecordingHandler(authenticate=authenticate),
        config=config(handshake_timeout=3.0),
        accepted=False,
    )
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(HandshakeRejected) as info:
        await served.client.wait_accepted()
    assert info.value.status == 503
    assert trio.current_time() - start == pytest.approx(3.0)
    await served.finished.wait()
    record = served.connection.close_record
    assert record is not None
    assert (record.cause, record.http_status) == (CloseCause.REJECTED, 503)


async def test_authenticate_returning_garbage_is_500(
    connect: Connect, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        await trio.lowlevel.checkpoint()
        return "yes please"  # type: ignore[return-value]

    served = await connect(RecordingHandler(authenticate=authenticate), accepted=False)
    with trio.fail_after(1), pytest.raises(HandshakeRejected) as info:
        await served.client.wait_accepted()
    assert info.value.status == 500
    await served.finished.wait()
    [logged] = errors(caplog)
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], TypeError)
    assert served.connection.state is ConnectionState.REJECTED


@pytest.mark.parametrize(
    ("code", "status"), [(1012, 503), (1013, 503), (1011, 500), (1000, 403), (4002, 403)]
)
async def test_close_nowait_during_handshake_refuses(
    connect: Connect, autojump_clock: trio.testing.MockClock, code: int, status: int
) -> None:
    cancelled = []

    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(True)
        raise AssertionError("unreachable")

    served = await connect(RecordingHandler(authenticate=authenticate), accepted=False)
    conn, client = served
    await trio.testing.wait_all_tasks_blocked()
    outcome = conn.close_nowait(code, "draining")
    assert outcome.initiated
    assert outcome.record == CloseRecord(code, "draining", CloseCause.APP, status)
    with trio.fail_after(1), pytest.raises(HandshakeRejected) as info:
        await client.wait_accepted()
    assert (info.value.status, info.value.body) == (status, b"draining")
    await served.finished.wait()
    assert cancelled == [True]
    assert conn.state is ConnectionState.REJECTED
    assert conn.close_record is outcome.record


async def test_cancel_during_handshake_is_503_and_cancelled_propagates(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    handler = RecordingHandler(authenticate=authenticate)
    served = await connect(handler, accepted=False)
    await trio.testing.wait_all_tasks_blocked()
    served.scope.cancel()
    with trio.fail_after(1), pytest.raises(HandshakeRejected) as info:
        await served.client.wait_accepted()
    assert info.value.status == 503
    await served.finished.wait()
    assert is_cancellation(served.error)
    record = served.connection.close_record
    assert record is not None
    assert (record.code, record.cause, record.http_status) == (1012, CloseCause.SHUTDOWN, 503)
    assert len(handler.closed) == 1


async def test_close_from_the_authenticate_hook_does_not_deadlock(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    # The hook runs in the actor's own task: close() must not wait for itself.
    conns: list[Connection] = []
    outcomes: list[CloseOutcome] = []

    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        await trio.testing.wait_all_tasks_blocked()
        outcomes.append(await conns[0].close(4002, "banned"))  # returns its outcome
        await trio.sleep_forever()  # cancelled: the refusal goes out
        raise AssertionError("unreachable")

    served = await connect(RecordingHandler(authenticate=authenticate), accepted=False)
    conns.append(served.connection)
    with trio.fail_after(1), pytest.raises(HandshakeRejected) as info:
        await served.client.wait_accepted()
    assert (info.value.status, info.value.body) == (403, b"banned")
    assert [o.initiated for o in outcomes] == [True]
    assert outcomes[0].record is served.connection.close_record


class SlowAcceptStream(MemoryStream):
    """A transport whose accept answers, then takes a while to return (like a
    real socket flushing the handshake response), or fails after a while."""

    def __init__(self, stream: MemoryStream, *, fail: bool = False, answer: bool = True) -> None:
        super().__init__(stream._link, stream.request)
        self.fail = fail
        self.answer = answer

    async def accept(
        self, *, subprotocol: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        if self.answer:
            await super().accept(subprotocol=subprotocol, headers=headers)
        await trio.sleep(1)
        if self.fail:
            raise PeerGone(None)


async def test_start_soon_while_the_transport_is_still_accepting(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    stream, client = memory_stream_pair()
    served = await connect(stream_pair=(SlowAcceptStream(stream), client))  # accepted
    conn = served.connection
    assert conn.state is ConnectionState.OPEN  # decided, but accept() did not return yet

    async def greet() -> None:
        await conn.send({"type": "hello"})

    conn.start_soon(greet)  # no AssertionError: it starts with the connection's tasks
    with trio.fail_after(5):
        assert await client.receive() == '{"type":"hello"}'


async def test_receive_waiting_since_accept_ends_when_accept_fails(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    stream, client = memory_stream_pair()
    served = await connect(stream_pair=(SlowAcceptStream(stream, fail=True), client))
    conn = served.connection
    assert conn.state is ConnectionState.OPEN
    with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
        await conn.receive()
    assert info.value.record.cause is CloseCause.TRANSPORT
    await served.finished.wait()
    assert conn.state is ConnectionState.CLOSED


async def test_shutdown_during_an_unfinished_accept_aborts_without_close_frame(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    # The accept was decided but the transport never answered: a close frame
    # there would be a protocol violation; the link is dropped instead.
    stream, client = memory_stream_pair()
    served = await connect(
        stream_pair=(SlowAcceptStream(stream, answer=False), client), accepted=False
    )
    await trio.testing.wait_all_tasks_blocked()
    assert served.connection.state is ConnectionState.OPEN
    served.scope.cancel()
    await served.finished.wait()
    assert is_cancellation(served.error)
    assert served.connection.close_record == CloseRecord(
        1012, "server shutting down", CloseCause.SHUTDOWN
    )
    assert await read_all(client) == []


# -- using a connection around and after its close ------------------------------


def check_closed_api(conn: Connection, record: CloseRecord | None) -> None:
    """Every sending/receiving call raises ConnectionClosed(record); offer says CLOSED."""

    def raises(fn: Callable[[], object]) -> None:
        with pytest.raises(ConnectionClosed) as info:
            fn()
        if record is not None:
            assert info.value.record is record

    raises(lambda: conn.send_nowait(msg(1)))
    raises(lambda: conn.start_soon(trio.sleep_forever))
    assert conn.offer(encode(msg(1))) is PushResult.CLOSED
    assert conn.offer(encode(msg(1), delivery=Delivery.EPHEMERAL)) is PushResult.CLOSED


async def check_closed_async_api(conn: Connection, record: CloseRecord | None) -> None:
    for call in (lambda: conn.send(msg(1)), conn.receive):
        with trio.fail_after(1), pytest.raises(ConnectionClosed) as info:
            await call()
        if record is not None:
            assert info.value.record is record


async def test_api_in_connecting_state(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    async def authenticate(request: HandshakeRequest) -> Accept | Reject:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    served = await connect(RecordingHandler(authenticate=authenticate), accepted=False)
    conn = served.connection
    await trio.testing.wait_all_tasks_blocked()
    assert conn.state is ConnectionState.CONNECTING
    check_closed_api(conn, None)
    await check_closed_async_api(conn, None)
    assert conn.state is ConnectionState.CONNECTING  # none of that closed it
    first = conn.close_nowait(4002, "go away")
    assert first.initiated
    again = conn.close_nowait(1000)
    assert again == attrs.evolve(first, initiated=False)
    assert again.record is first.record
    with trio.fail_after(1):
        waited = await conn.close(1011)
    assert waited.record is first.record
    assert not waited.initiated
    assert conn.state is ConnectionState.REJECTED
    check_closed_api(conn, first.record)
    await check_closed_async_api(conn, first.record)


async def test_api_while_closing_and_closed_from_outside(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    handler = RecordingHandler()
    conn, client = await connect(handler)  # the client never reads: no answer to the close
    first = conn.close_nowait(4002, "kicked")
    assert first.initiated
    assert first.record == CloseRecord(4002, "kicked", CloseCause.APP)
    await trio.testing.wait_all_tasks_blocked()
    assert conn.state is ConnectionState.CLOSING
    check_closed_api(conn, first.record)
    await check_closed_async_api(conn, first.record)
    second = conn.close_nowait(1000, "other")
    assert not second.initiated
    assert second.record is first.record
    start = trio.current_time()
    third = await conn.close(1001)
    assert trio.current_time() - start == pytest.approx(TEST_CONFIG.close_timeout)
    assert not third.initiated
    assert third.record is first.record
    assert conn.state is ConnectionState.CLOSED
    check_closed_api(conn, first.record)
    await check_closed_async_api(conn, first.record)
    with trio.fail_after(0.001):  # closed: returns at once
        fourth = await conn.close()
    assert fourth == second
    assert await conn.wait_closed() is first.record
    # One close frame on the wire, with the first close's code.
    assert close_frames(client) == []
    await read_all(client)
    assert close_frames(client) == [CloseFrame(4002, "kicked")]


async def test_api_after_close_from_inside(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    results: list[object] = []

    async def handle(conn: Connection) -> None:
        outcome = await conn.close(4003, "done")  # inside: must not wait for itself
        results.append(outcome)
        assert conn.state is ConnectionState.CLOSING
        check_closed_api(conn, outcome.record)
        await check_closed_async_api(conn, outcome.record)
        again = conn.close_nowait(1000)
        assert again.record is outcome.record
        assert not again.initiated
        with trio.CancelScope(shield=True), trio.fail_after(1):
            # Even shielded (as in a ``finally``), close() from inside returns.
            results.append(await conn.close(1011))
        results.append("after")
        await trio.sleep_forever()  # cancelled: the connection is closing

    handler = RecordingHandler(handle)
    served = await connect(handler)
    _conn, client = served
    frames = await read_all(client)
    await served.finished.wait()
    record = CloseRecord(4003, "done", CloseCause.APP)
    assert results == [CloseOutcome(True, record), CloseOutcome(False, record), "after"]
    assert frames == [CloseFrame(4003, "done")]
    assert served.error is None


async def test_api_in_the_connection_closed_hook(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[object] = []

    class Handler(RecordingHandler):
        def connection_closed(self, connection: Connection) -> None:
            super().connection_closed(connection)
            record = connection.close_record
            assert connection.state is ConnectionState.CLOSED
            check_closed_api(connection, record)
            seen.append(connection.close_nowait(1011))

    served = await connect(Handler())
    served.client.vanish()
    with trio.fail_after(1):
        await served.finished.wait()
    record = served.connection.close_record
    assert record == CloseRecord(1006, "connection lost", CloseCause.TRANSPORT)
    assert [(o.initiated, o.record) for o in seen] == [(False, record)]  # type: ignore[attr-defined]


# -- application errors ----------------------------------------------------------


async def echo_or_crash(conn: Connection) -> None:
    async for text in conn:
        if text == "boom":
            raise ValueError("boom")
        await conn.send({"type": "echo", "text": text})


async def test_handler_raising_closes_1011_once_logged_once_others_unaffected(
    connect: Connect, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    handler = RecordingHandler(echo_or_crash)
    bad = await connect(handler, connection_id="c-bad")
    good = await connect(handler, connection_id="c-good")
    await bad.client.send("hi")
    await bad.client.send("boom")
    frames = await read_all(bad.client)
    assert frames == [TextFrame('{"type":"echo","text":"hi"}'), CloseFrame(1011, "internal error")]
    await bad.finished.wait()
    assert bad.error is None
    assert bad.connection.close_record == CloseRecord(1011, "internal error", CloseCause.INTERNAL)
    [logged] = errors(caplog)
    assert "c-bad" in logged.getMessage()
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], ValueError)
    # The other connection goes on.
    await good.client.send("still there?")
    with trio.fail_after(1):
        assert json.loads(await good.client.receive())["text"] == "still there?"
    assert good.connection.state is ConnectionState.OPEN
    assert handler.registry == {good.connection}


async def test_start_soon_task_raising_closes_1011(
    connect: Connect, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash() -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("task bug")

    async def handle(conn: Connection) -> None:
        conn.start_soon(crash)
        await trio.sleep_forever()

    served = await connect(RecordingHandler(handle), connection_id="c-task")
    frames = await read_all(served.client)
    assert frames == [CloseFrame(1011, "internal error")]
    [logged] = errors(caplog)
    assert "c-task" in logged.getMessage()
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], RuntimeError)


async def test_exception_group_from_app_nursery_closes_1011(
    connect: Connect, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash(n: int) -> None:
        raise ValueError(n)  # before any checkpoint: both raise, neither is cancelled

    async def handle(conn: Connection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash, 1)
            nursery.start_soon(crash, 2)
            nursery.start_soon(trio.sleep_forever)

    served = await connect(RecordingHandler(handle))
    frames = await read_all(served.client)
    assert frames == [CloseFrame(1011, "internal error")]
    await served.finished.wait()
    assert served.error is None
    [logged] = errors(caplog)
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], ExceptionGroup)
    assert {e.args[0] for e in logged.exc_info[1].exceptions} == {1, 2}


async def test_handler_returning_closes_1000(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    async def handle(conn: Connection) -> None:
        await conn.send({"type": "bye"})

    served = await connect(RecordingHandler(handle))
    frames = await read_all(served.client)
    assert frames == [TextFrame('{"type":"bye"}'), CloseFrame(1000, "")]
    assert served.connection.close_record == CloseRecord(1000, "", CloseCause.APP)


async def test_task_ending_on_its_own_connections_close_is_not_a_crash(
    connect: Connect, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Sending after the close (from a task not cancelled yet) raises
    # ConnectionClosed; letting it escape is how such a task ends, not a bug.
    async def handle(conn: Connection) -> None:
        conn.close_nowait(4002, "kicked")
        await conn.send({"type": "too late"})

    served = await connect(RecordingHandler(handle))
    assert await read_all(served.client) == [CloseFrame(4002, "kicked")]
    assert served.connection.close_record == CloseRecord(4002, "kicked", CloseCause.APP)
    assert errors(caplog) == []


async def test_foreign_connection_closed_escaping_is_a_crash(
    connect: Connect, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    other = await connect()
    other.connection.close_nowait()

    async def handle(conn: Connection) -> None:
        await other.connection.send({"type": "forward"})  # another connection: a bug

    served = await connect(RecordingHandler(handle))
    assert await read_all(served.client) == [CloseFrame(1011, "internal error")]
    assert len(errors(caplog)) == 1


# -- writer batching -----------------------------------------------------------


async def test_idle_connection_sends_each_message_at_once(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect()
    for n in range(3):
        conn.send_nowait(msg(n))
        await trio.testing.wait_all_tasks_blocked()
        assert conn.statistics().frames_sent == n + 1
        with trio.fail_after(1):
            assert await client.receive_frame() == TextFrame(text_of(n))


async def test_messages_queued_while_writer_busy_go_out_as_one_frame(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(capacity=1)
    await make_writer_busy(conn, client)
    for n in range(3):
        conn.send_nowait(msg(n))
    assert conn.statistics().outbox_messages == 3
    with trio.fail_after(1):
        frames = [await client.receive_frame() for _ in range(3)]
    joined = "\n".join(text_of(n) for n in range(3))
    assert frames == [TextFrame(text_of("a")), TextFrame(text_of("b")), TextFrame(joined)]
    for frame in frames:
        assert isinstance(frame, TextFrame)
        assert "" not in frame.text.split("\n")  # no empty segment, no trailing newline
    await trio.testing.wait_all_tasks_blocked()  # the writer counts after the send returns
    stats = conn.statistics()
    assert stats.frames_sent == 3
    assert stats.bytes_sent == sum(len(text_of(n)) for n in ("a", "b", 0, 1, 2)) + 2


@pytest.mark.parametrize(
    ("limits", "sizes"),
    [
        (lambda size: {"batch_max_messages": 2}, [2, 2, 1]),
        # Two messages of ``size`` bytes take 2 * size + 1 (the "\n" counts).
        (lambda size: {"batch_max_bytes": 2 * size + 1}, [2, 2, 1]),
        (lambda size: {"batch_max_bytes": 2 * size}, [1, 1, 1, 1, 1]),
        (lambda size: {"batch_max_bytes": 3 * size + 2}, [3, 2]),
        (lambda size: {"batch_max_messages": 3, "batch_max_bytes": 10_000}, [3, 2]),
    ],
    ids=["2 messages", "2 by bytes", "1 by bytes", "3 by bytes", "3 messages"],
)
async def test_batch_caps(
    connect: Connect,
    autojump_clock: trio.testing.MockClock,
    limits: Callable[[int], dict[str, int]],
    sizes: list[int],
) -> None:
    sent = [text_of(n) for n in range(10, 15)]
    size = len(sent[0])
    assert {len(t) for t in sent} == {size}
    conn, client = await connect(config=config(**limits(size)), capacity=1)
    await make_writer_busy(conn, client)
    for n in range(10, 15):
        conn.send_nowait(msg(n))
    with trio.fail_after(1):
        await client.receive_frame()
        await client.receive_frame()
        got = [await client.receive() for _ in sizes]
    assert [len(t.split("\n")) for t in got] == sizes
    assert "\n".join(got).split("\n") == sent


# -- outbox bounds ------------------------------------------------------------------


async def test_send_nowait_raises_outbox_full_and_connection_stays_open(
    connect: Connect,
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn, client = await connect(config=config(outbox_max_messages=3), capacity=1)
    await make_writer_busy(conn, client)
    for n in range(3):
        conn.send_nowait(msg(n))
    with pytest.raises(OutboxFull) as info:
        conn.send_nowait(msg(3))
    assert isinstance(info.value, trio.WouldBlock)
    # Durable with a key, too: the caller handles it, the connection stays open.
    with pytest.raises(OutboxFull):
        conn.send_nowait(encode(msg(4), key="k"))
    assert conn.state is ConnectionState.OPEN
    await client.receive()
    await client.receive()
    assert await client.receive() == "\n".join(text_of(n) for n in range(3))
    conn.send_nowait(msg(5))  # room again
    assert await client.receive() == text_of(5)


async def test_send_nowait_byte_bound(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    small = encode(msg(0))
    conn, client = await connect(
        config=config(outbox_max_bytes=2 * small.nbytes, batch_max_bytes=small.nbytes), capacity=1
    )
    await make_writer_busy(conn, client)
    conn.send_nowait(small)
    conn.send_nowait(small)
    with pytest.raises(OutboxFull):
        conn.send_nowait(small)
    assert conn.statistics().outbox_bytes == 2 * small.nbytes


async def test_a_message_larger_than_the_outbox_is_refused_not_a_disconnect(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    big = encode({"type": "big", "text": "x" * 100})
    conn, client = await connect(config=config(outbox_max_bytes=100, batch_max_bytes=100))
    with pytest.raises(ValueError, match="never fit"):
        conn.send_nowait(big)
    with trio.fail_after(1), pytest.raises(ValueError, match="never fit"):
        await conn.send(big)  # neither waits forever nor closes with 4001
    assert conn.state is ConnectionState.OPEN
    assert conn.statistics().outbox_messages == 0
    await conn.send(msg(0))
    assert await client.receive() == text_of(0)


async def test_durable_overflow_closes_4001_after_the_queued_messages(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(
        config=config(outbox_max_messages=3, outbox_burst_messages=3), capacity=1
    )
    await make_writer_busy(conn, client)
    results = [conn.offer(encode(msg(n))) for n in range(4)]
    assert results == [PushResult.QUEUED] * 3 + [PushResult.OVERFLOW]
    assert conn.close_record == CloseRecord(4001, "slow consumer", CloseCause.SLOW_CONSUMER)
    assert conn.offer(encode(msg(9))) is PushResult.CLOSED
    frames = await read_all(client)
    assert frames == [
        TextFrame(text_of("a")),
        TextFrame(text_of("b")),
        TextFrame("\n".join(text_of(n) for n in range(3))),
        CloseFrame(4001, "slow consumer"),
    ]


async def test_ephemeral_overflow_is_dropped_and_counted(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(outbox_max_messages=2), capacity=1)
    await make_writer_busy(conn, client)
    conn.send_nowait(msg(0))
    conn.send_nowait(msg(1))
    typing = encode({"type": "typing"}, delivery=Delivery.EPHEMERAL)
    assert conn.offer(typing) is PushResult.DROPPED
    assert conn.offer(typing) is PushResult.DROPPED
    stats = conn.statistics()
    assert (stats.dropped, stats.state) == (2, ConnectionState.OPEN)
    await client.receive()
    await client.receive()
    assert await client.receive() == f"{text_of(0)}\n{text_of(1)}"


async def test_ephemeral_messages_coalesce_by_key(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(outbox_max_messages=3), capacity=1)
    await make_writer_busy(conn, client)

    def typing(who: str, n: int) -> OutboundMessage:
        return encode(
            {"type": "typing", "who": who, "n": n}, delivery=Delivery.EPHEMERAL, key=f"t:{who}"
        )

    assert conn.offer(typing("ann", 1)) is PushResult.QUEUED
    assert conn.offer(encode(msg(0))) is PushResult.QUEUED
    assert conn.offer(typing("bob", 1)) is PushResult.QUEUED
    # Full now, but a message with a queued key replaces it (latest wins).
    assert conn.offer(typing("ann", 2)) is PushResult.COALESCED
    assert conn.offer(typing("ann", 3)) is PushResult.COALESCED
    assert conn.offer(typing("cat", 1)) is PushResult.DROPPED
    stats = conn.statistics()
    assert (stats.coalesced, stats.dropped, stats.outbox_messages) == (2, 1, 3)
    await client.receive()
    await client.receive()
    batch = [json.loads(line) for line in (await client.receive()).split("\n")]
    assert batch == [
        {"type": "typing", "who": "ann", "n": 3},
        msg(0),
        {"type": "typing", "who": "bob", "n": 1},
    ]


async def test_send_waits_for_room_and_proceeds_when_the_client_reads(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(outbox_max_messages=2), capacity=1)
    await make_writer_busy(conn, client)
    conn.send_nowait(msg(0))
    conn.send_nowait(msg(1))
    done = trio.Event()

    async def sender() -> None:
        await conn.send(msg(2))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.sleep(1)
        assert not done.is_set()  # still waiting: nobody read
        assert conn.state is ConnectionState.OPEN
        assert await client.receive() == text_of("a")  # makes room
        with trio.fail_after(1):
            await done.wait()
    assert await client.receive() == text_of("b")
    rest = [await client.receive() for _ in range(2)]
    assert "\n".join(rest).split("\n") == [text_of(n) for n in range(3)]


async def test_send_raises_connection_closed_if_closed_while_waiting(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(outbox_max_messages=1), capacity=1)
    await make_writer_busy(conn, client)
    conn.send_nowait(msg(0))
    caught: list[ConnectionClosed] = []

    async def sender() -> None:
        with pytest.raises(ConnectionClosed) as info:
            await conn.send(msg(1))
        caught.append(info.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not caught
        outcome = conn.close_nowait(4002, "kicked")
    assert caught[0].record is outcome.record


async def test_send_cancelled_while_waiting_queues_nothing(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(outbox_max_messages=1), capacity=1)
    await make_writer_busy(conn, client)
    conn.send_nowait(msg(0))
    with trio.move_on_after(1):
        await conn.send(msg(1))
        raise AssertionError("not reached")
    assert conn.statistics().outbox_messages == 1
    conn.close_nowait()
    frames = await read_all(client)
    assert [f.text for f in frames if isinstance(f, TextFrame)] == [
        text_of("a"),
        text_of("b"),
        text_of(0),
    ]


# -- a client that stops reading ------------------------------------------------------


async def test_stalled_send_closes_slow_consumer_and_aborts(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect(capacity=1)
    conn, client = served
    start = trio.current_time()
    await make_writer_busy(conn, client)
    await served.finished.wait()
    assert served.finished_at is not None
    # Aborted right at send_timeout: no close handshake on a half-sent frame.
    # The watchdog checks frames in flight every WATCH_INTERVAL.
    assert served.finished_at - start == pytest.approx(TEST_CONFIG.send_timeout, abs=WATCH_INTERVAL)
    assert conn.close_record == CloseRecord(4001, "send stalled", CloseCause.SLOW_CONSUMER)
    assert served.error is None
    assert await read_all(client) == [TextFrame(text_of("a"))]  # then the link dropped
    with pytest.raises(PeerGone):
        await client.send("anyone?")


@pytest.mark.parametrize("how", ["close", "overflow", "shutdown"])
async def test_close_is_bounded_by_close_timeout_while_a_send_is_stalled(
    connect: Connect, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    served = await connect(
        config=config(outbox_max_messages=1, outbox_burst_messages=1), capacity=1
    )
    conn, client = served
    await make_writer_busy(conn, client)
    await trio.sleep(1)
    start = trio.current_time()
    if how == "close":
        await conn.close(4002, "kicked")
        expected = CloseRecord(4002, "kicked", CloseCause.APP)
    elif how == "overflow":
        assert conn.offer(encode(msg(0))) is PushResult.QUEUED
        assert conn.offer(encode(msg(1))) is PushResult.OVERFLOW
        expected = CloseRecord(4001, "slow consumer", CloseCause.SLOW_CONSUMER)
    else:
        served.scope.cancel()
        expected = CloseRecord(1012, "server shutting down", CloseCause.SHUTDOWN)
    await served.finished.wait()
    assert served.finished_at is not None
    assert served.finished_at - start <= TEST_CONFIG.close_timeout
    assert TEST_CONFIG.close_timeout < TEST_CONFIG.send_timeout - 1
    assert conn.close_record == expected
    assert await read_all(client) == [TextFrame(text_of("a"))]  # aborted: no close frame


# -- inbound limits ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x00\x01", 1003),
        ("x" * 11, 1009),
        ("é" * 6, 1009),  # 6 characters, 12 UTF-8 bytes
        ("€" * 4, 1009),  # 4 characters, 12 UTF-8 bytes
    ],
)
async def test_inbound_faults_close_with_their_code(
    connect: Connect, autojump_clock: trio.testing.MockClock, payload: str | bytes, code: int
) -> None:
    handler = RecordingHandler()
    served = await connect(handler, config=config(max_message_bytes=10))
    if isinstance(payload, bytes):
        await served.client.send_bytes(payload)
    else:
        await served.client.send(payload)
    frames = await read_all(served.client)
    record = served.connection.close_record
    assert record is not None
    assert (record.code, record.cause) == (code, CloseCause.PROTOCOL)
    assert frames == [CloseFrame(code, record.reason)]
    assert handler.received == []


@pytest.mark.parametrize("payload", ["x" * 10, "é" * 5, "€€€x", "😀😀x"])
async def test_inbound_exactly_at_the_limit_is_accepted(
    connect: Connect, autojump_clock: trio.testing.MockClock, payload: str
) -> None:
    assert len(payload.encode()) <= 10
    handler = RecordingHandler()
    conn, client = await connect(handler, config=config(max_message_bytes=10))
    await client.send(payload)
    await trio.testing.wait_all_tasks_blocked()
    assert handler.received == [payload]
    assert conn.state is ConnectionState.OPEN
    assert conn.statistics().messages_received == 1


# -- heartbeat ------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ['{"type":"pong"}', '{"type":"chat","text":"hi"}'])
async def test_heartbeat_pings_every_interval_and_an_answering_client_stays(
    connect: Connect, autojump_clock: trio.testing.MockClock, answer: str
) -> None:
    conn, client = await connect(config=config(heartbeat_interval=10.0, heartbeat_timeout=5.0))
    start = trio.current_time()
    pings: list[float] = []

    async def answer_pings() -> None:
        while True:
            text = await client.receive()
            assert text == '{"type":"ping"}'
            pings.append(trio.current_time() - start)
            await client.send(answer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_pings)
        await trio.sleep(100.5)
        assert conn.state is ConnectionState.OPEN
        nursery.cancel_scope.cancel()
    assert pings == pytest.approx([10.0 * n for n in range(1, 11)])


async def test_heartbeat_closes_a_silent_client_with_4000(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect(config=config(heartbeat_interval=10.0, heartbeat_timeout=5.0))
    start = trio.current_time()
    frames = await read_all(served.client)  # reads, never answers
    assert frames == [TextFrame('{"type":"ping"}'), CloseFrame(4000, "heartbeat timeout")]
    assert served.finished_at is not None
    assert served.finished_at - start == pytest.approx(15.0)
    assert served.connection.close_record == CloseRecord(
        4000, "heartbeat timeout", CloseCause.HEARTBEAT
    )


# -- peer close, vanish, unanswered close -------------------------------------------


async def test_peer_close_is_recorded_and_echoed_once(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    handler = RecordingHandler()
    served = await connect(handler)
    await served.client.close(4100, "bye")
    frames = await read_all(served.client)
    assert frames == [CloseFrame(4100, "bye")]
    await served.finished.wait()
    assert served.connection.close_record == CloseRecord(4100, "bye", CloseCause.PEER)
    assert len(handler.closed) == 1


async def test_peer_vanishing_is_a_transport_close_without_close_frame(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect()
    served.connection.send_nowait(msg(0))
    await trio.testing.wait_all_tasks_blocked()
    served.client.vanish()
    with trio.fail_after(1):
        await served.finished.wait()
    assert served.connection.close_record == CloseRecord(
        1006, "connection lost", CloseCause.TRANSPORT
    )
    assert await read_all(served.client) == [TextFrame(text_of(0))]


async def test_close_returns_after_close_timeout_when_unanswered(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect()
    conn, client = served
    start = trio.current_time()
    outcome = await conn.close(4002, "kicked")
    assert trio.current_time() - start == pytest.approx(TEST_CONFIG.close_timeout)
    assert outcome.initiated
    assert conn.state is ConnectionState.CLOSED
    assert await read_all(client) == [CloseFrame(4002, "kicked")]
    with pytest.raises(PeerGone):  # the transport was aborted
        await client.send("hello?")


async def test_close_returns_as_soon_as_the_client_answers(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, client)
        await trio.sleep(1)
        start = trio.current_time()
        await conn.close()
        assert trio.current_time() == start
    assert close_frames(client) == [CloseFrame(1000, "")]


# -- server shutdown (cancellation) ---------------------------------------------------


async def test_shutdown_closes_1012_and_cancelled_propagates(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    handler = RecordingHandler()
    served = await connect(handler)
    served.connection.send_nowait(msg(0))
    served.scope.cancel()
    frames = await read_all(served.client)
    await served.finished.wait()
    assert frames == [TextFrame(text_of(0)), CloseFrame(1012, "server shutting down")]
    assert is_cancellation(served.error)
    assert served.connection.close_record == CloseRecord(
        1012, "server shutting down", CloseCause.SHUTDOWN
    )
    assert handler.registry == set()
    assert len(handler.closed) == 1


async def test_shutdown_is_bounded_when_the_client_never_answers(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect(RecordingHandler(sleep_forever_handler))
    await trio.sleep(1)
    start = trio.current_time()
    served.scope.cancel()
    await served.finished.wait()
    assert served.finished_at is not None
    assert served.finished_at - start == pytest.approx(TEST_CONFIG.close_timeout)
    assert is_cancellation(served.error)
    assert await read_all(served.client) == [CloseFrame(1012, "server shutting down")]


# -- the connection_closed hook ---------------------------------------------------------


async def _reject(request: HandshakeRequest) -> Accept | Reject:
    await trio.lowlevel.checkpoint()
    return Reject(403)


async def _auth_crash(request: HandshakeRequest) -> Accept | Reject:
    raise ValueError("auth bug")


async def _handle_crash(conn: Connection) -> None:
    await trio.lowlevel.checkpoint()
    raise ValueError("handler bug")


@pytest.mark.parametrize(
    "path",
    ["reject", "auth crash", "crash", "return", "peer", "vanish", "app", "shutdown", "heartbeat"],
)
async def test_connection_closed_hook_runs_once_on_every_path(
    connect: Connect, autojump_clock: trio.testing.MockClock, path: str
) -> None:
    async def returns(conn: Connection) -> None:
        await trio.lowlevel.checkpoint()

    handle = {"crash": _handle_crash, "return": returns}.get(path)
    authenticate = {"reject": _reject, "auth crash": _auth_crash}.get(path)
    handler = RecordingHandler(handle, authenticate)
    served = await connect(
        handler,
        config=config(heartbeat_interval=1.0, heartbeat_timeout=1.0),
        accepted=False,
    )
    conn, client = served
    if authenticate is None:
        await client.wait_accepted()
        await trio.testing.wait_all_tasks_blocked()
    if path == "peer":
        await client.close(4100)
    elif path == "vanish":
        client.vanish()
    elif path == "app":
        conn.close_nowait(4002)
    elif path == "shutdown":
        served.scope.cancel()
    async with trio.open_nursery() as nursery:
        if path != "heartbeat":
            nursery.start_soon(read_all, client)
        with trio.fail_after(30):
            await served.finished.wait()
        nursery.cancel_scope.cancel()
    assert len(handler.closed) == 1
    [(closed_conn, record, state)] = handler.closed
    assert closed_conn is conn
    assert record is not None
    assert record is conn.close_record
    assert state in (ConnectionState.CLOSED, ConnectionState.REJECTED)
    assert handler.registry == set()


async def test_a_raising_hook_is_logged_and_swallowed(
    connect: Connect, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Handler(RecordingHandler):
        def connection_closed(self, connection: Connection) -> None:
            super().connection_closed(connection)
            raise RuntimeError("hook bug")

    handler = Handler()
    served = await connect(handler, connection_id="c-hook")
    served.client.vanish()
    with trio.fail_after(1):
        await served.finished.wait()
    assert served.error is None
    assert len(handler.closed) == 1
    [logged] = errors(caplog)
    assert "c-hook" in logged.getMessage()
    assert "connection_closed" in logged.getMessage()
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], RuntimeError)


# -- statistics and repr ----------------------------------------------------------------


async def test_statistics(connect: Connect, autojump_clock: trio.testing.MockClock) -> None:
    handler = RecordingHandler()
    conn, client = await connect(handler, config=config(outbox_max_messages=3), capacity=1)
    stats = conn.statistics()
    assert stats == attrs.evolve(
        stats,
        state=ConnectionState.OPEN,
        outbox_messages=0,
        outbox_bytes=0,
        messages_received=0,
        messages_queued=0,
        frames_sent=0,
        bytes_sent=0,
        dropped=0,
        coalesced=0,
    )
    await client.send("one")
    await client.send("two")
    await make_writer_busy(conn, client)
    conn.offer(encode({"type": "p"}, delivery=Delivery.EPHEMERAL, key="p"))
    conn.offer(encode({"type": "p", "v": 2}, delivery=Delivery.EPHEMERAL, key="p"))
    conn.send_nowait(msg(0))
    conn.offer(encode(msg(1)))
    conn.offer(encode({"type": "x"}, delivery=Delivery.EPHEMERAL))
    stats = conn.statistics()
    assert stats.messages_received == 2
    assert stats.messages_queued == 6  # a, b, p (coalesced twice), 0, 1
    assert (stats.outbox_messages, stats.dropped, stats.coalesced) == (3, 1, 1)
    assert stats.outbox_bytes == len('{"type":"p","v":2}') + 2 * len(text_of(0))
    assert stats.frames_sent == 1  # "b" is still in flight
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.frames_sent = 7
    for _ in range(3):
        await client.receive()
    await trio.testing.wait_all_tasks_blocked()
    stats = conn.statistics()
    assert (stats.frames_sent, stats.outbox_messages, stats.outbox_bytes) == (3, 0, 0)


async def test_repr_shows_id_state_and_outbox(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect(config=config(outbox_max_messages=8), capacity=1, connection_id="c7f3a")
    conn, client = served
    assert re.fullmatch(r"<Connection c7f3a OPEN outbox=0/8 0/1048576B>", repr(conn))
    await make_writer_busy(conn, client)
    conn.send_nowait(msg(0))
    conn.send_nowait(msg(1))
    nbytes = 2 * len(text_of(0))
    assert repr(conn) == f"<Connection c7f3a OPEN outbox=2/8 {nbytes}/1048576B>"
    conn.close_nowait()
    assert repr(conn).startswith("<Connection c7f3a CLOSING ")
    await read_all(client)
    await served.finished.wait()
    assert repr(conn) == "<Connection c7f3a CLOSED outbox=0/8 0/1048576B>"
