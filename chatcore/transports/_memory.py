"""An in-memory WebSocket: a server-side :class:`MessageStream` and its client.

It behaves like a real socket where it matters to the connection core: frames
queue in a bounded buffer (a client that stops reading makes the server's sends
block), a close frame is answered by a close frame, and either side can vanish
without one. Every frame the client receives is also logged in
:attr:`MemoryClient.frames`, so tests can assert on exactly what went over the
"wire" (e.g. that exactly one close frame arrived).
"""

from __future__ import annotations

import contextlib
from collections import deque

import attrs
import trio

from .._exceptions import HandshakeRejected, PeerGone
from .._transport import MessageStream
from ..sansio import HandshakeRequest

__all__ = [
    "BinaryFrame",
    "CloseFrame",
    "MemoryClient",
    "MemoryStream",
    "TextFrame",
    "memory_stream_pair",
]


@attrs.frozen
class TextFrame:
    """A WebSocket text frame."""

    #: The frame's text.
    text: str


@attrs.frozen
class BinaryFrame:
    """A WebSocket binary frame."""

    #: The frame's payload.
    data: bytes


@attrs.frozen
class CloseFrame:
    """A WebSocket close frame."""

    #: The close code.
    code: int
    #: The close reason.
    reason: str = ""


Frame = TextFrame | BinaryFrame | CloseFrame


