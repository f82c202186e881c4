"""A room's recent history, for reconnect recovery by offset.

Theory of operation
-------------------

Every message of a room gets its place in the room's order: an *offset*, +1
per message, first message 1 (``docs/protocol.md``). A :class:`History` keeps the most
recent of those messages, already encoded, so a client that comes back with
``since: {"epoch", "offset"}`` can be sent exactly what it missed.

Rule 1: **the held messages are one unbroken run ending at the last offset.**
Offsets are appended consecutively and trimmed only from the old end, so what
is held is always ``range(first_offset, last_offset + 1)`` (empty when
``first_offset == last_offset + 1``). :attr:`History.last_offset` survives
trimming: a history trimmed to nothing still knows where the room stands.

Rule 2: **nothing is partially recovered.** :meth:`History.since` answers a
:class:`Recovery` that is either complete (every message after the client's
offset, in order, possibly none) or empty. It is complete exactly when the
history still holds ``offset + 1`` (or ``offset == last_offset``: nothing was
missed). A client that fell behind the trimmed end gets
:attr:`RecoveryStatus.TRIMMED`; one that claims to have seen more than was
ever appended gets :attr:`RecoveryStatus.AHEAD`. Both mean ``recovered:
false``: the client must reload its state.

Rule 3: **bounded three ways, trimmed from the old end.** By count
(``max_messages``), by age (``max_age`` seconds: an entry appended at ``t`` is
held while ``now <= t + max_age``) and optionally by bytes (``max_bytes`` of
encoded text). Count and bytes are enforced on :meth:`~History.append`; age on
every call that takes ``now`` (so a room that is written but never read stays
bounded too). Nothing here reads a clock: callers pass ``now``.

History and epoch
-----------------

An offset names a message only within one *epoch*; the epoch belongs to the
room (the hub), not to this class. The two change together:

* A :class:`History` holds exactly one epoch's order. When the hub loses a
  room's order (the room was forgotten, the process restarted without a
  durable stream), it makes a new epoch **and** a new :class:`History`; it
  never keeps one without the other.
* The hub compares epochs first. A ``since`` from another epoch is not
  recovered, without asking the history: the same offset may name a
  different message there.
* Trimming does **not** change the epoch. The order is intact; only its old
  end is gone, and :meth:`History.since` says so (``TRIMMED``) to the clients
  that fell behind it, while clients within the window still recover.
* ``AHEAD`` with a matching epoch means the room handed out offsets it no
  longer knows about: an epoch was reused after history was lost (a bug or a
  restart that kept the epoch). It is answered like ``TRIMMED``
  (``recovered: false``) and is worth logging.

A history restored after a restart starts at the room's position:
``History(..., last_offset=n)`` answers ``since(n)`` as complete (nothing
missed) and accepts ``n + 1`` next. The first append into a history that holds
nothing may also jump ahead (e.g. replaying a capped stream whose oldest entry
is later than ``n + 1``); the skipped offsets are simply not held, so a
recovery across them is ``TRIMMED``, never wrong.

For the hub: call :meth:`History.since` and queue its messages in the same
synchronous step that makes the connection a member of the room, so no live
message can fall between the recovered ones and the next live one (nor be
sent twice).
"""

from __future__ import annotations

import enum
import sys
from collections import deque
from itertools import islice

import attrs

from ._errors import LocalProtocolError
from ._outbox import Delivery, OutboundMessage

__all__ = ["History", "HistoryBudget", "HistoryEntry", "Recovery", "RecoveryStatus"]

#: Bytes one held entry costs besides its text: the entry, its slot in the
#: ring and the message object (measured on CPython 3.11, rounded up).
ENTRY_OVERHEAD = 200


def held_size(message: OutboundMessage) -> int:
    """The memory one held message costs, as :class:`HistoryBudget` counts it.

    The size of the text *object*, not its UTF-8 bytes: CPython stores a
    string in 1, 2 or 4 bytes per character, whichever its widest character
    needs, so one emoji in 64 KiB of ASCII makes the text 256 KiB in memory.
    """
    return sys.getsizeof(message.text) + ENTRY_OVERHEAD


class HistoryBudget:
    """The memory many :class:`History` objects hold together (one per process).

    Each history given this budget adds :func:`held_size` of every entry it
    holds to :attr:`held` and subtracts it when the entry goes. The budget
    does not evict anything itself: its owner checks :attr:`over` after an
    append and chooses what to drop (rooms without members first).

    Args:
        limit: The most bytes the histories should hold together; ``None``: no limit.
    """

    __slots__ = ("held", "limit")

    def __init__(self, limit: int | None) -> None:
        #: The bound in bytes (``None``: none).
        self.limit = limit
        #: Bytes held now by every history on this budget.
        self.held = 0

    def __repr__(self) -> str:
        return f"<HistoryBudget held={self.held} limit={self.limit}>"

    @property
    def over(self) -> bool:
        """True while the histories hold more than :attr:`limit`."""
        return self.limit is not None and self.held > self.limit


