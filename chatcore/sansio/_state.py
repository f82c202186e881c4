"""The connection state machine and close arbiter.

Theory of operation
-------------------

A connection is owned by one task (the *actor*). Everyone else (the hub, the
heartbeat, the application, server shutdown) can only *ask* it to close. This
module decides, without any I/O, what such a request means.

Rule 1: **the first close cause wins.** The first request to close fixes the
close code, the reason and the cause. Every later request is a no-op that
returns the recorded outcome, so two code paths racing to close one connection
cannot produce two close frames, two different codes or an exception.

Rule 2: **the transitions are data.** :data:`TRANSITIONS` below is the whole
state machine; anything not in it is a bug in the caller and raises
:class:`~chatcore.LocalProtocolError`. ``docs/lifecycle.md`` draws its diagram
from this table (``python -m chatcore.sansio --diagram``).

Rule 3: **no clock, no I/O.** Nothing here reads the time or imports trio; the
actor feeds in what happened and reads back what to do.

States::

    CONNECTING --accept--> OPEN --close--> CLOSING --finish--> CLOSED
        |
        +--reject / close--> REJECTED   (an HTTP refusal, no WebSocket close)
"""

from __future__ import annotations

import enum

import attrs

from ._errors import LocalProtocolError

__all__ = [
    "TRANSITIONS",
    "CloseArbiter",
    "CloseCause",
    "CloseOutcome",
    "CloseRecord",
    "ConnectionState",
    "Input",
    "handshake_status_for",
]


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    #: The handshake arrived and is being authenticated; nothing was accepted yet.
    CONNECTING = "CONNECTING"
    #: Accepted: messages flow both ways.
    OPEN = "OPEN"
    #: A close was requested and recorded; queued messages are flushed, then the
    #: close frame goes out (or the transport is aborted if it cannot).
    CLOSING = "CLOSING"
    #: Finished. The transport is released and every task of the connection ended.
    CLOSED = "CLOSED"
    #: The handshake was refused with an HTTP status; the connection never opened.
    REJECTED = "REJECTED"


class Input(enum.Enum):
    """What can happen to a connection (the state machine's alphabet)."""

    #: The actor accepted the handshake.
    ACCEPT = "accept"
    #: The actor refused the handshake with an HTTP status.
    REJECT = "reject"
    #: Somebody asked for a close (see :class:`CloseCause` for who).
    CLOSE = "close"
    #: The close handshake ended, or the transport was aborted.
    FINISH = "finish"


class CloseCause(enum.Enum):
    """Why a connection closed: whose decision or fault it was."""

    #: The peer sent a close frame.
    PEER = "peer"
    #: The application (or a server-side API such as ``disconnect_user``) closed it.
    APP = "app"
    #: No pong and no other traffic from the client within the heartbeat timeout.
    HEARTBEAT = "heartbeat"
    #: The outbox overflowed for a durable message, or a send stalled.
    SLOW_CONSUMER = "slow_consumer"
    #: The client broke the protocol (binary frame, oversize message, bad frames).
    PROTOCOL = "protocol"
    #: An application handler or per-connection task raised.
    INTERNAL = "internal"
    #: The server is draining or was cancelled.
    SHUTDOWN = "shutdown"
    #: The transport failed: TCP reset, EOF without a close frame, I/O error.
    TRANSPORT = "transport"
    #: The handshake was refused (the connection was never open).
    REJECTED = "rejected"

    @property
    def peer_gone(self) -> bool:
        """True if nothing can be sent to the peer any more."""
        return self in (CloseCause.PEER, CloseCause.TRANSPORT)


@attrs.frozen
class CloseRecord:
    """The one recorded close of a connection.

    Attributes:
        code: The WebSocket close code (for a refused handshake, the code that
            was asked for; the peer saw :attr:`http_status` instead).
        reason: The close reason sent in the close frame (may be empty).
        cause: Whose decision or fault the close was.
        http_status: For a refused handshake, the HTTP status sent; else ``None``.
    """

    code: int
    reason: str
    cause: CloseCause
    http_status: int | None = None


@attrs.frozen
class CloseOutcome:
    """What a request to close did.

    Attributes:
        initiated: True if this request was the first and so decided the close.
        record: The recorded close (the same object for every request).
    """

    initiated: bool
    record: CloseRecord


