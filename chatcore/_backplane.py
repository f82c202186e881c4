"""Backplanes: where a room's order is decided and how it reaches every node.

Theory of operation
-------------------

A hub delivers to the connections it holds; a *backplane* connects hubs. It
does three things and nothing else:

1. **Sequencing.** :meth:`Backplane.publish` gives a room message its place in
   the room's order (``epoch``, ``offset``: +1 per message) in exactly one
   place, stores it in the room's history, and hands it to every node that
   watches the room, this one included, as a :class:`Sequenced`. The message
   is encoded once, where its offset is assigned.
2. **Recovery.** :meth:`Backplane.replay` returns the stored messages after an
   offset, or ``None`` when they are not all there any more (never partial).
3. **Directed delivery.** Messages for a user (all their connections,
   wherever they are) and user disconnects.

A backplane hands everything to its :class:`BackplaneSink` (the hub) as
typed events through one method, :meth:`BackplaneSink.backplane_event`:
room messages (:class:`Sequenced`), node events
(:data:`chatcore.sansio.NodeEvent`: directed messages, disconnects,
broadcasts, presence) and its own news (:class:`NodeDown`,
:class:`RoomReset`, :class:`Reconnected`). The hub keeps its own position
per room and delivers what arrives in offset order: its per-room
:class:`~chatcore.sansio.RoomSequencer` is the one place duplicates are
dropped; it asks :meth:`Backplane.replay` to fill gaps. The publisher's
``reply`` is matched by ``nonce``, so it goes out right before the
publisher's own message whichever of the two a node learns first.

A new backplane implements :class:`Backplane` with public names only and
proves itself with :func:`chatcore.testing.check_backplane` (see
``docs/scale-out.md``).

:class:`LocalBackplane` is the in-process default: one process, zero
services, delivery synchronous. ``chatcore.redis.RedisBackplane`` runs the
same contract across processes and nodes.
"""

from __future__ import annotations

import abc
import contextvars
import secrets
from collections import OrderedDict
from typing import Any, Protocol, TypeAlias, runtime_checkable

import attrs
import trio

from ._config import _positive, _positive_or_none
from ._exceptions import ChatcoreError
from ._memory import release_free_memory
from .sansio import (
    History,
    NodeEvent,
    OutboundMessage,
    Position,
    PresenceEvent,
    RoomBroadcast,
    Sequenced,
    UserDisconnect,
    UserMessage,
)
from .sansio._history import HistoryBudget
from .sansio._protocol import encode_message

__all__ = [
    "Backplane",
    "BackplaneError",
    "BackplaneEvent",
    "BackplaneSink",
    "HistoryConfig",
    "LocalBackplane",
    "NodeDown",
    "Position",
    "Reconnected",
    "RoomReset",
    "Sequenced",
]


#: The wall-clock time (:func:`time.time`) the hub accepted the room message
#: being published, when that publish is sampled for the delivery-lag metric;
#: ``0.0`` otherwise. The hub sets it around :meth:`Backplane.publish`. A
#: backplane that carries it stamps the message it hands to every node with
#: it (:attr:`OutboundMessage.published
#: <chatcore.sansio.OutboundMessage.published>`), never the stored copy that
#: replays hand out; one that ignores it is simply not measured.
published_at: contextvars.ContextVar[float] = contextvars.ContextVar(
    "chatcore.published_at", default=0.0
)


class BackplaneError(ChatcoreError):
    """The backplane cannot do it now (e.g. Redis is unreachable).

    Whose fault: the infrastructure's. The hub answers the request with the
    ``unavailable`` error code; open connections stay up.
    """


#: History freed by one sweep after which free memory is handed back to the system.
_RELEASE_AFTER = 8 * 1024 * 1024


@attrs.frozen
class HistoryConfig:
    """How much of each room's order is kept for recovery.

    Attributes:
        max_messages: Messages kept per room.
        max_age: Seconds a message is kept (``None``: no age limit).
        max_bytes: Encoded bytes kept per room (``None``: no byte limit).
        rooms: Rooms whose order is kept in memory (in-process backplane only);
            beyond it the least recently used rooms without members are
            forgotten, and get a new epoch if they come back. A room with
            members is never forgotten.
        total_bytes: Memory the histories of all rooms may hold together
            (in-process backplane only; ``None``: no limit). Past it, rooms
            without members are forgotten, least recently used first, then
            the histories of rooms with members are emptied, least recently
            published first. Counted as the size of the held texts in memory
            plus a fixed cost per message.
    """

    max_messages: int = attrs.field(default=1_000, validator=_positive)
    max_age: float | None = attrs.field(default=3_600.0, validator=_positive_or_none)
    max_bytes: int | None = attrs.field(default=1_048_576, validator=_positive_or_none)
    rooms: int = attrs.field(default=10_000, validator=_positive)
    total_bytes: int | None = attrs.field(default=256 * 1024 * 1024, validator=_positive_or_none)


