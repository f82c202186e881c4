"""An in-memory ASGI server that plays hypercorn's role for one WebSocket.

It runs an ASGI application against a scripted client with memory channels,
and reproduces what hypercorn 0.18's ``WSStream`` does at the ASGI boundary
(read in ``hypercorn/protocol/ws_stream.py``), quirks included:

* ``websocket.disconnect`` always carries 1006 for a disconnect the app did
  not start and 1000 after the app's own close (``forward_close_codes=True``
  makes it a spec-following server that reports the client's real code);
* after the link is gone every ``send`` is a silent no-op; a ``websocket.send``
  after the app's close raises ``UnexpectedMessageError``; a second
  ``websocket.close`` before accept raises ``AttributeError``;
* a close before accept becomes a bare HTTP 403; the denial response
  (``websocket.http.response.*``) sends the app's status, headers and body;
* when the app returns, a handshake nobody answered gets HTTP 500 and an open
  connection a 1011 close frame, then the link is dropped;
* socket writes are shielded from cancellation and end only when the client
  reads or the (emulated) ``TCP_USER_TIMEOUT`` drops the link.

The client side implements the conformance suite's ``TransportPeer``, so
:func:`open_asgi_pair` is a ``PairFactory`` for
:func:`chatcore.testing.check_message_stream`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from chatcore import HandshakeRejected, PeerGone
from chatcore.transports import BinaryFrame, CloseFrame, TextFrame
from chatcore.transports._asgi_stream import ASGIStream

Frame = TextFrame | BinaryFrame | CloseFrame
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class UnexpectedMessageError(Exception):
    """hypercorn's error for an ASGI message that does not fit the state."""


@attrs.frozen
class Accepted:
    subprotocol: str | None


