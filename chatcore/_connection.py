"""The connection actor: one nursery owns everything a connection does.

Theory of operation
-------------------

A :class:`Connection` is driven by one task, :func:`serve_connection`. After
the handshake it opens a nursery with

* a **reader** that always receives (so close frames and pings keep flowing)
  and puts messages into a bounded inbox;
* a **writer**, the only code that sends on the transport while the
  connection is open; it drains *everything* queued in the outbox into one
  frame per wake-up;
* any task started with :meth:`Connection.start_soon`;

and runs the application's ``handle`` itself, in the nursery's body: three
tasks per connection. The run's :class:`~chatcore._pacer.Pacer` does two jobs
for every connection at once: it wakes writers in batches after a burst (so
messages that arrive together leave together, whoever sent them), and it
runs the heartbeat (a ping every interval; 4000 when the client stays silent).
On a transport with :attr:`~chatcore.MessageStream.direct_send` (the lean
engine's) the pacer does not wake the writer: it writes the batch itself
(:meth:`Connection._write_now`, one non-blocking write, no task switch), and
the writer runs only to wait for the socket when the kernel did not take it
all, so frames keep their order and the send deadlines still apply.

Each frame also says how late it is, cheaply: :meth:`Outbox.take_batch
<chatcore.sansio.Outbox.take_batch>` leaves the publish stamp of the frame's
oldest message on the outbox (``0.0`` unless the hub sampled that publish
for the delivery-lag metric), and the writer, once the transport took the
frame, reads it and tests it; only a stamped frame goes on to
:func:`chatcore._observe.frame_delivered`.

A burst of large messages may take an outbox over its budget
(:attr:`Config.outbox_max_bytes`); that is not an offence. The connection is a
slow consumer (4001) when it stays over budget while its writer completes no
frame for :attr:`Config.slow_consumer_timeout`, when it would pass the hard
bound :attr:`Config.outbox_burst_bytes`, or when the process holds more than
:attr:`Config.max_queued_bytes` in all outboxes and this one is over budget.

Nobody else holds the transport. Everyone else *asks*: :meth:`Connection.offer`
and :meth:`Connection.send_nowait` queue a message, :meth:`Connection.close_nowait`
records a close in the sans-I/O :class:`~chatcore.sansio.CloseArbiter` (the first
cause wins) and wakes the writer, which returns and so cancels the nursery: no
child can send after a close because no path to the transport is left. The
actor then, alone and shielded under the close deadline, flushes what was
queued before the close, sends the close frame, waits for the peer's, and
aborts the transport if the deadline passes. Registry cleanup runs after that,
in ``finally``, so a connection cannot leak however it ends.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from . import _observe
from ._config import Config
from ._exceptions import ConnectionClosed, OutboxFull, PeerGone, RemoteProtocolError
from ._pacer import Beat, pacer
from ._transport import MessageStream
from .sansio import (
    Accept,
    CloseArbiter,
    CloseCause,
    CloseOutcome,
    CloseRecord,
    ConnectionState,
    Delivery,
    HandshakeRequest,
    OutboundMessage,
    Outbox,
    PushResult,
    Reject,
    encode,
)

__all__ = [
    "Connection",
    "ConnectionHandler",
    "ConnectionStatistics",
    "serve_connection",
]

logger = logging.getLogger("chatcore.connection")

_PING = encode({"type": "ping"}, delivery=Delivery.EPHEMERAL, key="\0ping")

# A task to start in the connection's nursery: (function, args, name).
_TaskSpec = tuple[Callable[..., Awaitable[object]], tuple[object, ...], object]

# What escapes a task without being a crash: cancellation and interpreter exits.
_PASS_THROUGH = (trio.Cancelled, KeyboardInterrupt, SystemExit, GeneratorExit)


class ConnectionHandler:
    """What an application plugs into a connection. Subclass and override.

    The hub implements this; a bare application may too (see ``examples/echo.py``).
    """

    #: Bounds for this handler's connections when the server is given none
    #: (``None``: the :class:`Config` defaults). The hub sets it.
    connection_config: Config | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The handler's background work, for as long as a server serves it.

        Servers start it (with ``nursery.start``) before accepting clients and
        cancel it when they stop. The default has none and returns at once.
        """
        task_status.started()
        await trio.lowlevel.checkpoint()

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        """Decide on a handshake before anything is accepted.

        Runs under :attr:`Config.handshake_timeout`; if it is exceeded or this
        raises, the client gets 503 or 500 and the error is logged.
        The default accepts everyone anonymously.
        """
        await trio.lowlevel.checkpoint()
        return Accept()

    async def handle(self, connection: Connection) -> None:
        """Serve an open connection; runs as a task of the connection's nursery.

        Typically ``async for text in connection: ...``. Returning closes the
        connection with 1000; raising closes it with 1011 (logged once). The
        task is cancelled when the connection closes for any other reason.
        """
        async for _ in connection:
            pass

    def connection_closed(self, connection: Connection) -> None:
        """Called once after the connection is fully closed (or refused).

        Synchronous, so it cannot be interrupted: remove registry entries here.
        :attr:`Connection.close_record` says how it ended. Exceptions are
        logged and swallowed.
        """