@attrs.frozen
class NodeDown:
    """Another node is gone (its lease expired): forget its connections.

    Attributes:
        node: The node's id.
    """

    node: str


@attrs.frozen
class RoomReset:
    """The room's order was lost (a new epoch began): re-read its position.

    Attributes:
        room: The room.
    """

    room: str


@attrs.frozen
class Reconnected:
    """The backplane reconnected: node events sent meanwhile may be lost.

    Presence is not stored, so the hub re-announces its own and asks the
    other nodes for theirs.
    """


#: Everything a backplane hands its sink: room messages (possibly repeated,
#: out of order, or of an ended epoch: the sink orders them), node events from
#: other nodes (and from this one for directed delivery), and the
#: backplane's own news.
BackplaneEvent: TypeAlias = Sequenced | NodeEvent | NodeDown | RoomReset | Reconnected


@runtime_checkable
class BackplaneSink(Protocol):
    """What a backplane delivers to: its hub (:class:`chatcore.Hub` implements it).

    A backplane calls :meth:`backplane_event` and nothing else, from any of
    its tasks, never concurrently with itself (Trio runs one task at a time).
    """

    def backplane_event(self, event: BackplaneEvent) -> None:
        """Take one event; never blocks.

        * :class:`~chatcore.Sequenced`: a room message. The backplane may hand
          over the same offset twice, out of order, or of an epoch the room
          has left; the sink keeps the room's order (one
          :class:`~chatcore.sansio.RoomSequencer` per room) and asks
          :meth:`Backplane.replay` to fill gaps.
        * :class:`~chatcore.sansio.UserMessage`,
          :class:`~chatcore.sansio.UserDisconnect`,
          :class:`~chatcore.sansio.RoomBroadcast`: directed delivery to this
          node's connections (the sending node's own included: backplanes
          hand these to their own sink directly).
        * presence events (:data:`~chatcore.sansio.PresenceEvent`) of other nodes.
        * :class:`NodeDown`, :class:`RoomReset`, :class:`Reconnected`.

        A sink that cannot apply an event logs it and returns; it does not
        raise into the backplane.
        """


class Backplane(abc.ABC):
    """Sequencing, history and directed delivery between hubs (see module docs)."""

    #: This node's id (unique per process).
    node_id: str

    @abc.abstractmethod
    def attach(self, sink: BackplaneSink) -> None:
        """Connect the hub that receives this backplane's deliveries (once)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the backplane's background tasks until cancelled.

        The in-process backplane has none and returns at once after
        ``task_status.started()``.
        """
        task_status.started()

    @property
    def degraded(self) -> bool:
        """True while the backplane cannot currently do its job (e.g. Redis down)."""
        return False

    @abc.abstractmethod
    async def publish(
        self, room: str, sender: str | None, data: Any, nonce: str | None
    ) -> Position:
        """Sequence, store and deliver a room message; returns its position.

        Raises:
            BackplaneError: no position is known for it. Usually nothing was
                stored; if the link broke after the request was sent, it may
                have been stored and then reaches every member as usual (it is
                never reported as published when it was not).
            TypeError, ValueError: ``data`` is not JSON-serialisable (nothing stored).
        """

    @abc.abstractmethod
    async def position(self, room: str) -> Position:
        """The room's current position.

        After :meth:`watch` it must not return before the watch is effective,
        so that every message after the returned offset reaches this node.

        Raises:
            BackplaneError: unreachable.
        """

    @abc.abstractmethod
    async def replay(self, room: str, epoch: str, after: int, upto: int) -> list[Sequenced] | None:
        """The stored messages with ``after < offset <= upto``, in order.

        Returns:
            The messages, or ``None`` if the epoch differs or any of them is
            no longer stored (recovery is never partial).

        Raises:
            BackplaneError: unreachable.
        """

    def watch(self, room: str) -> None:  # noqa: B027  (optional: local delivery needs none)
        """This node has members in ``room`` now: deliver its messages here."""

    def unwatch(self, room: str) -> None:  # noqa: B027
        """This node has no members in ``room`` any more."""

    @abc.abstractmethod
    async def recent(self, room: str, limit: int) -> list[Sequenced]:
        """The room's last ``limit`` stored messages, oldest first (for apps).

        Raises:
            BackplaneError: unreachable.
        """

    @abc.abstractmethod
    async def broadcast(self, room: str, message: OutboundMessage, exclude: str | None) -> None:
        """Deliver a message outside the room's order (no offset) on every node.

        ``exclude`` is a connection id that must not get it (the sender).
        """

    @abc.abstractmethod
    async def send_to_user(self, user: str, message: OutboundMessage) -> None:
        """Deliver ``message`` to every connection of ``user`` on every node."""

    @abc.abstractmethod
    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        """Close every connection of ``user`` on every node."""

    async def publish_presence(self, event: PresenceEvent) -> None:
        """Tell the other nodes about a presence change of this node.

        They receive it through :meth:`BackplaneSink.backplane_event`; this
        node's own sink does not. The in-process backplane has no other nodes.

        Raises:
            BackplaneError: the other nodes could not be told.
        """
        await trio.lowlevel.checkpoint()


