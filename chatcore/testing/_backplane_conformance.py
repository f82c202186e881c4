"""The backplane conformance suite: the contract between hubs, checked on any backplane.

A backplane is correct when :func:`check_backplane` passes for it. The suite
starts one or more nodes of a deployment (a :class:`BackplaneFactory`), puts
a :class:`BackplaneRecorder` where a hub would be, and checks what the hub
relies on: one order per room (consecutive offsets in one epoch, whoever
publishes), every room message reaching every node that watches the room,
the message text a client will see, exact and never partial replays, the
newest messages, a publish that cannot be encoded leaving no gap, directed
delivery and broadcasts on every node, and presence events reaching the
other nodes but not the sender. Room messages may arrive twice or out of
order: the recorder orders them the way the hub does, with a
:class:`~chatcore.sansio.RoomSequencer` and :meth:`Backplane.replay`.

``docs/scale-out.md`` shows how to run it on a new backplane.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import trio

from .._backplane import Backplane, BackplaneEvent
from ..sansio import (
    Emit,
    EpochChanged,
    Held,
    NodeEvent,
    OutboundMessage,
    Position,
    PresenceJoin,
    RoomBroadcast,
    RoomSequencer,
    Sequenced,
    UserDisconnect,
    UserMessage,
    encode,
    encode_message,
)

__all__ = [
    "BACKPLANE_CHECKS",
    "BackplaneFactory",
    "BackplaneRecorder",
    "check_backplane",
]


class BackplaneFactory(Protocol):
    """Starts ``nodes`` nodes of one fresh deployment of a backplane.

    ``async with factory(2) as (a, b): ...``: running backplanes (their
    :meth:`~chatcore.Backplane.run` started, and connected if they connect to
    something), not attached to any sink yet (the suite attaches its own),
    with distinct node ids. Leaving the block stops them.
    """

    def __call__(self, nodes: int) -> AbstractAsyncContextManager[Sequence[Backplane]]: ...


class BackplaneRecorder:
    """A :class:`~chatcore.BackplaneSink` that records everything, in place of a hub.

    Room messages are ordered as a hub orders them: per room, a
    :class:`~chatcore.sansio.RoomSequencer` from the position given to
    :meth:`follow`; :attr:`messages` holds what it emitted, each offset once.
    A gap is filled by :meth:`repair` (``Backplane.replay``).

    Args:
        backplane: The node it records (for replays).
    """

    def __init__(self, backplane: Backplane) -> None:
        #: The recorded node.
        self.backplane = backplane
        #: Every event, as it arrived.
        self.events: list[BackplaneEvent] = []
        #: Per room: the room messages emitted in order.
        self.messages: dict[str, list[Sequenced]] = {}
        #: Per room: held arrivals ahead of a gap.
        self.gaps: set[str] = set()
        self._sequencers: dict[str, RoomSequencer] = {}
        self._changed = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        return f"<BackplaneRecorder {self.backplane.node_id} events={len(self.events)}>"

    def backplane_event(self, event: BackplaneEvent) -> None:
        """Record one event (the :class:`~chatcore.BackplaneSink` method)."""
        self.events.append(event)
        if isinstance(event, Sequenced):
            sequencer = self._sequencers.setdefault(event.room, RoomSequencer())
            self._take(event.room, sequencer.receive(event))
        self._changed.unpark_all()

    def _take(self, room: str, step: object) -> None:
        if isinstance(step, Emit):
            self.messages.setdefault(room, []).extend(step.items)
        elif isinstance(step, Held) and step.gap:
            self.gaps.add(room)
        elif isinstance(step, EpochChanged):
            raise AssertionError(f"room {room!r}: the epoch changed to {step.position}")

    def follow(self, room: str, position: Position) -> None:
        """Start ordering ``room`` from ``position`` (what ``Backplane.position`` said)."""
        sequencer = self._sequencers.setdefault(room, RoomSequencer())
        for step in sequencer.start(position):
            self._take(room, step)

    async def repair(self, room: str, upto: int) -> None:
        """Fill the room's gap up to ``upto`` from the backplane's history."""
        sequencer = self._sequencers[room]
        if sequencer.offset >= upto:
            return
        items = await self.backplane.replay(room, sequencer.epoch, sequencer.offset, upto)
        _expect(items is not None, f"replay of {room!r} up to {upto} is None")
        assert items is not None
        for item in items:
            self._take(room, sequencer.receive(item))
        self.gaps.discard(room)

    def offsets(self, room: str) -> list[int]:
        """The offsets emitted for ``room``, in order."""
        return [item.offset for item in self.messages.get(room, ())]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (checked after every event)."""
        while not condition():
            await self._changed.park()


