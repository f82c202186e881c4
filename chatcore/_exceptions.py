"""The exceptions chatcore raises.

One tree, so ``except ChatcoreError`` catches everything chatcore itself means
to raise::

    ChatcoreError
    ├── ConnectionClosed      the connection is closed; carries the CloseRecord
    ├── OutboxFull            a non-blocking send found the outbox full
    ├── ProtocolError
    │   ├── LocalProtocolError    our own code broke the rules (a bug)
    │   └── RemoteProtocolError   the peer broke the protocol; carries a close code
    ├── PeerGone              (transports only) the peer or the link is gone
    ├── BackplaneError        the backplane (Redis) cannot do it now  [_backplane]
    ├── ErrorReply            raised by app hooks to answer with an error  [_hub]
    ├── HandshakeRejected     (clients/tests) the server refused the handshake
    └── RequestFailed         (tests) an error reply to a test client's request
                              [chatcore.testing]

Library exceptions (trio-websocket, wsproto, hypercorn, OS errors) are
translated at the transport boundary and never reach application code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .sansio._errors import (
    ChatcoreError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    from .sansio._state import CloseRecord

__all__ = [
    "ChatcoreError",
    "ConnectionClosed",
    "HandshakeRejected",
    "LocalProtocolError",
    "OutboxFull",
    "PeerGone",
    "ProtocolError",
    "RemoteProtocolError",
]


class ConnectionClosed(ChatcoreError):
    """Raised by ``send``/``send_nowait``/``receive`` on a closed connection.

    Whose fault: nobody's; the connection closed (see :attr:`record` for why).
    This replaces every ``RuntimeError``/``AttributeError`` a web framework
    raises when a socket is used after close.

    Attributes:
        record: The connection's one recorded close (code, reason, cause).
    """

    def __init__(self, record: CloseRecord) -> None:
        super().__init__(f"connection closed: {record.code} {record.cause.value} {record.reason!r}")
        #: The recorded close of the connection.
        self.record = record


class OutboxFull(ChatcoreError, trio.WouldBlock):
    """Raised by ``send_nowait`` when the outbox has no room for the message.

    Whose fault: the peer's (it reads slower than messages are produced). A
    subclass of :class:`trio.WouldBlock`, like every ``*_nowait`` in trio.
    """


class PeerGone(ChatcoreError):
    """Raised by a transport when the peer or the link is gone.

    Every library error (closed socket, reset, EOF, close frame received) is
    translated into this one signal at the transport boundary. Application code
    never sees it: the connection turns it into a recorded close.

    Attributes:
        code: The close code the peer sent, or ``None`` if it vanished without one.
        reason: The reason the peer sent (empty if none).
    """

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"peer gone (code={code})")
        #: The peer's close code, if it sent a close frame.
        self.code = code
        #: The peer's close reason.
        self.reason = reason


class HandshakeRejected(ChatcoreError):
    """A test or client connection was refused with an HTTP status.

    Attributes:
        status: The HTTP status of the refusal (401, 403, 429, 503, ...).
        body: The refusal's body.
        headers: The refusal's headers, names lowercase (e.g. ``retry-after``).
    """

    def __init__(
        self, status: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"handshake rejected with HTTP {status}: {body[:200]!r}")
        #: HTTP status of the refusal.
        self.status = status
        #: Body of the refusal.
        self.body = body
        #: Headers of the refusal, names lowercase.
        self.headers = headers

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or ``None`` if it was not sent."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)
