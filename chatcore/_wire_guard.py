"""Guards on the WebSocket wire that hypercorn lacks: bounded inflation, answered protocol errors.

Theory of operation
-------------------

hypercorn 0.18 frames WebSocket messages with wsproto inside
``hypercorn/protocol/ws_stream.py``, which looks up two wsproto names at
module level for each connection: ``PerMessageDeflate`` (the extension it
offers) and ``Connection`` (the frame parser). chatcore rebinds those two
names, process-wide, and nothing else; each rebinding checks first that the
name is still what 0.18 has, and refuses with :class:`RuntimeError`
otherwise (the tests fail too if hypercorn moves them).

* **Compression bomb.** wsproto inflates each chunk of a compressed frame in
  full before anyone can look at its size: one 194 KB frame that inflates to
  200 MB cost that much memory before hypercorn's size check answered 1009.
  :func:`bounded_deflate` makes a :class:`~wsproto.extensions.PerMessageDeflate`
  that asks zlib for at most the bytes still allowed in the message
  (``decompress(data, max_length)``, as the ``websockets`` library does) and
  fails the connection with **1009** the moment a message would inflate past
  the limit, so the memory a bomb costs is zlib's window plus one chunk.

* **Protocol errors.** When wsproto cannot parse what a client sent
  (unmasked frame, reserved bits, unknown opcode, control frame over 125
  bytes, bad close code, invalid UTF-8, a bomb) it reports a close event
  carrying the code and reason the client should get, but leaves the
  connection's state OPEN; hypercorn answers a close event only in the
  REMOTE_CLOSING state, so it dropped TCP without a close frame and the client
  saw 1006. :class:`AnsweringConnection` moves such a connection to
  REMOTE_CLOSING as the event leaves the parser, so hypercorn's own code
  sends the close frame (**1002**, **1007** for invalid UTF-8, **1009** for
  a bomb, with wsproto's reason) and then closes TCP. The application still
  sees a disconnect with 1006 (hypercorn reports every close it did not start
  so).

:class:`AnsweringConnection` also unties wsproto's frame parser
(:func:`chatcore._frame_parser.untie_parser`), so a closed connection's parser
is freed at once rather than by the cyclic garbage collector.

``chatcore serve`` installs both (:func:`answer_protocol_errors` when it starts
serving, :func:`bounded_deflate` through :func:`chatcore._serve.set_compression`).
A plain ``hypercorn`` command line gets neither.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Generator
from types import ModuleType
from typing import ClassVar

import wsproto.connection
import wsproto.extensions
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event
from wsproto.extensions import Extension
from wsproto.frame_protocol import (
    CloseReason,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
)

from ._frame_parser import untie_parser

__all__ = [
    "AnsweringConnection",
    "BoundedPerMessageDeflate",
    "DeclinedPerMessageDeflate",
    "answer_protocol_errors",
    "bounded_deflate",
    "install_deflate",
]


class BoundedPerMessageDeflate(wsproto.extensions.PerMessageDeflate):
    """permessage-deflate that never inflates a message past :attr:`max_message_bytes`.

    hypercorn creates its extension without arguments, so the limit is a class
    attribute: use :func:`bounded_deflate` for a subclass with another limit.
    A message that would inflate past it fails the connection with 1009
    (``ParseFailed``, which wsproto turns into the close event).
    """

    #: Most bytes one message may inflate to.
    max_message_bytes: ClassVar[int] = 65_536

    def __init__(
        self,
        client_no_context_takeover: bool = False,
        client_max_window_bits: int | None = None,
        server_no_context_takeover: bool = False,
        server_max_window_bits: int | None = None,
    ) -> None:
        super().__init__(
            client_no_context_takeover,
            client_max_window_bits,
            server_no_context_takeover,
            server_max_window_bits,
        )
        # Bytes the current message inflated to so far.
        self._inflated = 0

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}; max_message_bytes={self.max_message_bytes}>"

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            self._inflated = 0  # the first frame of a new message
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        decompressor = self._decompressor
        assert decompressor is not None  # set by frame_inbound_header
        budget = self.max_message_bytes - self._inflated
        try:
            # One byte over the budget is enough to know it is too big; the
            # rest of the input stays in zlib's unconsumed_tail, uninflated.
            inflated = decompressor.decompress(bytes(data), budget + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._count(len(inflated))
        return inflated

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        # The end of a message can only release what zlib held back (its
        # input was consumed within the budget), but it counts too.
        result = super().frame_inbound_complete(proto, fin)
        if isinstance(result, bytes):
            self._count(len(result))
        return result

    def _count(self, size: int) -> None:
        self._inflated += size
        if self._inflated > self.max_message_bytes:
            raise ParseFailed(
                f"message too big: inflates past {self.max_message_bytes} bytes",
                CloseReason.MESSAGE_TOO_BIG,
            )


class DeclinedPerMessageDeflate(wsproto.extensions.PerMessageDeflate):
    """permessage-deflate that declines every offer (the handshake omits it)."""

    def accept(self, offer: str) -> bool | str | None:
        return None


@functools.cache
def bounded_deflate(max_message_bytes: int) -> type[BoundedPerMessageDeflate]:
    """A :class:`BoundedPerMessageDeflate` subclass for ``max_message_bytes``.

    Args:
        max_message_bytes: Most bytes one message may inflate to (> 0).

    Returns:
        The class (the same one for the same limit).

    Raises:
        ValueError: the limit is not positive.
    """
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes!r}")
    return type(
        f"BoundedPerMessageDeflate{max_message_bytes}",
        (BoundedPerMessageDeflate,),
        {"max_message_bytes": max_message_bytes, "__module__": __name__},
    )


class AnsweringConnection(wsproto.connection.Connection):
    """wsproto's connection, with parse failures answered by a close frame under hypercorn.

    wsproto reports a parse failure as a :class:`~wsproto.events.CloseConnection`
    with the code and reason the peer should get, in the OPEN state; a real
    close frame from the peer moves the state to REMOTE_CLOSING first. This
    subclass moves the state of a failed connection to REMOTE_CLOSING too, so
    a caller that answers close events the usual way (``event.response()``,
    as hypercorn does) sends that code and reason. Its frame parser is untied
    (:func:`chatcore._frame_parser.untie_parser`): it is freed with the
    connection, not in a garbage collection.
    """

    def __init__(
        self,
        connection_type: ConnectionType,
        extensions: list[Extension] | None = None,
        trailing_data: bytes = b"",
    ) -> None:
        super().__init__(connection_type, extensions, trailing_data)
        # Freed with the connection, not by the cycle collector (chatcore._frame_parser).
        untie_parser(self._proto)

    def events(self) -> Generator[Event, None, None]:
        for event in super().events():
            if isinstance(event, CloseConnection) and self.state is ConnectionState.OPEN:
                self._state = ConnectionState.REMOTE_CLOSING
            yield event


def _hypercorn_ws_stream() -> ModuleType:
    from hypercorn.protocol import ws_stream

    return ws_stream


def _bound_class(module: ModuleType, name: str, base: type) -> type | None:
    current = getattr(module, name, None)
    return current if isinstance(current, type) and issubclass(current, base) else None


def install_deflate(enabled: bool, max_message_bytes: int) -> None:
    """Whether hypercorn accepts permessage-deflate in this process, and with which bound.

    Enabled, hypercorn's extension becomes ``bounded_deflate(max_message_bytes)``;
    disabled, :class:`DeclinedPerMessageDeflate`.

    Raises:
        RuntimeError: hypercorn does not look up ``PerMessageDeflate`` the way
            0.18 does, so it cannot be bounded or switched off here.
    """
    module = _hypercorn_ws_stream()
    if _bound_class(module, "PerMessageDeflate", wsproto.extensions.PerMessageDeflate) is None:
        raise RuntimeError(
            "cannot bound or switch off permessage-deflate for this hypercorn version"
        )
    chosen = bounded_deflate(max_message_bytes) if enabled else DeclinedPerMessageDeflate
    module.PerMessageDeflate = chosen  # type: ignore[attr-defined]


def answer_protocol_errors(enabled: bool) -> bool:
    """Whether hypercorn answers WebSocket protocol errors with a close frame, process-wide.

    Enabled, hypercorn's WebSocket connections are :class:`AnsweringConnection`;
    disabled, wsproto's own (hypercorn then drops TCP without a close frame).

    Args:
        enabled: The new setting.

    Returns:
        The previous setting.

    Raises:
        RuntimeError: hypercorn does not look up ``Connection`` the way 0.18
            does (nothing is changed).
    """
    module = _hypercorn_ws_stream()
    current = _bound_class(module, "Connection", wsproto.connection.Connection)
    if current is None:
        raise RuntimeError("cannot make this hypercorn version answer WebSocket protocol errors")
    module.Connection = (  # type: ignore[attr-defined]
        AnsweringConnection if enabled else wsproto.connection.Connection
    )
    return issubclass(current, AnsweringConnection)
