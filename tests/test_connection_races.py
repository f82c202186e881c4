"""Every pair and triple of close paths, started at the same instant, in random order.

The six ways a connection can end are started concurrently against one open
connection that is busy (a per-connection task streams ``tick`` messages and
the heartbeat has a ``ping`` out):

=========  ===========================================================  ===========
action     what the test does                                           close cause
=========  ===========================================================  ===========
peer       the client sends a close frame (4100)                        PEER
app        ``close_nowait(4002)`` from another task                     APP
heartbeat  nothing: the client never answers the ping, whose deadline   HEARTBEAT
           is the instant every action is scheduled for
overflow   durable ``offer`` until the outbox is full                   SLOW_CONSUMER
vanish     ``client.vanish()`` (TCP reset, no close frame)              TRANSPORT
shutdown   cancel the scope around ``serve_connection``                 SHUTDOWN
=========  ===========================================================  ===========

Hypothesis draws the order the action tasks start in, how many checkpoints
each passes before acting, and the seed of Trio's own scheduler (it shuffles
every batch of runnable tasks), so each example is one reproducible
interleaving; each runs in its own ``trio.run`` on a fresh ``MockClock``. In
"settle" examples the first action runs alone and the connection settles
before the others start.

What "first" means here. ``app`` and ``overflow`` act synchronously: if one of
them runs while the connection is OPEN, it *is* the first close request, and
the record must be exactly it. The other four are noticed by a connection task
a few scheduling steps after the action (the reader gets the close frame or the
dropped link; the heartbeat task wakes; a cancellation reaches the actor after
its nursery unwinds), so a synchronous request in between legitimately wins.
The properties asserted are the strongest that hold under that reading:

* exactly one close is recorded, it is that of one of the started actions (code,
  reason and cause), and it is the synchronous action's when one ran while OPEN
  (the first one to do so; every later request got ``initiated=False`` and the
  same record object); in settle examples it is the first action's;
* the wire: at most one close frame, nothing after it; none when the link
  failed first (TRANSPORT); only the echo of the client's own close when the
  peer closed first (PEER); otherwise exactly one (unless the client vanished),
  carrying the record's code, or the echo of the client's close frame when the
  client's close crossed ours;
* when the server decided the close and the client neither vanished nor closed,
  nothing that was accepted is lost: every ``tick`` whose ``send`` returned and
  every message ``offer`` queued arrives, in order, before the close frame;
* ``serve_connection`` returns within the close deadline with every task of the
  connection ended; it raises nothing but the cancellation, and that only when
  shut down (always when the record is SHUTDOWN); ``connection_closed`` ran
  exactly once, after the close was recorded, and the registry is empty; no
  error was logged.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, register_random, settings
from hypothesis import strategies as st

from chatcore import (
    CloseCause,
    CloseOutcome,
    CloseRecord,
    Config,
    Connection,
    ConnectionClosed,
    ConnectionHandler,
    ConnectionState,
    PeerGone,
    PushResult,
    encode,
    serve_connection,
)
from chatcore.transports import CloseFrame, MemoryClient, TextFrame, memory_stream_pair

# Trio shuffles each batch of runnable tasks with this generator; letting
# Hypothesis seed it makes every example's schedule reproducible.
_trio_scheduler_random = getattr(trio._core._run, "_r", None)
if isinstance(_trio_scheduler_random, random.Random):
    register_random(_trio_scheduler_random)

ACTIONS = ("peer", "app", "heartbeat", "overflow", "vanish", "shutdown")
COMBOS = [c for r in (2, 3) for c in itertools.combinations(ACTIONS, r)]
EXAMPLES_PER_COMBO = 100

RECORD_OF = {
    "peer": CloseRecord(4100, "peer bye", CloseCause.PEER),
    "app": CloseRecord(4002, "kicked", CloseCause.APP),
    "heartbeat": CloseRecord(4000, "heartbeat timeout", CloseCause.HEARTBEAT),
    "overflow": CloseRecord(4001, "slow consumer", CloseCause.SLOW_CONSUMER),
    "vanish": CloseRecord(1006, "connection lost", CloseCause.TRANSPORT),
    "shutdown": CloseRecord(1012, "server shutting down", CloseCause.SHUTDOWN),
}

#: The instant every action is scheduled for: the heartbeat's deadline (a ping
#: at 1.0, unanswered for 1.0). The streamer also sends a tick at that instant.
T = 2.0
CONFIG = Config(
    heartbeat_interval=1.0,
    heartbeat_timeout=1.0,
    outbox_max_messages=8,
    outbox_burst_messages=8,  # no burst allowance: the 9th message overflows
    close_timeout=5.0,
    send_timeout=10.0,
)
NO_HEARTBEAT = attrs.evolve(CONFIG, heartbeat_interval=1000.0)
MAX_CHECKPOINTS = 24


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RaceHandler(ConnectionHandler):
    """Keeps a registry, streams ticks from a connection task, counts live tasks."""

    def __init__(self) -> None:
        self.registry: set[Connection] = set()
        self.closed: list[tuple[CloseRecord | None, ConnectionState]] = []
        self.ticks_sent: list[int] = []
        self.streamer_closed: list[CloseRecord] = []
        self.live_tasks = 0

    async def handle(self, connection: Connection) -> None:
        self.live_tasks += 1
        try:
            self.registry.add(connection)
            connection.start_soon(self._stream, connection)
            async for _ in connection:
                pass
        finally:
            self.live_tasks -= 1

    async def _stream(self, connection: Connection) -> None:
        self.live_tasks += 1
        try:
            for n in itertools.count():
                await connection.send({"type": "tick", "n": n})
                self.ticks_sent.append(n)
                await trio.sleep(0.25)
        except ConnectionClosed as exc:
            self.streamer_closed.append(exc.record)
        finally:
            self.live_tasks -= 1

    def connection_closed(self, connection: Connection) -> None:
        self.closed.append((connection.close_record, connection.state))
        self.registry.discard(connection)


@attrs.define
class Race:
    """One interleaving: the schedule, then everything observed while it ran."""

    order: Sequence[str]
    checkpoints: Sequence[int]
    settle_first: bool
    handler: RaceHandler = attrs.Factory(RaceHandler)
    #: (action, details...) appended at the instant each action acted.
    log: list[tuple[Any, ...]] = attrs.Factory(list)
    error: BaseException | None = None
    finished_at: float | None = None
    live_tasks_at_return: int | None = None
    connection: Connection | None = None
    client: MemoryClient | None = None

    @property
    def config(self) -> Config:
        return CONFIG if "heartbeat" in self.order else NO_HEARTBEAT

    async def run(self) -> None:
        stream, client = memory_stream_pair(capacity=64)
        self.client = client
        serve_scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[Connection]) -> None:
            with serve_scope:
                try:
                    await serve_connection(
                        stream,
                        self.handler,
                        config=self.config,
                        connection_id="race",
                        task_status=task_status,
                    )
                except BaseException as exc:
                    self.error = exc
                    raise
                finally:
                    self.finished_at = trio.current_time()
                    self.live_tasks_at_return = self.handler.live_tasks

        async def read_everything() -> None:
            # Reads (and so answers close frames) but never answers a ping.
            while True:
                try:
                    await client.receive_frame()
                except PeerGone:
                    return

        async def act(index: int, name: str) -> None:
            if self.settle_first and index > 0:
                await trio.sleep_until(T)
                await trio.testing.wait_all_tasks_blocked()  # the first one settled
            elif self.settle_first and name != "heartbeat":
                await trio.sleep_until(T - 0.5)  # alone, before the heartbeat's deadline
            else:
                await trio.sleep_until(T)
            for _ in range(self.checkpoints[index]):
                await trio.lowlevel.checkpoint()
            was_open = conn.state is ConnectionState.OPEN
            if name == "peer":
                try:
                    await client.close(4100, "peer bye")
                except PeerGone:
                    self.log.append(("peer", False))
                else:
                    self.log.append(("peer", True))
            elif name == "app":
                self.log.append(("app", was_open, conn.close_nowait(4002, "kicked")))
            elif name == "overflow":
                results: list[PushResult] = []
                queued: list[int] = []
                for n in range(CONFIG.outbox_max_messages + 1):
                    result = conn.offer(encode({"type": "o", "n": n}))
                    results.append(result)
                    if result is not PushResult.QUEUED:
                        break
                    queued.append(n)
                self.log.append(("overflow", was_open, results, queued))
            elif name == "vanish":
                client.vanish()
                self.log.append(("vanish",))
            elif name == "shutdown":
                serve_scope.cancel()
                self.log.append(("shutdown",))
            # "heartbeat": nothing to do; its deadline is T.

        with trio.fail_after(T + 60):
            async with trio.open_nursery() as nursery:
                conn = await nursery.start(serve)
                self.connection = conn
                await client.wait_accepted()
                nursery.start_soon(read_everything)
                for index, name in enumerate(self.order):
                    nursery.start_soon(act, index, name)

    # -- the oracle --------------------------------------------------------------

    def check(self) -> None:
        conn = self.connection
        assert conn is not None
        record = conn.close_record
        assert record is not None
        started = set(self.order)
        acted = [entry[0] for entry in self.log]

        # The actor finished: every task ended, within the close deadline.
        assert conn.state is ConnectionState.CLOSED
        assert self.finished_at is not None
        assert self.finished_at <= T + self.config.close_timeout
        assert self.finished_at <= T  # the client always answers: no deadline was needed
        assert self.live_tasks_at_return == 0
        assert conn.statistics().outbox_messages == 0

        # Exactly one close, that of a started action.
        assert record in {RECORD_OF[name] for name in started}, (record, self.order)
        assert self.handler.closed == [(record, ConnectionState.CLOSED)]
        assert self.handler.registry == set()
        assert all(r is record for r in self.handler.streamer_closed)

        # Synchronous requests: the first while OPEN decided; the others saw its record.
        deciding: list[tuple[Any, ...]] = []
        for entry in self.log:
            if entry[0] == "app":
                _, was_open, outcome = entry
                assert isinstance(outcome, CloseOutcome)
                assert outcome.initiated == was_open
                assert outcome.record is record
                if was_open:
                    deciding.append(entry)
            elif entry[0] == "overflow":
                _, was_open, results, queued = entry
                if was_open:
                    assert results[-1] is PushResult.OVERFLOW
                    assert results[:-1] == [PushResult.QUEUED] * len(queued)
                    deciding.append(entry)
                else:
                    assert results == [PushResult.CLOSED]
        assert len(deciding) <= 1  # after one decided, the connection was no longer OPEN
        if deciding:
            assert record == RECORD_OF[deciding[0][0]]
        elif record.cause in (CloseCause.APP, CloseCause.SLOW_CONSUMER):
            raise AssertionError(f"{record} but no app/overflow request found it OPEN")
        if self.settle_first:
            assert record == RECORD_OF[self.order[0]]

        # serve_connection raises only the cancellation, and only when shut down.
        if record.cause is CloseCause.SHUTDOWN:
            assert _is_cancellation(self.error), self.error
        elif "shutdown" in acted:
            assert self.error is None or _is_cancellation(self.error), self.error
        else:
            assert self.error is None, self.error

        # The wire.
        assert self.client is not None
        frames = self.client.frames
        closes = [f for f in frames if isinstance(f, CloseFrame)]
        assert len(closes) <= 1, frames
        if closes:
            assert frames[-1] is closes[0], "a frame arrived after the close frame"
        vanished = "vanish" in acted
        peer_sent = ("peer", True) in self.log
        echo = CloseFrame(4100, "peer bye")
        if record.cause is CloseCause.TRANSPORT:
            assert closes == []
        elif record.cause is CloseCause.PEER:
            assert peer_sent
            assert closes == [echo] or (vanished and closes == [])
        else:
            if not vanished:
                assert len(closes) == 1, frames
            allowed = [CloseFrame(record.code, record.reason)] + ([echo] if peer_sent else [])
            assert all(close in allowed for close in closes), (closes, record)

        # Nothing accepted is lost when the server closed a healthy link.
        messages: list[dict[str, Any]] = []
        for frame in frames:
            if isinstance(frame, TextFrame):
                lines = frame.text.split("\n")
                assert "" not in lines
                messages.extend(json.loads(line) for line in lines)
        ticks = [m["n"] for m in messages if m["type"] == "tick"]
        assert ticks == sorted(ticks)
        if not (vanished or peer_sent or record.cause.peer_gone):
            assert ticks == self.handler.ticks_sent
            for entry in self.log:
                if entry[0] == "overflow":
                    offered = [m["n"] for m in messages if m["type"] == "o"]
                    assert offered == entry[3]


def _is_cancellation(exc: BaseException | None) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
@settings(
    max_examples=EXAMPLES_PER_COMBO,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_concurrent_close_paths(combo: tuple[str, ...], data: st.DataObject) -> None:
    order = data.draw(st.permutations(combo), label="order")
    checkpoints = data.draw(
        st.lists(
            # Mostly near-ties (a few scheduling steps apart), sometimes far apart.
            st.integers(0, 3) | st.integers(0, MAX_CHECKPOINTS),
            min_size=len(combo),
            max_size=len(combo),
        ),
        label="checkpoints",
    )
    settle_first = data.draw(st.integers(0, 4), label="settle") == 0
    race = Race(order, checkpoints, settle_first)
    errors = _ErrorLog()
    logger = logging.getLogger("chatcore.connection")
    logger.addHandler(errors)
    try:
        trio.run(race.run, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(errors)
    race.check()
    assert [r.getMessage() for r in errors.records] == []
