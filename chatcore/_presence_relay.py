"""Presence across nodes: who is in each room, kept current and told to members.

Theory of operation
-------------------

A :class:`PresenceRelay` owns the node's :class:`~chatcore.sansio.PresenceTable`.
Local joins and leaves go into the table and out to the other nodes as
presence events (:data:`~chatcore.sansio.PresenceEvent`, through
:meth:`Backplane.publish_presence <chatcore.Backplane.publish_presence>`);
the other nodes' events come in through the hub's backplane sink. Changes
reach local members as ``presence_diff`` messages, one per user, coalesced
per user (the latest change wins in a full outbox).

Presence events are not stored anywhere: a node that missed some asks for
everything (:class:`~chatcore.sansio.PresenceSync`); each node answers with
its whole state between :class:`~chatcore.sansio.PresenceStateBegin` and
:class:`~chatcore.sansio.PresenceStateEnd`, and what the asker held of it
and was not confirmed leaves after the grace.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from ._backplane import Backplane, BackplaneError
from ._connection import Connection
from ._exceptions import ChatcoreError
from ._rooms import Room, RoomRegistry
from ._session import Member, Session
from .sansio import (
    Delivery,
    PresenceDiff,
    PresenceEvent,
    PresenceJoin,
    PresenceLeave,
    PresenceMeta,
    PresenceStateBegin,
    PresenceStateEnd,
    PresenceSync,
    PresenceTable,
    encode,
)

__all__ = ["PresenceRelay"]

logger = logging.getLogger("chatcore.hub")

# Presence events of local connections waiting to be told to other nodes.
_ANNOUNCEMENTS = 100_000


def _meta_json(meta: PresenceMeta) -> dict[str, Any]:
    """What clients see of a presence meta: the connection id and the app's data."""
    return {**meta.data, "connection_id": meta.connection_id}