#: The whole state machine: (state, input) -> next state. Absent pairs are
#: caller bugs. ``CLOSE`` in a finished state is allowed and changes nothing:
#: that is what makes closing idempotent.
TRANSITIONS: dict[tuple[ConnectionState, Input], ConnectionState] = {
    (ConnectionState.CONNECTING, Input.ACCEPT): ConnectionState.OPEN,
    (ConnectionState.CONNECTING, Input.REJECT): ConnectionState.REJECTED,
    (ConnectionState.CONNECTING, Input.CLOSE): ConnectionState.REJECTED,
    (ConnectionState.OPEN, Input.CLOSE): ConnectionState.CLOSING,
    (ConnectionState.CLOSING, Input.CLOSE): ConnectionState.CLOSING,
    (ConnectionState.CLOSING, Input.FINISH): ConnectionState.CLOSED,
    (ConnectionState.CLOSED, Input.CLOSE): ConnectionState.CLOSED,
    (ConnectionState.CLOSED, Input.FINISH): ConnectionState.CLOSED,
    (ConnectionState.REJECTED, Input.CLOSE): ConnectionState.REJECTED,
    (ConnectionState.REJECTED, Input.FINISH): ConnectionState.REJECTED,
}

#: HTTP status used when a close is requested before the handshake was
#: accepted (the peer gets an HTTP refusal, never a close frame).
_HANDSHAKE_STATUS: dict[int, int] = {
    1008: 403,
    1011: 500,
    1012: 503,
    1013: 503,
    4002: 403,
}


def handshake_status_for(code: int) -> int:
    """The HTTP status that stands in for close ``code`` during the handshake.

    Service-side conditions (1012 restart, 1013 try later) map to 503, an
    internal error to 500, everything else to 403.
    """
    return _HANDSHAKE_STATUS.get(code, 403)


@attrs.define(eq=False)
class CloseArbiter:
    """The state machine of one connection; records the first close.

    Purely synchronous: the caller (the connection actor) applies the result.
    """

    #: Current state; only changed through :meth:`_apply`.
    state: ConnectionState = ConnectionState.CONNECTING
    #: The recorded close, fixed by the first ``close``/``reject``.
    record: CloseRecord | None = None

    def _apply(self, event: Input) -> ConnectionState:
        try:
            new = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise LocalProtocolError(
                f"cannot {event.value} a connection in state {self.state.name}"
            ) from None
        self.state = new
        return new

    def accept(self) -> None:
        """Mark the handshake accepted (CONNECTING -> OPEN).

        Raises:
            LocalProtocolError: if the connection is not CONNECTING (so a
                handshake can never be accepted after it was refused).
        """
        self._apply(Input.ACCEPT)

    def reject(self, status: int, reason: str = "") -> CloseOutcome:
        """Refuse the handshake with an HTTP ``status`` (CONNECTING -> REJECTED).

        Raises:
            LocalProtocolError: if the connection is not CONNECTING.
        """
        self._apply(Input.REJECT)
        code = 1011 if status == 500 else 1013 if status >= 500 else 1008
        self.record = CloseRecord(code, reason, CloseCause.REJECTED, status)
        return CloseOutcome(True, self.record)

    def close(
        self,
        code: int,
        reason: str,
        cause: CloseCause,
        http_status: int | None = None,
    ) -> CloseOutcome:
        """Request a close. The first request wins; later ones change nothing.

        In CONNECTING the request becomes a handshake refusal whose HTTP status
        is ``http_status`` or :func:`handshake_status_for` ``(code)``.

        Returns:
            Whether this request decided the close, and the recorded close.
        """
        was = self.state
        self._apply(Input.CLOSE)
        if self.record is None:
            if was is ConnectionState.CONNECTING:
                if http_status is None:
                    http_status = handshake_status_for(code)
            else:
                http_status = None
            self.record = CloseRecord(code, reason, cause, http_status)
            return CloseOutcome(True, self.record)
        return CloseOutcome(False, self.record)

    def finish(self) -> None:
        """Mark the close complete (CLOSING -> CLOSED); idempotent afterwards.

        Raises:
            LocalProtocolError: if no close was requested yet.
        """
        self._apply(Input.FINISH)

    @property
    def accepting_messages(self) -> bool:
        """True while new outbound messages may be queued (OPEN only)."""
        return self.state is ConnectionState.OPEN
