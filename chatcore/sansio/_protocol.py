"""Protocol v1: parse client messages into typed values, encode server messages.

Theory of operation
-------------------

The codec is the only place that looks at raw JSON. :func:`parse_client_message`
turns one text frame into one typed value (:class:`Join`, :class:`Publish`, ...)
or a :class:`BadFrame` that says which documented error code answers it and
whether the frame carried a usable ``ref`` (then the answer is a ``reply``,
otherwise an ``error``). Nothing past this module sees a dict it has to validate.

Server messages are encoded once (``encode_*`` return
:class:`~chatcore.sansio.OutboundMessage`) and the same object is queued in
every recipient's outbox. See ``docs/protocol.md`` for the contract.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import attrs

from ._outbox import Delivery, OutboundMessage, encode

__all__ = [
    "MAX_NESTING",
    "PROTOCOL_VERSION",
    "AppMessage",
    "BadFrame",
    "ClientMessage",
    "ErrorCode",
    "Join",
    "Leave",
    "Ping",
    "Pong",
    "Publish",
    "Ref",
    "Since",
    "encode_error",
    "encode_hello",
    "encode_message",
    "encode_reply",
    "encode_reply_error",
    "encode_shutdown",
    "parse_client_message",
    "text_message",
    "valid_room",
    "valid_user",
]

#: The protocol version announced in ``hello``.
PROTOCOL_VERSION = 1

#: A client-chosen request id echoed in the reply: a string or an integer.
Ref = str | int

_ROOM = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_USER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_BUILTIN_TYPES = frozenset({"join", "leave", "publish", "ping", "pong"})

#: The deepest nesting of arrays/objects a client message may have (the
#: message object itself is level 1). Deeper frames are ``bad_message``: they
#: would otherwise hit the interpreter's recursion limit in the decoder, or
#: later in the encoder when the data is fanned out.
MAX_NESTING = 128


def valid_room(name: object) -> bool:
    """True if ``name`` is a room name: 1-64 of ``[A-Za-z0-9_.:-]``."""
    return isinstance(name, str) and _ROOM.fullmatch(name) is not None


def valid_user(name: object) -> bool:
    """True if ``name`` is a user id: 1-64 of ``[A-Za-z0-9_.-]``."""
    return isinstance(name, str) and _USER.fullmatch(name) is not None


class ErrorCode:
    """The documented ``error.code`` values (``docs/protocol.md``)."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    NOT_JOINED = "not_joined"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_ROOMS = "too_many_rooms"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    AT_CAPACITY = "at_capacity"
    TOO_MANY_NEW_ROOMS = "too_many_new_rooms"

    #: The codes that count toward the bad-frame limit (then close 1008).
    COUNTED = frozenset({BAD_JSON, BAD_MESSAGE, UNKNOWN_TYPE})


@attrs.frozen
class Since:
    """A client's last seen position in a room (for recovery on join)."""

    #: The room epoch the offset belongs to.
    epoch: str
    #: The last offset the client saw.
    offset: int


@attrs.frozen
class Join:
    """``join``: become a member of ``room``."""

    room: str
    ref: Ref | None = None
    since: Since | None = None


@attrs.frozen
class Leave:
    """``leave``: stop being a member of ``room``."""

    room: str
    ref: Ref | None = None


@attrs.frozen
class Publish:
    """``publish``: put ``data`` (any JSON value) into the room's order."""

    room: str
    data: Any
    ref: Ref | None = None


@attrs.frozen
class Ping:
    """``ping``: a client-side latency check; answered with an ok reply."""

    ref: Ref | None = None


@attrs.frozen
class Pong:
    """``pong``: the answer to the server's ``ping`` (liveness only)."""


@attrs.frozen
class AppMessage:
    """A message of an application-defined ``type``.

    Attributes:
        type: The message type.
        fields: The whole decoded object (``type`` and ``ref`` included).
        ref: The ``ref``, if it had a usable one.
    """

    type: str
    fields: dict[str, Any]
    ref: Ref | None = None


