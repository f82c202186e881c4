"""Outbound messages and the bounded outbox of one connection.

Theory of operation
-------------------

Fan-out must never wait on a client, so it *offers* an already-encoded message
to each member's outbox and gets an immediate answer (:class:`PushResult`).

The outbox has a *budget* (bytes and messages) and, above it, a *burst*
allowance for durable messages. Under the budget everything is queued. Over
it the message's :class:`Delivery` class decides: an ephemeral message is
dropped, or, when it carries a coalescing key, replaces the queued message
with the same key (latest wins); a durable message cannot be silently
dropped, so it is still queued while the queue stays within ``burst_bytes``
and ``burst_messages``
and the process-wide :class:`QueueTotal` stays within its limit. Past those
the answer is :attr:`PushResult.OVERFLOW` and the connection closes the slow
consumer (4001).

Being over the budget is not an offence by itself: a burst of large messages
puts every healthy reader over it for a moment. The connection (which has a
clock; this module has none) judges *progress* instead: a connection that is
over its budget and whose writer completes no frame for a bounded time is the
slow consumer (see :attr:`Outbox.over_budget`).

The writer takes *everything* queued (up to a batch cap) in one go and sends it
as one WebSocket text frame of newline-separated JSON messages, so the cost per
message falls as load rises while an idle connection still gets each message
immediately.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Delivery", "OutboundMessage", "Outbox", "PushResult", "QueueTotal", "dumps", "encode"]


class Delivery(enum.Enum):
    """What may happen to a message when a client cannot keep up."""

    #: Must arrive or the client must be told (it is disconnected with 4001 and
    #: recovers by offset). Chat messages, replies.
    DURABLE = "durable"
    #: May be dropped (or coalesced by key) under pressure. Typing, presence.
    EPHEMERAL = "ephemeral"


@attrs.frozen(slots=True)
class OutboundMessage:
    """One encoded protocol message, ready to be queued in any number of outboxes.

    Encode once, offer the same object to every member: nothing is re-encoded
    per connection.

    Attributes:
        text: The JSON text (one line: it never contains a raw newline).
        nbytes: Its size in UTF-8 bytes.
        delivery: Durable or ephemeral (see :class:`Delivery`).
        key: For ephemeral messages, a coalescing key: a queued message with the
            same key is replaced by this one (latest wins).
        published: For a room message sampled for the delivery-lag metric, the
            wall-clock time (:func:`time.time`, seconds) its origin node
            accepted it; ``0.0`` for every other message. Set once per
            publish: every outbox it is offered to shares it. Not part of
            equality.
    """

    text: str
    nbytes: int
    delivery: Delivery = Delivery.DURABLE
    key: str | None = None
    published: float = attrs.field(default=0.0, eq=False)


# Line and paragraph separators that some line splitters (str.splitlines, old
# JavaScript eval) take as line breaks: escaped, so a message is one line for all.
_SEPARATORS = {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\u0085"}


def dumps(value: Any) -> str:
    """``value`` as compact JSON text for the wire (UTF-8, one line).

    Characters beyond ASCII are kept as they are (an emoji is 4 bytes on the
    wire, not a 12-byte escaped surrogate pair); control characters and the
    Unicode line separators are escaped, so no line break can appear inside.
    A string with a lone surrogate cannot be encoded as UTF-8: then the whole
    text is ASCII with escapes, as JSON allows.

    Raises:
        TypeError, ValueError: if ``value`` is not JSON-serialisable.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if text.isascii():  # O(1) in CPython: the common case costs nothing more
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = text.translate(_SEPARATORS)
    return text


def encode(
    message: Mapping[str, Any],
    *,
    delivery: Delivery = Delivery.DURABLE,
    key: str | None = None,
) -> OutboundMessage:
    """Encode a protocol message as one line of compact JSON (see :func:`dumps`).

    Raises:
        TypeError, ValueError: if the message is not JSON-serialisable.
    """
    text = dumps(message)
    nbytes = len(text) if text.isascii() else len(text.encode())
    return OutboundMessage(text, nbytes, delivery, key)


class PushResult(enum.Enum):
    """What :meth:`Outbox.push` did with a message."""

    #: Appended to the queue.
    QUEUED = "queued"
    #: Replaced a queued message with the same key (latest wins).
    COALESCED = "coalesced"
    #: Ephemeral and over the budget: discarded.
    DROPPED = "dropped"
    #: Durable and past the burst allowance or the process-wide limit: the
    #: connection must close as a slow consumer.
    OVERFLOW = "overflow"
    #: The connection is not open; nothing was queued (``Connection.offer`` only).
    CLOSED = "closed"


#: Classes of :attr:`QueueTotal.frames` (powers of two of messages per frame).
FRAME_SIZE_CLASSES = 16