_Check = Callable[[BackplaneFactory, int], Awaitable[None]]
_CHECKS: dict[str, _Check] = {}


def _check(fn: _Check) -> _Check:
    _CHECKS[fn.__name__.removeprefix("_check_")] = fn
    return fn


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _room() -> str:
    # A fresh room per check: a persistent backplane keeps old rooms.
    return "conformance-" + secrets.token_hex(4)


async def _recorders(backplanes: Sequence[Backplane]) -> list[BackplaneRecorder]:
    recorders = []
    for backplane in backplanes:
        recorder = BackplaneRecorder(backplane)
        backplane.attach(recorder)
        recorders.append(recorder)
    await trio.lowlevel.checkpoint()
    return recorders


async def _watch(room: str, recorders: Iterable[BackplaneRecorder]) -> Position:
    position = Position("", 0)
    for recorder in recorders:
        recorder.backplane.watch(room)
        position = await recorder.backplane.position(room)
        recorder.follow(room, position)
    return position


async def _all_delivered(room: str, recorders: Iterable[BackplaneRecorder], upto: int) -> None:
    """Wait until every recorder emitted ``room`` up to ``upto``, repairing gaps like a hub."""
    for recorder in recorders:

        def done(recorder: BackplaneRecorder = recorder) -> bool:
            return recorder.offsets(room)[-1:] == [upto]

        def done_or_gap(recorder: BackplaneRecorder = recorder) -> bool:
            return done(recorder) or room in recorder.gaps

        while not done():
            if room in recorder.gaps:
                await recorder.repair(room, upto)
            else:
                await recorder.wait_for(done_or_gap)


@_check
async def _check_sequencing(factory: BackplaneFactory, nodes: int) -> None:
    """Consecutive offsets in one epoch, whoever publishes; the message text; the nonce."""
    room = _room()
    async with factory(nodes) as backplanes:
        recorders = await _recorders(backplanes)
        start = await _watch(room, recorders)
        _expect(start.epoch != "", "position() gave no epoch")
        positions = []
        for index in range(6):
            publisher = backplanes[index % len(backplanes)]
            nonce = f"{publisher.node_id}:{index}"
            positions.append(await publisher.publish(room, f"user{index}", {"n": index}, nonce))
        expected = [Position(start.epoch, start.offset + 1 + i) for i in range(6)]
        _expect(positions == expected, f"publish() returned {positions}, expected {expected}")
        await _all_delivered(room, recorders, start.offset + 6)
        for recorder in recorders:
            got = recorder.messages[room]
            _expect(
                [i.offset for i in got] == [p.offset for p in expected],
                f"{recorder.backplane.node_id} got offsets {[i.offset for i in got]}",
            )
            for index, item in enumerate(got):
                want = encode_message(room, item.offset, start.epoch, f"user{index}", {"n": index})
                _expect(item.epoch == start.epoch, f"offset {item.offset} in epoch {item.epoch}")
                _expect(
                    item.message.text == want.text and item.message.nbytes == want.nbytes,
                    f"message text {item.message.text!r}, expected {want.text!r}",
                )
        for recorder in recorders:
            # The publisher's reply is matched by the nonce: its node sees it.
            mine = recorder.backplane.node_id + ":"
            own = [
                e
                for e in recorder.events
                if isinstance(e, Sequenced) and e.nonce is not None and e.nonce.startswith(mine)
            ]
            _expect(bool(own), f"{recorder.backplane.node_id} never saw its own publish's nonce")


