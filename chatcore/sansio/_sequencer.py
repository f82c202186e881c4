"""Per-room ordering: what to do with each room message a node receives.

Theory of operation
-------------------

A room's order is decided once, by the backplane: each message gets an
``epoch`` (the name of one unbroken history of the room) and an ``offset``
(+1 per message in that epoch). A node receives the room's messages from the
backplane possibly twice (live and again from a catch-up or a replay), out
of order (a message overtaking one that is being repaired), or from an epoch
that has ended. A :class:`RoomSequencer` turns that stream into the room's
order, each offset once. It is the one place duplicates are filtered.

Rule 1: **nothing is emitted before the position is known.** Until
:meth:`RoomSequencer.start` learns where the room stands, arrivals are held.

Rule 2: **emit the next offset, hold the rest.** ``offset + 1`` is emitted,
followed by every held message that then continues the order. An offset at
or below ``offset`` is :class:`Stale` (a duplicate). One further ahead is
held and the step reports a gap, which the caller fills from the room's
history (:meth:`RoomSequencer.repair_range`, then :meth:`receive` each).

Rule 3: **a new epoch is a break, never a continuation.** A message of an
unknown epoch means the history the members followed is gone
(:class:`EpochChanged`): the sequencer adopts the new epoch and the members
must recover on their own. A message of an epoch already left behind is
:class:`Stale`.

Every step is one of four values; the table:

=====================================  ==========================================
arrival                                step
=====================================  ==========================================
position unknown                       ``Held(gap=False)``
retired epoch, or ``offset <= last``   ``Stale(item)``
another epoch                          ``EpochChanged(position)``
``offset == last + 1``                 ``Emit(items)``: it and what follows it
``offset > last + 1``                  ``Held(gap=True)``
=====================================  ==========================================
"""

from __future__ import annotations

from collections import deque

import attrs

from ._outbox import OutboundMessage

__all__ = [
    "Emit",
    "EpochChanged",
    "Held",
    "Position",
    "RoomSequencer",
    "Sequenced",
    "SequencerStep",
    "Stale",
]

# Epochs a room remembers having left: their late messages are stale.
_RETIRED_EPOCHS = 8


@attrs.frozen
class Position:
    """Where a room's order stands.

    Attributes:
        epoch: The room's epoch (changes when its history was lost).
        offset: The last assigned offset (0 before the first message).
    """

    epoch: str
    offset: int


@attrs.frozen(slots=True)
class Sequenced:
    """A room message with its place in the room's order.

    Attributes:
        room: The room.
        epoch: The epoch the offset belongs to.
        offset: The message's offset.
        message: The encoded ``message`` (encoded once, where sequenced).
        nonce: Set by the publishing node to match the publisher's reply.
    """

    room: str
    epoch: str
    offset: int
    message: OutboundMessage
    nonce: str | None = None


@attrs.frozen(slots=True)
class Emit:
    """Deliver these messages, in this order (consecutive offsets).

    Attributes:
        items: The arrival first if it was next, then the held ones it released.
    """

    items: tuple[Sequenced, ...]


@attrs.frozen(slots=True)
class Held:
    """The arrival is kept until it can be emitted.

    Attributes:
        gap: True if it waits for missing offsets (fill them from the
            room's history); False if it waits for the room's position.
    """

    gap: bool


@attrs.frozen(slots=True)
class Stale:
    """The arrival was already emitted, or belongs to an epoch left behind.

    Attributes:
        item: The arrival (its publisher may still wait for its offset).
    """

    item: Sequenced


@attrs.frozen(slots=True)
class EpochChanged:
    """The room's order began anew: what came before cannot be continued.

    The sequencer now stands at ``position``; held messages were discarded.

    Attributes:
        position: The new epoch and offset.
    """

    position: Position


#: What :meth:`RoomSequencer.receive` decides for one arrival.
SequencerStep = Emit | Held | Stale | EpochChanged

_NOT_READY = Held(gap=False)
_GAP = Held(gap=True)


class RoomSequencer:
    """One room's order as one node delivers it (see the module docs).

    Args:
        max_held: Most messages held ahead of a gap; beyond it an arrival is
            not kept (the repair reads it from history like the others).

    Raises:
        ValueError: ``max_held`` is below 1.
    """

    __slots__ = ("_held", "_retired", "epoch", "max_held", "offset")

    def __init__(self, max_held: int = 65_536) -> None:
        if max_held < 1:
            raise ValueError(f"max_held must be >= 1, got {max_held!r}")
        #: Most messages held ahead of a gap.
        self.max_held = max_held
        #: The epoch being followed ("" until :meth:`start`).
        self.epoch = ""
        #: The last offset emitted (or the starting position's).
        self.offset = 0
        # Arrivals ahead of the order (or before the position was known).
        self._held: dict[int, Sequenced] = {}
        # Epochs left behind (most recent last).
        self._retired: deque[str] = deque(maxlen=_RETIRED_EPOCHS)

    def __repr__(self) -> str:
        return f"<RoomSequencer epoch={self.epoch!r} offset={self.offset} held={len(self._held)}>"

    @property
    def ready(self) -> bool:
        """True once the position is known (:meth:`start` was called)."""
        return bool(self.epoch)

    @property
    def held(self) -> int:
        """How many arrivals are held."""
        return len(self._held)

    @property
    def position(self) -> Position:
        """The epoch and the last offset emitted."""
        return Position(self.epoch, self.offset)

    def start(self, position: Position) -> list[SequencerStep]:
        """Learn where the room stands; release what arrived before.

        Returns:
            The steps of the held arrivals, in offset order.

        Raises:
            ValueError: the position has an empty epoch.
        """
        if not position.epoch:
            raise ValueError("a position needs an epoch")
        self.epoch = position.epoch
        self.offset = position.offset
        early = sorted(self._held.items())
        self._held.clear()
        return [self.receive(item) for _, item in early]

    def receive(self, item: Sequenced) -> SequencerStep:
        """Decide what to do with one arrival (see the table in the module docs)."""
        if not self.epoch:
            self._hold(item)
            return _NOT_READY
        if item.epoch != self.epoch:
            if item.epoch in self._retired:
                return Stale(item)
            self.reset(Position(item.epoch, item.offset))
            return EpochChanged(self.position)
        offset = item.offset
        if offset <= self.offset:
            return Stale(item)
        if offset > self.offset + 1:
            self._hold(item)
            return _GAP
        self.offset = offset
        held = self._held
        if not held:
            return Emit((item,))
        items = [item]
        while self.offset + 1 in held:
            self.offset += 1
            items.append(held.pop(self.offset))
        return Emit(tuple(items))

    def reset(self, position: Position) -> None:
        """Adopt ``position`` after the order was lost; drop what is held.

        The epoch left behind is remembered: its late messages are stale.
        """
        if self.epoch and self.epoch != position.epoch:
            self._retired.append(self.epoch)
        self.epoch = position.epoch
        self.offset = position.offset
        self._held.clear()

    def needs_repair(self, position: Position) -> bool:
        """True if messages up to ``position`` are missing here (same epoch)."""
        return bool(self._held) or position.offset > self.offset

    def _hold(self, item: Sequenced) -> None:
        if len(self._held) < self.max_held or item.offset in self._held:
            self._held[item.offset] = item
