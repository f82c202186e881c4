"""The transport interface: a WebSocket seen as a stream of messages.

A transport adapts one library's connection (trio-websocket, ASGI under
hypercorn, the in-memory pair) to :class:`MessageStream`. Transports are tiny
and contain no room or business logic. Their one job besides moving messages is
to translate *every* library error into one signal, :class:`~chatcore.PeerGone`
(or :class:`~chatcore.RemoteProtocolError` for a framing fault the library
already answered), so nothing above them ever sees a library exception.

Every transport passes :func:`chatcore.testing.check_message_stream`.
"""

from __future__ import annotations

import abc

import trio

from .sansio import HandshakeRequest, LocalProtocolError

__all__ = ["MessageStream"]


class MessageStream(abc.ABC):
    """One WebSocket connection, server side, as a stream of whole messages.

    A stream starts with the client's handshake received (:attr:`request`) and
    not yet answered. Exactly one of :meth:`accept` / :meth:`reject` may be
    called, once. The connection actor is the only user of a stream and never
    calls two methods concurrently, except that :meth:`receive` runs in the
    reader task while :meth:`send` runs in the writer task.
    """

    # No instance dict of its own: a transport that declares its slots costs
    # a few hundred bytes less per connection.
    __slots__ = ()

    #: The client's handshake.
    request: HandshakeRequest
    #: True once :meth:`accept` or :meth:`reject` was called.
    _answered: bool = False

    def _answer(self) -> None:
        """Claim the one answer to the handshake; implementations call it first.

        Raises:
            LocalProtocolError: the handshake was already answered (accepting
                after a refusal kills trio-websocket's server, for one).
        """
        if self._answered:
            raise LocalProtocolError("the handshake was already answered")
        # Set on the instance: in its dict, or in a slot a slotted subclass
        # declares (this class has none, so subclasses choose).
        self._answered = True  # type: ignore[misc]

    @abc.abstractmethod
    async def accept(
        self, *, subprotocol: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Accept the handshake.

        Raises:
            PeerGone: the client went away during the handshake.
            LocalProtocolError: the handshake was already answered.
        """

    @abc.abstractmethod
    async def reject(
        self, status: int, *, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Refuse the handshake with an HTTP response, then release the link.

        Never raises because the client is gone (the refusal is then moot).

        Raises:
            LocalProtocolError: the handshake was already answered.
        """

    @abc.abstractmethod
    async def receive(self) -> str | bytes:
        """The next whole message: ``str`` for a text frame, ``bytes`` for binary.

        Raises:
            PeerGone: the peer closed (``code`` set) or vanished (``code`` None).
            RemoteProtocolError: the peer broke WebSocket framing and the
                library already answered with ``code`` (e.g. 1009).
        """

    @abc.abstractmethod
    async def send(self, text: str) -> None:
        """Send one text frame.

        If cancelled before it completes, the stream may hold a partial frame;
        the transport must then treat itself as broken (a later :meth:`send`
        or :meth:`close` raises :class:`~chatcore.PeerGone`) and drop the link.

        Raises:
            PeerGone: the link is gone or broken.
        """

    @abc.abstractmethod
    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame, wait for the peer's, then release the link.

        Unbounded by itself: the caller puts a deadline around it and calls
        :meth:`abort` when it passes.

        Raises:
            PeerGone: the link was already gone.
        """

    @abc.abstractmethod
    async def abort(self) -> None:
        """Drop the link at once, without a close handshake. Idempotent; never raises."""

    #: True if :meth:`send_nowait` writes without a task switch; the connection
    #: actor then writes batched frames straight from the pacer (the lean
    #: engine's :class:`~chatcore.transports.LeanStream`).
    direct_send: bool = False

    def send_nowait(self, text: str) -> bool:
        """Write one text frame now, without waiting (only if :attr:`direct_send`).

        Whatever the link does not take now stays in the stream, in order,
        ahead of every later frame; :meth:`flush` waits until it is written.

        Returns:
            True if the whole frame was written; False if part of it waits.

        Raises:
            PeerGone: the link is gone, broken, or closing.
            NotImplementedError: this transport has no direct writes.
        """
        raise NotImplementedError(f"{type(self).__name__} has no direct writes")

    async def flush(self) -> None:
        """Wait until everything :meth:`send_nowait` left waiting is written.

        Raises:
            PeerGone: the link is gone or broke meanwhile.

        Cancellation: if bytes were still waiting, the stream is broken (as
        for a cancelled :meth:`send`).
        """
        await trio.lowlevel.checkpoint()

    def server_stopping(self) -> None:  # noqa: B027  (optional: most transports need nothing)
        """The connection actor was cancelled from outside: the server is stopping.

        Called once, synchronously, before the actor's shielded close sequence.
        A transport whose server stops reading together with the application
        (hypercorn cancels both) can stop waiting for the peer's close frame
        here. The default does nothing. Never raises.
        """