@_check
async def _check_replay(factory: BackplaneFactory, nodes: int) -> None:
    """Exact ranges in order; ``None`` for another epoch or what is not stored."""
    room = _room()
    async with factory(1) as (backplane,):
        (recorder,) = await _recorders([backplane])
        start = await _watch(room, [recorder])
        for index in range(5):
            await backplane.publish(room, None, index, None)
        base = start.offset
        items = await backplane.replay(room, start.epoch, base, base + 5)
        _expect(items is not None, "replay of everything stored is None")
        assert items is not None
        _expect(
            [(i.offset, json.loads(i.message.text)["data"]) for i in items]
            == [(base + n + 1, n) for n in range(5)],
            f"replay gave {[i.offset for i in items]}",
        )
        middle = await backplane.replay(room, start.epoch, base + 2, base + 4)
        _expect(
            middle is not None and [i.offset for i in middle] == [base + 3, base + 4],
            f"replay(after={base + 2}, upto={base + 4}) gave {middle}",
        )
        empty = await backplane.replay(room, start.epoch, base + 5, base + 5)
        _expect(empty == [], f"an empty range gave {empty}")
        other = await backplane.replay(room, start.epoch + "x", base, base + 5)
        _expect(other is None, "replay in another epoch is not None")
        beyond = await backplane.replay(room, start.epoch, base, base + 6)
        _expect(beyond is None, "replay beyond the last offset is not None (never partial)")


@_check
async def _check_recent(factory: BackplaneFactory, nodes: int) -> None:
    """The newest messages, oldest first; nothing for a room never used."""
    room = _room()
    async with factory(1) as (backplane,):
        await _recorders([backplane])
        for index in range(5):
            await backplane.publish(room, None, index, None)
        recent = await backplane.recent(room, 3)
        data = [json.loads(i.message.text)["data"] for i in recent]
        _expect(data == [2, 3, 4], f"recent(3) gave {data}")
        _expect(await backplane.recent(_room(), 3) == [], "recent() of an unused room")


@_check
async def _check_unencodable(factory: BackplaneFactory, nodes: int) -> None:
    """A publish that cannot be encoded raises and takes no offset."""
    room = _room()
    async with factory(1) as (backplane,):
        await _recorders([backplane])
        first = await backplane.publish(room, None, "a", None)
        for bad in (object(), float("nan")):
            try:
                await backplane.publish(room, None, bad, None)
            except (TypeError, ValueError):
                pass
            else:
                raise AssertionError(f"publishing {bad!r} did not raise")
        second = await backplane.publish(room, None, "b", None)
        _expect(
            second == Position(first.epoch, first.offset + 1),
            f"after failed publishes: {second}, expected offset {first.offset + 1}",
        )


@_check
async def _check_directed(factory: BackplaneFactory, nodes: int) -> None:
    """Messages for a user and disconnects reach every node, the sender's included."""
    async with factory(nodes) as backplanes:
        recorders = await _recorders(backplanes)
        sender = backplanes[0]
        message = encode({"type": "note", "text": "\u00e9\n"})
        await sender.send_to_user("alice", message)
        await sender.disconnect_user("alice", 4002, "kicked")
        want: list[NodeEvent] = [
            UserMessage(sender.node_id, "alice", message),
            UserDisconnect(sender.node_id, "alice", 4002, "kicked"),
        ]
        for recorder in recorders:

            def both(recorder: BackplaneRecorder = recorder) -> bool:
                return len(_directed(recorder)) >= 2

            await recorder.wait_for(both)
            _expect(
                _directed(recorder) == want,
                f"{recorder.backplane.node_id} got {_directed(recorder)}",
            )


def _directed(recorder: BackplaneRecorder) -> list[NodeEvent]:
    return [e for e in recorder.events if isinstance(e, (UserMessage, UserDisconnect))]


@_check
async def _check_broadcast(factory: BackplaneFactory, nodes: int) -> None:
    """A broadcast reaches every node watching the room, with its exclusion."""
    room = _room()
    async with factory(nodes) as backplanes:
        recorders = await _recorders(backplanes)
        await _watch(room, recorders)
        message = OutboundMessage('{"type":"typing"}', 17)
        await backplanes[-1].broadcast(room, message, "conn-1")
        want = RoomBroadcast(backplanes[-1].node_id, room, message, "conn-1")
        for recorder in recorders:

            def arrived(recorder: BackplaneRecorder = recorder) -> bool:
                return any(isinstance(e, RoomBroadcast) for e in recorder.events)

            await recorder.wait_for(arrived)
            got = [e for e in recorder.events if isinstance(e, RoomBroadcast)]
            _expect(got == [want], f"{recorder.backplane.node_id} got {got}")


