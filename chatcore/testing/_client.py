"""The protocol test client for chatcore applications: in memory or over a socket.

:func:`open_test_client` connects a :class:`TestClient` to a
:class:`~chatcore.ConnectionHandler` (a :class:`~chatcore.Hub` or your own)
through :func:`~chatcore.transports.memory_stream_pair`. The real connection
actor runs: your ``authenticate`` hook sees the handshake, your ``handle``
serves the connection, ``connection_closed`` runs when it ends. No sockets, no
threads, and every wait is on Trio's clock, so tests on the ``autojump_clock``
fixture never really sleep.

Given a ``ws://`` URL instead, the same client talks to a running server over
a real WebSocket (a :class:`~chatcore.testing.WebSocketPeer` underneath), for
end-to-end tests through hypercorn or ``chatcore serve``.

Theory of operation
-------------------

A background *reader* task owns the receiving side of the wire. It splits
every frame into its JSON lines, answers the server's ``ping`` with ``pong``
(like a browser client would) and appends every other message to a buffer. The
test's calls only look at that buffer:

* :meth:`TestClient.receive` / :meth:`TestClient.expect` take the *next*
  message, in arrival order;
* :meth:`TestClient.request` (and ``join``/``leave``/``publish``/``ping``)
  takes only the ``reply`` with its own ``ref`` and leaves every message that
  arrived around it in the buffer, in order;
* :meth:`TestClient.expect_closed` waits for the close frame and leaves the
  messages before it in the buffer.

Every wait is bounded by the client's ``timeout`` (virtual time on a mock
clock). A wait that fails raises :class:`AssertionError` saying what was
awaited and what arrived instead, so a failing test explains itself.
"""

from __future__ import annotations

import itertools
import json
import keyword
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import trio
import trio.testing

from .._config import Config
from .._connection import Connection, ConnectionHandler, serve_connection
from .._exceptions import ChatcoreError, PeerGone, RemoteProtocolError
from .._transport import MessageStream
from ..sansio import HandshakeRequest
from ..sansio._outbox import dumps
from ..transports._memory import BinaryFrame, CloseFrame, memory_stream_pair
from ._peers import Frame, MemoryPeer, WebSocketPeer

__all__ = ["RequestFailed", "TestClient", "open_test_client", "open_test_clients"]

#: A decoded protocol message (a JSON object with a string ``type``).
Message = dict[str, Any]

_T = TypeVar("_T")

_PONG = '{"type":"pong"}'

# Each test client gets its own source port, so apps that key anything on the
# client address (connection limits, logs) see distinct clients.
_ports = itertools.count(50_000)

# How many buffered messages a failure message shows, and how much of each.
_SHOW_MESSAGES = 10
_SHOW_CHARS = 300


class RequestFailed(ChatcoreError):
    """The server answered a request with an error ``reply``.

    Raised by :meth:`TestClient.join`, :meth:`~TestClient.leave`,
    :meth:`~TestClient.publish` and :meth:`~TestClient.ping`. Use
    :meth:`TestClient.request` instead to get error replies as values.

    Whose fault: depends on the test; the server refused the request (e.g.
    ``forbidden``, ``not_joined``, ``rate_limited``).

    Attributes:
        code: ``reply["error"]["code"]`` (e.g. ``"not_joined"``).
        message: ``reply["error"]["message"]``.
        reply: The whole reply message.
    """

    def __init__(self, code: str, message: str, reply: Message) -> None:
        super().__init__(f"error reply {code!r}: {message}")
        #: The error code.
        self.code = code
        #: The human-readable error message.
        self.message = message
        #: The whole ``reply`` message.
        self.reply = reply


def _show(message: object) -> str:
    text = json.dumps(message, ensure_ascii=False, default=repr)
    if len(text) > _SHOW_CHARS:
        text = text[: _SHOW_CHARS - 3] + "..."
    return text


def _show_fields(fields: Mapping[str, object]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in fields.items())


