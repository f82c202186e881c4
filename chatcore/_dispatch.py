"""Protocol dispatch: what the hub does with each client message.

One :class:`Dispatcher` serves every connection of a hub; its
:meth:`~Dispatcher.dispatch` runs in the connection's own ``handle`` task,
so one connection's messages are handled in order.

* ``publish``: a token from the connection's bucket, membership, the
  application's ``on_publish`` hook, then :meth:`Backplane.publish
  <chatcore.Backplane.publish>`. The reply (``{"offset": n}``) is queued by
  the room registry right before the message itself when this node delivers
  it first, else here when the publish returns.
* ``join`` (with ``since``: recovery): authorisation, the room's position,
  the replay from history, then, with no ``await`` in between, membership,
  the answer and the replay: no live message can fall between the replayed
  ones and the next live one.
* ``leave``, ``ping``, ``pong``; bad frames (counted: too many close with 1008);
  application-defined types (``Hub.on``).

Every frame but a bad one is paid for first from the connection's frame
budget (``chatcore.sansio._budget.FrameBudget``: its type's cost), and what
the server answers a join or an application request (its reply, a replayed
backlog) is charged by size after.
A refused frame is answered ``rate_limited`` and does nothing else; too many
refusals close the connection with 1008.

A join that would open a room no one here is in is a *new room*: it is
refused (``at_capacity``) while the process holds ``HubConfig.max_rooms``
rooms, and (``too_many_new_rooms``) past the user's new-room rate.
"""

from __future__ import annotations

import contextvars
import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import trio

from . import _observe
from ._backplane import Backplane, BackplaneError, Position, published_at
from ._connection import Connection
from ._presence_relay import PresenceRelay
from ._rooms import Room, RoomRegistry
from ._session import ErrorReply, Member, Session, answer, answer_error
from .sansio import CloseCause, Sequenced
from .sansio._budget import Spend
from .sansio._limits import WindowCounter
from .sansio._protocol import (
    AppMessage,
    BadFrame,
    ErrorCode,
    Join,
    Leave,
    Ping,
    Pong,
    Publish,
    Ref,
    Since,
    parse_client_message,
)

__all__ = ["SENDER", "Dispatcher", "MessageHandler", "outbox_busy", "sequence"]

#: The member whose message handler (or a task it started) is running: what
#: the handler makes the server do on its behalf is charged to it.
SENDER: contextvars.ContextVar[Member | None] = contextvars.ContextVar(
    "chatcore_sender", default=None
)

#: ``handler(session, message) -> reply data``; raise :class:`ErrorReply` to refuse.
MessageHandler: TypeAlias = Callable[[Session, AppMessage], Awaitable[Any]]


def sequence(
    backplane: Backplane, room: str, sender: str | None, data: Any, nonce: str | None, stamp: float
) -> Awaitable[Position]:
    """:meth:`Backplane.publish`, with the delivery-lag ``stamp`` when it is not 0.

    ``stamp``: what :func:`chatcore._observe.publish_stamp` gave where the hub
    accepted the message; it reaches the backplane as
    :data:`chatcore._backplane.published_at` (the backplane contract stays as
    it is, and a backplane that ignores it is simply not measured).

    Returns:
        What to await: the backplane's own coroutine when ``stamp`` is 0 (no
        extra frame for the publishes that are not sampled).
    """
    if not stamp:
        return backplane.publish(room, sender, data, nonce)
    return _publish_stamped(backplane, room, sender, data, nonce, stamp)


async def _publish_stamped(
    backplane: Backplane, room: str, sender: str | None, data: Any, nonce: str | None, stamp: float
) -> Position:
    token = published_at.set(stamp)
    try:
        return await backplane.publish(room, sender, data, nonce)
    finally:
        published_at.reset(token)


def outbox_busy(connection: Connection) -> bool:
    """True if anything is queued in the connection's outbox."""
    return connection.outbox_room()[1] < connection.config.outbox_max_messages