@attrs.frozen
class ConnectionStatistics:
    """A snapshot of one connection (cheap; take as often as you like).

    Attributes:
        state: The connection's state.
        outbox_messages: Messages queued now.
        outbox_bytes: Bytes queued now.
        messages_received: Text messages received from the client.
        messages_queued: Messages accepted into the outbox (coalesced ones included).
        frames_sent: Frames written to the transport.
        bytes_sent: Message bytes written (separators excluded).
        dropped: Ephemeral messages dropped because the outbox was full.
        coalesced: Ephemeral messages that replaced a queued one with the same key.
    """

    state: ConnectionState
    outbox_messages: int
    outbox_bytes: int
    messages_received: int
    messages_queued: int
    frames_sent: int
    bytes_sent: int
    dropped: int
    coalesced: int


class Connection:
    """One WebSocket connection, owned by its actor task (see module docs).

    Not created by users: transports' servers create connections and run them
    with :func:`serve_connection`. Everything here is safe to call from any
    task at any time: sending after close raises :class:`ConnectionClosed`,
    closing twice returns the first close.
    """

    # Slots: a connection is created thousands of times; no per-instance dict.
    __slots__ = (
        "__weakref__",
        "_actor_task",
        "_arbiter",
        "_batch_delay",
        "_beat_entry",
        "_bytes_sent",
        "_close_deadline",
        "_closed",
        "_coalesced",
        "_direct",
        "_done",
        "_flush_due",
        "_flushed",
        "_frame_started",
        "_frames_sent",
        "_handshake_scope",
        "_inbox",
        "_inbox_lot",
        "_marked",
        "_messages_queued",
        "_messages_received",
        "_nursery",
        "_outbox",
        "_pacer",
        "_pending_tasks",
        "_rejection",
        "_room_lot",
        "_seen",
        "_send_scope",
        "_transport",
        "_transport_broken",
        "_unsent",
        "_writer_idle",
        "_writer_lot",
        "config",
        "id",
        "identity",
        "request",
        "scope",
    )

    def __init__(self, transport: MessageStream, config: Config, connection_id: str) -> None:
        #: Unique id of this connection (in every log line about it).
        self.id = connection_id
        #: The client's handshake.
        self.request: HandshakeRequest = transport.request
        #: What the authenticate hook returned as ``Accept.identity``.
        self.identity: object = None
        #: The bounds in force.
        self.config = config
        #: Free for the application (per-connection state).
        self.scope: dict[str, Any] = {}
        # The one path to the socket; used by the writer and, after the
        # nursery ends, by the actor's close sequence. Nobody else.
        self._transport = transport
        # First-cause-wins state machine (sans-I/O).
        self._arbiter = CloseArbiter()
        # Batched wake-ups, heartbeats and the run's queued-bytes total.
        self._pacer = pacer()
        # Bounded queue of encoded messages waiting for the writer.
        self._outbox = Outbox(
            config.outbox_max_bytes,
            config.outbox_max_messages,
            burst_bytes=config.outbox_burst_bytes,
            burst_messages=config.outbox_burst_messages,
            total=self._pacer.queued,
            max_total_bytes=config.max_queued_bytes,
        )
        # The writer parks here when the outbox is empty; pushes unpark it
        # (directly, or through the pacer after the current burst).
        self._writer_lot = trio.lowlevel.ParkingLot()
        # The writer's wake-up is with the pacer (it wakes it after the burst).
        self._marked = False
        # The pacer woke the writer: what is queued goes out now.
        self._flushed = False
        # The writer is parked, with no frame in flight (a push must wake it,
        # or, on a direct-send transport, the pacer writes for it).
        self._writer_idle = False
        # The transport writes without a task switch: the pacer's flush
        # writes this connection's frames itself (see _write_now).
        self._direct = transport.direct_send
        # A direct write left bytes in the transport: the writer must wait
        # for the socket (under the send deadlines) before anything else.
        self._flush_due = False
        self._batch_delay = config.batch_delay
        # When the frame being sent started (the slow-consumer clock).
        self._frame_started = 0.0
        # This connection's entry in the pacer's heartbeat heap (while open).
        self._beat_entry: Beat | None = None
        # Tasks in ``send()`` park here until the outbox has room.
        self._room_lot: trio.lowlevel.ParkingLot | None = None
        # Reader -> application; bounded so a slow handler back-pressures TCP.
        # (A list and one parking lot, not a memory channel: a connection is
        # made thousands of times and a channel costs ~2.5 KiB.) Receivers
        # park here while it is empty, the reader while it is full; both are
        # woken at the transitions, and at the close.
        self._inbox: list[str] = []
        self._inbox_lot = trio.lowlevel.ParkingLot()
        # The nursery holding reader/writer/heartbeat/app tasks (while OPEN).
        self._nursery: trio.Nursery | None = None
        # Tasks started after the accept decision but before the nursery exists
        # (the transport was still answering the handshake); started with it.
        self._pending_tasks: list[_TaskSpec] = []
        # The task running serve_connection (the authenticate hook runs in it).
        self._actor_task: trio.lowlevel.Task | None = None
        # The writer's in-flight send; a close request clips its deadline to the
        # close deadline, so a stalled send cannot stretch the close.
        self._send_scope: trio.CancelScope | None = None
        # A frame the writer took from the outbox but whose send did not finish
        # (cancelled by shutdown): the close sequence sends it first, so it is
        # not silently lost. A transport whose interrupted send wrote part of
        # it is broken (the MessageStream contract), so that send raises
        # PeerGone and the transport is aborted instead.
        self._unsent: str | None = None
        # Cancelled by a close request during the handshake.
        self._handshake_scope: trio.CancelScope | None = trio.CancelScope()
        # Set once the close is complete and the transport released; the
        # event is made for the first waiter (most connections have none).
        self._done = False
        self._closed: trio.Event | None = None
        # Set by the reader on any client message; the heartbeat clears it
        # when it pings and checks it when the answer is due.
        self._seen = False
        # Absolute time by which the close must be finished (set at close request).
        self._close_deadline: float | None = None
        # The transport can no longer carry a close frame (stalled/cancelled send).
        self._transport_broken = False
        # The refusal to send, when the authenticate hook returned one.
        self._rejection: Reject | None = None
        self._messages_received = 0
        self._messages_queued = 0
        self._frames_sent = 0
        self._bytes_sent = 0
        self._coalesced = 0

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The connection's current state."""
        return self._arbiter.state

    @property
    def close_record(self) -> CloseRecord | None:
        """The recorded close (code, reason, cause), or ``None`` while not closing."""
        return self._arbiter.record

    def __repr__(self) -> str:
        return (
            f"<Connection {self.id} {self.state.name} "
            f"outbox={len(self._outbox)}/{self._outbox.max_messages} "
            f"{self._outbox.nbytes}/{self._outbox.max_bytes}B>"
        )

    def statistics(self) -> ConnectionStatistics:
        """A frozen snapshot of this connection's counters."""
        return ConnectionStatistics(
            state=self.state,
            outbox_messages=len(self._outbox),
            outbox_bytes=self._outbox.nbytes,
            messages_received=self._messages_received,
            messages_queued=self._messages_queued,
            frames_sent=self._frames_sent,
            bytes_sent=self._bytes_sent,
            dropped=self._outbox.dropped,
            coalesced=self._coalesced,
        )

    # -- sending -------------------------------------------------------------

    def offer(self, message: OutboundMessage) -> PushResult:
        """Queue an encoded message without ever blocking or raising (for fan-out).

        When the outbox is over its budget the message's delivery class
        decides: an ephemeral message is dropped (or coalesced by key); a
        durable one is still queued within :attr:`Config.outbox_burst_bytes`
        (and the writer must then make progress, see the module docs), past
        it the connection closes as a slow consumer (4001), queued behind
        what was already accepted.

        Returns:
            What happened; :attr:`PushResult.CLOSED` if the connection is not open.
        """
        if self._arbiter.state is not ConnectionState.OPEN:
            return PushResult.CLOSED
        result = self._push(message)
        if result is PushResult.OVERFLOW:
            self._request_close(4001, "slow consumer", CloseCause.SLOW_CONSUMER)
        return result

    def _push(self, message: OutboundMessage, *, burst: bool = True) -> PushResult:
        """Push into the outbox, count, wake the writer; the caller handles OVERFLOW."""
        outbox = self._outbox
        result = outbox.push(message, burst=burst)
        if result is PushResult.QUEUED:
            self._messages_queued += 1
            if self._writer_idle and not self._marked:
                delay = self._batch_delay
                if delay > 0:
                    self._marked = True
                    self._pacer.mark(self, delay)
                else:
                    self._writer_lot.unpark()
        elif result is PushResult.COALESCED:
            self._coalesced += 1
            self._messages_queued += 1
        return result

    def _check_send(self, now: float) -> None:
        """The pacer's watchdog: cancel the frame in flight if it overstayed.

        A frame may take :attr:`Config.send_timeout`, or
        :attr:`Config.slow_consumer_timeout` while the outbox is over its
        budget, counted from the frame's start (so every frame the client
        takes resets the clock).
        """
        scope = self._send_scope
        if scope is None:
            return
        cfg = self.config
        limit = cfg.slow_consumer_timeout if self._outbox.over_budget else cfg.send_timeout
        if now - self._frame_started >= min(limit, cfg.send_timeout):
            scope.cancel()

    def _wake_writer(self) -> None:
        """The pacer's call after a burst: write now, or wake the writer if it is parked."""
        self._marked = False
        if (
            self._direct
            and self._writer_idle
            and not self._flush_due
            and self._arbiter.state is ConnectionState.OPEN
        ):
            self._write_now()
            return
        self._flushed = True
        if self._writer_lot:
            self._writer_lot.unpark()

    def _write_now(self) -> None:
        """Write what is queued from the pacer's flush, with no task switch.

        Only while the writer is parked with no frame in flight, so frames
        keep their order. Whatever the socket does not take now stays in the
        transport, ahead of later frames; the writer then waits for the
        socket under the usual send deadlines (``_flush_due``).
        """
        outbox = self._outbox
        cfg = self.config
        transport = self._transport
        try:
            while len(outbox):
                frame = outbox.take_batch(cfg.batch_max_bytes, cfg.batch_max_messages)
                assert frame is not None
                complete = transport.send_nowait(frame)
                self._frames_sent += 1
                self._bytes_sent += len(frame)
                if outbox.published:  # sampled for the delivery lag (rare)
                    _observe.frame_delivered(outbox.published)
                if not complete:
                    self._flush_due = True
                    self._writer_lot.unpark()
                    break
        except PeerGone as exc:
            self._peer_gone(exc)  # wakes the writer, which ends the connection
        if self._room_lot:
            self._room_lot.unpark_all()

    def outbox_room(self) -> tuple[int, int]:
        """How much the outbox can take within its budget now: ``(bytes, messages)``."""
        outbox = self._outbox
        return (
            max(0, outbox.max_bytes - outbox.nbytes),
            max(0, outbox.max_messages - len(outbox)),
        )

    def send_nowait(self, message: Mapping[str, Any] | OutboundMessage) -> None:
        """Queue one message (a JSON object, or an already-encoded message).

        Raises:
            ConnectionClosed: the connection is closing or closed.
            OutboxFull: no room now (the connection stays open; the caller decides).
            TypeError, ValueError: ``message`` is not JSON-serialisable, or is
                larger than :attr:`Config.outbox_max_bytes` (it could never fit).
        """
        if not isinstance(message, OutboundMessage):
            message = encode(message)
        self._check_fits(message)
        self._raise_unless_open()
        if message.key is None and not self._outbox.has_room_for(message.nbytes):
            raise OutboxFull(f"outbox full ({self._outbox.nbytes} bytes queued)")
        # Not offer(): a full outbox is the caller's to handle here, even for a
        # durable keyed message that offer() would turn into a 4001 close.
        if self._push(message, burst=False) in (PushResult.DROPPED, PushResult.OVERFLOW):
            raise OutboxFull(f"outbox full ({self._outbox.nbytes} bytes queued)")

    async def send(self, message: Mapping[str, Any] | OutboundMessage) -> None:
        """Queue one message, waiting while the outbox is full.

        Use it from per-connection tasks that produce a stream (it paces them to
        the client). Cancellation: nothing is queued if cancelled while waiting.

        Raises:
            ConnectionClosed: the connection is closing or closed (also if it
                closes while waiting).
            TypeError, ValueError: ``message`` is not JSON-serialisable, or is
                larger than :attr:`Config.outbox_max_bytes` (it could never fit).
        """
        if not isinstance(message, OutboundMessage):
            message = encode(message)
        self._check_fits(message)
        while True:
            self._raise_unless_open()
            if self._outbox.has_room_for(message.nbytes):
                break
            if self._room_lot is None:
                self._room_lot = trio.lowlevel.ParkingLot()
            await self._room_lot.park()
        await trio.lowlevel.checkpoint()
        self._raise_unless_open()
        if self._outbox.has_room_for(message.nbytes):
            self.offer(message)
        else:  # filled up during the checkpoint: wait again
            await self.send(message)

    def _check_fits(self, message: OutboundMessage) -> None:
        # Even an empty outbox refuses it: waiting would be forever, and
        # queueing it anyway would close the connection as a slow consumer.
        if message.nbytes > self._outbox.max_bytes:
            raise ValueError(
                f"message of {message.nbytes} bytes can never fit the outbox "
                f"(outbox_max_bytes={self._outbox.max_bytes})"
            )

    def _raise_unless_open(self) -> None:
        if self._arbiter.state is not ConnectionState.OPEN:
            record = self._arbiter.record
            if record is None:
                raise ConnectionClosed(
                    CloseRecord(1006, "connection not open yet", CloseCause.TRANSPORT)
                )
            raise ConnectionClosed(record)

    # -- receiving -----------------------------------------------------------

    async def receive(self) -> str:
        """The next text message from the client.

        Raises:
            ConnectionClosed: the connection is closing or closed.
        """
        self._raise_unless_open()
        await trio.lowlevel.checkpoint()
        while (message := self._take_message()) is None:
            await self._inbox_lot.park()
        return message

    def _take_message(self) -> str | None:
        """The next message if one is waiting; raises if the connection is not open."""
        self._raise_unless_open()
        inbox = self._inbox
        if not inbox:
            return None
        message = inbox.pop(0)
        if self._inbox_lot and len(inbox) == self.config.inbox_size - 1:
            self._inbox_lot.unpark_all()  # the reader waits for room
        return message

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> str:
        # receive()'s body, not a call to it: one coroutine frame less for
        # every connection parked in ``async for`` (they are most of them).
        try:
            self._raise_unless_open()
            await trio.lowlevel.checkpoint()
            while (message := self._take_message()) is None:
                await self._inbox_lot.park()
        except ConnectionClosed:
            raise StopAsyncIteration from None
        return message

    # -- tasks -----------------------------------------------------------------

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None
    ) -> None:
        """Start a task owned by this connection (e.g. streaming a long reply).

        The task is cancelled when the connection closes, so it can never send
        after the close. If it raises, the connection closes with 1011 and the
        error is logged once; the server and other connections are unaffected.

        Raises:
            ConnectionClosed: the connection is not open.
        """
        self._raise_unless_open()
        if self._nursery is None:
            # Accepted, but the transport is still answering the handshake.
            self._pending_tasks.append((fn, args, name or fn))
            return
        self._nursery.start_soon(self._guarded, fn, args, False, name=name or fn)

    async def _guarded(
        self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...], closes: bool
    ) -> None:
        try:
            await fn(*args)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:
            passing = self._firewall(exc, getattr(fn, "__qualname__", repr(fn)))
            if passing is not None:
                try:
                    raise passing
                finally:
                    # The traceback holds this frame: no local may hold the
                    # exception, or a closed connection lives on in a cycle.
                    del passing
        else:
            if closes:
                self._request_close(1000, "", CloseCause.APP)

    def _firewall(self, exc: BaseException, where: str) -> BaseException | None:
        """Turn an application exception into a 1011 close.

        Returns:
            What must propagate (cancellation, interpreter exit), or ``None``.
            The caller raises it: raising here would put this frame, which
            holds ``exc``, into its traceback (a reference cycle).
        """
        if isinstance(exc, BaseExceptionGroup):
            passing, crashing = exc.split(_PASS_THROUGH)
            if crashing is not None:
                crashing = crashing.split(lambda e: self._is_own_close(e))[1]
            if crashing is not None:
                self._crash(crashing, where)
            return passing
        if isinstance(exc, _PASS_THROUGH):
            return exc
        if not self._is_own_close(exc):
            self._crash(exc, where)
        return None

    def _is_own_close(self, exc: BaseException) -> bool:
        # A task that used this connection after its close got ConnectionClosed
        # carrying this very record: it ended with the connection, it did not
        # crash (no 1011, no error log; the close is already decided).
        record = self._arbiter.record
        return record is not None and isinstance(exc, ConnectionClosed) and exc.record is record

    def _crash(self, exc: BaseException, where: str) -> None:
        logger.error("connection %s: %s raised; closing with 1011", self.id, where, exc_info=exc)
        self._request_close(1011, "internal error", CloseCause.INTERNAL)

    # -- closing ---------------------------------------------------------------

    def close_nowait(
        self, code: int = 1000, reason: str = "", *, cause: CloseCause = CloseCause.APP
    ) -> CloseOutcome:
        """Ask the connection to close; returns at once. Idempotent; never raises.

        The first request fixes code, reason and cause; later requests change
        nothing and return the recorded close. During the handshake the client
        gets an HTTP refusal instead (503 for 1012/1013, 500 for 1011, else 403).
        """
        return self._request_close(code, reason, cause)

    async def close(self, code: int = 1000, reason: str = "") -> CloseOutcome:
        """Close the connection and wait until it is closed.

        Idempotent and never raises because of the connection's state: in
        CONNECTING it refuses the handshake, in OPEN it flushes what was queued
        and sends the close frame, in CLOSING it waits for that to finish, in
        CLOSED it returns at once. Bounded by :attr:`Config.close_timeout`
        (then the transport is aborted).

        Called from one of the connection's own tasks (or from the
        authenticate hook) it returns without waiting: the calling task is
        cancelled as part of the close.

        Returns:
            Whether this call decided the close, and the recorded close.
        """
        outcome = self._request_close(code, reason, CloseCause.APP)
        if self._inside():
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._wait_done()
        return outcome

    async def wait_closed(self) -> CloseRecord:
        """Wait until the connection is fully closed; returns the recorded close."""
        await self._wait_done()
        assert self._arbiter.record is not None
        return self._arbiter.record

    async def _wait_done(self) -> None:
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        if self._closed is None:
            self._closed = trio.Event()
        await self._closed.wait()

    def _inside(self) -> bool:
        """True if the current task is the actor or belongs to the connection's nursery.

        Such a task cannot wait for the close: the close waits for it.
        """
        nursery = self._nursery
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        while task is not None:
            if task is self._actor_task:
                return True
            parent = task.parent_nursery
            if parent is None:
                return False
            if parent is nursery:
                return True
            task = parent.parent_task
        return False  # pragma: no cover  (the root task has no parent nursery)

    def _request_close(self, code: int, reason: str, cause: CloseCause) -> CloseOutcome:
        was = self._arbiter.state
        outcome = self._arbiter.close(code, reason, cause)
        if outcome.initiated:
            self._close_deadline = trio.current_time() + self.config.close_timeout
            if was is ConnectionState.CONNECTING and self._handshake_scope is not None:
                self._handshake_scope.cancel()
            if self._send_scope is not None:
                self._send_scope.deadline = min(self._send_scope.deadline, self._close_deadline)
            logger.debug("connection %s: close %d (%s) %r", self.id, code, cause.value, reason)
            # Wake the writer so it returns and cancels the nursery; wake
            # senders so they raise ConnectionClosed.
            self._writer_lot.unpark_all()
            if self._room_lot is not None:
                self._room_lot.unpark_all()
        return outcome

    # -- the tasks of an open connection -------------------------------------

    def _peer_gone(self, exc: PeerGone) -> None:
        """Record the peer's close (its code) or its disappearance (1006)."""
        if exc.code is None:
            self._request_close(1006, "connection lost", CloseCause.TRANSPORT)
        else:
            self._request_close(exc.code, exc.reason, CloseCause.PEER)

    async def _reader(self) -> None:
        limit = self.config.max_message_bytes
        inbox = self._inbox
        lot = self._inbox_lot
        size = self.config.inbox_size
        while True:
            try:
                message = await self._transport.receive()
            except PeerGone as exc:
                self._peer_gone(exc)
                return
            except RemoteProtocolError as exc:
                self._request_close(exc.code, str(exc), CloseCause.PROTOCOL)
                return
            self._seen = True
            if isinstance(message, bytes):
                self._request_close(1003, "binary frames are not supported", CloseCause.PROTOCOL)
                return
            # len() counts code points <= UTF-8 bytes <= 4 * code points, so
            # encoding is only needed in the ambiguous band.
            if len(message) > limit or (len(message) * 4 > limit and len(message.encode()) > limit):
                self._request_close(1009, "message too big", CloseCause.PROTOCOL)
                return
            self._messages_received += 1
            while len(inbox) >= size:
                await lot.park()  # a slow handler back-pressures the client's TCP
            inbox.append(message)
            if lot:
                lot.unpark_all()

    async def _writer(self) -> None:
        outbox = self._outbox
        transport = self._transport
        cfg = self.config
        now = trio.current_time
        # One scope for the writer's life (entering a scope per frame costs
        # ~15% of a fan-out's CPU, and so would setting its deadline twice per
        # frame): the pacer's watchdog cancels it when the frame in flight
        # overstays its time; a close requested meanwhile clips its deadline.
        stalled = trio.CancelScope()
        sending = self._pacer.sending
        delay = cfg.batch_delay
        try:
            with stalled:
                while self._arbiter.state is ConnectionState.OPEN:
                    if self._flush_due:
                        # A direct write left bytes in the transport: they
                        # go out before any other frame, under the deadlines.
                        self._flush_due = False
                        self._frame_started = now()
                        self._send_scope = stalled
                        sending.add(self)
                        try:
                            await transport.flush()
                        except PeerGone as exc:
                            self._peer_gone(exc)
                            return
                        finally:
                            self._send_scope = None
                            sending.discard(self)
                        continue
                    if not len(outbox):
                        self._writer_idle = True
                        try:
                            await self._writer_lot.park()
                        finally:
                            self._writer_idle = False
                        continue
                    if (
                        delay > 0
                        and not self._flushed
                        and len(outbox) < cfg.batch_max_messages
                        and outbox.nbytes < cfg.batch_max_bytes
                    ):
                        # Less than a frame's worth is queued, and the burst
                        # that queued it may go on: let the pacer wake us
                        # after it (a writer that just sent one message would
                        # otherwise send one message per frame forever).
                        if not self._marked:
                            self._marked = True
                            self._pacer.mark(self, delay)
                        self._writer_idle = True
                        try:
                            await self._writer_lot.park()
                        finally:
                            self._writer_idle = False
                        continue
                    self._flushed = False
                    frame = outbox.take_batch(cfg.batch_max_bytes, cfg.batch_max_messages)
                    assert frame is not None
                    # Sampled for the delivery lag? Almost always 0.0: one read
                    # and one test per frame (see chatcore._observe).
                    published = outbox.published
                    if self._room_lot:
                        self._room_lot.unpark_all()
                    self._unsent = frame
                    self._frame_started = now()
                    self._send_scope = stalled
                    sending.add(self)
                    try:
                        await transport.send(frame)
                    except PeerGone as exc:
                        # The send can see the peer's close before the reader does.
                        self._peer_gone(exc)
                        return
                    finally:
                        self._send_scope = None
                        sending.discard(self)
                    self._unsent = None
                    self._frames_sent += 1
                    self._bytes_sent += len(frame)
                    if published:
                        _observe.frame_delivered(published)
            if stalled.cancelled_caught:
                # Past send_timeout, past the slow-consumer time while over
                # budget, or past the close deadline of a close requested
                # meanwhile: the frame may be half-written.
                self._transport_broken = True
                reason = "slow consumer" if outbox.over_budget else "send stalled"
                self._request_close(4001, reason, CloseCause.SLOW_CONSUMER)
        finally:
            # Whatever ended the writer ends the connection's tasks.
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()

    def _beat(self, beat: Beat) -> None:
        """The pacer's call when this connection's heartbeat is due."""
        if self._arbiter.state is not ConnectionState.OPEN:
            return
        cfg = self.config
        # The clock, not the due time: a busy process may call back late, and
        # the client's time to answer counts from the ping it actually got.
        now = trio.current_time()
        if not beat.ping_sent:
            self._seen = False
            self.offer(_PING)
            beat.ping_sent = True
            beat.pinged_at = now
            self._pacer.schedule(beat, now + cfg.heartbeat_timeout)
        elif not self._seen:
            self._request_close(4000, "heartbeat timeout", CloseCause.HEARTBEAT)
        else:
            # Answered: the next ping is one interval after the last one.
            beat.ping_sent = False
            self._pacer.schedule(beat, max(now, beat.pinged_at + cfg.heartbeat_interval))

    # -- the actor -------------------------------------------------------------

    async def _run(self, handler: ConnectionHandler) -> None:
        self._actor_task = trio.lowlevel.current_task()
        try:
            if await self._handshake(handler):
                self._handshake_scope = None  # done with: not kept for the connection's life
                beat = self._beat_entry = Beat(self, 0.0)
                self._pacer.schedule(beat, trio.current_time() + self.config.heartbeat_interval)
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._reader)
                        nursery.start_soon(self._writer)
                        for fn, args, name in self._pending_tasks:
                            nursery.start_soon(self._guarded, fn, args, False, name=name)
                        self._pending_tasks.clear()
                        # The actor itself runs the application, with no
                        # wrapper coroutine (one frame less per connection):
                        # _guarded's firewall, inline.
                        try:
                            await handler.handle(self)
                        except _PASS_THROUGH:
                            raise
                        except BaseException as exc:
                            escaping = self._firewall(
                                exc, getattr(handler.handle, "__qualname__", "handle")
                            )
                            if escaping is not None:
                                try:
                                    raise escaping
                                finally:
                                    del escaping  # the traceback holds this frame
                        else:
                            self._request_close(1000, "", CloseCause.APP)
                except BaseException as exc:
                    # The nursery absorbs its own cancellation (a close), so a
                    # Cancelled that leaves it came from outside: the server
                    # is stopping.
                    if _is_cancellation(exc):
                        self._transport.server_stopping()
                    raise
                finally:
                    self._pacer.detach(beat)
                    self._inbox_lot.unpark_all()  # receivers see the close
                    with trio.CancelScope(shield=True):
                        await self._finish_close()
        finally:
            # Also when the nursery never ran: a receive() waiting since the
            # accept decision must not wait forever.
            self._inbox_lot.unpark_all()
            self._pending_tasks.clear()
            # Nothing of the run (tasks, nursery, scopes) stays reachable from
            # a closed connection: no reference cycles for the collector.
            self._nursery = None
            self._actor_task = None
            self._send_scope = None
            self._done = True
            if self._closed is not None:
                self._closed.set()
            try:
                handler.connection_closed(self)
            except Exception:
                logger.exception("connection %s: connection_closed hook raised", self.id)

    async def _handshake(self, handler: ConnectionHandler) -> bool:
        """Authenticate and answer the handshake. True if the connection opened."""
        decision: Accept | Reject | None = None
        scope = self._handshake_scope
        assert scope is not None
        try:
            with scope:
                scope.deadline = trio.current_time() + self.config.handshake_timeout
                decision = await handler.authenticate(self.request)
                if isinstance(decision, Accept):
                    self.identity = decision.identity
                    self._arbiter.accept()
                    try:
                        await self._transport.accept(
                            subprotocol=decision.subprotocol, headers=decision.headers
                        )
                    except BaseException:
                        # The handshake answer may be half-written: no close
                        # frame can follow it, only an abort.
                        self._transport_broken = True
                        raise
                    return True
                if not isinstance(decision, Reject):
                    raise TypeError(f"authenticate returned {decision!r}, not Accept/Reject")
        except PeerGone:
            self._request_close(1006, "client left during handshake", CloseCause.TRANSPORT)
        except BaseException as exc:
            passing = self._firewall(exc, "authenticate")  # a crash: refused with 500
            if passing is not None:
                # Cancelled from outside (server shutdown): refuse with 503.
                if _is_cancellation(passing):
                    self._transport.server_stopping()
                self._request_close(1012, "server shutting down", CloseCause.SHUTDOWN)
                with trio.CancelScope(shield=True):
                    await self._finish_close()
                try:
                    raise passing
                finally:
                    del passing
        state = self._arbiter.state
        if state is ConnectionState.CONNECTING:
            # The hook refused, or ran out of time (then it is our fault: 503).
            if not isinstance(decision, Reject):
                logger.warning("connection %s: handshake timed out", self.id)
                decision = Reject(503, b"handshake timed out")
            self._rejection = decision
            self._arbiter.reject(decision.status, decision.body.decode("utf-8", "replace"))
            self._close_deadline = trio.current_time() + self.config.close_timeout
        elif state is ConnectionState.OPEN:
            # We accepted but the transport's accept did not complete in time.
            self._request_close(1006, "handshake did not complete", CloseCause.TRANSPORT)
        with trio.CancelScope(shield=True):
            await self._finish_close()
        return False

    async def _finish_close(self) -> None:
        """The close sequence; the only code that closes the transport. Shielded."""
        record = self._arbiter.record
        if record is None:
            # Cancelled from outside with no close requested: server shutdown.
            self._request_close(1012, "server shutting down", CloseCause.SHUTDOWN)
            record = self._arbiter.record
            assert record is not None
        deadline = self._close_deadline
        assert deadline is not None
        transport = self._transport
        with trio.move_on_at(deadline):
            try:
                if self._arbiter.state is ConnectionState.REJECTED:
                    if record.cause is not CloseCause.TRANSPORT:
                        rejection = self._rejection
                        assert record.http_status is not None
                        await transport.reject(
                            record.http_status,
                            body=rejection.body if rejection else record.reason.encode(),
                            headers=rejection.headers if rejection else (),
                        )
                elif not (record.cause.peer_gone or self._transport_broken):
                    cfg = self.config
                    outbox = self._outbox
                    # What the writer had in hand goes first, then the rest, in order.
                    frame, self._unsent = self._unsent, None
                    if frame is None:
                        frame = outbox.take_batch(cfg.batch_max_bytes, cfg.batch_max_messages)
                    while frame is not None:
                        await transport.send(frame)
                        self._frames_sent += 1
                        self._bytes_sent += len(frame)
                        frame = outbox.take_batch(cfg.batch_max_bytes, cfg.batch_max_messages)
                    await transport.close(record.code, record.reason)
            except PeerGone:
                pass
        self._outbox.clear()
        await transport.abort()
        self._arbiter.finish()


