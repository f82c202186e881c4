"""A Python client for chatcore servers: bots, services and scripts.

::

    from chatcore.client import Message, open_client

    async with open_client("ws://127.0.0.1:8000/ws?user=bot&token=...") as client:
        await client.join("lobby")
        offset = await client.publish("lobby", {"text": "hello"})  # acknowledged
        async for event in client.events():
            if isinstance(event, Message) and event.sender != client.user:
                await client.publish(event.room, {"text": f"you said {event.data!r}"})

Theory of operation: one task (started by :func:`open_client`) owns the
WebSocket. It reads frames, answers the server's pings, settles requests by
their ``ref`` and turns every other message into a typed, frozen event on a
bounded channel that :meth:`ChatClient.events` reads. The connection policy is
the browser client's (``chatcore.js``), so both behave alike:

* **Reconnect** after a lost connection, waiting a random time between 0 and
  ``min(max_delay, min_delay * 2**attempt)`` (full jitter), or exactly the
  server's ``shutdown.reconnect_after_ms`` when it announced a drain. Never
  after a close that says not to (1000, 1003, 1007, 1008, 1009, 4002).
* **Recovery**: a position ``(epoch, offset)`` is kept per joined room, across
  reconnects; after a reconnect every room is joined again with ``since``, so
  the server replays what was missed (``Joined.recovered``) or says it cannot
  (``Joined.reset``: reload what you need). Duplicates are dropped; a message
  of another epoch or after a gap in the offsets produces a :class:`Reset`.
* **Heartbeat**: a server silent for longer than its ``hello`` promised
  (``interval_ms + timeout_ms``) counts as gone.
* **Sign-in**: a handshake refused with 401 or 403 raises
  :class:`~chatcore.HandshakeRejected` (retrying would not help), and
  ``max_sign_in_attempts`` failed attempts before the first ``hello`` raise
  :class:`ConnectFailed`. Once signed in, the client retries for ever.

Exceptions::

    ChatcoreError
    ├── HandshakeRejected   the server refused the handshake (401/403)
    ├── ConnectFailed       never got in: no server, or it kept refusing
    ├── ConnectionLost      the connection ended while a request waited
    └── RequestFailed       an error reply (code, message)

Plus :class:`trio.TooSlowError` when a request got no reply within
``request_timeout`` (the server may still have acted on it).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import attrs
import trio
import trio_websocket

from ._backplane import Position
from ._exceptions import ChatcoreError, HandshakeRejected
from .sansio._outbox import dumps
from .testing._client import RequestFailed

__all__ = [
    "ChatClient",
    "ConnectFailed",
    "Connected",
    "ConnectionLost",
    "Disconnected",
    "Event",
    "Joined",
    "Message",
    "Position",
    "PresenceDiff",
    "PresenceState",
    "RequestFailed",
    "Reset",
    "ServerError",
    "ServerMessage",
    "Shutdown",
    "open_client",
]

logger = logging.getLogger("chatcore.client")

#: Close codes after which the client does not reconnect (see docs/protocol.md).
NO_RECONNECT = frozenset({1000, 1003, 1007, 1008, 1009, 4002})


class ConnectFailed(ChatcoreError):
    """No connection ever got as far as the server's ``hello``.

    Whose fault: the environment's; no server at the URL, or it kept refusing
    (e.g. 503 while draining) for ``max_sign_in_attempts`` attempts.
    """


class ConnectionLost(ChatcoreError):
    """The connection ended while a request waited for its reply.

    Whose fault: nobody's. The server may or may not have acted on the request
    (a ``publish`` may have been ordered): recovery after the reconnect shows
    what happened.
    """


# -- events ----------------------------------------------------------------------


@attrs.frozen
class Connected:
    """The server's ``hello``: signed in (again) as ``user``."""

    user: str
    connection_id: str


@attrs.frozen
class Joined:
    """A join was answered (a first join, or a rejoin after a reconnect).

    ``recovered`` is ``None`` for a first join. ``reset`` is true when what the
    client held for the room is not continued by what follows (a first join,
    ``recovered`` false, or a new epoch): reload what you need.
    """

    room: str
    epoch: str
    offset: int
    recovered: bool | None
    reset: bool