@attrs.frozen
class BadFrame:
    """A frame that breaks the protocol, and how to answer it.

    Attributes:
        code: The ``error.code`` to answer with (``bad_json``, ``bad_message``).
        message: A human-readable explanation.
        ref: The frame's ``ref`` if usable: answer with a ``reply``; else ``error``.
    """

    code: str
    message: str
    ref: Ref | None = None


#: Any message a client may send, as :func:`parse_client_message` returns it.
ClientMessage = Join | Leave | Publish | Ping | Pong | AppMessage


def _ref(obj: dict[str, Any]) -> tuple[bool, Ref | None]:
    """(ok, ref): a missing ref is fine; a ref of the wrong type is not."""
    if "ref" not in obj:
        return True, None
    ref = obj["ref"]
    if isinstance(ref, str) or (isinstance(ref, int) and not isinstance(ref, bool)):
        return True, ref
    return False, None


class _NotFinite(ValueError):
    """A number JSON cannot carry back: ``NaN``, ``Infinity``, or out of range."""


def _reject_constant(name: str) -> float:
    raise _NotFinite(name)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # e.g. 1e400 overflows to inf
        raise _NotFinite(literal)
    return value


class _TooManyDigits(ValueError):
    """An integer longer than the interpreter converts (``sys.get_int_max_str_digits``)."""


def _bounded_int(literal: str) -> int:
    try:
        return int(literal)
    except ValueError:  # a JSON integer literal fails only on the digit limit
        raise _TooManyDigits(literal) from None


# Built once: ``json.loads`` with hooks would build a decoder per call.
_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
)