@_check
async def _check_presence(factory: BackplaneFactory, nodes: int) -> None:
    """Presence events reach the other nodes, not the sender."""
    if nodes < 2:
        return  # one node has no one to tell
    async with factory(2) as backplanes:
        a, b = await _recorders(backplanes)
        event = PresenceJoin(a.backplane.node_id, "r", "alice", "c1", 12.5, {"device": "phone"})
        await a.backplane.publish_presence(event)
        await b.wait_for(lambda: any(isinstance(e, PresenceJoin) for e in b.events))
        got = [e for e in b.events if isinstance(e, PresenceJoin)]
        _expect(got == [event], f"the other node got {got}")
        # A barrier: b's message to a user reaches a after a's own event would have.
        await b.backplane.send_to_user("marker", encode({"type": "marker"}))
        await a.wait_for(lambda: any(isinstance(e, UserMessage) for e in a.events))
        _expect(
            not any(isinstance(e, PresenceJoin) for e in a.events),
            "the sender heard its own presence event",
        )


@_check
async def _check_concurrent_order(factory: BackplaneFactory, nodes: int) -> None:
    """Concurrent publishes from every node: one order, every message everywhere once."""
    room = _room()
    per_node = 20
    async with factory(nodes) as backplanes:
        recorders = await _recorders(backplanes)
        start = await _watch(room, recorders)
        positions: list[Position] = []

        async def publish_many(backplane: Backplane) -> None:
            for index in range(per_node):
                positions.append(await backplane.publish(room, None, index, None))

        async with trio.open_nursery() as nursery:
            for backplane in backplanes:
                nursery.start_soon(publish_many, backplane)
        total = per_node * len(backplanes)
        offsets = sorted(p.offset for p in positions)
        _expect(
            offsets == list(range(start.offset + 1, start.offset + total + 1)),
            f"publish() offsets are not one consecutive order: {offsets}",
        )
        _expect({p.epoch for p in positions} == {start.epoch}, "an epoch changed")
        await _all_delivered(room, recorders, start.offset + total)
        for recorder in recorders:
            _expect(
                recorder.offsets(room) == offsets,
                f"{recorder.backplane.node_id} emitted {recorder.offsets(room)}",
            )


#: The names of the checks, for parametrizing tests (see :func:`check_backplane`).
BACKPLANE_CHECKS: tuple[str, ...] = tuple(_CHECKS)


async def check_backplane(
    factory: BackplaneFactory,
    *,
    nodes: int = 2,
    checks: Iterable[str] | None = None,
    check_timeout: float = 10.0,
) -> None:
    """Check that a backplane keeps the :class:`~chatcore.Backplane` contract.

    Each check starts a fresh deployment with ``factory`` and drives it.
    Parametrize over :data:`BACKPLANE_CHECKS` to see each check as its own
    test::

        @pytest.mark.parametrize("check", BACKPLANE_CHECKS)
        async def test_my_backplane(check):
            await check_backplane(open_my_backplanes, checks=[check])

    Args:
        factory: Starts the nodes (see :class:`BackplaneFactory`).
        nodes: How many nodes the multi-node checks use; 1 for a backplane
            that serves one process only (:class:`~chatcore.LocalBackplane`).
        checks: Names from :data:`BACKPLANE_CHECKS` (default: all).
        check_timeout: Seconds each check may take.

    Raises:
        AssertionError: a check failed (the message names the check).
        KeyError: an unknown check name.
        ValueError: ``nodes`` is below 1.

    Cancellation: stops the check in progress; its nodes are stopped.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes!r}")
    names = list(BACKPLANE_CHECKS if checks is None else checks)
    for name in names:
        if name not in _CHECKS:
            raise KeyError(f"unknown check {name!r}; known: {', '.join(BACKPLANE_CHECKS)}")
    for name in names:
        try:
            with trio.fail_after(check_timeout):
                await _CHECKS[name](factory, nodes)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        except trio.TooSlowError as exc:
            raise AssertionError(f"{name}: did not finish within {check_timeout} s") from exc
        except Exception as exc:
            raise AssertionError(f"{name}: raised {exc!r}") from exc
