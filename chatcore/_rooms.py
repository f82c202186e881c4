"""The room registry: who is connected, who is in which room, and ordered delivery.

Theory of operation
-------------------

:class:`RoomRegistry` keeps three indexes: members (one per connection) by
connection id, members by user (one user, many tabs and devices), and rooms
(a user is "in" a room while any of their connections is). A connection's
own ``handle`` task adds it and its ``finally`` removes it, so a connection
cannot leak from the registry however it ends.

Fan-out never waits on a client: a room message is encoded once and the
same :class:`~chatcore.sansio.OutboundMessage` is offered to every member's
outbox without blocking (:meth:`RoomRegistry.fan_out`); a full outbox
applies the message's delivery class. There is no task per delivery.

Room messages arrive from the backplane in any order, possibly twice. Each
room's :class:`~chatcore.sansio.RoomSequencer` decides what is delivered;
a gap is filled by :meth:`RoomRegistry.run_repairs` from the room's history,
and a lost order (a new epoch) closes the members with 4001 so they recover.
A publisher's ``reply`` is matched by nonce and queued right before its own
message, whichever of the two this node learns first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import attrs
import trio

from ._backplane import Backplane, BackplaneError
from ._connection import Connection
from ._session import Member, Session
from .sansio import (
    Emit,
    EpochChanged,
    Held,
    OutboundMessage,
    Position,
    PushResult,
    RoomBroadcast,
    RoomSequencer,
    Sequenced,
    SequencerStep,
    Stale,
    UserDisconnect,
    UserMessage,
)
from .sansio._protocol import Ref, encode_reply

__all__ = ["Room", "RoomRegistry", "RoomStatistics"]

logger = logging.getLogger("chatcore.hub")


@attrs.frozen
class RoomStatistics:
    """A snapshot of one room.

    Attributes:
        name: The room name.
        members: Connections in the room.
        users: Distinct users in the room.
        offset: The last assigned offset (0 when nothing was published).
        epoch: The room's epoch (changes when its history was lost).
    """

    name: str
    members: int
    users: int
    offset: int
    epoch: str


class Room:
    """A room as this process sees it: its local members and its position.

    Created by the hub when a local connection joins and dropped when the last
    one leaves; the room's order itself lives in the backplane. Not created by
    users.
    """

    __slots__ = ("joining", "members", "name", "presence_serial", "sequencer")

    def __init__(self, name: str) -> None:
        #: The room's name.
        self.name = name
        #: Member connections, in join order.
        self.members: dict[Connection, Session] = {}
        #: The room's order as delivered here.
        self.sequencer = RoomSequencer()
        #: Joins in progress (they keep the room open while they await).
        self.joining = 0
        #: Part of the coalescing key of this room's presence diffs (see
        #: :class:`~chatcore._presence_relay.PresenceRelay`).
        self.presence_serial = 0

    @property
    def epoch(self) -> str:
        """The epoch of the room's order ("" until the position is known)."""
        return self.sequencer.epoch

    @property
    def offset(self) -> int:
        """The last offset delivered to this process's members."""
        return self.sequencer.offset

    @property
    def ready(self) -> bool:
        """True once the room's position is known here."""
        return self.sequencer.ready

    def __repr__(self) -> str:
        return f"<Room {self.name!r} members={len(self.members)} offset={self.offset}>"

    def statistics(self) -> RoomStatistics:
        """A snapshot of this room."""
        return RoomStatistics(
            name=self.name,
            members=len(self.members),
            users=len({s.user for s in self.members.values()}),
            offset=self.offset,
            epoch=self.epoch,
        )