class PresenceRelay:
    """The node's presence: local changes out, other nodes' in, diffs to members (internal).

    Args:
        registry: The rooms whose members get the diffs.
        backplane: Where other nodes are told.
        enabled: Presence is on (``HubConfig.presence``); when off, nothing
            is tracked or sent, whatever other nodes do.
        grace: Seconds a user stays present after their last connection left.
        meta: ``(session) -> mapping``: the application's presence meta.
    """

    def __init__(
        self,
        registry: RoomRegistry,
        backplane: Backplane,
        *,
        enabled: bool,
        grace: float,
        meta: Callable[[Session], Mapping[str, Any]] | None,
    ) -> None:
        self.registry = registry
        self.backplane = backplane
        #: Presence is tracked and sent.
        self.enabled = enabled
        #: User-level presence of every room this node hears about.
        self.table = PresenceTable(backplane.node_id, grace)
        self._meta = meta
        # Presence serials, unique per process (a reopened room never reuses one).
        self._serials = itertools.count(1)
        #: Local presence events not yet told to the other nodes (bounded).
        self.announcements: deque[PresenceEvent] = deque(maxlen=_ANNOUNCEMENTS)
        # node -> its (room, connection id) not re-announced yet since its
        # state began: they leave at its state end.
        self._unconfirmed: dict[str, set[tuple[str, str]]] = {}
        self._wakeup = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        state = "ON" if self.enabled else "OFF"
        return f"<PresenceRelay {state} rooms={len(self.table)} queued={len(self.announcements)}>"

    @property
    def node(self) -> str:
        """This node's id."""
        return self.table.node

    @property
    def unconfirmed(self) -> dict[str, frozenset[tuple[str, str]]]:
        """Per node, what it has not re-announced since its state began (a snapshot)."""
        return {node: frozenset(keys) for node, keys in self._unconfirmed.items()}

    def state(self, room: str) -> dict[str, list[dict[str, Any]]]:
        """Who is present in ``room``: user -> their connections' metas (as clients see them)."""
        return {
            user: [_meta_json(meta) for meta in metas]
            for user, metas in self.table.state(room).items()
        }

    def users(self) -> set[str]:
        """Users present in any room on any node."""
        return {user for _, user, _ in self.table.connections()}

    # -- local changes ---------------------------------------------------------------

    def joined(self, member: Member, room: Room, backlog: bool) -> None:
        """Record a join, send the joiner the room's presence, tell the others.

        ``backlog``: the joiner's outbox held something before this join was
        answered, so it may still hold a diff of this room from an earlier
        membership (nothing else can be there).
        """
        if not self.enabled:
            return
        session = member.session
        meta = self._meta(session) if self._meta is not None else None
        now = trio.current_time()
        diff = self.table.join(room.name, session.user, session.id, meta, now)
        # Not keyed: a later snapshot must not take the place of one queued
        # before this connection's leave of the room.
        member.connection.offer(
            encode(
                {"type": "presence_state", "room": room.name, "users": self.state(room.name)},
                delivery=Delivery.EPHEMERAL,
            )
        )
        if backlog:
            # Later diffs must not take the place of one queued before this
            # snapshot: that would put them ahead of it (see emit).
            room.presence_serial = next(self._serials)
        if diff is not None:
            self.emit(diff, exclude=member.connection)
        self._announce(
            PresenceJoin(self.node, room.name, session.user, session.id, now, dict(meta or {}))
        )

    def left(self, member: Member, room: str) -> None:
        """A local connection left ``room`` (the registry's ``on_leave``)."""
        if not self.enabled:
            return
        if self.table.leave(room, member.connection.id, trio.current_time()) is not None:
            self._wakeup.unpark_all()
        self._announce(PresenceLeave(self.node, room, member.connection.id))

    # -- other nodes ------------------------------------------------------------------

    def apply(self, event: PresenceEvent) -> None:
        """Apply another node's presence event (one that does not fit is logged and ignored)."""
        if not self.enabled:
            return
        node = event.node
        try:
            if isinstance(event, PresenceJoin):
                meta = PresenceMeta(event.connection_id, node, event.joined_at, event.data or None)
                diff = self.table.apply_remote_join(event.room, event.user, meta)
                self._unconfirmed.get(node, set()).discard((event.room, event.connection_id))
                if diff is not None:
                    self.emit(diff)
            elif isinstance(event, PresenceLeave):
                deadline = self.table.apply_remote_leave(
                    event.room, node, event.connection_id, trio.current_time()
                )
                if deadline is not None:
                    self._wakeup.unpark_all()
            elif isinstance(event, PresenceSync):
                self._announce_all()
            elif isinstance(event, PresenceStateBegin):
                # The node re-announces all it has, up to its state end. What we
                # hold of it and it does not confirm by then (a leave we
                # missed: the bus is not stored) then leaves, after the grace.
                self._unconfirmed[node] = {
                    (room, meta.connection_id) for room, _, meta in self.table.connections(node)
                }
            else:
                now = trio.current_time()
                for room, connection_id in self._unconfirmed.pop(node, ()):
                    if self.table.apply_remote_leave(room, node, connection_id, now):
                        self._wakeup.unpark_all()
        except (TypeError, ValueError, ChatcoreError) as exc:
            logger.warning("ignoring a presence event from node %s: %r (%s)", node, event, exc)

    def node_down(self, node: str) -> None:
        """Another node is gone: its connections leave (after the grace)."""
        if not self.enabled:
            return
        self._unconfirmed.pop(node, None)
        if node != self.node and self.table.drop_node(node, trio.current_time()):
            self._wakeup.unpark_all()

    def resync(self) -> None:
        """The backplane reconnected: events may have been lost, so re-announce
        this node's presence and ask the others for theirs."""
        if self.enabled:
            self._announce_all()
            self._announce(PresenceSync(self.node))

    def start(self) -> None:
        """Ask the other nodes for their connections (when the hub starts)."""
        if self.enabled:
            self._announce(PresenceSync(self.node))

    # -- out ---------------------------------------------------------------------------

    def emit(self, diff: PresenceDiff, exclude: Connection | None = None) -> None:
        """Tell local members, one ephemeral message per user, coalesced per user.

        The latest change of a user supersedes an earlier one still queued, so
        coalescing under pressure keeps every member's view correct. Never
        across a ``presence_state``: the key changes when one goes to a joiner
        that may still have this room's diffs queued (it left and rejoined while
        behind), so a change cannot take the place of a diff queued before the
        joiner's snapshot, which would put the change ahead of the snapshot.
        """
        room = self.registry.rooms.get(diff.room)
        if room is None or not room.members:
            return
        members: Iterable[Connection] = room.members
        if exclude is not None:
            members = [c for c in room.members if c is not exclude]
        for field, users in (("joins", diff.joins), ("leaves", diff.leaves)):
            for user, metas in users.items():
                change: dict[str, Any] = {"joins": {}, "leaves": {}}
                change[field] = {user: [_meta_json(meta) for meta in metas]}
                message = encode(
                    {"type": "presence_diff", "room": diff.room, **change},
                    delivery=Delivery.EPHEMERAL,
                    key=f"presence:{diff.room}:{room.presence_serial}:{user}",
                )
                self.registry.fan_out(members, message)

    def _announce(self, event: PresenceEvent) -> None:
        self.announcements.append(event)
        self._wakeup.unpark_all()

    def _announce_all(self) -> None:
        # Between a state begin and a state end: all this node has (see apply).
        self._announce(PresenceStateBegin(self.node))
        for room, user, meta in self.table.connections(self.node):
            self._announce(
                PresenceJoin(
                    self.node, room, user, meta.connection_id, meta.joined_at, dict(meta.data)
                )
            )
        self._announce(PresenceStateEnd(self.node))

    async def run(self) -> None:
        """Publish leaves whose grace passed; tell other nodes about local changes."""
        while True:
            while self.announcements:
                event = self.announcements[0]
                try:
                    await self.backplane.publish_presence(event)
                except BackplaneError:
                    await trio.sleep(1.0)  # kept queued; retried when it is back
                    continue
                if self.announcements and self.announcements[0] is event:
                    self.announcements.popleft()
            for diff in self.table.expire(trio.current_time()):
                self.emit(diff)
            deadline = self.table.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._wakeup.park()
