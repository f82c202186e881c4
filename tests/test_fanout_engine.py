"""The fan-out engine: batched wake-ups, the slow-consumer rule, small connections.

In memory and on virtual time: what the client receives (frames on the wire),
how and when the connection closes, and what a closed connection leaves behind.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from conftest import Connect, RecordingHandler, config, read_all

from chatcore import (
    CloseCause,
    CloseRecord,
    Config,
    Connection,
    ConnectionState,
    Delivery,
    HandshakeRequest,
    Hub,
    HubConfig,
    PushResult,
    encode,
    serve_connection,
)
from chatcore._pacer import MAX_PASSES, WATCH_INTERVAL, pacer
from chatcore.testing import (
    TestClient,
    WebSocketPeer,
    open_lean_pair,
    open_test_client,
    open_test_clients,
)
from chatcore.transports import CloseFrame, TextFrame, memory_stream_pair


def message(n: int, size: int = 0) -> dict[str, object]:
    return {"type": "m", "n": n, "pad": "x" * size}


def lines(frames: list[object]) -> list[str]:
    """Every message the client received, frames split on newlines."""
    return [line for f in frames if isinstance(f, TextFrame) for line in f.text.split("\n")]


# -- batched wake-ups ----------------------------------------------------------------


async def test_messages_offered_across_passes_of_one_burst_leave_in_one_frame(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect()
    await trio.testing.wait_all_tasks_blocked()  # the writer is parked
    sent = [encode(message(n)) for n in range(5)]
    for m in sent:  # one message per scheduler pass, as a client's publishes arrive
        assert conn.offer(m) is PushResult.QUEUED
        await trio.lowlevel.checkpoint()
    with trio.fail_after(1):
        frame = await client.receive()
    assert frame == "\n".join(m.text for m in sent)
    assert conn.statistics().frames_sent == 1


async def test_an_idle_connection_gets_a_single_message_without_virtual_delay(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(batch_delay=5.0))
    start = trio.current_time()
    conn.offer(encode(message(1)))
    assert await client.receive() == encode(message(1)).text
    # The burst was over at once: no part of the (huge) batch delay was spent.
    assert trio.current_time() == start


async def test_batch_delay_zero_wakes_the_writer_per_message(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(batch_delay=0))
    await trio.testing.wait_all_tasks_blocked()
    for n in range(3):
        conn.offer(encode(message(n)))
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
    for n in range(3):
        assert await client.receive() == encode(message(n)).text
    assert conn.statistics().frames_sent == 3


async def test_a_writer_is_not_starved_by_a_load_that_never_pauses(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(batch_delay=3600.0))
    produced = 0
    first_frame_after: int | None = None

    async def read() -> None:
        nonlocal first_frame_after
        await client.receive()
        first_frame_after = produced

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        # A push in every scheduler pass, and virtual time never advances.
        while first_frame_after is None and produced < 10 * MAX_PASSES:
            conn.offer(encode(message(produced)))
            produced += 1
            await trio.lowlevel.checkpoint()
    assert first_frame_after is not None
    assert first_frame_after <= MAX_PASSES + 8  # + the passes of writer, link and reader


async def test_a_real_time_batch_delay_bounds_the_wait_under_constant_load() -> None:
    # Real clock: a producer that never pauses; the writer still sends within
    # about batch_delay (and long before the producer is done).
    stream, client = memory_stream_pair(capacity=10_000)
    async with trio.open_nursery() as nursery:
        conn: Connection = await nursery.start(
            lambda task_status: serve_connection(
                stream,
                RecordingHandler(),
                config=config(batch_delay=0.002),
                task_status=task_status,
            )
        )
        with trio.fail_after(5):
            await client.wait_accepted()
        received_at: list[float] = []

        async def read() -> None:
            await client.receive()
            received_at.append(trio.current_time())

        nursery.start_soon(read)
        start = trio.current_time()
        with trio.move_on_after(0.5):
            while not received_at:
                conn.offer(encode(message(0)))
                await trio.lowlevel.checkpoint()
        assert received_at, "the writer was starved"
        assert received_at[0] - start < 0.25
        nursery.cancel_scope.cancel()


async def test_a_close_still_flushes_what_was_queued_before_it(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect()
    for n in range(3):
        conn.offer(encode(message(n)))
    conn.close_nowait(4002, "kicked")
    frames = await read_all(client)
    assert lines(frames) == [encode(message(n)).text for n in range(3)]
    assert frames[-1] == CloseFrame(4002, "kicked")


async def test_order_is_kept_across_batches(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=config(batch_max_messages=7))
    for n in range(100):
        conn.offer(encode(message(n)))
        if n % 13 == 0:
            await trio.lowlevel.checkpoint()
    conn.close_nowait()
    frames = await read_all(client)
    assert lines(frames) == [encode(message(n)).text for n in range(100)]
    assert all(len(f.text.split("\n")) <= 7 for f in frames if isinstance(f, TextFrame))


# -- the slow-consumer rule ------------------------------------------------------------


BIG = 10_000  # bytes per message in these tests; the budget holds three


def burst_config(**changes: object) -> Config:
    settings: dict[str, object] = {
        "outbox_max_bytes": 3 * BIG + 500,
        "batch_max_bytes": BIG + 200,
        "outbox_burst_bytes": 100 * BIG,
        "slow_consumer_timeout": 2.0,
    }
    return config(**(settings | changes))


async def test_a_burst_over_the_budget_never_closes_a_reading_client(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=burst_config(), capacity=2)
    sent = [encode(message(n, BIG)) for n in range(40)]
    for m in sent:  # 40 messages at once: 13 times the budget
        assert conn.offer(m) is PushResult.QUEUED
    assert conn.statistics().outbox_bytes > 3 * BIG + 500
    received: list[str] = []
    with trio.fail_after(10):
        while len(received) < len(sent):
            received.extend((await client.receive()).split("\n"))
    assert received == [m.text for m in sent]
    assert conn.state is ConnectionState.OPEN


async def test_a_slow_but_progressing_reader_stays_over_budget_for_long(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, client = await connect(config=burst_config(), capacity=1)
    sent = [encode(message(n, BIG)) for n in range(30)]
    for m in sent:
        conn.offer(m)
    start = trio.current_time()
    received: list[str] = []
    while len(received) < len(sent):
        await trio.sleep(1.5)  # one frame per 1.5 s: slower than the queue fills
        received.extend((await client.receive()).split("\n"))
    assert received == [m.text for m in sent]
    assert trio.current_time() - start > 10 * 2.0  # far longer than the timeout
    assert conn.state is ConnectionState.OPEN


async def test_over_budget_without_progress_closes_4001_after_the_timeout(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect(config=burst_config(), capacity=1)
    conn, client = served
    for n in range(6):  # the client never reads
        conn.offer(encode(message(n, BIG)))
    start = trio.current_time()
    await served.finished.wait()
    assert conn.close_record == CloseRecord(4001, "slow consumer", CloseCause.SLOW_CONSUMER)
    assert served.finished_at is not None
    assert served.finished_at - start == pytest.approx(2.0, abs=WATCH_INTERVAL)
    # Aborted: a half-sent frame is never followed by a close frame.
    assert not any(isinstance(f, CloseFrame) for f in await read_all(client))


async def test_the_timeout_counts_from_the_last_progress_not_from_the_burst(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect(config=burst_config(), capacity=1)
    conn, client = served
    for n in range(8):
        conn.offer(encode(message(n, BIG)))
    await trio.sleep(1.5)
    await client.receive()  # progress at 1.5 s, then the client stops reading
    progress = trio.current_time()
    await served.finished.wait()
    assert served.finished_at is not None
    assert served.finished_at - progress == pytest.approx(2.0, abs=WATCH_INTERVAL)
    assert conn.close_record == CloseRecord(4001, "slow consumer", CloseCause.SLOW_CONSUMER)


async def test_within_budget_a_stalled_send_waits_for_send_timeout(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect(config=burst_config(send_timeout=7.0), capacity=1)
    conn, _client = served
    conn.offer(encode(message(0)))
    await trio.testing.wait_all_tasks_blocked()  # on the wire (the link holds one)
    conn.offer(encode(message(1)))
    start = trio.current_time()
    await trio.testing.wait_all_tasks_blocked()  # the writer is stuck sending it
    await served.finished.wait()
    assert served.finished_at is not None
    assert served.finished_at - start == pytest.approx(7.0, abs=WATCH_INTERVAL)
    assert conn.close_record == CloseRecord(4001, "send stalled", CloseCause.SLOW_CONSUMER)


async def test_past_the_burst_bound_a_durable_message_closes_at_once(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    served = await connect(config=burst_config(outbox_burst_bytes=5 * BIG), capacity=1)
    conn, _client = served
    results = [conn.offer(encode(message(n, BIG))) for n in range(6)]
    assert results == [PushResult.QUEUED] * 4 + [PushResult.OVERFLOW, PushResult.CLOSED]
    assert conn.close_record == CloseRecord(4001, "slow consumer", CloseCause.SLOW_CONSUMER)


async def test_over_budget_ephemeral_messages_are_dropped_not_queued(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    conn, _client = await connect(config=burst_config(), capacity=1)
    for n in range(5):
        conn.offer(encode(message(n, BIG)))
    typing = encode({"type": "typing"}, delivery=Delivery.EPHEMERAL)
    assert conn.offer(typing) is PushResult.DROPPED
    assert conn.statistics().dropped == 1
    assert conn.state is ConnectionState.OPEN


async def test_the_process_wide_bound_closes_only_connections_over_their_budget(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = burst_config(max_queued_bytes=8 * BIG)
    stuck = await connect(config=cfg, capacity=1)
    healthy = await connect(config=cfg, capacity=1)
    results = [stuck.connection.offer(encode(message(n, BIG))) for n in range(9)]
    # Over its budget it may grow only while the process holds <= 8 * BIG.
    assert PushResult.OVERFLOW in results
    assert stuck.connection.close_record == CloseRecord(
        4001, "slow consumer", CloseCause.SLOW_CONSUMER
    )
    # A connection within its budget is untouched by the process-wide bound.
    await stuck.finished.wait()
    for n in range(3):
        assert healthy.connection.offer(encode(message(n, BIG))) is PushResult.QUEUED
    assert healthy.connection.state is ConnectionState.OPEN


async def test_the_process_wide_total_returns_to_zero_when_connections_close(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    total = pacer().queued
    before = total.nbytes
    served = [await connect(config=burst_config(), capacity=1) for _ in range(3)]
    for s in served:
        for n in range(5):
            s.connection.offer(encode(message(n, BIG)))
    assert total.nbytes > before + 3 * 3 * BIG
    for s in served:
        s.scope.cancel()
        await s.finished.wait()
    assert total.nbytes == before


# -- small connections -------------------------------------------------------------------


async def test_a_closed_connection_is_freed_without_the_cycle_collector(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Reference counting alone frees a closed connection and its transport."""
    refs: list[weakref.ref[object]] = []

    async def one(close_how: str) -> None:
        stream, client = memory_stream_pair()
        handler = RecordingHandler()
        async with trio.open_nursery() as nursery:
            conn: Connection = await nursery.start(
                lambda task_status: serve_connection(
                    stream, handler, config=config(), task_status=task_status
                )
            )
            await client.wait_accepted()
            conn.offer(encode(message(1)))
            await client.receive()
            if close_how == "server":
                conn.close_nowait(4002, "bye")
            elif close_how == "client":
                await client.close(1000)
            else:
                client.vanish()
            await conn.wait_closed()
        refs.extend([weakref.ref(conn), weakref.ref(stream)])
        handler.closed.clear()

    gc.collect()
    gc.disable()
    try:
        for how in ("server", "client", "vanish"):
            await one(how)
        await trio.testing.wait_all_tasks_blocked()
        alive = [r() for r in refs if r() is not None]
        assert alive == []
    finally:
        gc.enable()