@attrs.frozen(slots=True)
class HistoryEntry:
    """One message held in a room's history.

    Attributes:
        offset: Its place in the room's order.
        message: The encoded message, exactly as it was fanned out (queue the
            same object into a recovering client's outbox: nothing is
            re-encoded).
        at: When it was appended, in the caller's clock (never earlier than the
            entry before it; see :meth:`History.append`).
    """

    offset: int
    message: OutboundMessage
    at: float

    @property
    def text(self) -> str:
        """The encoded message text (one line of JSON)."""
        return self.message.text

    @property
    def nbytes(self) -> int:
        """Size of :attr:`text` in UTF-8 bytes."""
        return self.message.nbytes


class RecoveryStatus(enum.Enum):
    """How a :meth:`History.since` request turned out."""

    #: Every message after the offset is held and returned (possibly none).
    COMPLETE = "complete"
    #: At least one message after the offset was trimmed: nothing is returned.
    TRIMMED = "trimmed"
    #: The offset is past the last offset this history ever saw: the client's
    #: position is not from this history. Nothing is returned.
    AHEAD = "ahead"


@attrs.frozen(slots=True)
class Recovery:
    """The answer to a reconnecting client's ``since``: all of it, or nothing.

    Attributes:
        status: Complete, or why not (see :class:`RecoveryStatus`).
        messages: When complete, every message after the requested offset, in
            offset order; otherwise always empty (never partial).
    """

    status: RecoveryStatus
    messages: tuple[HistoryEntry, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.messages and self.status is not RecoveryStatus.COMPLETE:
            raise ValueError("an incomplete Recovery carries no messages (never partial)")

    @property
    def complete(self) -> bool:
        """True if the client gets every message it missed (``recovered: true``)."""
        return self.status is RecoveryStatus.COMPLETE

    @property
    def nbytes(self) -> int:
        """Total encoded size of :attr:`messages` (to check it fits an outbox)."""
        return sum(entry.message.nbytes for entry in self.messages)


_TRIMMED = Recovery(RecoveryStatus.TRIMMED)
_AHEAD = Recovery(RecoveryStatus.AHEAD)
_NOTHING_MISSED = Recovery(RecoveryStatus.COMPLETE)


class History:
    """The recent messages of one room (one epoch), bounded, keyed by offset.

    A ring buffer: appended at the new end, trimmed at the old end. No I/O, no
    clock: every method that may trim by age takes ``now``.

    Args:
        max_messages: Most entries held (0: hold nothing; recovery then works
            only for clients that missed nothing).
        max_age: Seconds an entry is held after it was appended; ``None``: no
            age bound.
        max_bytes: Most bytes of encoded text held; ``None``: no byte bound. An
            entry larger than this on its own is not held at all.
        last_offset: The room's last offset when this history starts (0 for a
            new room); offsets up to it are not held.
        budget: A process-wide :class:`HistoryBudget` to count held memory in.

    Raises:
        ValueError: on a negative bound or offset, or a ``max_age`` that is not
            > 0.
    """

    __slots__ = ("_budget", "_entries", "_last", "max_age", "max_bytes", "max_messages", "nbytes")

    def __init__(
        self,
        max_messages: int,
        max_age: float | None = None,
        max_bytes: int | None = None,
        *,
        last_offset: int = 0,
        budget: HistoryBudget | None = None,
    ) -> None:
        if max_messages < 0:
            raise ValueError(f"max_messages must be >= 0, got {max_messages!r}")
        # ``not > 0`` also refuses NaN, which would make every age check false.
        if max_age is not None and not max_age > 0:
            raise ValueError(f"max_age must be > 0 or None, got {max_age!r}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes!r}")
        if last_offset < 0:
            raise ValueError(f"last_offset must be >= 0, got {last_offset!r}")
        #: Count bound.
        self.max_messages = max_messages
        #: Age bound in seconds, or ``None``.
        self.max_age = max_age
        #: Byte bound (encoded text), or ``None``.
        self.max_bytes = max_bytes
        #: Bytes of encoded text held now.
        self.nbytes = 0
        # Held entries, oldest first; offsets consecutive, the newest == _last.
        self._entries: deque[HistoryEntry] = deque()
        # The last offset appended (or given at construction); survives trimming.
        self._last = last_offset
        # Where held memory is counted across rooms (None: nowhere).
        self._budget = budget

    def __len__(self) -> int:
        """Entries held now (as of the last call that trimmed)."""
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"<History {self.first_offset}..{self._last} held={len(self._entries)}"
            f"/{self.max_messages} nbytes={self.nbytes}>"
        )

    @property
    def last_offset(self) -> int:
        """The last offset appended (or given at construction); kept when trimmed."""
        return self._last

    @property
    def first_offset(self) -> int:
        """The oldest offset held, or ``last_offset + 1`` when nothing is held.

        Held offsets are always ``range(first_offset, last_offset + 1)``, so
        ``since(o)`` is complete exactly when ``first_offset - 1 <= o <= last_offset``
        (as of the last call that trimmed: call :meth:`trim` for a fresh view).
        """
        return self._entries[0].offset if self._entries else self._last + 1

    def append(self, offset: int, message: OutboundMessage, now: float) -> HistoryEntry:
        """Hold ``message`` as the room's message number ``offset``.

        Offsets are consecutive: ``offset`` must be ``last_offset + 1``, except
        that a history holding nothing accepts any ``offset > last_offset`` (a
        start from a stream; the skipped offsets are not held, so recovering
        across them is ``TRIMMED``). Then trims by count, bytes and age.

        ``now`` earlier than the previous entry's time is taken as that time,
        so entry times never go backwards and age trimming stays in order.

        Returns:
            The new entry (it may already have been trimmed if it alone
            exceeds ``max_bytes``, or if ``max_messages`` is 0).

        Raises:
            LocalProtocolError: if ``offset`` is not the next one (a lost or
                repeated message in the caller), or ``message`` is ephemeral
                (only durable messages have a place in the room's order).
        """
        entries = self._entries
        expected = self._last + 1
        if offset != expected and (entries or offset < expected):
            raise LocalProtocolError(
                f"history append out of order: got offset {offset}, expected {expected}"
            )
        if message.delivery is not Delivery.DURABLE:
            raise LocalProtocolError("only durable messages belong in a room's history")
        if entries and now < entries[-1].at:
            now = entries[-1].at
        entry = HistoryEntry(offset, message, now)
        entries.append(entry)
        self._last = offset
        self.nbytes += message.nbytes
        if self._budget is not None:
            self._budget.held += held_size(message)
        max_bytes = self.max_bytes
        while entries and (
            len(entries) > self.max_messages or (max_bytes is not None and self.nbytes > max_bytes)
        ):
            self._drop_oldest()
        self.trim(now)
        return entry

    def _drop_oldest(self) -> None:
        message = self._entries.popleft().message
        self.nbytes -= message.nbytes
        if self._budget is not None:
            self._budget.held -= held_size(message)

    def trim(self, now: float) -> int:
        """Drop the entries older than ``max_age`` at ``now``.

        An entry appended at ``t`` is held while ``now <= t + max_age``.

        Returns:
            How many entries were dropped.
        """
        max_age = self.max_age
        entries = self._entries
        if max_age is None:
            return 0
        dropped = 0
        while entries and entries[0].at + max_age < now:
            self._drop_oldest()
            dropped += 1
        return dropped

    def since(self, offset: int, now: float) -> Recovery:
        """What a client that last saw ``offset`` missed: all of it, or nothing.

        Trims by age first (at ``now``).

        Returns:
            ``COMPLETE`` with every held message after ``offset`` in order (none
            if ``offset == last_offset``) when ``offset + 1`` is still held;
            ``TRIMMED`` (no messages) when it is not; ``AHEAD`` (no messages)
            when ``offset > last_offset``.
        """
        self.trim(now)
        missed = self._last - offset
        if missed < 0:
            return _AHEAD
        if missed == 0:
            return _NOTHING_MISSED
        if missed > len(self._entries):
            return _TRIMMED
        return Recovery(RecoveryStatus.COMPLETE, self._newest(missed))

    def last(self, n: int, now: float) -> tuple[HistoryEntry, ...]:
        """The newest ``n`` held entries (fewer if fewer are held), oldest first.

        For applications rendering a room's recent messages. Trims by age first.
        """
        self.trim(now)
        return self._newest(min(max(n, 0), len(self._entries)))

    def _newest(self, n: int) -> tuple[HistoryEntry, ...]:
        # Walk from the new end: a reconnecting client usually missed a few
        # messages, so this costs O(n), not O(entries held).
        entries = self._entries
        if n == len(entries):
            return tuple(entries)
        newest = list(islice(reversed(entries), n))
        newest.reverse()
        return tuple(newest)

    def clear(self) -> int:
        """Drop every held entry; ``last_offset`` stays.

        Use it when the caller knows its copy of the order has a hole (e.g. a
        backplane gap it cannot fill): later recoveries across the hole are then
        ``TRIMMED``, and the next append may jump ahead.

        Returns:
            How many entries were dropped.
        """
        n = len(self._entries)
        if self._budget is not None:
            self._budget.held -= sum(held_size(entry.message) for entry in self._entries)
        self._entries.clear()
        self.nbytes = 0
        return n
