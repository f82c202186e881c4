"""Node events: what one node tells the others, and their byte format.

Theory of operation
-------------------

Besides a room's ordered messages (:class:`~chatcore.sansio.Sequenced`),
nodes tell each other things that are not stored: a message for a user's
connections wherever they are, a disconnect, a message outside a room's
order, and presence changes. Each is a frozen event naming the node that sent
it. A backplane moves them; :func:`encode_node_event` and
:func:`decode_node_event` give them one byte format a backplane may use on
its wire (the Redis backplane does)::

    <kind byte><JSON header>\\n<body>

=========  ======================  =========================================  ==================
kind       event                   header                                     body
=========  ======================  =========================================  ==================
``u``      :class:`UserMessage`    ``[node, user, delivery, key, nbytes]``    message text
``d``      :class:`UserDisconnect` ``[node, user, code]``                     reason
``b``      :class:`RoomBroadcast`  ``[node, exclude, delivery, key, nbytes]`` message text
``p``      presence events         ``[node]``                                 JSON ``{"op": ...}``
=========  ======================  =========================================  ==================

A broadcast travels on its room's own channel, so its room is not in the
bytes: the receiver passes it to :func:`decode_node_event`. Presence ops are
``join``, ``leave``, ``sync`` (send me your state), ``state`` and
``state_end`` (everything between the two is the sender's whole state).

Decoding is strict: a malformed event raises :class:`ValueError`; an event of
a kind or op this version does not know decodes to ``None`` (ignore it), so
newer nodes can add events.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import attrs

from ._outbox import Delivery, OutboundMessage

__all__ = [
    "NodeEvent",
    "PresenceEvent",
    "PresenceJoin",
    "PresenceLeave",
    "PresenceStateBegin",
    "PresenceStateEnd",
    "PresenceSync",
    "RoomBroadcast",
    "UserDisconnect",
    "UserMessage",
    "decode_node_event",
    "encode_node_event",
]

_JSON = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


@attrs.frozen
class UserMessage:
    """A message for every connection of ``user``.

    Attributes:
        node: The sending node.
        user: The user id.
        message: The encoded message.
    """

    node: str
    user: str
    message: OutboundMessage


@attrs.frozen
class UserDisconnect:
    """Close every connection of ``user``.

    Attributes:
        node: The sending node.
        user: The user id.
        code: The close code.
        reason: The close reason.
    """

    node: str
    user: str
    code: int
    reason: str


@attrs.frozen
class RoomBroadcast:
    """A message outside the room's order for the room's members.

    Attributes:
        node: The sending node.
        room: The room.
        message: The encoded message.
        exclude: A connection id that must not get it (the sender), or ``None``.
    """

    node: str
    room: str
    message: OutboundMessage
    exclude: str | None = None


@attrs.frozen
class PresenceJoin:
    """A connection of the sending node is present in a room.

    Attributes:
        node: The sending node.
        room: The room.
        user: The connection's user.
        connection_id: The connection's id.
        joined_at: When it joined, in the sender's clock (for ordering).
        data: The application's presence meta.
    """

    node: str
    room: str
    user: str
    connection_id: str
    joined_at: float
    data: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class PresenceLeave:
    """A connection of the sending node left a room.

    Attributes:
        node: The sending node.
        room: The room.
        connection_id: The connection's id.
    """

    node: str
    room: str
    connection_id: str


@attrs.frozen
class PresenceSync:
    """The sending node asks every node to send its whole presence state.

    Attributes:
        node: The sending node.
    """

    node: str


@attrs.frozen
class PresenceStateBegin:
    """The sending node's whole state follows, up to :class:`PresenceStateEnd`.

    Attributes:
        node: The sending node.
    """

    node: str


@attrs.frozen
class PresenceStateEnd:
    """End of the sending node's state: what it did not confirm is gone.

    Attributes:
        node: The sending node.
    """

    node: str


#: Presence events (kind ``p``).
PresenceEvent = PresenceJoin | PresenceLeave | PresenceSync | PresenceStateBegin | PresenceStateEnd
#: Every node event.
NodeEvent = UserMessage | UserDisconnect | RoomBroadcast | PresenceEvent


def _message_header(message: OutboundMessage) -> list[Any]:
    return [message.delivery.value, message.key, message.nbytes]


def _presence_body(event: PresenceEvent) -> dict[str, Any]:
    if isinstance(event, PresenceJoin):
        return {
            "op": "join",
            "room": event.room,
            "user": event.user,
            "connection_id": event.connection_id,
            "joined_at": event.joined_at,
            "data": dict(event.data),
        }
    if isinstance(event, PresenceLeave):
        return {"op": "leave", "room": event.room, "connection_id": event.connection_id}
    if isinstance(event, PresenceSync):
        return {"op": "sync"}
    if isinstance(event, PresenceStateBegin):
        return {"op": "state"}
    return {"op": "state_end"}


def encode_node_event(event: NodeEvent) -> bytes:
    """The bytes of ``event`` (see the table in the module docs).

    Raises:
        TypeError, ValueError: presence ``data`` is not JSON-serialisable.
    """
    if isinstance(event, UserMessage):
        kind, header = b"u", [event.node, event.user, *_message_header(event.message)]
        body = event.message.text
    elif isinstance(event, RoomBroadcast):
        kind, header = b"b", [event.node, event.exclude, *_message_header(event.message)]
        body = event.message.text
    elif isinstance(event, UserDisconnect):
        kind, header, body = b"d", [event.node, event.user, event.code], event.reason
    else:
        kind, header, body = b"p", [event.node], _JSON.encode(_presence_body(event))
    return kind + _JSON.encode(header).encode() + b"\n" + body.encode()


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _message(header: list[Any], body: str) -> OutboundMessage:
    delivery, key, nbytes = header
    if (key is not None and not isinstance(key, str)) or type(nbytes) is not int:
        raise ValueError(f"bad message header {header!r}")
    return OutboundMessage(body, nbytes, Delivery(delivery), key)


def _presence(node: str, event: object) -> PresenceEvent | None:
    if not isinstance(event, dict):
        raise ValueError(f"a presence event must be an object, got {event!r}")
    op = event.get("op")
    if op == "join":
        joined_at = event["joined_at"]
        if isinstance(joined_at, bool) or not isinstance(joined_at, (int, float)):
            raise ValueError(f"bad joined_at {joined_at!r}")
        if not math.isfinite(joined_at):
            raise ValueError(f"bad joined_at {joined_at!r}")
        data = event.get("data") or {}
        if not isinstance(data, dict):
            raise ValueError(f"bad presence data {data!r}")
        return PresenceJoin(
            node,
            _str(event["room"]),
            _str(event["user"]),
            _str(event["connection_id"]),
            float(joined_at),
            data,
        )
    if op == "leave":
        return PresenceLeave(node, _str(event["room"]), _str(event["connection_id"]))
    if op == "sync":
        return PresenceSync(node)
    if op == "state":
        return PresenceStateBegin(node)
    if op == "state_end":
        return PresenceStateEnd(node)
    if not isinstance(op, str):
        raise ValueError(f"a presence event needs an op, got {op!r}")
    return None  # an op of a newer version


def decode_node_event(data: bytes, *, room: str | None = None) -> NodeEvent | None:
    """The event in ``data``, or ``None`` for a kind or op this version does not know.

    Args:
        data: The bytes (see :func:`encode_node_event`).
        room: The room whose channel carried it (needed for broadcasts).

    Raises:
        ValueError: ``data`` is malformed (or a broadcast came without ``room``).
    """
    kind = data[:1]
    try:
        header_line, raw_body = data[1:].split(b"\n", 1)
        header = json.loads(header_line)
        body = raw_body.decode()
        if not isinstance(header, list) or not header:
            raise ValueError(f"bad header {header_line[:80]!r}")
        node = _str(header[0])
        if kind == b"u":
            return UserMessage(node, _str(header[1]), _message(header[2:], body))
        if kind == b"b":
            if room is None:
                raise ValueError("a broadcast needs its room")
            exclude = header[1]
            if exclude is not None:
                exclude = _str(exclude)
            return RoomBroadcast(node, room, _message(header[2:], body), exclude)
        if kind == b"d":
            _, user, code = header
            if type(code) is not int:
                raise ValueError(f"bad close code {code!r}")
            return UserDisconnect(node, _str(user), code, body)
        if kind == b"p":
            return _presence(node, json.loads(body))
    except (KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed node event: {exc!r}") from exc
    return None