class QueueTotal:
    """Memory held by many outboxes (one per process, shared by its connections).

    A fan-out offers the *same* encoded message to every member, so a byte
    count per outbox would count one 64 KiB message a thousand times for a
    room of a thousand. This counts each message text once, however many
    outboxes hold it, and subtracts it when the last one hands it out:
    :attr:`nbytes` is the memory the queued messages take. An outbox given a
    ``max_total_bytes`` refuses, while the total is past it, durable messages
    that would take it over its own budget and add memory (they become
    :attr:`PushResult.OVERFLOW`): the connections that are behind are closed
    first, the ones within budget are untouched, and a message the process
    already holds costs nothing more.
    """

    __slots__ = ("_refs", "framed", "frames", "nbytes")

    def __init__(self) -> None:
        #: Bytes of the distinct message texts queued now in every outbox.
        self.nbytes = 0
        #: Frames taken from the outboxes, by messages per frame:
        #: ``frames[k]`` counts frames of ``2**(k-1)`` to ``2**k - 1``
        #: messages (k = 1 … 16; the last also counts larger ones). How much
        #: batching happens (one list increment per frame).
        self.frames = [0] * (FRAME_SIZE_CLASSES + 1)
        #: Messages in those frames.
        self.framed = 0
        # id(text) -> how many queue entries hold it. The entries keep the
        # text alive, so its id is stable while it is counted.
        self._refs: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<QueueTotal {self.nbytes}B {len(self._refs)} texts>"

    def holds(self, text: str) -> bool:
        """True if some outbox already holds this very text (queueing it adds no memory)."""
        return id(text) in self._refs

    def hold(self, text: str, nbytes: int) -> None:
        """Count one more queue entry holding ``text`` (of ``nbytes``)."""
        refs = self._refs
        key = id(text)
        count = refs.get(key)
        if count is None:
            refs[key] = 1
            self.nbytes += nbytes
        else:
            refs[key] = count + 1

    def release(self, text: str, nbytes: int) -> None:
        """Count one queue entry fewer holding ``text``."""
        refs = self._refs
        key = id(text)
        count = refs[key]
        if count == 1:
            del refs[key]
            self.nbytes -= nbytes
        else:
            refs[key] = count - 1


# The queue of an empty outbox: shared and never appended to (an empty deque
# still holds a block of 64 slots, and most connections are idle).
_EMPTY: deque[_Slot | OutboundMessage] = deque(maxlen=0)


class _Slot:
    __slots__ = ("key", "nbytes", "published", "text")

    def __init__(self, text: str, nbytes: int, key: str | None, published: float) -> None:
        self.text = text
        self.nbytes = nbytes
        self.key = key
        self.published = published


