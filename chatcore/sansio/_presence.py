"""Who is in a room: user-level presence with a grace window, across nodes.

Theory of operation
-------------------

A :class:`PresenceTable` answers "who is here?" for every room of one node,
and says when the answer changes, as :class:`PresenceDiff` values for the hub
to fan out (``presence_diff``); :meth:`PresenceTable.state` is the snapshot a
joining client gets first (``presence_state``).

Rule 1: **presence is per user, not per connection.** All connections (tabs,
devices) of one user in a room are one presence entry with one
:class:`PresenceMeta` per connection. A diff names a user in ``joins`` only
when the user appears (or re-appears after their leave was published) and in
``leaves`` only when they are gone. Opening or closing one more tab of a user
who stays present emits nothing: the metas a client holds may lag (a
connection id that has since closed, a new tab not listed), but *who* is
present is always exact. That keeps presence traffic proportional to people
arriving and leaving, not to tabs and reconnects.

Rule 2: **a leave waits out a grace window.** When a user's last connection
leaves a room, the user stays present (with the metas of that connection) for
``grace`` seconds. A reconnect in that window (any connection of the user,
from any node) cancels the leave and produces no diff at all, so a deploy,
a network blip or a page reload does not flap presence. A leave is published
by :meth:`~PresenceTable.expire` once ``now >= deadline``; until it is, the
user can still come back silently, even if the timer runs late. After it was
published, the next join is a join again.

Rule 3: **no clock, no timer.** Every call takes ``now`` (any clock, the same
one throughout); :meth:`~PresenceTable.next_deadline` says when
:meth:`~PresenceTable.expire` should next run. A timer task sleeps until then,
and is woken early when :meth:`~PresenceTable.leave` (or
:meth:`~PresenceTable.apply_remote_leave`, :meth:`~PresenceTable.drop_node`)
returns a deadline while it had none to wait for: with one clock and a fixed
``grace``, a new deadline is never earlier than one already pending.

Rule 4: **memory follows membership.** A room with no user present or in
grace is forgotten; so is a connection with no room and a node with no
connection. Superseded deadlines are skipped lazily and compacted.

Several nodes
-------------

Every node keeps a table of the *whole* cluster: its own connections
(:meth:`~PresenceTable.join` / :meth:`~PresenceTable.leave`) and everybody
else's, replayed from the backplane (:meth:`~PresenceTable.apply_remote_join`
/ :meth:`~PresenceTable.apply_remote_leave`). Local and remote events go
through the same code, so every node derives the same diffs for its own
members. Connections are keyed by ``(node, connection_id)``: ids need only be
unique per node, and a node's own events echoed back by the backplane
(Redis pub/sub delivers to the publisher too) are recognised and ignored.
The backplane must deliver each node's events in the order they were sent.

A node that stops (crash, partition) leaves its connections listed until the
caller decides its lease expired and calls :meth:`~PresenceTable.drop_node`.
Its users then enter the grace window like any other leaver, so they leave
*lease + grace* after the node went silent, unless they reconnected to another
node meanwhile (the usual case: they are then still present and no diff is
emitted at all).

To resynchronise with a node after events may have been lost (a backplane
reconnect), call ``drop_node(node, now)`` and then ``apply_remote_join`` for
each entry of that node's current :meth:`~PresenceTable.connections`: users
still there are silently restored (their leave was in grace), users gone leave
after the grace window, and new users join.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from ._errors import LocalProtocolError

__all__ = ["PresenceDiff", "PresenceMeta", "PresenceTable"]


def _frozen_data(data: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(data or {}))


def _frozen_users(
    users: Mapping[str, Iterable[PresenceMeta]],
) -> Mapping[str, tuple[PresenceMeta, ...]]:
    return MappingProxyType({user: tuple(metas) for user, metas in users.items()})


@attrs.frozen
class PresenceMeta:
    """One connection of a present user, in one room.

    Attributes:
        connection_id: The connection's id (unique within its node).
        node: The id of the node (process) that holds the connection.
        joined_at: When it joined the room, in the clock of the table that
            made it (``now`` of :meth:`PresenceTable.join`; another node's
            clock for remote metas): for ordering, not for display.
        data: The application's meta (e.g. ``{"device": "phone"}``), read-only.
    """

    connection_id: str
    node: str
    joined_at: float
    data: Mapping[str, Any] = attrs.field(default=None, converter=_frozen_data)


@attrs.frozen
class PresenceDiff:
    """A change of who is present in one room (the ``presence_diff`` payload).

    Apply ``leaves`` and ``joins`` to a set of users; a user is never in both.
    Both mappings are read-only.

    Attributes:
        room: The room.
        joins: Users who appeared, with their connections' metas.
        leaves: Users who are gone, with the metas they were last present with.
    """

    room: str
    joins: Mapping[str, tuple[PresenceMeta, ...]] = attrs.field(
        factory=dict, converter=_frozen_users
    )
    leaves: Mapping[str, tuple[PresenceMeta, ...]] = attrs.field(
        factory=dict, converter=_frozen_users
    )


#: A connection's key: ``(node, connection_id)``.
_Key = tuple[str, str]


class _Member:
    """One user's presence in one room."""

    __slots__ = ("deadline", "lingering", "metas", "seq")

    def __init__(self) -> None:
        # Live connections of the user in the room, in join order.
        self.metas: dict[_Key, PresenceMeta] = {}
        # While in grace (no live connection): when the leave is due.
        self.deadline: float | None = None
        # While in grace: the metas shown in state() and in the leave.
        self.lingering: tuple[PresenceMeta, ...] = ()
        # Which deadline heap entry is the live one (the others are stale).
        self.seq = 0