@attrs.frozen
class Message:
    """A room message, in order, each offset once (``sender`` is ``None`` for the server)."""

    room: str
    epoch: str
    offset: int
    sender: str | None
    data: Any


@attrs.frozen
class Reset:
    """Messages went missing (``reason="gap"``) or the room started over (``"epoch"``)."""

    room: str
    epoch: str
    offset: int
    reason: str


@attrs.frozen
class PresenceState:
    """Everyone present in ``room``: ``{user: [meta, ...]}``."""

    room: str
    users: Mapping[str, Any]


@attrs.frozen
class PresenceDiff:
    """Users who appeared in (``joins``) or left (``leaves``) ``room``."""

    room: str
    joins: Mapping[str, Any]
    leaves: Mapping[str, Any]


@attrs.frozen
class Shutdown:
    """The server is draining; it asked for a reconnect after ``reconnect_after`` seconds."""

    reconnect_after: float


@attrs.frozen
class Disconnected:
    """A connection ended; ``reconnect_in`` seconds until the next attempt (``None``: final)."""

    code: int
    reason: str
    reconnect_in: float | None


@attrs.frozen
class ServerError:
    """An ``error`` message from the server, or a rejoin that was refused."""

    code: str
    message: str


@attrs.frozen
class ServerMessage:
    """Any other message (an application type): its ``type`` and its other fields."""

    type: str
    fields: Mapping[str, Any]


Event: TypeAlias = (
    Connected
    | Joined
    | Message
    | Reset
    | PresenceState
    | PresenceDiff
    | Shutdown
    | Disconnected
    | ServerError
    | ServerMessage
)


@attrs.define(eq=False)
class _Pending:
    # One request waiting for its reply. `on_reply` runs in the reader, before
    # the next line is handled (a join settles its position before the replay).
    on_reply: Callable[[Any], Event | None] | None
    done: trio.Event = attrs.Factory(trio.Event)
    data: Any = None
    error: Exception | None = None


