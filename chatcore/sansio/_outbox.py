"""Outbound messages and the bounded outbox of one connection.

Theory of operation
-------------------

Fan-out must never wait on a client, so it *offers* an already-encoded message
to each member's outbox and gets an immediate answer (:class:`PushResult`).
The outbox is bounded in bytes and in count. When it is full, the message's
:class:`Delivery` class decides: a durable message cannot be silently dropped,
so the answer is :attr:`PushResult.OVERFLOW` and the connection closes the
slow consumer (4001); an ephemeral one is dropped, or, when it carries a
coalescing key, replaces the queued message with the same key (latest wins).

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

__all__ = ["Delivery", "OutboundMessage", "Outbox", "PushResult", "encode"]


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
    """

    text: str
    nbytes: int
    delivery: Delivery = Delivery.DURABLE
    key: str | None = None


def encode(
    message: Mapping[str, Any],
    *,
    delivery: Delivery = Delivery.DURABLE,
    key: str | None = None,
) -> OutboundMessage:
    """Encode a protocol message as one line of compact JSON.

    ``ensure_ascii`` keeps the text pure ASCII, so its byte size is its length
    and no raw newline (nor U+2028) can appear inside a message.

    Raises:
        TypeError, ValueError: if the message is not JSON-serialisable.
    """
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return OutboundMessage(text, len(text), delivery, key)


class PushResult(enum.Enum):
    """What :meth:`Outbox.push` did with a message."""

    #: Appended to the queue.
    QUEUED = "queued"
    #: Replaced a queued message with the same key (latest wins).
    COALESCED = "coalesced"
    #: Ephemeral and no room: discarded.
    DROPPED = "dropped"
    #: Durable and no room: the connection must close as a slow consumer.
    OVERFLOW = "overflow"
    #: The connection is not open; nothing was queued (``Connection.offer`` only).
    CLOSED = "closed"


class _Slot:
    __slots__ = ("key", "nbytes", "text")

    def __init__(self, text: str, nbytes: int, key: str | None) -> None:
        self.text = text
        self.nbytes = nbytes
        self.key = key


class Outbox:
    """A bounded FIFO of encoded messages for one connection (no I/O, no clock).

    Args:
        max_bytes: Upper bound on the bytes queued.
        max_messages: Upper bound on the messages queued.
    """

    __slots__ = ("_keyed", "_queue", "dropped", "max_bytes", "max_messages", "nbytes")

    def __init__(self, max_bytes: int, max_messages: int) -> None:
        #: Byte bound of the queue.
        self.max_bytes = max_bytes
        #: Count bound of the queue.
        self.max_messages = max_messages
        #: Bytes queued now.
        self.nbytes = 0
        #: Ephemeral messages dropped for lack of room, since creation.
        self.dropped = 0
        # FIFO of queued messages; keyed ones are also indexed by key so a newer
        # message with the same key can replace them in place.
        self._queue: deque[_Slot] = deque()
        self._keyed: dict[str, _Slot] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, message: OutboundMessage) -> PushResult:
        """Offer ``message``; never blocks. See :class:`PushResult`."""
        if message.key is not None:
            slot = self._keyed.get(message.key)
            if slot is not None:
                grown = self.nbytes - slot.nbytes + message.nbytes
                if grown > self.max_bytes:
                    return self._refuse(message)
                slot.text = message.text
                slot.nbytes = message.nbytes
                self.nbytes = grown
                return PushResult.COALESCED
        if self.nbytes + message.nbytes > self.max_bytes or len(self._queue) >= self.max_messages:
            return self._refuse(message)
        slot = _Slot(message.text, message.nbytes, message.key)
        self._queue.append(slot)
        if message.key is not None:
            self._keyed[message.key] = slot
        self.nbytes += message.nbytes
        return PushResult.QUEUED

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

        Returns:
            The messages joined with ``"\\n"``, or ``None`` if the queue is empty.
        """
        queue = self._queue
        if not queue:
            return None
        first = queue.popleft()
        self._forget(first)
        if not queue:
            self.nbytes -= first.nbytes
            return first.text
        texts = [first.text]
        size = first.nbytes
        while queue and len(texts) < max_messages:
            slot = queue[0]
            if size + 1 + slot.nbytes > max_bytes:
                break
            queue.popleft()
            self._forget(slot)
            texts.append(slot.text)
            size += 1 + slot.nbytes
        self.nbytes -= size - (len(texts) - 1)
        return "\n".join(texts)

    def clear(self) -> int:
        """Discard everything queued; returns how many messages were discarded."""
        n = len(self._queue)
        self._queue.clear()
        self._keyed.clear()
        self.nbytes = 0
        return n

    def _forget(self, slot: _Slot) -> None:
        if slot.key is not None and self._keyed.get(slot.key) is slot:
            del self._keyed[slot.key]