class _Connection:
    """One connection: its user and its metas by room."""

    __slots__ = ("rooms", "user")

    def __init__(self, user: str) -> None:
        self.user = user
        self.rooms: dict[str, PresenceMeta] = {}


class PresenceTable:
    """User-level presence of every room, for one node (no I/O, no clock).

    Args:
        node: This node's id; the ``node`` of every meta made by :meth:`join`.
        grace: Seconds a user stays present after their last connection left
            (0: until the next :meth:`expire`).

    Raises:
        ValueError: if ``node`` is empty or ``grace`` is negative or not finite.
    """

    __slots__ = (
        "_by_node",
        "_connections",
        "_heap",
        "_in_grace",
        "_rooms",
        "_seq",
        "grace",
        "node",
    )

    def __init__(self, node: str, grace: float) -> None:
        if not node:
            raise ValueError("node must be a non-empty id")
        if not (grace >= 0 and math.isfinite(grace)):
            raise ValueError(f"grace must be >= 0 and finite, got {grace!r}")
        #: This node's id.
        self.node = node
        #: The grace window in seconds.
        self.grace = grace
        # room -> user -> presence; a room is here while anybody is present or in grace.
        self._rooms: dict[str, dict[str, _Member]] = {}
        # (node, connection id) -> connection, while it is in at least one room.
        self._connections: dict[_Key, _Connection] = {}
        # node -> its connection ids (an ordered set), for drop_node.
        self._by_node: dict[str, dict[str, None]] = {}
        # Pending leaves (deadline, seq, room, user); an entry is stale unless the
        # member is still in grace with the same seq.
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = 0
        # Members in grace now (for compacting the heap).
        self._in_grace = 0

    def __len__(self) -> int:
        """Rooms with at least one user present (or in grace)."""
        return len(self._rooms)

    def __contains__(self, room: object) -> bool:
        """True if someone is present (or in grace) in ``room``."""
        return room in self._rooms

    def __repr__(self) -> str:
        return (
            f"<PresenceTable node={self.node!r} rooms={len(self._rooms)} "
            f"connections={len(self._connections)} in_grace={self._in_grace}>"
        )

    @property
    def nodes(self) -> frozenset[str]:
        """Nodes with at least one connection in the table (this one included)."""
        return frozenset(self._by_node)

    # -- local connections -----------------------------------------------------------

    def join(
        self,
        room: str,
        user: str,
        connection_id: str,
        data: Mapping[str, Any] | None,
        now: float,
    ) -> PresenceDiff | None:
        """A connection of this node joined ``room`` as ``user``.

        Args:
            data: The application's meta for this connection (e.g. its device).
            now: The time of the join (becomes :attr:`PresenceMeta.joined_at`).

        Returns:
            A diff with ``user`` in ``joins`` if the user was not present (nor
            in grace); ``None`` if presence did not change (another tab, a
            reconnect within grace, or a repeated join, which replaces the
            connection's meta).

        Raises:
            LocalProtocolError: if the connection is already known as another user's.
        """
        return self._join(room, user, PresenceMeta(connection_id, self.node, now, data))

    def leave(self, room: str, connection_id: str, now: float) -> float | None:
        """A connection of this node left ``room`` (or closed).

        Never emits a diff by itself: when it was the user's last connection in
        the room, the user enters the grace window and :meth:`expire` emits the
        leave once it has passed. Unknown connections are ignored, so a cleanup
        path may call this more than once.

        Returns:
            The deadline of the grace window this started, or ``None`` if none
            did (the user has other connections there, or the connection was
            not in the room).
        """
        return self._leave(room, (self.node, connection_id), now)

    # -- other nodes ----------------------------------------------------------------------

    def apply_remote_join(self, room: str, user: str, meta: PresenceMeta) -> PresenceDiff | None:
        """Replay another node's join (its :attr:`PresenceMeta.node` says which).

        Same result as :meth:`join`; an echo of this node's own join is ignored
        (returns ``None``).

        Raises:
            LocalProtocolError: if the connection is already known as another user's.
        """
        if meta.node == self.node:
            return None
        return self._join(room, user, meta)

    def apply_remote_leave(
        self, room: str, node: str, connection_id: str, now: float
    ) -> float | None:
        """Replay another node's leave; same result as :meth:`leave`.

        An echo of this node's own leave is ignored (returns ``None``): only
        this node removes its own connections.
        """
        if node == self.node:
            return None
        return self._leave(room, (node, connection_id), now)

    def drop_node(self, node: str, now: float) -> float | None:
        """Remove every connection of ``node`` (its lease expired: it is gone).

        Each removal is a leave at ``now``: users left without a connection
        enter the grace window (so a crashed node's users leave lease + grace
        after it went silent, unless they reconnected elsewhere).

        Returns:
            The deadline of the grace windows this started, or ``None``.

        Raises:
            LocalProtocolError: if ``node`` is this node (its connections leave
                one by one, through :meth:`leave`).
        """
        if node == self.node:
            raise LocalProtocolError("a node cannot drop itself; its connections leave")
        started: float | None = None
        for connection_id in list(self._by_node.get(node, ())):
            key = (node, connection_id)
            for room in list(self._connections[key].rooms):
                deadline = self._leave(room, key, now)
                if deadline is not None:
                    started = deadline
        return started

    def connections(self, node: str | None = None) -> list[tuple[str, str, PresenceMeta]]:
        """Every ``(room, user, meta)`` held, or only ``node``'s.

        ``connections(table.node)`` is what this node sends another one that
        resynchronises (see the module docstring).
        """
        if node is None:
            keys: Iterable[_Key] = self._connections
        else:
            keys = [(node, cid) for cid in self._by_node.get(node, ())]
        out: list[tuple[str, str, PresenceMeta]] = []
        for key in keys:
            conn = self._connections[key]
            out.extend((room, conn.user, meta) for room, meta in conn.rooms.items())
        return out

    # -- the grace window ------------------------------------------------------------------

    def expire(self, now: float) -> list[PresenceDiff]:
        """Publish the leaves whose grace window has passed (``deadline <= now``).

        Returns:
            At most one diff per room (users in ``leaves`` only), rooms in the
            order their first leave fell due. Rooms left empty are forgotten.
        """
        heap = self._heap
        due: dict[str, dict[str, tuple[PresenceMeta, ...]]] = {}
        while heap and heap[0][0] <= now:
            _, seq, room, user = heapq.heappop(heap)
            member = self._pending(seq, room, user)
            if member is None:
                continue
            members = self._rooms[room]
            del members[user]
            if not members:
                del self._rooms[room]
            self._in_grace -= 1
            due.setdefault(room, {})[user] = member.lingering
        return [PresenceDiff(room, leaves=leaves) for room, leaves in due.items()]

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to publish next; ``None``: nothing pending."""
        heap = self._heap
        while heap and self._pending(heap[0][1], heap[0][2], heap[0][3]) is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # -- reading -----------------------------------------------------------------------------

    def state(self, room: str) -> dict[str, tuple[PresenceMeta, ...]]:
        """Who is present in ``room`` now: user -> metas (the ``presence_state``).

        Users in grace are present, with the metas of their last connection.
        A fresh dict; empty for an unknown room.
        """
        members = self._rooms.get(room)
        if members is None:
            return {}
        return {
            user: tuple(member.metas.values()) if member.metas else member.lingering
            for user, member in members.items()
        }

    # -- internals -----------------------------------------------------------------------------

    def _join(self, room: str, user: str, meta: PresenceMeta) -> PresenceDiff | None:
        key = (meta.node, meta.connection_id)
        conn = self._connections.get(key)
        if conn is None:
            conn = self._connections[key] = _Connection(user)
            self._by_node.setdefault(meta.node, {})[meta.connection_id] = None
        elif conn.user != user:
            raise LocalProtocolError(
                f"connection {meta.connection_id} of node {meta.node!r} belongs to "
                f"user {conn.user!r}, not {user!r}"
            )
        conn.rooms[room] = meta
        members = self._rooms.setdefault(room, {})
        member = members.get(user)
        if member is None:
            member = members[user] = _Member()
            member.metas[key] = meta
            return PresenceDiff(room, joins={user: (meta,)})
        member.metas[key] = meta
        if member.deadline is not None:
            # Back within grace: the pending leave was never published, so
            # nobody saw the user go; its heap entry goes stale.
            member.deadline = None
            member.lingering = ()
            self._in_grace -= 1
        return None

    def _leave(self, room: str, key: _Key, now: float) -> float | None:
        conn = self._connections.get(key)
        if conn is None:
            return None
        meta = conn.rooms.pop(room, None)
        if meta is None:
            return None
        if not conn.rooms:
            del self._connections[key]
            node, connection_id = key
            ids = self._by_node[node]
            del ids[connection_id]
            if not ids:
                del self._by_node[node]
        member = self._rooms[room][conn.user]
        del member.metas[key]
        if member.metas:
            return None
        deadline = now + self.grace
        self._seq += 1
        member.deadline = deadline
        member.lingering = (meta,)
        member.seq = self._seq
        self._in_grace += 1
        heapq.heappush(self._heap, (deadline, self._seq, room, conn.user))
        if len(self._heap) > 2 * self._in_grace + 64:
            # Reconnects within grace leave stale entries behind; keep them bounded.
            self._heap = [e for e in self._heap if self._pending(e[1], e[2], e[3]) is not None]
            heapq.heapify(self._heap)
        return deadline

    def _pending(self, seq: int, room: str, user: str) -> _Member | None:
        """The member a heap entry stands for, if that entry is still its live one."""
        members = self._rooms.get(room)
        member = members.get(user) if members is not None else None
        if member is None or member.deadline is None or member.seq != seq:
            return None
        return member