class Dispatcher:
    """Handles the protocol's client messages for one hub (internal).

    Args:
        registry: The hub's rooms and members.
        presence: The hub's presence relay.
        backplane: The hub's backplane.
        max_rooms: Rooms one connection may be in.
        authorize_join: The application's join hook.
        on_publish: The application's publish hook.
        costs: Tokens each built-in frame type costs.
        max_rooms_here: Rooms with members in this process (``None``: no limit).
        new_rooms_per_user: Rooms a user may open per ``new_room_window``
            (``None``: no limit).
        new_room_window: Seconds of the new-room window.
    """

    def __init__(
        self,
        registry: RoomRegistry,
        presence: PresenceRelay,
        backplane: Backplane,
        *,
        max_rooms: int,
        authorize_join: Callable[[Session, str], Awaitable[bool]] | None,
        on_publish: Callable[[Session, str, Any], Awaitable[Any]] | None,
        costs: Mapping[str, float],
        max_rooms_here: int | None = None,
        new_rooms_per_user: int | None = None,
        new_room_window: float = 60.0,
    ) -> None:
        self.registry = registry
        self.presence = presence
        self.backplane = backplane
        self.max_rooms = max_rooms
        self.max_rooms_here = max_rooms_here
        self.new_rooms_per_user = new_rooms_per_user
        self.new_room_window = new_room_window
        #: App-defined message types -> handlers.
        self.handlers: dict[str, MessageHandler] = {}
        #: App-defined message types -> their cost in tokens (default 1).
        self.handler_costs: dict[str, float] = {}
        #: Room messages given an offset through this hub.
        self.published = 0
        #: Frames refused for an empty budget.
        self.rate_limited = 0
        #: Joins refused by the room cap or the new-room rate.
        self.refused_rooms = 0
        self._costs = costs
        # user -> rooms they opened recently, least recently active first;
        # pruned once a user's window is empty (bounded by recent openers).
        self._openers: OrderedDict[str, WindowCounter] = OrderedDict()
        self._authorize_join = authorize_join
        self._on_publish = on_publish
        self._nonces = itertools.count(1)

    def __repr__(self) -> str:
        return f"<Dispatcher handlers={len(self.handlers)} published={self.published}>"

    async def dispatch(self, member: Member, text: str) -> None:
        """Handle one client message (a text frame)."""
        message = parse_client_message(text)
        costs = self._costs
        if isinstance(message, Publish):
            if self._pay(member, costs["publish"], message.ref, "publishing too fast"):
                await self._publish(member, message)
        elif isinstance(message, Pong):
            # Liveness was already noted by the connection's reader; a flood of
            # pongs is still paid for (refusals are counted, not answered).
            self._pay(member, costs["pong"], None, None)
        elif isinstance(message, Join):
            if self._pay(member, costs["join"], message.ref, "joining too fast"):
                await self._join(member, message)
        elif isinstance(message, Leave):
            if self._pay(member, costs["leave"], message.ref, "leaving too fast"):
                if message.room in member.rooms:
                    self.registry.remove_member(member, message.room)
                answer(member.connection, message.ref, {"room": message.room})
        elif isinstance(message, Ping):
            if self._pay(member, costs["ping"], message.ref, "pinging too fast"):
                answer(member.connection, message.ref)
        elif isinstance(message, BadFrame):
            self._bad_frame(member, message.code, message.message, message.ref)
        else:
            await self._app_message(member, message)

    def _pay(self, member: Member, cost: float, ref: Ref | None, refusal: str | None) -> bool:
        """Take ``cost`` from the member's budget; False: refused (answered or closed)."""
        verdict = member.budget.spend(cost, trio.current_time())
        if verdict is Spend.OK:
            return True
        self.rate_limited += 1
        if verdict is Spend.ABUSE:
            member.connection.close_nowait(
                1008, "sustained rate-limit abuse", cause=CloseCause.PROTOCOL
            )
        elif refusal is not None:
            answer_error(member.connection, ref, ErrorCode.RATE_LIMITED, refusal)
        return False

    @staticmethod
    def _charge(member: Member, nbytes: int) -> None:
        """Charge what was answered to the asker, by size."""
        member.budget.charge_bytes(nbytes, trio.current_time())

    def _room_refusal(self, member: Member, name: str) -> tuple[str, str] | None:
        """Why ``member`` may not open room ``name`` now, or ``None`` (then it is counted)."""
        if name in self.registry.rooms:
            return None  # not a new room here
        if self.max_rooms_here is not None and len(self.registry.rooms) >= self.max_rooms_here:
            return ErrorCode.AT_CAPACITY, "this server holds as many rooms as it may"
        limit = self.new_rooms_per_user
        if limit is None:
            return None
        now = trio.current_time()
        openers = self._openers
        # Forget users whose window is empty (oldest activity first).
        while openers:
            oldest = next(iter(openers.values()))
            if oldest.count(now):
                break
            openers.popitem(last=False)
        user = member.session.user
        counter = openers.get(user)
        if counter is None:
            counter = openers[user] = WindowCounter(limit, self.new_room_window)
        openers.move_to_end(user)
        if counter.count(now) >= limit:
            return ErrorCode.TOO_MANY_NEW_ROOMS, "opening new rooms too fast"
        counter.hit(now)
        return None

    def _bad_frame(self, member: Member, code: str, text: str, ref: Ref | None) -> None:
        if member.bad_frames.hit(trio.current_time()):
            member.connection.close_nowait(1008, "too many bad frames", cause=CloseCause.PROTOCOL)
            return
        answer_error(member.connection, ref, code, text)

    async def _join(self, member: Member, message: Join) -> None:
        name = message.room
        connection = member.connection
        began = _observe.publish_began()  # None unless tracing observes joins
        if name in member.rooms:
            self._answer_member(member, message)
            return
        if len(member.rooms) >= self.max_rooms:
            answer_error(connection, message.ref, ErrorCode.TOO_MANY_ROOMS, "too many rooms")
            return
        refusal = self._room_refusal(member, name)
        if refusal is not None:
            self.refused_rooms += 1
            answer_error(connection, message.ref, *refusal)
            return
        if self._authorize_join is not None:
            try:
                allowed = await self._authorize_join(member.session, name)
            except ErrorReply as exc:  # a hook may refuse with its own code
                answer_error(connection, message.ref, exc.code, exc.message)
                return
            if not allowed:
                answer_error(
                    connection, message.ref, ErrorCode.FORBIDDEN, "not allowed to join this room"
                )
                return
        room = self.registry.open_room(name)
        room.joining += 1
        try:
            await self.registry.ready(room)
            replay, recovered = await self._recover(member, room, message.since)
        except BackplaneError as exc:
            answer_error(
                connection, message.ref, ErrorCode.UNAVAILABLE, str(exc) or "try again later"
            )
            return
        else:
            if name in member.rooms:
                # A server-side join made it a member meanwhile: it already gets
                # the room live, so replaying would repeat messages.
                self._answer_member(member, message)
                return
            # From here on, synchronously: become a member, answer, replay. No live
            # message can fall between the replayed ones and the next live one.
            # A member before the join is released: the room never closes (and
            # is never unwatched) in between.
            self.registry.add_member(member, room)
        finally:
            room.joining -= 1
            self.registry.close_room_if_unused(room)
        backlog = outbox_busy(connection)  # before the reply is queued
        data: dict[str, Any] = {"room": name, "epoch": room.epoch, "offset": room.offset}
        if recovered is not None:
            data["recovered"] = recovered
        nbytes = answer(connection, message.ref, data)
        for item in replay:
            connection.offer(item.message)
            nbytes += item.message.nbytes
        self._charge(member, nbytes)
        self.presence.joined(member, room, backlog)
        if began is not None:
            _observe.join_done(began, connection, name, recovered, len(replay))

    async def join_from_server(self, member: Member, name: str) -> bool:
        """Make ``member`` a member of room ``name`` (``Hub.join``); False if it closed meanwhile.

        Raises:
            BackplaneError: the room's position could not be read.
        """
        if name in member.rooms:
            await trio.lowlevel.checkpoint()
            return True
        registry = self.registry
        room = registry.open_room(name)
        room.joining += 1
        try:
            await registry.ready(room)
            if registry.members.get(member.connection.id) is not member:
                return False
            # A member before the join is released: the room stays open.
            registry.add_member(member, room)
        finally:
            room.joining -= 1
            registry.close_room_if_unused(room)
        self.presence.joined(member, room, outbox_busy(member.connection))
        return True

    def _answer_member(self, member: Member, message: Join) -> None:
        """Answer a join of a room the connection is already in (nothing to replay)."""
        room = member.rooms[message.room]
        data: dict[str, Any] = {"room": room.name, "epoch": room.epoch, "offset": room.offset}
        if message.since is not None:
            data["recovered"] = (
                message.since.epoch == room.epoch and message.since.offset == room.offset
            )
        answer(member.connection, message.ref, data)

    async def _recover(
        self, member: Member, room: Room, since: Since | None
    ) -> tuple[list[Sequenced], bool | None]:
        """Everything after ``since`` up to the room's position here, or nothing."""
        if since is None:
            return [], None
        replay: list[Sequenced] = []
        after = since.offset
        while True:
            if since.epoch != room.epoch or after > room.offset:
                return [], False
            upto = room.offset
            if after == upto:
                break
            items = await self.backplane.replay(room.name, room.epoch, after, upto)
            if items is None or since.epoch != room.epoch:
                return [], False
            replay.extend(items)
            after = upto
        nbytes = sum(item.message.nbytes for item in replay)
        free_bytes, free_messages = member.connection.outbox_room()
        if nbytes + 256 > free_bytes or len(replay) + 1 > free_messages:
            return [], False  # would overflow: never partial
        return replay, True

    async def _publish(self, member: Member, message: Publish) -> None:
        # Paid for already, joined or not: a client cannot flood with publishes
        # to rooms it is not in.
        connection = member.connection
        began = _observe.publish_began()  # None unless metrics/tracing observe publishes
        room = member.rooms.get(message.room)
        if room is None:
            answer_error(
                connection, message.ref, ErrorCode.NOT_JOINED, "join the room before publishing"
            )
            return
        # Before the application's hook: its time is part of the delivery lag.
        stamp = _observe.publish_stamp()  # 0.0 unless this publish's lag is sampled
        data = message.data
        if self._on_publish is not None:
            try:
                data = await self._on_publish(member.session, message.room, data)
            except ErrorReply as exc:
                answer_error(connection, message.ref, exc.code, exc.message)
                return
            if member.rooms.get(message.room) is not room:  # left while the hook ran
                answer_error(connection, message.ref, ErrorCode.NOT_JOINED, "left the room")
                return
        nonce = f"{self.backplane.node_id}:{next(self._nonces)}"
        self.registry.expect_publish(nonce, connection, message.ref)
        try:
            position = await sequence(
                self.backplane, room.name, member.session.user, data, nonce, stamp
            )
        except BackplaneError as exc:
            answer_error(
                connection, message.ref, ErrorCode.UNAVAILABLE, str(exc) or "try again later"
            )
            if began is not None:
                _observe.publish_acked(began, connection, room.name, False)
            return
        finally:
            waiting = self.registry.publish_done(nonce)
        self.published += 1
        if began is not None:
            _observe.publish_acked(began, connection, room.name, True)
        if waiting:
            # Sequenced, but not delivered here yet (a gap is being filled): the
            # publisher learns its offset now; the message follows.
            answer(connection, message.ref, {"offset": position.offset})

    async def _app_message(self, member: Member, message: AppMessage) -> None:
        handler = self.handlers.get(message.type)
        connection = member.connection
        if handler is None:
            self._bad_frame(
                member,
                ErrorCode.UNKNOWN_TYPE,
                f"unknown message type {message.type!r}",
                message.ref,
            )
            return
        if not self._pay(
            member, self.handler_costs.get(message.type, 1.0), message.ref, "sending too fast"
        ):
            return
        sender = SENDER.set(member)
        try:
            result = await handler(member.session, message)
        except ErrorReply as exc:
            answer_error(connection, message.ref, exc.code, exc.message)
            return
        except Exception:
            # A handler bug: the connection closes with 1011 (the actor's
            # firewall logs it). The request still gets its answer, queued
            # before the close frame; no detail leaks to the client.
            if message.ref is not None:
                answer_error(connection, message.ref, ErrorCode.INTERNAL, "internal error")
            raise
        finally:
            SENDER.reset(sender)
        if message.ref is not None:
            self._charge(member, answer(connection, message.ref, result))