def _is_cancellation(exc: BaseException) -> bool:
    """True for ``trio.Cancelled``, or a group that holds one."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[0] is not None
    return isinstance(exc, trio.Cancelled)


async def serve_connection(
    transport: MessageStream,
    handler: ConnectionHandler,
    *,
    config: Config | None = None,
    connection_id: str | None = None,
    task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one connection from handshake to close; returns when it is closed.

    Never raises because of the client or the application: handler errors
    close the connection with 1011, client faults with their close code.
    Cancellation (server shutdown) closes it with 1012, shielded and bounded
    by :attr:`Config.close_timeout`, and then propagates.

    Args:
        transport: The client's stream, handshake received and not answered.
        handler: The application.
        config: Bounds and timings (default: ``handler.connection_config``, else
            :class:`Config` ``()``).
        connection_id: An id for logs (default: random).
        task_status: Started with the :class:`Connection` before the handshake.
    """
    config = config or handler.connection_config or Config()
    connection = Connection(transport, config, connection_id or secrets.token_hex(6))
    task_status.started(connection)
    # The close log, metrics, tracing (chatcore._observe): per connection, not per message.
    started, handler = _observe.connection_started(connection, handler)
    try:
        await connection._run(handler)
    finally:
        _observe.connection_ended(connection, started)