async def test_a_closed_hub_connection_is_freed_without_the_cycle_collector() -> None:
    hub = Hub()
    refs: list[weakref.ref[object]] = []

    async def session() -> None:
        async with open_test_client(hub, user="u1") as client:
            await client.join("r")
            await client.publish("r", {"n": 1})
            refs.append(weakref.ref(client.connection))

    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                await session()
            await trio.testing.wait_all_tasks_blocked()
            assert len(refs) == 3
            assert [r() for r in refs if r() is not None] == []
        finally:
            gc.enable()
        nursery.cancel_scope.cancel()


async def test_an_open_connection_runs_three_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The actor (which runs ``handle``), the reader and the writer; heartbeats,
    batched wake-ups and send deadlines are the run's pacer's, shared."""
    pacer()  # the run's shared tasks exist before counting
    before = trio.lowlevel.current_statistics().tasks_living
    clients = []
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            stream, client = memory_stream_pair()
            clients.append(client)
            await nursery.start(
                lambda task_status, s=stream: serve_connection(
                    s, RecordingHandler(), config=config(), task_status=task_status
                )
            )
            await client.wait_accepted()
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().tasks_living - before == 10 * 3
        nursery.cancel_scope.cancel()


async def test_connection_churn_cannot_grow_the_heartbeat_heap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Closed connections' heartbeat entries are compacted away long before
    their (hour-long) due time."""
    run_pacer = pacer()
    base = run_pacer.statistics().heartbeats
    async with trio.open_nursery() as nursery:
        for _ in range(300):
            stream, client = memory_stream_pair()
            conn: Connection = await nursery.start(
                lambda task_status, s=stream: serve_connection(
                    s, RecordingHandler(), config=config(), task_status=task_status
                )
            )
            await client.wait_accepted()
            client.vanish()
            await conn.wait_closed()
            assert run_pacer.statistics().heartbeats - base <= 65