@attrs.frozen
class Refused:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class ASGIWebSocketDriver:
    """One WebSocket connection between a scripted client and an ASGI app.

    Args:
        app: The ASGI application.
        target: Request path and query string.
        headers: Request headers.
        subprotocols: Offered subprotocols.
        forward_close_codes: Report the client's close code in
            ``websocket.disconnect`` (hypercorn does not).
        capacity: Frames the server->client "socket" buffers before a send blocks.
        user_timeout: Seconds a blocked write waits before the link is dropped
            (``TCP_USER_TIMEOUT``); ``inf`` blocks forever, like hypercorn
            without it.
        denial_extension: Advertise ``websocket.http.response``.
    """

    def __init__(
        self,
        app: App,
        *,
        target: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
        forward_close_codes: bool = False,
        capacity: int = 64,
        user_timeout: float = math.inf,
        denial_extension: bool = True,
    ) -> None:
        path, _, query = target.partition("?")
        if not any(name.lower() == "sec-websocket-key" for name, _ in headers):
            # hypercorn passes only handshakes that carry a key (RFC 6455 4.2.1).
            headers = [*headers, ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]
        self.app = app
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"spec_version": "2.3", "version": "3.0"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "subprotocols": list(subprotocols),
            "extensions": {"websocket.http.response": {}} if denial_extension else {},
        }
        self.forward_close_codes = forward_close_codes
        self.user_timeout = user_timeout
        # hypercorn's ASGIWebsocketState and its "closed" flag (StreamClosed seen).
        self.state = "HANDSHAKE"
        self.closed = False
        # wsproto's view of the close handshake.
        self.server_sent_close = False
        self.client_sent_close = False
        self.client_close: CloseFrame | None = None
        self._response: dict[str, Any] | None = None
        # The app's queue (hypercorn: max_app_queue_size = 10).
        self._app_send, self._app_receive = trio.open_memory_channel[dict[str, Any]](10)
        # server -> client "socket"
        self._to_client_send, self._to_client_receive = trio.open_memory_channel[Frame](capacity)
        # client -> server "socket", read by the server's reader task
        self._to_server_send, self._to_server_receive = trio.open_memory_channel[Frame](capacity)
        self._answer: Accepted | Refused | None = None
        self._answered = trio.Event()
        # The server closed TCP (after its close handshake, or on an error).
        self._link_dropped = False
        # The client sent (or answered with) its close frame.
        self._client_closing = False
        # The client reset the link.
        self._client_gone = False
        #: Every frame the client received, in order (the wire log).
        self.frames: list[Frame] = []
        #: Exceptions that escaped the app (hypercorn would log them).
        self.app_errors: list[BaseException] = []
        self.app_returned = trio.Event()

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the app and the server's reader until both are done."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader)
            await self._app_send.send({"type": "websocket.connect"})
            task_status.started()
            try:
                await self.app(self.scope, self._app_receive.receive, self._app_send_event)
            except Exception as exc:  # hypercorn logs "Error in ASGI Framework"
                self.app_errors.append(exc)
            finally:
                with trio.CancelScope(shield=True):
                    await self._app_finished()
                self.app_returned.set()
            nursery.cancel_scope.cancel()

    async def _app_finished(self) -> None:
        # hypercorn's app_send(None)
        if self.closed:
            return
        if self.state == "HANDSHAKE":
            self._answer_with(Refused(500, (), b""))
        elif self.state == "CONNECTED":
            await self._send_frame(CloseFrame(1011, ""), close=True)
        await self._stream_closed()

    # -- the server side: hypercorn's WSStream ------------------------------------

    async def _app_send_event(self, message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            return  # "Allow app to finish after close": a silent no-op
        kind = message["type"]
        if kind == "websocket.accept" and self.state == "HANDSHAKE":
            self.state = "CONNECTED"
            subprotocol = message.get("subprotocol")
            if subprotocol is not None and subprotocol not in self.scope["subprotocols"]:
                raise Exception("Invalid Subprotocol")
            self._answer_with(Accepted(subprotocol))
        elif kind == "websocket.http.response.start" and self.state == "HANDSHAKE":
            self._response = message
        elif kind == "websocket.http.response.body" and self.state in ("HANDSHAKE", "RESPONSE"):
            assert self._response is not None
            self.state = "HTTPCLOSED"
            self._answer_with(
                Refused(
                    self._response["status"],
                    tuple(self._response.get("headers", ())),
                    bytes(message.get("body", b"")),
                )
            )
        elif kind == "websocket.send" and self.state == "CONNECTED":
            text = message.get("text")
            if message.get("bytes") is not None:
                frame: Frame = BinaryFrame(bytes(message["bytes"]))
            elif not isinstance(text, str):
                raise TypeError(f"{text} should be a str")
            else:
                frame = TextFrame(text)
            await self._send_frame(frame)
        elif kind == "websocket.close" and self.state == "HANDSHAKE":
            self.state = "HTTPCLOSED"
            self._answer_with(Refused(403, (), b""))
        elif kind == "websocket.close":
            if self.state == "HTTPCLOSED":
                # hypercorn has no wsproto connection before accept.
                raise AttributeError("'WSStream' object has no attribute 'connection'")
            self.state = "CLOSED"
            await self._send_frame(
                CloseFrame(int(message.get("code", 1000)), message.get("reason") or ""), close=True
            )
        else:
            raise UnexpectedMessageError(f"{kind} in state {self.state}")

    async def _send_frame(self, frame: Frame, *, close: bool = False) -> None:
        # wsproto refuses (LocalProtocolError, swallowed by hypercorn) anything
        # after our close frame, and data or a second close after the client's.
        if self.server_sent_close or self.client_sent_close:
            return
        if close:
            self.server_sent_close = True
        await self._write(frame)

    async def _write(self, frame: Frame) -> None:
        """A socket write: shielded, like hypercorn's; only the user timeout ends it."""
        if self._link_dropped:
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.user_timeout) as timed_out:
                try:
                    await self._to_client_send.send(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    broken = True
                else:
                    broken = False
            if timed_out.cancelled_caught or broken:
                # ETIMEDOUT / EPIPE: hypercorn catches it and closes the stream.
                await self._stream_closed()

    async def _stream_closed(self) -> None:
        """hypercorn's StreamClosed: tell the app (once), then close TCP."""
        if self.closed:
            return
        self.closed = True
        self._drop_link()
        if self.forward_close_codes and self.client_close is not None:
            disconnect: dict[str, Any] = {
                "type": "websocket.disconnect",
                "code": self.client_close.code,
                "reason": self.client_close.reason,
            }
        else:
            code = 1000 if self.state in ("CLOSED", "HTTPCLOSED") else 1006
            disconnect = {"type": "websocket.disconnect", "code": code}
        with trio.CancelScope(shield=True):
            await self._app_send.send(disconnect)

    def _drop_link(self) -> None:
        if self._link_dropped:
            return
        self._link_dropped = True
        self._answered.set()
        self._to_client_send.close()  # the client reads what is buffered, then EOF
        self._to_server_send.close()

    def _answer_with(self, answer: Accepted | Refused) -> None:
        self._answer = answer
        self._answered.set()

    async def _reader(self) -> None:
        """hypercorn's reader task: client frames in, answers out."""
        async for frame in self._to_server_receive:
            if self.closed:
                break
            if isinstance(frame, CloseFrame):
                self.client_sent_close = True
                self.client_close = frame
                if not self.server_sent_close:
                    # REMOTE_CLOSING: wsproto answers with the same code.
                    await self._write(CloseFrame(frame.code, frame.reason))
                break
            if isinstance(frame, TextFrame):
                await self._app_send.send(
                    {"type": "websocket.receive", "text": frame.text, "bytes": None}
                )
            elif isinstance(frame, BinaryFrame):
                await self._app_send.send(
                    {"type": "websocket.receive", "bytes": frame.data, "text": None}
                )
        # A close frame, or EOF/reset from the client without one.
        await self._stream_closed()

    # -- the client side (TransportPeer) -------------------------------------------

    @property
    def refusal(self) -> Refused | None:
        """The HTTP refusal the client got, if any."""
        return self._answer if isinstance(self._answer, Refused) else None

    async def wait_accepted(self) -> str | None:
        await self._answered.wait()
        answer = self._answer
        if isinstance(answer, Refused):
            raise HandshakeRejected(answer.status, answer.body)
        if answer is None:
            raise PeerGone(None)
        return answer.subprotocol

    async def _client_send(self, frame: Frame) -> None:
        if self._client_closing or self._client_gone:
            raise PeerGone(None)
        try:
            await self._to_server_send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone(None) from exc

    async def send_text(self, text: str) -> None:
        await self._client_send(TextFrame(text))

    async def send_bytes(self, data: bytes) -> None:
        await self._client_send(BinaryFrame(data))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._client_send(CloseFrame(code, reason))
        self._client_closing = True

    async def vanish(self) -> None:
        """Reset the link: no close frame; buffered frames are lost."""
        self._client_gone = True
        self._to_client_receive.close()
        self._to_server_send.close()
        await trio.lowlevel.checkpoint()

    async def receive_frame(self) -> Frame:
        if self._client_gone:
            raise PeerGone(None)
        try:
            frame = await self._to_client_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise PeerGone(None) from exc
        self.frames.append(frame)
        if isinstance(frame, CloseFrame) and not self._client_closing:
            self._client_closing = True  # answer it, like a browser
            try:
                await self._to_server_send.send(CloseFrame(frame.code, frame.reason))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return frame

    async def receive_text(self) -> str:
        frame = await self.receive_frame()
        if isinstance(frame, CloseFrame):
            raise PeerGone(frame.code, frame.reason)
        assert isinstance(frame, TextFrame)
        return frame.text


async def stream_app_for(
    streams: trio.MemorySendChannel[ASGIStream],
) -> App:
    """An ASGI app that hands each stream to the test and returns when it is released."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        stream = ASGIStream(scope, receive, send)
        await streams.send(stream)
        await stream.wait_released()
        if stream.accepted:
            await stream.linger(2.0)

    return app


@asynccontextmanager
async def open_asgi_pair(
    *,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    forward_close_codes: bool = False,
    user_timeout: float = 1.0,
) -> AsyncIterator[tuple[ASGIStream, ASGIWebSocketDriver]]:
    """A conformance ``PairFactory``: an :class:`ASGIStream` on the in-memory driver."""
    send, receive = trio.open_memory_channel[ASGIStream](1)
    driver = ASGIWebSocketDriver(
        await stream_app_for(send),
        target=target,
        headers=headers,
        subprotocols=subprotocols,
        forward_close_codes=forward_close_codes,
        user_timeout=user_timeout,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        stream = await receive.receive()
        try:
            yield stream, driver
        finally:
            await stream.abort()
            await driver.vanish()
            nursery.cancel_scope.cancel()