def _field_names(fields: Mapping[str, object]) -> dict[str, object]:
    # ``from`` is a message field but a Python keyword: accept ``from_=...``.
    return {
        name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name: value
        for name, value in fields.items()
    }


def _build_query(query: Mapping[str, str] | str, user: str | None) -> str:
    text = query.removeprefix("?") if isinstance(query, str) else urlencode(query)
    if user is None:
        return text
    if "user" in parse_qs(text, keep_blank_values=True):
        raise ValueError("pass the user either as user= or in the query, not both")
    extra = urlencode({"user": user})
    return f"{text}&{extra}" if text else extra


class TestClient:
    """One protocol client connected to the application under test.

    Made by :func:`open_test_client`, which also closes it; not constructed
    directly. Messages are plain ``dict`` objects as decoded from JSON.

    Every wait is bounded by :attr:`timeout`; the assertion methods
    (:meth:`receive`, :meth:`expect`, :meth:`expect_reply`,
    :meth:`expect_error`, :meth:`expect_closed`) also take their own
    ``timeout`` (seconds; ``math.inf`` for no bound). Waits run on Trio's
    clock, so on ``autojump_clock`` a timeout costs no real time. A wait that
    fails raises :class:`AssertionError` saying what was awaited and what is
    buffered. A cancelled wait takes nothing from the buffer.

    Attributes:
        hello: The server's ``hello`` message.
        connection: The server side of this connection (the actor's
            :class:`~chatcore.Connection`, in memory only): its ``identity``,
            ``close_record``, ``statistics()``, or ``close_nowait(4002)`` to
            act as the server would.
        timeout: The default bound of every wait, in seconds.
        answer_pings: Whether the server's ``ping`` is answered with ``pong``
            automatically (then it is not buffered) or buffered like any
            other message (then the test answers, or not).
    """

    # Not a test class, although its name starts with "Test" (pytest would
    # otherwise try to collect it wherever it is imported).
    __test__ = False

    def __init__(
        self,
        wire: MemoryPeer | WebSocketPeer,
        connection: Connection | None,
        *,
        timeout: float,
        answer_pings: bool,
    ) -> None:
        # The server side of this connection (None over a real socket).
        self._connection = connection
        #: Default bound of every wait (seconds).
        self.timeout = timeout
        #: Answer ``ping`` with ``pong`` automatically (and do not buffer it).
        self.answer_pings = answer_pings
        #: The server's ``hello`` (set by :func:`open_test_client`).
        self.hello: Message = {}
        # The client side of the in-memory link; the reader task receives on it.
        self._wire = wire
        # Decoded messages not consumed yet, in arrival order.
        self._buffer: deque[Message] = deque()
        # Things the server sent that are not protocol messages; reported by
        # the next wait (and on exit), then forgotten.
        self._violations: list[str] = []
        # The close frame received (1006 synthesised when the link dropped).
        self._closed: CloseFrame | None = None
        # The test already looked at the close (expect_closed/close/vanish).
        self._close_acknowledged = False
        # Waiters park here; the reader unparks them on every arrival.
        self._changed = trio.lowlevel.ParkingLot()
        # The next automatic ``ref`` of :meth:`request`.
        self._refs = itertools.count(1)

    # -- identity and state ---------------------------------------------------

    @property
    def connection(self) -> Connection:
        """The server side of this connection (the actor's :class:`~chatcore.Connection`).

        Raises:
            AttributeError: the client talks to a server over a real socket
                (:func:`open_test_client` with a URL): the server side runs
                elsewhere.
        """
        if self._connection is None:
            raise AttributeError("a client connected over a socket has no server-side connection")
        return self._connection

    @property
    def connection_id(self) -> str:
        """The ``connection_id`` the server announced in ``hello``."""
        return str(self.hello.get("connection_id", ""))

    @property
    def address(self) -> tuple[str, int] | None:
        """The client's ``(host, port)`` as the server sees it (``None`` if unknown)."""
        if isinstance(self._wire, WebSocketPeer) and isinstance(
            self._wire.stream, trio.SocketStream
        ):
            host, port = self._wire.stream.socket.getsockname()[:2]
            return str(host), int(port)
        assert self._connection is not None
        return self._connection.request.client

    @property
    def user(self) -> str | None:
        """The ``user`` the server announced in ``hello`` (``None`` if absent)."""
        user = self.hello.get("user")
        return None if user is None else str(user)

    @property
    def messages(self) -> list[Message]:
        """The messages received and not consumed yet, oldest first (a copy)."""
        return list(self._buffer)

    @property
    def closed(self) -> CloseFrame | None:
        """The server's close frame, or ``None`` while the connection is open.

        If the link dropped without a close frame (the server aborted, or
        :meth:`vanish`), this is ``CloseFrame(1006, "connection lost")``, the
        code a browser reports.
        """
        return self._closed

    @property
    def frames(self) -> list[Frame]:
        """Every frame received, in order, pings included (the wire log)."""
        return list(self._wire.frames)

    def __repr__(self) -> str:
        state = "OPEN" if self._closed is None else f"CLOSED {self._closed.code}"
        return (
            f"<TestClient {self.connection_id} user={self.user!r} {state} "
            f"buffered={len(self._buffer)}>"
        )

    # -- sending ----------------------------------------------------------------

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one JSON object as one text frame.

        Args:
            message: The message, e.g. ``{"type": "join", "room": "lobby"}``.

        Raises:
            AssertionError: the connection is closed, or the server did not
                take the frame within :attr:`timeout` (it stopped reading).
            TypeError, ValueError: ``message`` is not JSON-serialisable.
        """
        await self.send_text(dumps(message))

    async def send_text(self, text: str) -> None:
        """Send a raw text frame (e.g. invalid JSON, to test ``bad_json``).

        Raises:
            AssertionError: as for :meth:`send`.
        """
        await self._send(text)

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame (the server closes with 1003).

        Raises:
            AssertionError: as for :meth:`send`.
        """
        await self._send(data)

    async def _send(self, payload: str | bytes) -> None:
        limit = self.timeout
        what = f"sending {payload[:80]!r}"
        try:
            with trio.fail_after(limit):
                if isinstance(payload, bytes):
                    await self._wire.send_bytes(payload)
                else:
                    await self._wire.send_text(payload)
        except trio.TooSlowError:
            raise AssertionError(
                f"timed out after {limit:g}s {what}: the server is not reading"
            ) from None
        except PeerGone:
            raise AssertionError(
                f"{what}: the connection is closed ({self._describe_close()})"
            ) from None

    # -- requests ---------------------------------------------------------------

    async def request(self, type: str, /, **fields: Any) -> Message:
        """Send a message with a fresh ``ref`` and wait for the ``reply`` to it.

        Messages arriving before the reply stay buffered, in order, for
        :meth:`receive`/:meth:`expect`; only the matching reply is taken.
        Error replies are returned, not raised.

        Args:
            type: The message type (``"join"``, ``"publish"``, an app type...).
            fields: The message's other fields. ``ref`` defaults to a fresh
                integer (1, 2, ...); pass one to choose it.

        Returns:
            The whole ``reply`` message (``status``, ``data`` or ``error``).

        Raises:
            AssertionError: no reply within :attr:`timeout`, or the connection
                closed first.
        """
        ref = fields.pop("ref") if "ref" in fields else next(self._refs)
        await self.send({"type": type, "ref": ref, **fields})

        def take_reply() -> Message | None:
            for message in self._buffer:
                if message.get("type") == "reply" and message.get("ref") == ref:
                    self._buffer.remove(message)
                    return message
            return None

        return await self._wait(take_reply, f"the reply to {type!r} with ref={ref!r}", None)

    async def _call(self, type: str, **fields: Any) -> Any:
        reply = await self.request(type, **fields)
        if reply.get("status") != "ok":
            error = reply.get("error")
            if not isinstance(error, dict):
                error = {}
            raise RequestFailed(str(error.get("code")), str(error.get("message", "")), reply)
        return reply.get("data")

    async def join(self, room: str, since: Mapping[str, Any] | None = None) -> Any:
        """Join ``room`` and wait for the reply.

        With ``since``, messages the server replays after the reply stay
        buffered for :meth:`expect`.

        Args:
            room: The room name.
            since: ``{"epoch": ..., "offset": ...}`` to recover missed messages.

        Returns:
            The reply's ``data``: ``{"room", "epoch", "offset"}`` (and
            ``"recovered"`` when ``since`` was given).

        Raises:
            RequestFailed: the server refused (e.g. ``forbidden``).
            AssertionError: no reply within :attr:`timeout`, or the connection closed first.
        """
        fields: dict[str, Any] = {"room": room}
        if since is not None:
            fields["since"] = dict(since)
        return await self._call("join", **fields)

    async def leave(self, room: str) -> Any:
        """Leave ``room`` and wait for the reply.

        Returns:
            The reply's ``data``.

        Raises:
            RequestFailed: the server refused.
            AssertionError: no reply within :attr:`timeout`, or the connection closed first.
        """
        return await self._call("leave", room=room)

    async def publish(self, room: str, data: Any) -> int:
        """Publish ``data`` to ``room`` and wait for the reply.

        The server also sends the message back as a ``message`` (after the
        reply); it stays buffered for :meth:`expect`.

        Returns:
            The offset the message got in the room's order.

        Raises:
            RequestFailed: the server refused (``not_joined``, ``rate_limited``...).
            AssertionError: no reply within :attr:`timeout`, the connection closed first, or
                the reply has no integer ``offset``.
        """
        data_out = await self._call("publish", room=room, data=data)
        offset = data_out.get("offset") if isinstance(data_out, dict) else None
        assert isinstance(offset, int), f"publish reply without an integer offset: {data_out!r}"
        return offset

    async def ping(self) -> None:
        """Send a protocol ``ping`` and wait for the reply (a liveness check).

        Raises:
            RequestFailed: the server answered with an error.
            AssertionError: no reply within :attr:`timeout`, or the connection closed first.
        """
        await self._call("ping")

    # -- receiving --------------------------------------------------------------

    # ``timeout=`` on the assertion methods (ASYNC109): it is part of what is
    # asserted ("arrives within"), and a failure must say what was awaited,
    # which a caller's cancel scope could not.
    async def receive(self, *, timeout: float | None = None) -> Message:  # noqa: ASYNC109
        """Take the next message (waiting for one if none is buffered).

        Args:
            timeout: Bound on the wait (default :attr:`timeout`).

        Raises:
            AssertionError: nothing arrived in time, the connection closed
                first, or the server sent something that is not a message.
        """
        return await self._wait(self._take_next, "a message", timeout)

    async def expect(
        self,
        type: str,
        /,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        **fields: Any,
    ) -> Message:
        """Take the next message and assert its ``type`` and field values.

        Fields are compared with ``==`` (expected value on the left, so
        :data:`unittest.mock.ANY` matches anything). Fields not named are not
        checked. A field named like a Python keyword takes a trailing
        underscore: ``expect("message", from_="alice")``.

        Args:
            type: The expected ``type``.
            timeout: Bound on the wait (default :attr:`timeout`).
            fields: Expected field values.

        Returns:
            The message, for further checks.

        Raises:
            AssertionError: the next message differs (it is consumed; the
                error shows it and what else is buffered), nothing arrived
                in time, or the connection closed first.
        """
        wanted = _field_names(fields)
        what = f"a {type!r} message" + (f" with {_show_fields(wanted)}" if wanted else "")
        message = await self._wait(self._take_next, what, timeout)
        problems = []
        if message.get("type") != type:
            problems.append(f"type: expected {type!r}, got {message.get('type')!r}")
        for name, value in wanted.items():
            if name not in message:
                problems.append(f"{name}: expected {value!r}, missing")
            elif not value == message[name]:  # noqa: SIM201  (expected value's __eq__ decides)
                problems.append(f"{name}: expected {value!r}, got {message[name]!r}")
        if problems:
            detail = "\n  ".join(problems)
            raise AssertionError(
                f"expected {what}\n  got {_show(message)}\n  {detail}\n{self._describe_buffer()}"
            )
        return message

    async def expect_reply(
        self,
        ref: object,
        *,
        status: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Message:
        """Take the next message and assert it is the ``reply`` to ``ref``.

        For messages sent with an explicit ``ref`` through :meth:`send`
        (:meth:`request` waits for its reply by itself).

        Args:
            ref: The ``ref`` the request carried.
            status: ``"ok"`` or ``"error"`` to check too; ``None`` accepts either.
            timeout: Bound on the wait (default :attr:`timeout`).

        Raises:
            AssertionError: as for :meth:`expect`.
        """
        if status is None:
            return await self.expect("reply", timeout=timeout, ref=ref)
        return await self.expect("reply", timeout=timeout, ref=ref, status=status)

    async def expect_error(
        self,
        code: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Message:
        """Take the next message and assert it is an ``error`` with ``code``.

        ``error`` answers a frame without a usable ``ref`` (e.g. ``bad_json``);
        an error *reply* is checked with :meth:`expect_reply` or
        :class:`RequestFailed`.

        Raises:
            AssertionError: as for :meth:`expect`.
        """
        return await self.expect("error", timeout=timeout, code=code)

    async def expect_closed(
        self,
        code: int | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> CloseFrame:
        """Wait until the server closes the connection; assert the close code.

        Messages that arrived before the close stay in :attr:`messages`.

        Args:
            code: The expected close code (e.g. 1008, 4000); ``None`` accepts any.
            timeout: Bound on the wait (default :attr:`timeout`).

        Returns:
            The close frame (code 1006 if the link dropped without one).

        Raises:
            AssertionError: the connection is still open after ``timeout``, or
                it closed with another code.
        """
        what = "the connection to close" + ("" if code is None else f" with {code}")
        frame = await self._wait(lambda: self._closed, what, timeout, fail_on_close=False)
        self._close_acknowledged = True
        if code is not None and frame.code != code:
            raise AssertionError(
                f"expected the connection to close with {code}, "
                f"but it closed with {frame.code} {frame.reason!r}\n{self._describe_buffer()}"
            )
        return frame

    async def assert_nothing_received(self) -> None:
        """Assert that nothing arrived that the test has not consumed.

        Waits until every task is blocked
        (:func:`trio.testing.wait_all_tasks_blocked`), so whatever the server
        was about to send has been sent and read, then checks that no message
        is buffered and no unexpected close arrived. Automatically answered
        pings do not count. To check a stretch of time, sleep first (free on
        ``autojump_clock``).

        Raises:
            AssertionError: a message is buffered or the connection closed
                (unless :meth:`expect_closed` already saw the close).
        """
        await trio.testing.wait_all_tasks_blocked()
        self._raise_violation()
        problems = []
        if self._buffer:
            problems.append(self._describe_buffer())
        if self._closed is not None and not self._close_acknowledged:
            problems.append(f"closed: {self._describe_close()}")
        if problems:
            raise AssertionError("expected nothing, but received:\n" + "\n".join(problems))

    # -- closing ----------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str = "") -> CloseFrame:
        """Close the connection and wait for the server's answering close frame.

        Idempotent: if the connection is already closed this returns at once.

        Returns:
            The server's close frame (normally the same code).

        Raises:
            AssertionError: the server did not answer within :attr:`timeout`.
        """
        if self._closed is None:
            try:
                await self._wire.close(code, reason)
            except PeerGone:
                pass  # the server closed or the link dropped meanwhile
        frame = await self._wait(
            lambda: self._closed, "the server's close frame", None, fail_on_close=False
        )
        self._close_acknowledged = True
        return frame

    def vanish(self) -> None:
        """Drop the link without a close frame, like a crashed browser tab.

        The server sees the connection lost (1006); :attr:`closed` becomes
        ``CloseFrame(1006, ...)`` once the reader notices.
        """
        self._close_acknowledged = True
        self._wire.vanish_nowait()

    # -- internals --------------------------------------------------------------

    def _take_next(self) -> Message | None:
        return self._buffer.popleft() if self._buffer else None

    async def _wait(
        self,
        take: Callable[[], _T | None],
        what: str,
        within: float | None,
        *,
        fail_on_close: bool = True,
    ) -> _T:
        """Wait until ``take()`` returns something; bounded, with a clear failure."""
        limit = self.timeout if within is None else within
        await trio.lowlevel.checkpoint()
        try:
            with trio.fail_after(limit):
                while True:
                    self._raise_violation()
                    result = take()
                    if result is not None:
                        return result
                    if fail_on_close and self._closed is not None:
                        raise AssertionError(
                            f"expected {what}, but the connection closed "
                            f"({self._describe_close()})\n{self._describe_buffer()}"
                        )
                    await self._changed.park()
        except trio.TooSlowError:
            timed = "no timeout" if math.isinf(limit) else f"{limit:g}s"
            raise AssertionError(
                f"timed out ({timed}) waiting for {what}\n{self._describe_buffer()}"
            ) from None

    def _raise_violation(self) -> None:
        if self._violations:
            violation = self._violations.pop(0)
            raise AssertionError(f"the server sent an invalid message: {violation}")

    def _describe_buffer(self) -> str:
        if not self._buffer:
            return "nothing else buffered"
        shown = [f"  {_show(m)}" for m in itertools.islice(self._buffer, _SHOW_MESSAGES)]
        if len(self._buffer) > _SHOW_MESSAGES:
            shown.append(f"  ... and {len(self._buffer) - _SHOW_MESSAGES} more")
        return f"buffered ({len(self._buffer)}):\n" + "\n".join(shown)

    def _describe_close(self) -> str:
        if self._closed is None:
            return "not closed"
        return f"code {self._closed.code} {self._closed.reason!r}"

    def _arrived(self) -> None:
        self._changed.unpark_all()

    async def _read(self) -> None:
        """The reader task: frames -> messages, pings answered, until the close."""
        wire = self._wire
        while True:
            try:
                frame = await wire.receive_frame()
            except PeerGone:
                self._closed = CloseFrame(1006, "connection lost")
                self._arrived()
                return
            except RemoteProtocolError as exc:  # over a socket: corrupt framing
                self._violations.append(f"invalid WebSocket framing ({exc})")
                self._closed = CloseFrame(1006, "connection lost")
                self._arrived()
                return
            if isinstance(frame, CloseFrame):
                self._closed = frame
                self._arrived()
                return
            if isinstance(frame, BinaryFrame):
                self._violations.append(f"a binary frame {frame.data[:80]!r}")
                self._arrived()
                continue
            for line in frame.text.split("\n"):
                if line:
                    await self._take_line(line)
            self._arrived()

    async def _take_line(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError as exc:
            self._violations.append(f"{line[:_SHOW_CHARS]!r} is not JSON ({exc})")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self._violations.append(f"{_show(message)} is not an object with a string 'type'")
            return
        if self.answer_pings and message["type"] == "ping":
            try:
                await self._wire.send_text(_PONG)
            except PeerGone:
                pass  # closing; the reader sees the close next
            return
        self._buffer.append(message)


async def _serve(
    stream: MessageStream,
    handler: ConnectionHandler,
    config: Config | None,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve_connection(stream, handler, config=config, task_status=task_status)
    finally:
        done.set()


@asynccontextmanager
async def open_test_client(
    app: ConnectionHandler | str,
    *,
    user: str | None = None,
    path: str = "/ws",
    query: Mapping[str, str] | str = "",
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    client: tuple[str, int] | None = None,
    config: Config | None = None,
    answer_pings: bool = True,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> AsyncIterator[TestClient]:
    """Connect a :class:`TestClient` to ``app``: in memory, or over a real WebSocket.

    With a handler, runs the real connection actor
    (:func:`~chatcore.serve_connection`) for it in memory, in a nursery of its
    own: the ``authenticate`` hook judges the handshake, the server's first
    message must be ``hello``. On exit the client closes with 1000 (if still
    open) and waits until the server side has finished, so
    ``connection_closed`` has run when the block is left.

    With a ``ws://host:port/path?query`` URL, connects over TCP to a server
    that is already running (``chatcore serve``, hypercorn, ``serve_websocket``)
    and speaks the same protocol; on exit it closes with 1000 and waits for the
    server's answering close frame. :attr:`TestClient.connection` is not
    available then (the server side runs elsewhere).

    Example::

        async with open_test_client(hub, user="alice") as alice:
            await alice.join("lobby")
            offset = await alice.publish("lobby", {"text": "hi"})
            await alice.expect("message", room="lobby", offset=offset, from_="alice")

    Args:
        app: The application (a :class:`~chatcore.Hub`, or any
            :class:`~chatcore.ConnectionHandler`), or the ``ws://`` URL of
            a running server.
        user: Added to the query as ``user=<user>`` (how the example app
            authenticates). Tokens and other credentials go in ``query``
            or ``headers``.
        path: The request path (in memory; a URL carries its own).
        query: The query string (``"token=abc"``) or parameters
            (``{"token": "abc"}``), added to the URL's own query.
        headers: Handshake headers, e.g. ``[("origin", "https://example.com")]``.
        subprotocols: Subprotocols to offer.
        client: The client's ``(host, port)`` (in memory only); default
            ``127.0.0.1`` with a port unique to this client.
        config: The connection's bounds and timings (in memory only; default
            ``Config()``), e.g. ``Config(heartbeat_interval=1)`` to test heartbeats.
        answer_pings: Answer the server's ``ping`` automatically (see
            :attr:`TestClient.answer_pings`).
        timeout: Default bound, in seconds, of every wait of the client,
            including the connection, the handshake, ``hello`` and the close
            on exit.

    Yields:
        The connected client, ``hello`` received.

    Raises:
        HandshakeRejected: the server refused (``status``, ``body``, ``headers``).
        AssertionError: the first message was not ``hello``; the handshake, the
            ``hello`` or the server's finish on exit took longer than
            ``timeout``; or the server sent something that is not a protocol
            message and the test never received it.
        ValueError: ``user`` given both as ``user=`` and in ``query``; a URL
            that is not ``ws://``; ``client`` or ``config`` with a URL.
        OSError: the TCP connection to the URL failed.

    Cancellation: leaving the block with an exception (cancellation included)
    drops the link without a close frame (the server sees 1006) and, in
    memory, cancels the connection; the exception propagates unchanged, never
    wrapped in an :class:`ExceptionGroup`.
    """
    if isinstance(app, str):
        if client is not None or config is not None:
            raise ValueError("client= and config= apply in memory only, not to a URL")
        connecting = _open_socket_client(
            app, user, query, headers, subprotocols, answer_pings, timeout
        )
    else:
        request = HandshakeRequest(
            path=path,
            query_string=_build_query(query, user),
            headers=tuple(headers),
            client=client if client is not None else ("127.0.0.1", next(_ports)),
            subprotocols=tuple(subprotocols),
        )
        connecting = _open_memory_client(app, request, config, answer_pings, timeout)
    async with connecting as test_client:
        yield test_client


@asynccontextmanager
async def _open_memory_client(
    handler: ConnectionHandler,
    request: HandshakeRequest,
    config: Config | None,
    answer_pings: bool,
    timeout: float,  # noqa: ASYNC109
) -> AsyncIterator[TestClient]:
    stream, wire = memory_stream_pair(request)
    server_done = trio.Event()
    # An exception raised inside the nursery's body would come out wrapped in
    # an ExceptionGroup; keep it and re-raise it bare once the nursery is done.
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        connection: Connection = await nursery.start(_serve, stream, handler, config, server_done)
        test_client = TestClient(
            MemoryPeer(wire), connection, timeout=timeout, answer_pings=answer_pings
        )
        try:
            await _start(test_client, nursery)
            yield test_client
            if test_client._closed is None:
                await test_client.close()
            with trio.move_on_after(timeout) as waiting:
                await server_done.wait()
            if waiting.cancelled_caught:
                raise AssertionError(
                    f"the server side did not finish within {timeout:g}s after the close "
                    f"(handler: {handler!r})"
                )
            test_client._raise_violation()
        except GeneratorExit:  # pragma: no cover  (garbage-collected generator)
            raise
        except BaseException as exc:
            error = exc
            wire.vanish()
        if error is not None and not isinstance(error, trio.Cancelled):
            # Let the server notice the lost link by itself (it records 1006),
            # but do not hang on an application that ignores cancellation.
            with trio.move_on_after(timeout):
                await server_done.wait()
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error


@asynccontextmanager
async def _open_socket_client(
    url: str,
    user: str | None,
    query: Mapping[str, str] | str,
    headers: Sequence[tuple[str, str]],
    subprotocols: Sequence[str],
    answer_pings: bool,
    timeout: float,  # noqa: ASYNC109
) -> AsyncIterator[TestClient]:
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"expected a ws://host:port/path URL, got {url!r}")
    text = _build_query("&".join(q for q in (parts.query, _build_query(query, None)) if q), user)
    target = (parts.path or "/") + (f"?{text}" if text else "")
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(timeout):
                peer = await WebSocketPeer.connect(
                    parts.hostname,
                    parts.port or 80,
                    target,
                    headers=headers,
                    subprotocols=subprotocols,
                )
        except trio.TooSlowError:
            raise AssertionError(f"could not connect to {url} within {timeout:g}s") from None
        test_client = TestClient(peer, None, timeout=timeout, answer_pings=answer_pings)
        try:
            await _start(test_client, nursery)
            yield test_client
            if test_client._closed is None:
                await test_client.close()
            test_client._raise_violation()
        except GeneratorExit:  # pragma: no cover  (garbage-collected generator)
            raise
        except BaseException as exc:
            error = exc
        finally:
            peer.vanish_nowait()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def _start(test_client: TestClient, nursery: trio.Nursery) -> None:
    """The handshake's answer, then the reader task, then ``hello``."""
    timeout = test_client.timeout
    try:
        with trio.fail_after(timeout):
            await test_client._wire.wait_accepted()
    except trio.TooSlowError:
        raise AssertionError(
            f"the server did not answer the handshake within {timeout:g}s"
        ) from None
    except PeerGone:
        raise AssertionError("the server dropped the link during the handshake") from None
    nursery.start_soon(test_client._read)
    test_client.hello = await test_client.expect("hello")


@asynccontextmanager
async def open_test_clients(
    handler: ConnectionHandler, users: Sequence[str], **options: Any
) -> AsyncIterator[list[TestClient]]:
    """Connect one :class:`TestClient` per user (see :func:`open_test_client`).

    The clients connect in order and are closed in reverse order on exit.

    Example::

        async with open_test_clients(hub, ["alice", "bob"]) as (alice, bob):
            ...

    Args:
        handler: The application.
        users: One user name per client.
        options: Any other keyword argument of :func:`open_test_client`,
            applied to every client.

    Yields:
        The clients, in the order of ``users``.

    Raises:
        HandshakeRejected, AssertionError: as :func:`open_test_client`
            (clients already connected are closed first).
    """
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_test_client(handler, user=user, **options))
            for user in users
        ]