async def test_a_burst_of_large_messages_closes_only_the_client_that_never_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The burst that used to close every reader: 64 messages of ~60 KB, then
    2,000 small ones, from a client, to a room of 20 readers and one member
    that never reads. Every reader and the publisher get everything; the
    never-reader is closed as a slow consumer once its socket took nothing
    for slow_consumer_timeout."""
    cfg = config()  # the default outbox bounds and timeouts
    hub = Hub(
        config=HubConfig(publish_rate=1e9, publish_burst=100_000),
        connection_config=cfg,
        authenticate=_user_from_query,
    )
    big, small = 64, 2_000
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        stream, wire = memory_stream_pair(HandshakeRequest("/ws", "user=stuck"), capacity=1)
        stuck: Connection = await nursery.start(
            lambda task_status: serve_connection(stream, hub, task_status=task_status)
        )
        await wire.wait_accepted()
        await trio.testing.wait_all_tasks_blocked()
        assert await hub.join(stuck.id, "room")
        async with open_test_clients(hub, [f"r{i}" for i in range(20)]) as readers:
            for reader in readers:
                await reader.join("room")
            publisher = readers[0]

            async def publish_all() -> None:
                for n in range(big + small):
                    pad = "x" * 60_000 if n < big else "y"
                    await publisher.send({"type": "publish", "room": "room", "data": [n, pad]})

            async def read_all_messages(reader: TestClient, got: list[int]) -> None:
                while len(got) < big + small:
                    message = await reader.receive()
                    if message["type"] == "message":
                        got.append(message["data"][0])

            received: list[list[int]] = [[] for _ in readers]
            with trio.fail_after(120):
                async with trio.open_nursery() as clients:
                    clients.start_soon(publish_all)
                    for reader, got in zip(readers, received, strict=True):
                        clients.start_soon(read_all_messages, reader, got)
            assert all(got == list(range(big + small)) for got in received)
            assert all(reader.closed is None for reader in readers)
            with trio.fail_after(cfg.slow_consumer_timeout + cfg.send_timeout):
                record = await stuck.wait_closed()
            assert record == CloseRecord(4001, "slow consumer", CloseCause.SLOW_CONSUMER)
            assert hub.statistics().slow_consumer_disconnects == 1
        nursery.cancel_scope.cancel()


async def _user_from_query(request: HandshakeRequest) -> str:
    await trio.lowlevel.checkpoint()
    return request.query["user"]


# -- direct writes (the lean engine's transport) ---------------------------------------------
#
# Real loopback sockets: a LeanStream writes with non-blocking send() calls,
# which the pacer makes for every ready connection without waking writers.


class _WriterSteps(trio.abc.Instrument):
    """Counts scheduler steps of the connection writers' tasks."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Connection._writer"):
            self.steps += 1


