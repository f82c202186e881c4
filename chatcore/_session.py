"""Who a connection is, as the hub and its hooks see it: :class:`Session`.

A :class:`Session` is the public face of one connection for hooks and
message handlers. What the hub keeps per connection besides (its rooms, its
rate limits) is a :class:`Member`, owned by the room registry; the session
reads its rooms from it and never changes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._connection import Connection
from ._exceptions import ChatcoreError
from .sansio import CloseOutcome, OutboundMessage
from .sansio._budget import FrameBudget
from .sansio._limits import WindowCounter
from .sansio._protocol import Ref, encode_error, encode_reply, encode_reply_error

if TYPE_CHECKING:
    from ._hub import Hub
    from ._hub_config import HubConfig
    from ._rooms import Room

__all__ = ["ErrorReply", "Identity", "Member", "Session", "answer", "answer_error"]


@attrs.frozen
class Identity:
    """Who a connection belongs to, as decided by the authenticate hook.

    Attributes:
        user: The user id (1-64 of ``[A-Za-z0-9_.-]``); several connections
            (tabs, devices) may share it.
        data: Anything else the application wants to keep (claims, roles).
    """

    user: str
    data: Any = None


class ErrorReply(ChatcoreError):
    """Raise from a hook or message handler to answer the request with an error.

    Whose fault: the client's request (e.g. ``forbidden``). The connection
    stays open. The code should be one of the protocol's error codes
    (``docs/protocol.md``) or an application-defined one.

    Attributes:
        code: The ``error.code`` (e.g. ``"forbidden"``).
        message: Human-readable explanation.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        #: The ``error.code`` of the reply.
        self.code = code
        #: The ``error.message`` of the reply.
        self.message = message


def answer(connection: Connection, ref: Ref | None, data: Any = None) -> int:
    """Queue the ok ``reply`` to request ``ref``; returns its size in bytes.

    Replies are durable: a client too slow to take its replies is a slow consumer.
    """
    reply = encode_reply(ref, data)
    connection.offer(reply)
    return reply.nbytes


def answer_error(connection: Connection, ref: Ref | None, code: str, message: str) -> None:
    """Queue an error: the ``reply`` to ``ref``, or a bare ``error`` without one."""
    if ref is None:
        connection.offer(encode_error(code, message))
    else:
        connection.offer(encode_reply_error(ref, code, message))


class Member:
    """What the hub keeps about one connection besides its session (internal).

    Created by the hub when the connection is served; its ``rooms`` change
    only through the room registry.
    """

    __slots__ = ("bad_frames", "budget", "connection", "rooms", "session")

    def __init__(self, connection: Connection, config: HubConfig, now: float) -> None:
        #: The connection.
        self.connection = connection
        #: Rooms it is a member of (by name); changed by the room registry only.
        self.rooms: dict[str, Room] = {}
        #: What its frames may cost (every frame type; answers by size).
        self.budget = FrameBudget(
            rate=config.publish_rate,
            burst=config.publish_burst,
            abuse_limit=config.rate_limit_abuse,
            abuse_window=config.abuse_window,
            reply_bytes_per_token=config.reply_bytes_per_token,
            now=now,
        )
        #: Bad frames in the bad-frame window.
        self.bad_frames = WindowCounter(config.bad_frame_limit, config.bad_frame_window)
        #: The public face (set by :class:`Session`'s constructor).
        self.session: Session

    def __repr__(self) -> str:
        return f"<Member {self.connection.id} rooms={len(self.rooms)}>"


class Session:
    """One connection as the hub sees it: who it is and which rooms it is in.

    Hooks and message handlers receive it. It is valid while the connection
    is open; after that, sends raise :class:`~chatcore.ConnectionClosed`.
    """

    __slots__ = ("_rooms", "connection", "hub", "identity")

    def __init__(self, hub: Hub, member: Member, identity: Identity) -> None:
        #: The hub this session belongs to.
        self.hub = hub
        #: The underlying connection.
        self.connection = member.connection
        #: Who the client is.
        self.identity = identity
        # The member's own rooms dict, read here, changed by the registry only
        # (no reference back to the member: nothing to collect as a cycle).
        self._rooms = member.rooms
        member.session = self

    @property
    def user(self) -> str:
        """The user id."""
        return self.identity.user

    @property
    def id(self) -> str:
        """The connection id."""
        return self.connection.id

    @property
    def rooms(self) -> frozenset[str]:
        """Names of the rooms this connection is in."""
        return frozenset(self._rooms)

    def __repr__(self) -> str:
        return f"<Session {self.connection.id} user={self.user!r} rooms={len(self._rooms)}>"

    def send_nowait(self, message: Mapping[str, Any] | OutboundMessage) -> None:
        """Queue a message to this connection (see :meth:`Connection.send_nowait`)."""
        self.connection.send_nowait(message)

    async def send(self, message: Mapping[str, Any] | OutboundMessage) -> None:
        """Queue a message, waiting for room (see :meth:`Connection.send`)."""
        await self.connection.send(message)

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None
    ) -> None:
        """Start a task owned by this connection (cancelled when it closes)."""
        self.connection.start_soon(fn, *args, name=name)

    def close_nowait(self, code: int = 1000, reason: str = "") -> CloseOutcome:
        """Ask the connection to close (idempotent; never raises)."""
        return self.connection.close_nowait(code, reason)