# A ``\uD800``-``\uDFFF`` escape in the raw text: only then can the decoded
# value hold a lone surrogate (a raw one cannot survive UTF-8 decoding).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    """True if a string (or key) anywhere in ``value`` holds a lone surrogate."""
    # A valid escaped pair decodes to one character beyond U+FFFF, so any
    # surrogate left in a decoded string is a lone one.
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _too_deep(value: Any) -> bool:
    """True if ``value`` nests arrays/objects more than :data:`MAX_NESTING` deep."""
    # Iterative, so checking the depth cannot itself hit the recursion limit.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                if depth >= MAX_NESTING:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_client_message(text: str) -> ClientMessage | BadFrame:
    """Parse one client text frame (one JSON object).

    Unknown extra fields are ignored. A type that is not built in becomes an
    :class:`AppMessage`; whether the application handles it is decided above.
    Never raises: whatever the text, the answer is a typed message or a
    :class:`BadFrame`.

    ``NaN``, ``Infinity`` and numbers too large for a float are not JSON that
    the server could encode again, so they are ``bad_json``, and so are
    integers longer than the interpreter converts (4,300 digits by default);
    nesting deeper than :data:`MAX_NESTING` and strings with a lone surrogate
    (``"\\ud800"``: not encodable as UTF-8, so not sendable to anyone) are
    ``bad_message``.
    """
    try:
        obj = _DECODER.decode(text)
    except _NotFinite:
        return BadFrame(ErrorCode.BAD_JSON, "NaN, Infinity and out-of-range numbers are not JSON")
    except _TooManyDigits:
        return BadFrame(
            ErrorCode.BAD_JSON,
            f"integers of more than {sys.get_int_max_str_digits()} digits are not accepted",
        )
    except ValueError:
        return BadFrame(ErrorCode.BAD_JSON, "frame is not valid JSON")
    except RecursionError:
        return BadFrame(ErrorCode.BAD_MESSAGE, f"nested more than {MAX_NESTING} levels deep")
    # Only a frame with enough brackets can be too deep: skip the walk otherwise.
    if (
        isinstance(obj, dict | list)
        and text.count("[") + text.count("{") > MAX_NESTING
        and _too_deep(obj)
    ):
        return BadFrame(ErrorCode.BAD_MESSAGE, f"nested more than {MAX_NESTING} levels deep")
    if not isinstance(obj, dict):
        return BadFrame(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    ref_ok, ref = _ref(obj)
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(obj):
        if isinstance(ref, str) and _SURROGATE.search(ref):
            ref = None  # it could not be echoed back
        return BadFrame(ErrorCode.BAD_MESSAGE, "a string holds a lone surrogate (not UTF-8)", ref)
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        return BadFrame(ErrorCode.BAD_MESSAGE, "missing or invalid 'type'", ref)
    if not ref_ok:
        return BadFrame(ErrorCode.BAD_MESSAGE, "'ref' must be a string or an integer")
    if kind not in _BUILTIN_TYPES:
        return AppMessage(kind, obj, ref)
    if kind == "ping":
        return Ping(ref)
    if kind == "pong":
        return Pong()
    room = obj.get("room")
    if not valid_room(room):
        return BadFrame(
            ErrorCode.BAD_MESSAGE, "'room' must be 1-64 characters of [A-Za-z0-9_.:-]", ref
        )
    assert isinstance(room, str)
    if kind == "join":
        since = obj.get("since")
        if since is None:
            return Join(room, ref)
        if (
            not isinstance(since, dict)
            or not isinstance(since.get("epoch"), str)
            or not isinstance(since.get("offset"), int)
            or isinstance(since.get("offset"), bool)
            or since["offset"] < 0
        ):
            return BadFrame(
                ErrorCode.BAD_MESSAGE,
                '\'since\' must be {"epoch": str, "offset": int >= 0}',
                ref,
            )
        return Join(room, ref, Since(since["epoch"], since["offset"]))
    if kind == "leave":
        return Leave(room, ref)
    if "data" not in obj:
        return BadFrame(ErrorCode.BAD_MESSAGE, "'publish' needs 'data'", ref)
    return Publish(room, obj["data"], ref)


# -- server -> client ---------------------------------------------------------


def text_message(text: str, published: float = 0.0) -> OutboundMessage:
    """A durable message from already encoded JSON ``text`` (its UTF-8 size counted).

    ``published``: see :attr:`OutboundMessage.published`.
    """
    nbytes = len(text) if text.isascii() else len(text.encode())
    return OutboundMessage(text, nbytes, Delivery.DURABLE, None, published)


def encode_hello(
    connection_id: str, user: str, heartbeat_interval: float, heartbeat_timeout: float
) -> OutboundMessage:
    """The first message on every accepted connection."""
    return encode(
        {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "connection_id": connection_id,
            "user": user,
            "heartbeat": {
                "interval_ms": round(heartbeat_interval * 1000),
                "timeout_ms": round(heartbeat_timeout * 1000),
            },
        }
    )


def encode_reply(ref: Ref | None, data: Any = None) -> OutboundMessage:
    """An ok ``reply`` to the request with ``ref``."""
    return encode({"type": "reply", "ref": ref, "status": "ok", "data": data})


def encode_reply_error(ref: Ref | None, code: str, message: str) -> OutboundMessage:
    """An error ``reply`` to the request with ``ref``."""
    return encode(
        {
            "type": "reply",
            "ref": ref,
            "status": "error",
            "error": {"code": code, "message": message},
        }
    )


def encode_error(code: str, message: str) -> OutboundMessage:
    """An ``error`` for a frame without a usable ``ref``."""
    return encode({"type": "error", "code": code, "message": message})


def encode_message(
    room: str, offset: int, epoch: str, sender: str | None, data: Any
) -> OutboundMessage:
    """A room ``message`` (durable: it has its place in the room's order).

    A backplane encodes each room message once, where its offset is
    assigned, with this (the Redis backplane's script builds the same bytes).

    Raises:
        TypeError, ValueError: ``data`` is not JSON-serialisable.
    """
    return encode(
        {
            "type": "message",
            "room": room,
            "offset": offset,
            "epoch": epoch,
            "from": sender,
            "data": data,
        }
    )


def encode_shutdown(reconnect_after_ms: int) -> OutboundMessage:
    """``shutdown``: the server is draining; a 1012 close follows."""
    return encode(
        {"type": "shutdown", "reconnect_after_ms": reconnect_after_ms},
        delivery=Delivery.DURABLE,
    )