@contextlib.asynccontextmanager
async def lean_connection(
    **changes: object,
) -> AsyncIterator[tuple[Connection, WebSocketPeer]]:
    """An open connection on a LeanStream and its client, small kernel buffers."""
    async with open_lean_pair(buffer_size=4096) as (stream, client), trio.open_nursery() as nursery:
        conn: Connection = await nursery.start(
            functools.partial(
                serve_connection, stream, RecordingHandler(), config=config(**changes)
            )
        )
        await client.wait_accepted()
        yield conn, client
        await client.vanish()  # the connection sees the link go, without a close wait
        await conn.wait_closed()


async def receive_lines(client: WebSocketPeer, count: int) -> list[str]:
    got: list[str] = []
    while len(got) < count:
        frame = await client.receive_frame()
        assert isinstance(frame, TextFrame), frame
        got += frame.text.split("\n")
    return got


async def test_the_pacer_writes_a_burst_to_a_direct_send_transport_without_waking_the_writer() -> (
    None
):
    with trio.fail_after(10):
        async with lean_connection() as (conn, client):
            await trio.testing.wait_all_tasks_blocked()
            steps = _WriterSteps()
            trio.lowlevel.add_instrument(steps)
            try:
                for burst in range(5):
                    for n in range(10):
                        conn.offer(encode(message(10 * burst + n)))
                        await trio.lowlevel.checkpoint()
                    assert await receive_lines(client, 10) == [
                        encode(message(10 * burst + n)).text for n in range(10)
                    ]
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert steps.steps == 0
            assert conn.statistics().frames_sent <= 5 * 3  # batched, not one per message