class ChatClient:
    """One logical client session across reconnects (make it with :func:`open_client`).

    Args:
        url: ``ws://`` or ``wss://`` URL with the credentials the server's
            ``authenticate`` hook reads (e.g. ``?user=bot&token=...``).
        min_delay: Seconds; the first reconnect waits up to this long.
        max_delay: Seconds; no reconnect waits longer.
        request_timeout: Seconds a request waits for a connection and its reply.
        max_sign_in_attempts: Failed attempts before the first ``hello`` before
            :class:`ConnectFailed`.
        event_buffer: Events held for :meth:`events`. When it is full the
            client stops reading (the server then treats it as a slow consumer
            and, for durable messages, closes it; it recovers after the
            reconnect). ``0`` discards events (a client that only publishes).
        seed: Seeds the jitter (tests).
    """

    def __init__(
        self,
        url: str,
        *,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        request_timeout: float = 10.0,
        max_sign_in_attempts: int = 3,
        event_buffer: int = 1024,
        seed: int | None = None,
    ) -> None:
        #: The WebSocket URL.
        self.url = url
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.request_timeout = request_timeout
        self.max_sign_in_attempts = max_sign_in_attempts
        #: The user name from the last ``hello`` (``None`` before the first).
        self.user: str | None = None
        #: ``connecting``, ``open``, ``reconnecting`` or ``closed``.
        self.status = "connecting"
        #: Position per joined room (its last message seen), kept across
        #: reconnects and sent as ``since`` when rejoining.
        self.rooms: dict[str, Position] = {}
        #: Who is present per joined room, from presence events: ``{room: {user: metas}}``.
        self.presence: dict[str, dict[str, Any]] = {}
        #: Connections opened so far (1 after the first ``hello``).
        self.connections = 0
        self._keep_events = event_buffer > 0
        self._events_in, self._events_out = trio.open_memory_channel[Event](max(event_buffer, 1))
        self._random = random.Random(seed)
        self._refs = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # The open, signed-in connection; `_ready` is set while there is one
        # whose rooms are joined again.
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._ready = trio.Event()
        self._send_lock = trio.Lock()
        self._server_delay: float | None = None  # from `shutdown`
        self._silence = math.inf  # from hello.heartbeat
        self._stopped = False
        self._attempt = 0  # failed attempts since the last hello
        self._cancel_scope: trio.CancelScope | None = None
        self._task_status: trio.TaskStatus[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<ChatClient {self.user or '?'} {self.status} rooms={len(self.rooms)} "
            f"pending={len(self._pending)} connections={self.connections}>"
        )

    # -- public API ----------------------------------------------------------------

    async def join(self, room: str) -> Joined:
        """Join ``room`` (with ``since`` if this client was in it before).

        Returns:
            The :class:`Joined` also delivered as an event.

        Raises:
            RequestFailed: refused (``forbidden``, ``too_many_rooms``, ...).
            ConnectionLost: the connection ended before the reply.
            trio.TooSlowError: no reply within ``request_timeout``.

        Cancelling it abandons the wait; the server may still have joined.
        """
        return await self._join(room, None)

    async def _join(self, room: str, ws: trio_websocket.WebSocketConnection | None) -> Joined:
        known = self.rooms.get(room)
        fields: dict[str, Any] = {"room": room}
        if known is not None:
            fields["since"] = {"epoch": known.epoch, "offset": known.offset}
        joined: list[Joined] = []

        def note(data: Any) -> Joined:
            joined.append(self._note_join(room, known, data))
            return joined[0]

        await self._request(ws, "join", fields, note)
        return joined[0]

    async def leave(self, room: str) -> None:
        """Leave ``room`` and forget its position (same errors as :meth:`join`)."""
        self.rooms.pop(room, None)
        self.presence.pop(room, None)
        await self.request("leave", {"room": room})

    async def publish(self, room: str, data: Any) -> int:
        """Publish ``data`` (any JSON value) to ``room`` and wait for the acknowledgement.

        Returns:
            The message's offset in the room: the server ordered it.

        Raises:
            RequestFailed: refused (``not_joined``, ``rate_limited``, ...).
            ConnectionLost: the connection ended first (it may have been ordered).
            trio.TooSlowError: no reply within ``request_timeout``.
        """
        reply = await self.request("publish", {"room": room, "data": data})
        return int(reply["offset"])

    async def request(
        self,
        type: str,
        fields: Mapping[str, Any] | None = None,
        on_reply: Callable[[Any], Event | None] | None = None,
    ) -> Any:
        """Send a request of ``type`` with a fresh ``ref``; return the reply's ``data``.

        Waits for a signed-in connection first, whose rooms are joined again
        after a reconnect (both waits within ``request_timeout``).
        ``on_reply(data)`` runs when the ok reply is read, before the next
        message of the same frame; the event it returns (if any) is delivered.

        Raises:
            RequestFailed: an error reply.
            ConnectionLost: the connection ended before the reply.
            trio.TooSlowError: no connection or reply within ``request_timeout``.
        """
        return await self._request(None, type, fields, on_reply)

    async def _request(
        self,
        ws: trio_websocket.WebSocketConnection | None,
        type: str,
        fields: Mapping[str, Any] | None,
        on_reply: Callable[[Any], Event | None] | None,
    ) -> Any:
        # `ws`: this connection, ready or not (the rejoins); None: wait until ready.
        pending = _Pending(on_reply)
        with trio.fail_after(self.request_timeout):
            if ws is None:
                ws = await self._connection()
            ref = next(self._refs)
            self._pending[ref] = pending
            try:
                await self._send(ws, {**(fields or {}), "type": type, "ref": ref})
                await pending.done.wait()
            finally:
                self._pending.pop(ref, None)
        if pending.error is not None:
            raise pending.error
        return pending.data

    async def send(self, message: Mapping[str, Any]) -> bool:
        """Send a message without waiting for a reply (e.g. a ``typing`` notice).

        Returns:
            False when there is no connection right now (nothing was sent).
        """
        ws = self._ws
        if ws is None:
            return False
        try:
            await self._send(ws, message)
        except trio_websocket.ConnectionClosed:
            return False
        return True

    async def events(self) -> AsyncIterator[Event]:
        """The events, in the order they happened; ends after the client closed for good."""
        async for event in self._events_out:
            yield event

    async def wait_connected(self) -> None:
        """Return once there is a signed-in connection (at once if there is one)."""
        await self._ready.wait()

    async def aclose(self) -> None:
        """Close for good (code 1000, no reconnect). Idempotent."""
        self._stopped = True
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(2):
                await ws.aclose(1000, "bye")
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    # -- the connection task ----------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect, until closed for good (see the module docs)."""
        self._task_status = task_status
        try:
            with trio.CancelScope() as self._cancel_scope:
                while not self._stopped:
                    code, reason = await self._connect_and_serve()
                    if self._stopped or code in NO_RECONNECT:
                        await self._emit(Disconnected(code, reason, None))
                        return
                    if not self.connections and self._attempt + 1 >= self.max_sign_in_attempts:
                        raise ConnectFailed(
                            f"{self._attempt + 1} attempts to connect failed, the last: {reason}"
                        )
                    delay = self._delay(self._attempt)
                    self._attempt += 1
                    self.status = "reconnecting" if self.connections else "connecting"
                    await self._emit(Disconnected(code, reason, delay))
                    await trio.sleep(delay)
        finally:
            self.status = "closed"
            self._events_in.close()
            self._ready.set()  # waiting requests wake up and see "closed"

    async def _connect_and_serve(self) -> tuple[int, str]:
        """One connection attempt; returns how it ended (close code, reason)."""
        try:
            async with (
                trio_websocket.open_websocket_url(
                    self.url, connect_timeout=self.request_timeout, disconnect_timeout=2
                ) as ws,
                trio.open_nursery() as nursery,  # the rejoins of this connection
            ):
                try:
                    return await self._serve(ws, nursery)
                finally:
                    nursery.cancel_scope.cancel()
        except trio_websocket.ConnectionRejected as exc:
            if exc.status_code in (401, 403):  # retrying would not help
                raise HandshakeRejected(exc.status_code, exc.body or b"") from None
            return 1006, f"refused with HTTP {exc.status_code}"
        except (OSError, trio_websocket.HandshakeError) as exc:
            return 1006, f"cannot connect: {type(exc).__name__}: {exc}"

    def _delay(self, attempt: int) -> float:
        if self._server_delay is not None:
            delay, self._server_delay = self._server_delay, None
            return delay  # the server spread its clients out for us
        return self._random.uniform(0, min(self.max_delay, self.min_delay * 2**attempt))

    async def _serve(
        self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery
    ) -> tuple[int, str]:
        """Read until the connection ends; returns its close code and reason."""
        self._silence = math.inf
        try:
            while True:
                with trio.move_on_after(self._silence) as timer:
                    text = await ws.get_message()
                if timer.cancelled_caught:
                    return 4000, "the server went silent"
                if isinstance(text, bytes):
                    return 1003, "binary frame"
                for line in text.split("\n"):
                    if line:
                        await self._handle(ws, json.loads(line), nursery)
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason is None:
                return 1006, "connection lost"
            return exc.reason.code or 1005, exc.reason.reason or ""
        finally:
            self._ws = None
            self._ready = trio.Event()
            for pending in self._pending.values():
                pending.error = ConnectionLost("the connection ended before the reply")
                pending.done.set()

    async def _handle(
        self, ws: trio_websocket.WebSocketConnection, message: dict[str, Any], nursery: trio.Nursery
    ) -> None:
        kind = message.get("type")
        if kind == "hello":
            self.user = str(message["user"])
            heartbeat = message.get("heartbeat")
            if heartbeat:
                self._silence = (heartbeat["interval_ms"] + heartbeat["timeout_ms"]) / 1000
            self._server_delay = None
            self._attempt = 0
            self.connections += 1
            self.status = "open"
            self._ws = ws
            if self._task_status is not None:  # the first hello: open_client returns
                self._task_status.started()
                self._task_status = None
            await self._emit(Connected(self.user, str(message.get("connection_id", ""))))
            nursery.start_soon(self._rejoin_all, ws)
        elif kind == "ping":
            await self._send(ws, {"type": "pong"})
        elif kind == "reply":
            pending = self._pending.get(message.get("ref"))  # type: ignore[arg-type]
            if pending is None:
                return
            if message.get("status") == "ok":
                pending.data = message.get("data")
                event = pending.on_reply(pending.data) if pending.on_reply else None
                if event is not None:
                    await self._emit(event)
            else:
                error = message.get("error") or {}
                pending.error = RequestFailed(
                    str(error.get("code")), str(error.get("message")), message
                )
            pending.done.set()
        elif kind == "message":
            await self._message(message)
        elif kind == "shutdown":
            self._server_delay = message["reconnect_after_ms"] / 1000
            await self._emit(Shutdown(self._server_delay))
        elif kind == "presence_state":
            self.presence[message["room"]] = dict(message["users"])
            await self._emit(PresenceState(message["room"], message["users"]))
        elif kind == "presence_diff":
            present = self.presence.setdefault(message["room"], {})
            for user in message["leaves"]:
                present.pop(user, None)
            present.update(message["joins"])
            await self._emit(PresenceDiff(message["room"], message["joins"], message["leaves"]))
        elif kind == "error":
            await self._emit(ServerError(str(message.get("code")), str(message.get("message"))))
        else:
            fields = {k: v for k, v in message.items() if k != "type"}
            await self._emit(ServerMessage(str(kind), fields))

    async def _message(self, message: dict[str, Any]) -> None:
        room = message["room"]
        position = self.rooms.get(room)
        if position is None:
            return  # a room we left
        epoch, offset = message["epoch"], message["offset"]
        same_epoch = position.epoch == epoch
        if same_epoch and offset <= position.offset:
            return  # a duplicate (a replay overlapping what we had)
        self.rooms[room] = Position(epoch, offset)
        if not same_epoch or offset > position.offset + 1:
            await self._emit(Reset(room, epoch, offset, "gap" if same_epoch else "epoch"))
        await self._emit(Message(room, epoch, offset, message.get("from"), message.get("data")))

    def _note_join(self, room: str, known: Position | None, data: dict[str, Any]) -> Joined:
        recovered = data.get("recovered")
        continued = known is not None and recovered is True and known.epoch == data["epoch"]
        if not continued:
            # A first join, or the server could not recover: start from the reply.
            # (When it recovers, the replayed messages that follow advance `known`.)
            self.rooms[room] = Position(data["epoch"], data["offset"])
        return Joined(room, data["epoch"], data["offset"], recovered, not continued)

    async def _rejoin_all(self, ws: trio_websocket.WebSocketConnection) -> None:
        # Requests wait for this: a publish right after a reconnect would
        # otherwise race its room's rejoin (and be refused as not_joined).
        async with trio.open_nursery() as nursery:
            for room in list(self.rooms):
                nursery.start_soon(self._rejoin, room, ws)
        if self._ws is ws:
            self._ready.set()

    async def _rejoin(self, room: str, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            await self._join(room, ws)
        except (RequestFailed, ConnectionLost, trio.TooSlowError) as exc:
            code = getattr(exc, "code", "rejoin_failed")
            await self._emit(ServerError(code, f"rejoining {room}: {exc}"))

    async def _connection(self) -> trio_websocket.WebSocketConnection:
        while True:
            if self.status == "closed":
                raise ConnectionLost("the client is closed")
            await self._ready.wait()
            ws = self._ws
            if ws is not None:
                return ws

    async def _send(
        self, ws: trio_websocket.WebSocketConnection, message: Mapping[str, Any]
    ) -> None:
        text = dumps(message)
        async with self._send_lock:
            await ws.send_message(text)

    async def _emit(self, event: Event) -> None:
        if self._keep_events:
            await self._events_in.send(event)


@asynccontextmanager
async def open_client(url: str, **options: Any) -> AsyncIterator[ChatClient]:
    """Connect to a chatcore server; the client stays connected inside the block.

    Returns once the first ``hello`` arrived. On leaving the block the
    connection is closed with 1000 and the client's task ends.

    Args:
        url: The WebSocket URL, with credentials (see :class:`ChatClient`).
        options: :class:`ChatClient` keyword arguments.

    Raises:
        HandshakeRejected: the server refused the handshake with 401 or 403
            (at the first attempt or a later reconnect).
        ConnectFailed: no connection got as far as ``hello``.
    """
    client = ChatClient(url, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        # One error (the client's, or the block's own): raise it as itself,
        # as trio_websocket does, so `except HandshakeRejected` works.
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], trio.Cancelled):
            raise group.exceptions[0] from None
        raise