class _Pipe:
    """One direction of the link: a bounded frame buffer that can be cut.

    A frame is queued whole or not at all: a cancelled :meth:`put` queued
    nothing (an in-memory frame is never half-written).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.frames: deque[Frame] = deque()
        self.cut = False  # the link was dropped (a vanish/abort)
        self.eof = False  # the writing side sent its close frame and stopped
        self._lot = trio.lowlevel.ParkingLot()

    async def put(self, frame: Frame) -> None:
        while len(self.frames) >= self.capacity and not self.cut:
            await self._lot.park()
        await trio.lowlevel.checkpoint_if_cancelled()
        self.put_nowait(frame)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def put_nowait(self, frame: Frame) -> None:
        """Queue ``frame`` now, over capacity if need be (a close frame's answer).

        Synchronous, so the answer to a close frame cannot be lost to a
        cancellation between deciding to answer and answering.
        """
        if self.cut:
            raise PeerGone(None)
        self.frames.append(frame)
        self._lot.unpark_all()

    async def get(self) -> Frame:
        while not self.frames:
            if self.cut:
                raise PeerGone(None)
            await self._lot.park()
        await trio.lowlevel.checkpoint_if_cancelled()
        frame = self.frames.popleft()
        self._lot.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return frame

    def drop(self) -> None:
        self.cut = True
        self._lot.unpark_all()


class _Link:
    def __init__(self, capacity: int) -> None:
        self.to_server = _Pipe(capacity)
        self.to_client = _Pipe(capacity)
        self.answered = trio.Event()
        # (status, body, headers) of the refusal.
        self.rejection: tuple[int, bytes, tuple[tuple[str, str], ...]] | None = None
        self.subprotocol: str | None = None

    def drop(self) -> None:
        self.to_server.drop()
        self.to_client.drop()
        self.answered.set()


class MemoryStream(MessageStream):
    """The server side of an in-memory WebSocket (see :func:`memory_stream_pair`)."""

    def __init__(self, link: _Link, request: HandshakeRequest) -> None:
        #: The client's handshake.
        self.request = request
        self._link = link
        # Handshake answered (accept or reject); a second answer is a bug.
        self._answered = False
        # We sent our close frame; nothing may be sent after it.
        self._close_sent = False
        # The peer's close frame arrived (its code/reason), or None.
        self._peer_close: CloseFrame | None = None

    async def accept(
        self, *, subprotocol: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """See :meth:`MessageStream.accept`."""
        # Answered whole or not at all: cancelled here, nothing was answered.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._answer()
        if self._link.to_server.cut:
            raise PeerGone(None)
        self._link.subprotocol = subprotocol
        self._link.answered.set()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def reject(
        self, status: int, *, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """See :meth:`MessageStream.reject`."""
        self._answer()
        await trio.lowlevel.checkpoint()
        lowered = tuple((name.lower(), value) for name, value in headers)
        self._link.rejection = (status, body, lowered)
        self._link.answered.set()
        self._link.drop()

    async def receive(self) -> str | bytes:
        """See :meth:`MessageStream.receive`."""
        if self._peer_close is not None:
            raise PeerGone(self._peer_close.code, self._peer_close.reason)
        frame = await self._link.to_server.get()
        if isinstance(frame, CloseFrame):
            self._peer_close = frame
            if not self._close_sent:
                # Like a WebSocket library: answer the close frame, then drop TCP.
                # Synchronously: a cancellation must not leave it "sent" but unsent.
                self._close_sent = True
                with contextlib.suppress(PeerGone):
                    self._link.to_client.put_nowait(CloseFrame(frame.code, frame.reason))
            self._link.to_client.eof = True
            raise PeerGone(frame.code, frame.reason)
        if isinstance(frame, BinaryFrame):
            return frame.data
        return frame.text

    async def send(self, text: str) -> None:
        """See :meth:`MessageStream.send`.

        An in-memory frame is queued whole or not at all, so a cancelled send
        sent nothing and leaves the stream usable (the contract allows that).
        """
        if self._close_sent or self._peer_close is not None:
            raise PeerGone(None)
        await self._link.to_client.put(TextFrame(text))

    async def close(self, code: int, reason: str = "") -> None:
        """See :meth:`MessageStream.close`."""
        if self._link.to_client.cut:
            raise PeerGone(None)
        if not self._close_sent:
            if self._peer_close is not None:
                raise PeerGone(self._peer_close.code, self._peer_close.reason)
            self._close_sent = True
            await self._link.to_client.put(CloseFrame(code, reason))
        # Wait for the peer's answer, discarding data frames sent meanwhile.
        while self._peer_close is None:
            frame = await self._link.to_server.get()
            if isinstance(frame, CloseFrame):
                self._peer_close = frame
        self._link.to_client.eof = True

    async def abort(self) -> None:
        """See :meth:`MessageStream.abort`."""
        self._link.drop()
        await trio.lowlevel.checkpoint_if_cancelled()


class MemoryClient:
    """The client side of an in-memory WebSocket (see :func:`memory_stream_pair`).

    This is the raw end of the link, for tests of the connection core that
    look at single frames. To test an application, use
    :class:`chatcore.testing.TestClient`; the transport conformance suite
    drives this end through :class:`chatcore.testing.MemoryPeer`.

    Attributes:
        frames: Every frame received so far, in order (the wire log).
    """

    def __init__(self, link: _Link) -> None:
        self._link = link
        #: Every frame received, in order.
        self.frames: list[Frame] = []
        # We sent a close frame (or answered the server's).
        self._close_sent = False

    async def wait_accepted(self) -> str | None:
        """Wait for the server's answer to the handshake.

        Returns:
            The subprotocol the server selected.

        Raises:
            HandshakeRejected: the server refused (with its HTTP status and body).
            PeerGone: the link dropped without an answer.
        """
        await self._link.answered.wait()
        if self._link.rejection is not None:
            raise HandshakeRejected(*self._link.rejection)
        if self._link.to_client.cut:
            raise PeerGone(None)
        return self._link.subprotocol

    async def send(self, text: str) -> None:
        """Send a text frame (blocks while the server's buffer is full)."""
        await self.send_frame(TextFrame(text))

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame."""
        await self.send_frame(BinaryFrame(data))

    async def send_frame(self, frame: Frame) -> None:
        """Send any frame.

        Raises:
            PeerGone: the link is gone, or a close frame was already sent.
        """
        if self._close_sent:
            raise PeerGone(None)
        if isinstance(frame, CloseFrame):
            self._close_sent = True
        await self._link.to_server.put(frame)

    async def receive_frame(self) -> Frame:
        """The next frame from the server (a close frame is answered, like a browser).

        Raises:
            PeerGone: the link dropped (the server aborted; a real client sees 1006).
        """
        pipe = self._link.to_client
        if pipe.eof and not pipe.frames:
            raise PeerGone(None)
        frame = await pipe.get()
        self.frames.append(frame)
        if isinstance(frame, CloseFrame) and not self._close_sent:
            self._close_sent = True
            with contextlib.suppress(PeerGone):  # the server may have dropped the link
                self._link.to_server.put_nowait(CloseFrame(frame.code, frame.reason))
        return frame

    async def receive(self) -> str:
        """The next text frame's text.

        Raises:
            PeerGone: a close frame arrived (``code`` set) or the link dropped.
            AssertionError: a binary frame arrived (the server never sends one).
        """
        frame = await self.receive_frame()
        if isinstance(frame, CloseFrame):
            raise PeerGone(frame.code, frame.reason)
        assert isinstance(frame, TextFrame), frame
        return frame.text

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (the server answers it)."""
        await self.send_frame(CloseFrame(code, reason))

    def vanish(self) -> None:
        """Drop the link without a close frame (a crashed browser, a TCP reset)."""
        self._link.drop()

    @property
    def received_close(self) -> CloseFrame | None:
        """The close frame received so far, if any."""
        for frame in self.frames:
            if isinstance(frame, CloseFrame):
                return frame
        return None


def memory_stream_pair(
    request: HandshakeRequest | None = None, *, capacity: int = 64
) -> tuple[MemoryStream, MemoryClient]:
    """Make a connected in-memory WebSocket: (server stream, client).

    Args:
        request: The handshake the client presents (default: ``GET /``).
        capacity: Frames each direction buffers before the sender blocks.
    """
    link = _Link(capacity)
    return MemoryStream(link, request or HandshakeRequest("/")), MemoryClient(link)