async def test_direct_writes_keep_order_when_the_socket_fills() -> None:
    # ~2 MB against ~8 KiB of kernel buffers: most direct writes end partial,
    # the writer waits for the socket, and later bursts queue behind it.
    count, size = 400, 5_000
    with trio.fail_after(30):
        async with lean_connection(outbox_max_bytes=4 << 20, outbox_burst_bytes=8 << 20) as (
            conn,
            client,
        ):
            for n in range(count):
                assert conn.offer(encode(message(n, size))) is PushResult.QUEUED
                if n % 7 == 0:
                    await trio.lowlevel.checkpoint()
            got = await receive_lines(client, count)
            assert got == [encode(message(n, size)).text for n in range(count)]
            assert conn.state is ConnectionState.OPEN


async def test_a_close_flushes_what_direct_writes_left_in_the_transport() -> None:
    count, size = 200, 5_000
    with trio.fail_after(30):
        async with lean_connection(outbox_max_bytes=4 << 20, outbox_burst_bytes=8 << 20) as (
            conn,
            client,
        ):
            for n in range(count):
                conn.offer(encode(message(n, size)))
            for _ in range(10):  # the pacer writes; the kernel takes a few KiB only
                await trio.lowlevel.checkpoint()
            conn.close_nowait(4002, "kicked")
            frames: list[object] = []
            while not frames or not isinstance(frames[-1], CloseFrame):
                frames.append(await client.receive_frame())
            assert lines(frames[:-1]) == [encode(message(n, size)).text for n in range(count)]
            assert frames[-1] == CloseFrame(4002, "kicked")
            record = await conn.wait_closed()
            assert (record.code, record.cause) == (4002, CloseCause.APP)


async def test_direct_writes_are_not_starved_by_a_load_that_never_pauses() -> None:
    with trio.fail_after(10):
        async with lean_connection(batch_delay=3600.0) as (conn, client):
            produced = 0
            first_frame_after: int | None = None

            async def read() -> None:
                nonlocal first_frame_after
                await client.receive_frame()
                first_frame_after = produced

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                while first_frame_after is None and produced < 10 * MAX_PASSES:
                    conn.offer(encode(message(produced)))
                    produced += 1
                    await trio.lowlevel.checkpoint()
            assert first_frame_after is not None
            assert first_frame_after <= MAX_PASSES + 8