class Outbox:
    """A bounded FIFO of encoded messages for one connection (no I/O, no clock).

    Args:
        max_bytes: The byte budget: under it every message is queued; over it
            ephemeral messages are dropped and the connection must show
            progress (:attr:`over_budget`).
        max_messages: The message budget, like ``max_bytes`` by count.
        burst_bytes: Upper bound on the bytes queued, for durable messages
            (default ``max_bytes``: no burst allowance). Never exceeded.
        burst_messages: Upper bound on the messages queued, likewise
            (default ``max_messages``). Never exceeded.
        total: The process-wide count this outbox adds to.
        max_total_bytes: Past this many bytes in ``total``, no durable message
            may take this queue over ``max_bytes`` (default: no limit).

    Raises:
        ValueError: ``burst_bytes`` is below ``max_bytes``, or
            ``burst_messages`` below ``max_messages``.
    """

    __slots__ = (
        "_keyed",
        "_max_total",
        "_queue",
        "_total",
        "burst_bytes",
        "burst_messages",
        "dropped",
        "max_bytes",
        "max_messages",
        "nbytes",
        "published",
    )

    def __init__(
        self,
        max_bytes: int,
        max_messages: int,
        *,
        burst_bytes: int | None = None,
        burst_messages: int | None = None,
        total: QueueTotal | None = None,
        max_total_bytes: int | None = None,
    ) -> None:
        if burst_bytes is None:
            burst_bytes = max_bytes
        if burst_bytes < max_bytes:
            raise ValueError(f"burst_bytes ({burst_bytes}) must be >= max_bytes ({max_bytes})")
        if burst_messages is None:
            burst_messages = max_messages
        if burst_messages < max_messages:
            raise ValueError(
                f"burst_messages ({burst_messages}) must be >= max_messages ({max_messages})"
            )
        #: Byte budget of the queue.
        self.max_bytes = max_bytes
        #: Count budget of the queue.
        self.max_messages = max_messages
        #: Count bound of the queue (durable messages over the budget).
        self.burst_messages = burst_messages
        #: Byte bound of the queue (durable messages over the budget).
        self.burst_bytes = burst_bytes
        # Shared with every other outbox of the process, and its bound.
        self._total = total if total is not None else QueueTotal()
        self._max_total = max_total_bytes if max_total_bytes is not None else 1 << 62
        #: Bytes queued now.
        self.nbytes = 0
        #: Ephemeral messages dropped for lack of room, since creation.
        self.dropped = 0
        #: :attr:`OutboundMessage.published` of the first (oldest) message of
        #: the last batch taken: the frame's lag, when its origin sampled it.
        self.published = 0.0
        # FIFO of queued messages; keyed ones are also indexed by key so a newer
        # message with the same key can replace them in place.
        self._queue = _EMPTY
        self._keyed: dict[str, _Slot] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def __repr__(self) -> str:
        return (
            f"<Outbox {len(self._queue)}/{self.max_messages} "
            f"{self.nbytes}/{self.max_bytes}B burst={self.burst_bytes}B>"
        )

    @property
    def over_budget(self) -> bool:
        """True while more than the budget is queued (a burst, or a slow reader)."""
        return self.nbytes > self.max_bytes or len(self._queue) > self.max_messages

    def push(self, message: OutboundMessage, *, burst: bool = True) -> PushResult:
        """Offer ``message``; never blocks. See :class:`PushResult`.

        Args:
            message: The message.
            burst: False to refuse a durable message over the budget too
                (:attr:`PushResult.OVERFLOW`) instead of using the burst
                allowance: for a caller that handles a full outbox itself.
        """
        key = message.key
        if key is not None:
            slot = self._keyed.get(key)
            if slot is not None:
                grown = self.nbytes - slot.nbytes + message.nbytes
                if grown > self.max_bytes and not (
                    burst and self._may_burst(message, grown - self.nbytes, 0)
                ):
                    return self._refuse(message)
                total = self._total
                total.hold(message.text, message.nbytes)
                total.release(slot.text, slot.nbytes)
                slot.text = message.text
                slot.nbytes = message.nbytes
                slot.published = message.published
                self.nbytes = grown
                return PushResult.COALESCED
        nbytes = message.nbytes
        queue = self._queue
        if (self.nbytes + nbytes > self.max_bytes or len(queue) >= self.max_messages) and not (
            burst and self._may_burst(message, nbytes, 1)
        ):
            return self._refuse(message)
        if queue is _EMPTY:
            queue = self._queue = deque()
        if key is None:
            # Immutable and shared by every outbox it is offered to: no copy.
            queue.append(message)
        else:
            # Coalescing rewrites it in place: this outbox's own slot.
            slot = _Slot(message.text, nbytes, key, message.published)
            queue.append(slot)
            self._keyed[key] = slot
        self.nbytes += nbytes
        self._total.hold(message.text, nbytes)
        return PushResult.QUEUED

    def _may_burst(self, message: OutboundMessage, growth: int, count: int) -> bool:
        # Over the budget only durable messages are queued, and only within the
        # burst allowance and the process-wide limit.
        return (
            message.delivery is Delivery.DURABLE
            and self.nbytes + growth <= self.burst_bytes
            and len(self._queue) + count <= self.burst_messages
            and (self._total.nbytes + growth <= self._max_total or self._total.holds(message.text))
        )

    def _refuse(self, message: OutboundMessage) -> PushResult:
        # No room. Only an ephemeral message may vanish; a durable one (keyed or
        # not) must never be dropped silently, so the caller hears OVERFLOW.
        if message.delivery is Delivery.EPHEMERAL:
            self.dropped += 1
            return PushResult.DROPPED
        return PushResult.OVERFLOW

    def has_room_for(self, nbytes: int) -> bool:
        """True if a message of ``nbytes`` would be queued now."""
        return self.nbytes + nbytes <= self.max_bytes and len(self._queue) < self.max_messages

    def take_batch(self, max_bytes: int, max_messages: int) -> str | None:
        """Remove queued messages and join them into one frame's text.

        Takes at least one message (even one larger than ``max_bytes``), then
        more while the frame stays within ``max_bytes`` and ``max_messages``.
        Sets :attr:`published` from the first one (one attribute per frame,
        not per message: the oldest message is the frame's lag).

        Returns:
            The messages joined with ``"\\n"``, or ``None`` if the queue is empty.
        """
        queue = self._queue
        if not queue:
            return None
        total = self._total
        first = queue.popleft()
        self.published = first.published
        if first.key is not None:
            self._forget(first)
        total.release(first.text, first.nbytes)
        if not queue:
            self._queue = _EMPTY
            self.nbytes -= first.nbytes
            total.frames[1] += 1
            total.framed += 1
            return first.text
        texts = [first.text]
        size = first.nbytes
        while queue and len(texts) < max_messages:
            slot = queue[0]
            if size + 1 + slot.nbytes > max_bytes:
                break
            queue.popleft()
            if slot.key is not None:
                self._forget(slot)
            total.release(slot.text, slot.nbytes)
            texts.append(slot.text)
            size += 1 + slot.nbytes
        if not queue:
            self._queue = _EMPTY
        self.nbytes -= size - (len(texts) - 1)
        count = len(texts)
        total.frames[min(count.bit_length(), FRAME_SIZE_CLASSES)] += 1
        total.framed += count
        return "\n".join(texts)

    def clear(self) -> int:
        """Discard everything queued; returns how many messages were discarded."""
        queue = self._queue
        release = self._total.release
        for slot in queue:
            release(slot.text, slot.nbytes)
        self._queue = _EMPTY
        self._keyed.clear()
        self.nbytes = 0
        return len(queue)

    def _forget(self, slot: _Slot | OutboundMessage) -> None:
        key = slot.key
        if key is not None and self._keyed.get(key) is slot:
            del self._keyed[key]
