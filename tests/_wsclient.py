"""A small real WebSocket client for tests: websockets' sans-I/O protocol over trio.

Light enough to run hundreds in one trio process. It speaks RFC 6455 over a
real TCP socket, so tests see exactly what a browser would: the HTTP status
of a refusal, the close code (1006 when the server dropped TCP without a close
frame), and chatcore's JSON lines.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import trio
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["Refused", "WSClient", "connect"]


class Refused(Exception):
    """The server answered the handshake with an HTTP status other than 101."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status}: {body[:100]!r}")
        self.status = status
        self.body = body
        self.headers = headers


class WSClient:
    """One client connection (created by :func:`connect`)."""

    def __init__(self, stream: trio.SocketStream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        #: Text frames received and not yet taken, in order.
        self.frames: deque[str] = deque()
        #: JSON messages split from taken frames, not yet taken.
        self.messages: deque[dict[str, Any]] = deque()
        #: The handshake response.
        self.response: Response | None = None
        self.eof = False
        self._send_lock = trio.Lock()

    @property
    def closed(self) -> bool:
        return self.protocol.state is State.CLOSED or self.eof

    @property
    def close_code(self) -> int | None:
        """The server's close code; 1006 if TCP ended without a close frame."""
        if self.protocol.close_rcvd is not None:
            return self.protocol.close_rcvd.code
        if self.closed:
            return 1006
        return None

    @property
    def compressed(self) -> bool:
        return bool(self.protocol.extensions)

    async def _flush(self) -> None:
        # A receiving task (answering a close) and a sending task may flush
        # at the same time; the stream takes one writer at a time.
        async with self._send_lock:
            for data in self.protocol.data_to_send():
                try:
                    if data:
                        await self.stream.send_all(data)
                    else:
                        await self.stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _pump(self) -> None:
        """Read from the socket once and feed the protocol."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self.protocol.receive_data(data)
        else:
            self.eof = True
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                self.response = event
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.frames.append(event.data.decode())
        await self._flush()

    async def receive_text(self) -> str:
        """The next text frame.

        Raises:
            EOFError: the connection closed first (see :attr:`close_code`).
        """
        while not self.frames:
            if self.closed:
                raise EOFError(f"closed with {self.close_code}")
            await self._pump()
        return self.frames.popleft()

    async def receive(self) -> dict[str, Any]:
        """The next JSON message (frames carry one or more, newline-separated)."""
        while not self.messages:
            text = await self.receive_text()
            self.messages.extend(json.loads(line) for line in text.split("\n") if line)
        return self.messages.popleft()

    async def expect(self, type: str, *, pong: bool = True) -> dict[str, Any]:
        """The next message of ``type``, skipping others (answering pings if ``pong``)."""
        while True:
            message = await self.receive()
            if message.get("type") == "ping" and pong:
                await self.send_json({"type": "pong"})
            if message.get("type") == type:
                return message

    def _check_open(self) -> None:
        if self.protocol.state is not State.OPEN or self.eof:
            raise trio.ClosedResourceError(f"connection is {self.protocol.state.name.lower()}")

    async def send_text(self, text: str) -> None:
        """Send a text frame (ClosedResourceError once closing)."""
        self._check_open()
        self.protocol.send_text(text.encode())
        await self._flush()

    async def send_bytes(self, data: bytes) -> None:
        self._check_open()
        self.protocol.send_binary(data)
        await self._flush()

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message))

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes on the socket (e.g. a malformed frame)."""
        await self.stream.send_all(data)

    async def wait_closed(self) -> int:
        """Read (and discard) until the connection ends; returns the close code."""
        while not self.closed:
            await self._pump()
        await self.stream.aclose()
        code = self.close_code
        assert code is not None
        return code

    async def close(self, code: int = 1000, reason: str = "") -> int:
        """Send a close frame and wait for the end; returns the server's close code."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            await self._flush()
        return await self.wait_closed()

    async def abort(self) -> None:
        """Drop TCP without a close frame."""
        await self.stream.aclose()


async def connect(
    port: int,
    path: str = "/ws",
    *,
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    compression: bool = False,
    stream: trio.SocketStream | None = None,
) -> WSClient:
    """Open a WebSocket to ``ws://host:port/path``.

    Args:
        compression: Offer permessage-deflate, like every browser does.
        stream: An already connected stream to use (e.g. with socket options set).

    Raises:
        Refused: the server answered with another HTTP status (body included).
        OSError: the TCP connection failed.
    """
    extensions = [ClientPerMessageDeflateFactory()] if compression else None
    protocol = ClientProtocol(
        parse_uri(f"ws://{host}:{port}{path}"),
        extensions=extensions,
        subprotocols=subprotocols,  # type: ignore[arg-type]
        max_size=None,
    )
    if stream is None:
        stream = await trio.open_tcp_stream(host, port)
    client = WSClient(stream, protocol)
    request = protocol.connect()
    for name, value in (headers or {}).items():
        request.headers[name] = value
    protocol.send_request(request)
    await client._flush()
    while client.response is None:
        if client.eof:
            await stream.aclose()
            raise ConnectionResetError("connection closed during the handshake")
        await client._pump()
    response = client.response
    if response.status_code != 101:
        await stream.aclose()
        headers = {k.lower(): v for k, v in response.headers.raw_items()}
        raise Refused(response.status_code, bytes(response.body), headers)
    return client
