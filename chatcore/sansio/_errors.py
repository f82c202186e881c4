"""The pure part of chatcore's exception tree (see ``chatcore._exceptions``)."""

from __future__ import annotations

__all__ = ["ChatcoreError", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ChatcoreError(Exception):
    """Base class of every exception chatcore raises on purpose."""


class ProtocolError(ChatcoreError):
    """A rule of the connection protocol was broken."""


class LocalProtocolError(ProtocolError):
    """Our side broke the rules: an impossible state transition (a bug).

    Example: accepting a handshake that was already refused.
    """


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. Carries the close code to answer with.

    Attributes:
        code: The WebSocket close code that answers this fault (e.g. 1003, 1009).
    """

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        #: Close code that answers this fault.
        self.code = code