class _RoomStore:
    __slots__ = ("epoch", "history")

    def __init__(self, history: HistoryConfig, budget: HistoryBudget) -> None:
        self.epoch = secrets.token_hex(4)
        self.history = History(
            history.max_messages, history.max_age, history.max_bytes, budget=budget
        )


class LocalBackplane(Backplane):
    """The in-process backplane: one process, zero services (the default).

    Each room's order and history live in memory; a process restart loses
    them, so rooms get new epochs (clients are told ``recovered: false``).

    Args:
        history: How much history to keep.
    """

    def __init__(self, history: HistoryConfig | None = None) -> None:
        #: This process's node id.
        self.node_id = "local-" + secrets.token_hex(4)
        #: The history bounds in force.
        self.history = history or HistoryConfig()
        self._sink: BackplaneSink | None = None
        # Room stores (bounded by history.rooms, except watched rooms).
        self._rooms: dict[str, _RoomStore] = {}
        # Rooms with members (watched): never forgotten, their members would
        # see the order restart under a new epoch.
        self._watched: set[str] = set()
        # The other stored rooms, least recently used first: forgotten first.
        self._idle: OrderedDict[str, None] = OrderedDict()
        # Memory held by every room's history together (history.total_bytes).
        self._budget = HistoryBudget(self.history.total_bytes)

    @property
    def history_bytes(self) -> int:
        """Memory the rooms' histories hold now (as ``HistoryConfig.total_bytes`` counts it)."""
        return self._budget.held

    @property
    def rooms_kept(self) -> int:
        """Rooms whose order is kept in memory (with or without members)."""
        return len(self._rooms)

    def attach(self, sink: BackplaneSink) -> None:
        """See :meth:`Backplane.attach`."""
        self._sink = sink

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep aged messages out of every room until cancelled.

        With ``history.max_age`` set, every ``max_age / 10`` seconds (at most a
        minute) messages past their age are dropped from every room, so a room
        nobody comes back to gives its memory back without waiting to be pushed
        out. The room's order (epoch, last offset) stays: a client that missed
        nothing still recovers; the rooms kept are bounded by ``history.rooms``.
        After a sweep that freed 8 MiB or more, the C allocator is asked to
        return its free pages to the system (glibc's ``malloc_trim``).
        """
        task_status.started()
        max_age = self.history.max_age
        if max_age is None:
            await trio.sleep_forever()
        while True:
            await trio.sleep(min(max_age / 10, 60.0))
            held = self._budget.held
            self.sweep(trio.current_time())
            if held - self._budget.held >= _RELEASE_AFTER:
                release_free_memory()  # else the freed texts stay in the RSS

    def sweep(self, now: float) -> int:
        """Drop messages older than ``history.max_age`` at ``now`` from every room.

        Returns:
            How many messages were dropped.
        """
        return sum(store.history.trim(now) for store in self._rooms.values())

    def watch(self, room: str) -> None:
        """See :meth:`Backplane.watch` (the room's order is kept while watched)."""
        self._watched.add(room)
        self._idle.pop(room, None)

    def unwatch(self, room: str) -> None:
        """See :meth:`Backplane.unwatch` (the room may be forgotten from now on)."""
        self._watched.discard(room)
        if room in self._rooms:
            self._idle[room] = None
            self._idle.move_to_end(room)
            self._forget(self.history.rooms)

    def _forget(self, limit: int) -> None:
        """Forget least recently used unwatched rooms while more than ``limit`` are kept."""
        while len(self._rooms) > limit and self._idle:
            name, _ = self._idle.popitem(last=False)
            self._rooms.pop(name).history.clear()

    def _shrink(self) -> None:
        """Get back under ``history.total_bytes``: rooms without members go first."""
        budget = self._budget
        while budget.over and self._idle:
            name, _ = self._idle.popitem(last=False)
            self._rooms.pop(name).history.clear()
        # Rooms with members keep their order (epoch, offset); only their
        # held messages go, least recently published first.
        for store in list(self._rooms.values()):
            if not budget.over:
                break
            store.history.clear()

    def _store(self, room: str) -> _RoomStore:
        store = self._rooms.get(room)
        if store is None:
            self._forget(self.history.rooms - 1)
            store = self._rooms[room] = _RoomStore(self.history, self._budget)
            if room not in self._watched:
                self._idle[room] = None
        elif room in self._idle:
            self._idle.move_to_end(room)
        return store

    async def publish(
        self, room: str, sender: str | None, data: Any, nonce: str | None
    ) -> Position:
        """See :meth:`Backplane.publish` (synchronous delivery)."""
        stamp = published_at.get()
        await trio.lowlevel.checkpoint()
        store = self._store(room)
        history = store.history
        offset = history.last_offset + 1
        # Encode before the offset is taken: unencodable data leaves no gap.
        message = encode_message(room, offset, store.epoch, sender, data)
        history.append(offset, message, trio.current_time())
        # Least recently published first in _rooms, for _shrink.
        self._rooms[room] = self._rooms.pop(room)
        if self._budget.over:
            self._shrink()
        if self._sink is not None:
            if stamp:
                # The live delivery only: a replay of the history is not lag.
                message = attrs.evolve(message, published=stamp)
            self._sink.backplane_event(Sequenced(room, store.epoch, offset, message, nonce))
        return Position(store.epoch, offset)

    async def position(self, room: str) -> Position:
        """See :meth:`Backplane.position`."""
        await trio.lowlevel.checkpoint()
        store = self._store(room)
        return Position(store.epoch, store.history.last_offset)

    async def replay(self, room: str, epoch: str, after: int, upto: int) -> list[Sequenced] | None:
        """See :meth:`Backplane.replay`."""
        await trio.lowlevel.checkpoint()
        store = self._rooms.get(room)
        if store is None or store.epoch != epoch or upto > store.history.last_offset:
            return None
        recovery = store.history.since(after, trio.current_time())
        if not recovery.complete:
            return None
        return [
            Sequenced(room, epoch, entry.offset, entry.message)
            for entry in recovery.messages
            if entry.offset <= upto
        ]

    async def recent(self, room: str, limit: int) -> list[Sequenced]:
        """See :meth:`Backplane.recent`."""
        await trio.lowlevel.checkpoint()
        store = self._rooms.get(room)
        if store is None:
            return []
        entries = store.history.last(limit, trio.current_time())
        return [Sequenced(room, store.epoch, e.offset, e.message) for e in entries]

    async def broadcast(self, room: str, message: OutboundMessage, exclude: str | None) -> None:
        """See :meth:`Backplane.broadcast`."""
        await trio.lowlevel.checkpoint()
        if self._sink is not None:
            self._sink.backplane_event(RoomBroadcast(self.node_id, room, message, exclude))

    async def send_to_user(self, user: str, message: OutboundMessage) -> None:
        """See :meth:`Backplane.send_to_user`."""
        await trio.lowlevel.checkpoint()
        if self._sink is not None:
            self._sink.backplane_event(UserMessage(self.node_id, user, message))

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        """See :meth:`Backplane.disconnect_user`."""
        await trio.lowlevel.checkpoint()
        if self._sink is not None:
            self._sink.backplane_event(UserDisconnect(self.node_id, user, code, reason))