class RoomRegistry:
    """Members, users and rooms of one hub, and ordered delivery to them (internal).

    Args:
        backplane: Where positions and history come from.
    """

    def __init__(self, backplane: Backplane) -> None:
        self.backplane = backplane
        #: Members by connection id (registered by their own handle task).
        self.members: dict[str, Member] = {}
        #: user -> that user's members (every tab and device).
        self.users: dict[str, dict[Member, None]] = {}
        #: Rooms with local members (or joins in progress).
        self.rooms: dict[str, Room] = {}
        #: Called as ``on_leave(member, room)`` after a member left a room.
        self.on_leave: Callable[[Member, str], None] | None = None
        # Local publishes waiting for their message: nonce -> (publisher, ref).
        self._awaiting: dict[str, tuple[Connection, Ref | None]] = {}
        # Rooms with a gap in delivery (or a reset epoch) to repair.
        self._repairs: set[str] = set()
        self._repair_wakeup = trio.lowlevel.ParkingLot()
        #: Counters (see :class:`~chatcore.HubStatistics`).
        self.delivered = 0
        self.dropped = 0
        self.coalesced = 0

    def __repr__(self) -> str:
        return (
            f"<RoomRegistry members={len(self.members)} users={len(self.users)} "
            f"rooms={len(self.rooms)} repairs={len(self._repairs)}>"
        )

    @property
    def awaiting(self) -> int:
        """Local publishes whose message has not been delivered here yet."""
        return len(self._awaiting)

    @property
    def repairs_pending(self) -> frozenset[str]:
        """Rooms waiting for a repair."""
        return frozenset(self._repairs)

    # -- members and rooms -----------------------------------------------------------

    def register(self, member: Member) -> None:
        """Add a connection (by its own handle task)."""
        self.members[member.connection.id] = member
        self.users.setdefault(member.session.user, {})[member] = None

    def unregister(self, member: Member) -> None:
        """Remove a connection and its memberships (in its handle task's ``finally``)."""
        for name in list(member.rooms):
            self.remove_member(member, name)
        self.members.pop(member.connection.id, None)
        user = member.session.user
        members = self.users.get(user)
        if members is not None:
            members.pop(member, None)
            if not members:
                del self.users[user]

    def open_room(self, name: str) -> Room:
        """The room called ``name``, opened (and watched) if needed."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
            self.backplane.watch(name)
        return room

    def close_room_if_unused(self, room: Room) -> None:
        """Forget ``room`` if it has no members and no join in progress."""
        if not room.members and not room.joining and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            self.backplane.unwatch(room.name)

    def active_rooms(self) -> list[Room]:
        """Rooms with at least one member."""
        return [room for room in self.rooms.values() if room.members]

    async def ready(self, room: Room) -> None:
        """Learn the room's position (once per room opened here).

        Raises:
            BackplaneError: the position could not be read.
        """
        while not room.ready:
            position = await self.backplane.position(room.name)
            if not room.ready:
                for step in room.sequencer.start(position):
                    self._apply(room, step, None)

    def add_member(self, member: Member, room: Room) -> None:
        """Make ``member`` a member of ``room`` (synchronously: nothing falls in between)."""
        room.members[member.connection] = member.session
        member.rooms[room.name] = room

    def remove_member(self, member: Member, name: str) -> None:
        """Remove ``member`` from room ``name`` (it must be a member)."""
        room = member.rooms.pop(name)
        del room.members[member.connection]
        self.close_room_if_unused(room)
        if self.on_leave is not None:
            self.on_leave(member, name)

    # -- fan-out ---------------------------------------------------------------------

    def fan_out(self, connections: Iterable[Connection], message: OutboundMessage) -> int:
        """Offer one encoded message to many connections; never blocks.

        Returns:
            How many queued it (coalesced included).
        """
        queued = 0
        for connection in connections:
            result = connection.offer(message)
            if result is PushResult.QUEUED:
                queued += 1
            elif result is PushResult.COALESCED:
                self.coalesced += 1
                queued += 1
            elif result is PushResult.DROPPED:
                self.dropped += 1
        self.delivered += queued
        return queued

    def broadcast_here(self, event: RoomBroadcast) -> None:
        """Offer a message outside the room's order to the room's members here."""
        room = self.rooms.get(event.room)
        if room is None:
            return
        members: Iterable[Connection] = room.members
        if event.exclude is not None:
            members = [c for c in room.members if c.id != event.exclude]
        self.fan_out(members, event.message)

    def deliver_to_user(self, event: UserMessage) -> None:
        """Offer a message to every local connection of the user."""
        members = self.users.get(event.user)
        if members:
            self.fan_out([m.connection for m in members], event.message)

    def disconnect_user_here(self, event: UserDisconnect) -> None:
        """Close every local connection of the user."""
        for member in list(self.users.get(event.user, ())):
            member.connection.close_nowait(event.code, event.reason)

    # -- ordered delivery ----------------------------------------------------------------

    def expect_publish(self, nonce: str, publisher: Connection, ref: Ref | None) -> None:
        """A local publish is under way: answer it right before its message."""
        self._awaiting[nonce] = (publisher, ref)

    def publish_done(self, nonce: str) -> bool:
        """The publish returned; True if its message was not delivered here yet."""
        return self._awaiting.pop(nonce, None) is not None

    def deliver(self, item: Sequenced) -> None:
        """A room message from the backplane, in any order, possibly again."""
        room = self.rooms.get(item.room)
        if room is None:
            self._answer_publisher(item)
            return
        self._apply(room, room.sequencer.receive(item), item)

    def _apply(self, room: Room, step: SequencerStep, item: Sequenced | None) -> None:
        if type(step) is Emit:
            for emitted in step.items:
                if emitted.nonce is not None:
                    self._answer_publisher(emitted)
                self.fan_out(room.members, emitted.message)
        elif type(step) is Held:
            if step.gap:
                self.schedule_repair(room.name)
        elif type(step) is Stale:
            self._answer_publisher(step.item)
        else:
            assert isinstance(step, EpochChanged)
            # The room's order was lost and began anew: members here cannot be
            # brought up to date message by message; they must recover.
            if item is not None:
                self._answer_publisher(item)
            self._lost_order(room)

    def _answer_publisher(self, item: Sequenced) -> None:
        if item.nonce is not None:
            waiting = self._awaiting.pop(item.nonce, None)
            if waiting is not None:
                publisher, ref = waiting
                reply = encode_reply(ref, {"offset": item.offset})
                if item.message.published:
                    # Sampled: the reply goes out just before the message, in the
                    # same frame, so it carries the stamp that frame is measured by.
                    reply = attrs.evolve(reply, published=item.message.published)
                publisher.offer(reply)

    def schedule_repair(self, name: str) -> None:
        """Ask :meth:`run_repairs` to bring room ``name`` up to date (if it is open here)."""
        if name in self.rooms:
            self._repairs.add(name)
            self._repair_wakeup.unpark_all()

    async def run_repairs(self) -> None:
        """Fill delivery gaps from the backplane's history, until cancelled."""
        while True:
            while not self._repairs:
                await self._repair_wakeup.park()
            name = self._repairs.pop()
            room = self.rooms.get(name)
            if room is None or not room.ready:
                continue
            try:
                await self._repair(room)
            except BackplaneError:
                logger.warning("room %s: cannot fill a gap yet (backplane unavailable)", name)
                self._repairs.add(name)
                await trio.sleep(1.0)

    async def _repair(self, room: Room) -> None:
        position = await self.backplane.position(room.name)
        if position.epoch != room.epoch:
            room.sequencer.reset(position)
            self._lost_order(room)
            return
        if not room.sequencer.needs_repair(position):
            return
        items = await self.backplane.replay(room.name, room.epoch, room.offset, position.offset)
        if items is None:
            room.sequencer.reset(position)
            self._lost_order(room)
            return
        for item in items:
            self.deliver(item)

    def _lost_order(self, room: Room) -> None:
        """Members missed messages that can no longer be replayed: they must recover."""
        logger.warning("room %s: messages lost to members here; closing them with 4001", room.name)
        for connection in list(room.members):
            connection.close_nowait(4001, "missed messages; rejoin with since")

    def position_of(self, room: Room) -> Position:
        """Where ``room`` stands here."""
        return room.sequencer.position
