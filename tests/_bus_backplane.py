"""A third backplane, written with public names only: hubs in one process on a shared bus.

:class:`MemoryBus` is the deployment's shared services, reduced to memory:
one order and history per room (:class:`chatcore.sansio.History`), and a bus
between nodes. :class:`BusBackplane` is one node's view of it. Room messages
reach every live node that watches the room; node events travel through
their byte format (:func:`chatcore.sansio.encode_node_event`), as they would
on a real wire. A node can crash (it hears nothing and nobody hears it) and
its lease can run out (the others get :class:`chatcore.NodeDown`).

It passes :func:`chatcore.testing.check_backplane` (tests/test_backplane_conformance.py),
and the presence tests run several hubs on it.
"""

from __future__ import annotations

import secrets
from typing import Any

import trio

from chatcore import (
    Backplane,
    BackplaneEvent,
    BackplaneSink,
    HistoryConfig,
    NodeDown,
    Position,
    Sequenced,
)
from chatcore.sansio import (
    History,
    NodeEvent,
    OutboundMessage,
    PresenceEvent,
    RoomBroadcast,
    UserDisconnect,
    UserMessage,
    decode_node_event,
    encode_message,
    encode_node_event,
)


class _Room:
    def __init__(self, history: HistoryConfig) -> None:
        self.epoch = secrets.token_hex(4)
        self.history = History(history.max_messages, history.max_age, history.max_bytes)


class MemoryBus:
    """The shared services of several :class:`BusBackplane` nodes in one process.

    Args:
        history: How much of each room's order is kept.
    """

    def __init__(self, history: HistoryConfig | None = None) -> None:
        self.history = history or HistoryConfig()
        self.rooms: dict[str, _Room] = {}
        self.nodes: list[BusBackplane] = []

    def node(self, node_id: str | None = None) -> BusBackplane:
        """A new node on this bus."""
        node = BusBackplane(self, node_id or "bus-" + secrets.token_hex(4))
        self.nodes.append(node)
        return node

    def live(self) -> list[BusBackplane]:
        return [node for node in self.nodes if node.alive]

    def room(self, name: str) -> _Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = _Room(self.history)
        return room

    def lose_history(self, name: str) -> None:
        """The room's order is lost: the next use starts a new epoch."""
        self.rooms.pop(name, None)

    def crash(self, node: BusBackplane) -> None:
        """The node stops: it hears nothing, and nobody hears from it."""
        node.alive = False

    def lease_expired(self, node: BusBackplane) -> None:
        """Tell the live nodes that ``node`` is gone."""
        for other in self.live():
            if other is not node:
                other.emit(NodeDown(node.node_id))

    def send(self, sender: BusBackplane, wire: bytes, *, room: str | None = None) -> None:
        """Hand a node event's bytes to every other live node (watching ``room``, if given)."""
        for node in self.live():
            if node is sender or (room is not None and room not in node.watched):
                continue
            event = decode_node_event(wire, room=room)
            if event is not None:
                node.emit(event)


class BusBackplane(Backplane):
    """One node on a :class:`MemoryBus` (see the module docs)."""

    def __init__(self, bus: MemoryBus, node_id: str) -> None:
        self.node_id = node_id
        self.bus = bus
        self.sink: BackplaneSink | None = None
        self.watched: set[str] = set()
        #: False once crashed.
        self.alive = True

    def __repr__(self) -> str:
        return f"<BusBackplane {self.node_id} watched={len(self.watched)} alive={self.alive}>"

    def attach(self, sink: BackplaneSink) -> None:
        self.sink = sink

    def emit(self, event: BackplaneEvent) -> None:
        if self.sink is not None and self.alive:
            self.sink.backplane_event(event)

    def watch(self, room: str) -> None:
        self.watched.add(room)

    def unwatch(self, room: str) -> None:
        self.watched.discard(room)

    async def publish(
        self, room: str, sender: str | None, data: Any, nonce: str | None
    ) -> Position:
        await trio.lowlevel.checkpoint()
        store = self.bus.room(room)
        offset = store.history.last_offset + 1
        message = encode_message(room, offset, store.epoch, sender, data)
        store.history.append(offset, message, trio.current_time())
        item = Sequenced(room, store.epoch, offset, message, nonce)
        for node in self.bus.live():
            if room in node.watched:
                node.emit(item)
        return Position(store.epoch, offset)

    async def position(self, room: str) -> Position:
        await trio.lowlevel.checkpoint()
        store = self.bus.room(room)
        return Position(store.epoch, store.history.last_offset)

    async def replay(self, room: str, epoch: str, after: int, upto: int) -> list[Sequenced] | None:
        await trio.lowlevel.checkpoint()
        store = self.bus.rooms.get(room)
        if store is None or store.epoch != epoch or upto > store.history.last_offset:
            return None
        recovery = store.history.since(after, trio.current_time())
        if not recovery.complete:
            return None
        return [
            Sequenced(room, epoch, entry.offset, entry.message)
            for entry in recovery.messages
            if entry.offset <= upto
        ]

    async def recent(self, room: str, limit: int) -> list[Sequenced]:
        await trio.lowlevel.checkpoint()
        store = self.bus.rooms.get(room)
        if store is None:
            return []
        entries = store.history.last(limit, trio.current_time())
        return [Sequenced(room, store.epoch, e.offset, e.message) for e in entries]

    async def _tell(self, event: NodeEvent, *, room: str | None = None) -> None:
        await trio.lowlevel.checkpoint()
        if self.alive:
            self.bus.send(self, encode_node_event(event), room=room)

    async def broadcast(self, room: str, message: OutboundMessage, exclude: str | None) -> None:
        event = RoomBroadcast(self.node_id, room, message, exclude)
        self.emit(event)
        await self._tell(event, room=room)

    async def send_to_user(self, user: str, message: OutboundMessage) -> None:
        event = UserMessage(self.node_id, user, message)
        self.emit(event)
        await self._tell(event)

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        event = UserDisconnect(self.node_id, user, code, reason)
        self.emit(event)
        await self._tell(event)

    async def publish_presence(self, event: PresenceEvent) -> None:
        await self._tell(event)
