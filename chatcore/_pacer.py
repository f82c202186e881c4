"""The pacer: one per Trio run, it wakes writers in batches and runs every heartbeat.

Theory of operation
-------------------

Jobs that used to cost every connection a task or a timer are done here once
for all connections of a Trio run, by three system tasks that sleep unless
there is work.

**Batched wake-ups.** A message offered to a connection whose writer is
parked does not wake the writer at once: the connection is *marked*. The
flusher wakes every marked writer together once the burst that marked them is
over, i.e. after :data:`QUIET_PASSES` scheduler passes in a row in which no
other task was waiting to run (neither woken by another task nor by I/O) and
no outbox of the run changed, or after the connection's
:attr:`Config.batch_delay <chatcore.Config.batch_delay>`, or after
:data:`MAX_PASSES` passes, whichever comes first. The busier the process, the
more messages each frame carries, so the cost per message falls as the load
rises. While a client streams
publishes, their frames keep arriving on the socket and the tasks that read
and fan them out keep running; the writers then find them all queued and send
them as one frame. When nothing
else runs, the flusher's few passes take microseconds, so an idle connection
still gets its message at once. The flusher never sleeps while writers are
marked: it checkpoints, so ``wait_all_tasks_blocked()`` still means
"everything is delivered".

**Heartbeats.** Each open connection has a :class:`Beat` in one heap ordered
by due time; one task sleeps until the earliest is due and calls the
connection back (send a ping, or check the answer). A closed connection
detaches its beat, so the heap never keeps a closed connection alive, and the
heap is compacted once detached entries are the majority, so connection churn
cannot grow it beyond about twice the open connections.

**Send deadlines.** A writer puts its connection in :attr:`Pacer.sending`
while a frame is in flight; one watchdog task looks at them every
:data:`WATCH_INTERVAL` seconds and cancels a frame that overstayed its time
(so no writer arms a deadline per frame, which costs more than the rest of
its bookkeeping).

**Queued bytes.** The :class:`~chatcore.sansio.QueueTotal` that every outbox
of the run adds to, bounding the memory all outboxes hold together.

The tasks are Trio *system tasks* (``trio.lowlevel.spawn_system_task``),
started on first use in a run and cancelled when the run ends; what they call
back never raises (it is the connection's own close logic), and anything
unexpected is logged, never propagated.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Protocol

import attrs
import trio

from .sansio import QueueTotal

__all__ = [
    "MAX_PASSES",
    "QUIET_PASSES",
    "WATCH_INTERVAL",
    "Beat",
    "Pacer",
    "PacerStatistics",
    "pacer",
]

logger = logging.getLogger("chatcore.connection")

#: Scheduler passes in a row with nothing else to run after which marked
#: writers are woken. Several, because Trio runs a pass's tasks in either order:
#: the flusher may run before the tasks of its own pass and see none waiting.
QUIET_PASSES = 4
#: How often the watchdog checks the frames in flight (the precision of
#: :attr:`Config.send_timeout <chatcore.Config.send_timeout>` and
#: :attr:`Config.slow_consumer_timeout <chatcore.Config.slow_consumer_timeout>`).
WATCH_INTERVAL = 0.1
#: Most scheduler passes a mark waits (bounds the delay under virtual clocks
#: and under a load that never pauses).
MAX_PASSES = 256


class Paced(Protocol):
    """What the pacer calls back (a connection)."""

    def _wake_writer(self) -> None: ...

    def _beat(self, beat: Beat) -> None: ...

    def _check_send(self, now: float) -> None: ...


class Beat:
    """One connection's place in the heartbeat heap.

    Attributes:
        owner: The connection, or ``None`` once it closed (then the entry is
            skipped when due).
        due: When the pacer calls the owner back.
        ping_sent: True between a ping and the check of its answer.
        pinged_at: When the last ping was sent.
        queued: True while it is in the pacer's heap.
    """

    __slots__ = ("due", "owner", "ping_sent", "pinged_at", "queued")

    def __init__(self, owner: Paced, due: float) -> None:
        self.owner: Paced | None = owner
        self.due = due
        self.ping_sent = False
        self.pinged_at = due
        self.queued = False

    def __repr__(self) -> str:
        state = "detached" if self.owner is None else ("check" if self.ping_sent else "ping")
        return f"<Beat {state} due={self.due:.3f}>"

    def __lt__(self, other: Beat) -> bool:
        # Heap order. A beat is in the heap at most once and its due time
        # changes only while it is out of it (see Pacer.schedule).
        return self.due < other.due


@attrs.frozen
class PacerStatistics:
    """A snapshot of a run's pacer.

    Attributes:
        marked: Connections whose writer waits for the end of a burst.
        heartbeats: Entries in the heartbeat heap (open connections, plus
            closed ones not yet compacted away).
        sending: Connections with a frame in flight.
        queued_bytes: Bytes queued in every outbox of the run.
        frames_by_size: Frames written so far, by messages per frame:
            entry ``k`` counts frames of ``2**k`` to ``2**(k+1) - 1``
            messages (the last entry also counts larger ones).
        framed_messages: Messages in those frames.
    """

    marked: int
    heartbeats: int
    sending: int
    queued_bytes: int
    frames_by_size: tuple[int, ...] = ()
    framed_messages: int = 0


class Pacer:
    """Batched writer wake-ups and every heartbeat of one Trio run (see module docs).

    Use :func:`pacer` to get the run's instance; it starts the system tasks.
    """

    def __init__(self) -> None:
        #: Bytes queued across every outbox of the run.
        self.queued = QueueTotal()
        # Connections whose writer waits for the flusher, in marking order.
        self._marked: list[Paced] = []
        # Shortest batch delay among the marked connections of this round.
        self._delay = math.inf

        # The flusher parks here while nothing is marked.
        self._flusher_lot = trio.lowlevel.ParkingLot()
        # Heap of beats by due time.
        self._beats: list[Beat] = []
        # Entries of closed connections still in the heap.
        self._detached = 0
        # The heartbeat task parks here; woken when an earlier beat arrives.
        self._beat_lot = trio.lowlevel.ParkingLot()
        #: Connections with a frame in flight (the watchdog's to check).
        self.sending: _Sending = _Sending(self)
        # The watchdog parks here while nothing is in flight.
        self._watch_lot = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        return f"<Pacer marked={len(self._marked)} beats={len(self._beats)} {self.queued!r}>"

    def statistics(self) -> PacerStatistics:
        """A frozen snapshot of the pacer's queues."""
        return PacerStatistics(
            marked=len(self._marked),
            heartbeats=len(self._beats),
            sending=len(self.sending),
            queued_bytes=self.queued.nbytes,
            frames_by_size=tuple(self.queued.frames[1:]),
            framed_messages=self.queued.framed,
        )

    # -- batched wake-ups ------------------------------------------------------

    def mark(self, connection: Paced, delay: float) -> None:
        """Wake ``connection``'s writer after the current burst (at most ``delay`` s)."""
        self._marked.append(connection)
        if delay < self._delay:
            self._delay = delay
        if self._flusher_lot:
            self._flusher_lot.unpark()

    async def _flusher(self) -> None:
        checkpoint = trio.lowlevel.cancel_shielded_checkpoint
        statistics = trio.lowlevel.current_statistics
        now = trio.current_time
        while True:
            if not self._marked:
                await self._flusher_lot.park()
                continue
            deadline = now() + self._delay
            total = self.queued
            queued = total.nbytes
            quiet = passes = 0
            while quiet < QUIET_PASSES and passes < MAX_PASSES:
                await checkpoint()
                passes += 1
                if statistics().tasks_runnable == 0 and total.nbytes == queued:
                    quiet += 1
                else:
                    # Other tasks still run (reading, fanning out): the burst goes on.
                    quiet = 0
                    queued = total.nbytes
                    if now() >= deadline:
                        break
            self._flush()

    def _flush(self) -> None:
        marked, self._marked = self._marked, []
        self._delay = math.inf
        for connection in marked:
            try:
                connection._wake_writer()
            except Exception:  # pragma: no cover  (a chatcore bug; never kill the run)
                logger.exception("waking the writer of %r failed", connection)

    # -- heartbeats ------------------------------------------------------------

    def schedule(self, beat: Beat, due: float) -> None:
        """Schedule ``beat`` (not in the heap now) to call its owner back at ``due``."""
        beat.due = due
        beat.queued = True
        heap = self._beats
        if not heap or due < heap[0].due:
            self._beat_lot.unpark()
        heapq.heappush(heap, beat)

    def detach(self, beat: Beat) -> None:
        """Forget ``beat``'s connection (it closed); compact the heap if need be."""
        beat.owner = None
        if not beat.queued:
            return  # out of the heap already (its last callback closed it)
        self._detached += 1
        heap = self._beats
        if self._detached > 64 and 2 * self._detached > len(heap):
            # In place: the heartbeat task holds this list.
            heap[:] = [entry for entry in heap if entry.owner is not None]
            heapq.heapify(heap)
            self._detached = 0
            self._beat_lot.unpark()

    async def _heartbeats(self) -> None:
        heap = self._beats
        while True:
            if not heap:
                await self._beat_lot.park()
                continue
            beat = heap[0]
            due = beat.due
            if due > trio.current_time():
                with trio.move_on_at(due):
                    await self._beat_lot.park()
                continue
            heapq.heappop(heap)
            beat.queued = False
            owner = beat.owner
            if owner is None:
                self._detached -= 1
                continue
            try:
                owner._beat(beat)
            except Exception:  # pragma: no cover  (a chatcore bug; never kill the run)
                logger.exception("heartbeat of %r failed", owner)

    # -- send deadlines ----------------------------------------------------------

    async def _watchdog(self) -> None:
        sending = self.sending
        while True:
            if not sending:
                await self._watch_lot.park()
                continue
            await trio.sleep(WATCH_INTERVAL)
            now = trio.current_time()
            for connection in list(sending):
                try:
                    connection._check_send(now)
                except Exception:  # pragma: no cover  (a chatcore bug; never kill the run)
                    logger.exception("checking the send of %r failed", connection)


class _Sending(set[Paced]):
    """The connections with a frame in flight; the first one wakes the watchdog."""

    __slots__ = ("_pacer",)

    def __init__(self, pacer: Pacer) -> None:
        super().__init__()
        self._pacer = pacer

    def add(self, connection: Paced) -> None:
        if not self:
            self._pacer._watch_lot.unpark()
        super().add(connection)


_RUN_PACER: trio.lowlevel.RunVar[Pacer] = trio.lowlevel.RunVar("chatcore.pacer")


def pacer() -> Pacer:
    """The pacer of the current Trio run, created (and its tasks started) on first use."""
    try:
        return _RUN_PACER.get()
    except LookupError:
        found = Pacer()
        _RUN_PACER.set(found)
        trio.lowlevel.spawn_system_task(found._flusher, name="chatcore.pacer.flusher")
        trio.lowlevel.spawn_system_task(found._heartbeats, name="chatcore.pacer.heartbeats")
        trio.lowlevel.spawn_system_task(found._watchdog, name="chatcore.pacer.watchdog")
        return found
