"""The per-room sequencer: each offset emitted once, in order, whatever arrives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore.sansio import (
    Emit,
    EpochChanged,
    Held,
    Position,
    RoomSequencer,
    Sequenced,
    SequencerStep,
    Stale,
    encode,
)


def item(offset: int, epoch: str = "e1", nonce: str | None = None) -> Sequenced:
    return Sequenced("r", epoch, offset, encode({"offset": offset}), nonce)


def offsets(step: SequencerStep) -> list[int]:
    assert isinstance(step, Emit)
    return [i.offset for i in step.items]


def test_holds_everything_until_the_position_is_known() -> None:
    seq = RoomSequencer()
    assert not seq.ready
    assert seq.receive(item(3)) == Held(gap=False)
    assert seq.receive(item(2)) == Held(gap=False)
    steps = seq.start(Position("e1", 1))
    assert steps == [Emit((item(2),)), Emit((item(3),))]
    assert seq.position == Position("e1", 3)
    assert seq.held == 0


def test_early_arrivals_at_or_below_the_position_are_stale() -> None:
    seq = RoomSequencer()
    seq.receive(item(1))
    assert seq.start(Position("e1", 4)) == [Stale(item(1))]
    assert offsets(seq.receive(item(5))) == [5]


def test_next_offset_is_emitted_a_gap_is_held_and_released() -> None:
    seq = RoomSequencer()
    assert seq.start(Position("e1", 0)) == []
    assert offsets(seq.receive(item(1))) == [1]
    assert seq.receive(item(3)) == Held(gap=True)
    assert seq.receive(item(4)) == Held(gap=True)
    assert seq.needs_repair(Position("e1", 4))
    assert offsets(seq.receive(item(2))) == [2, 3, 4]
    assert not seq.needs_repair(Position("e1", 4))
    assert seq.needs_repair(Position("e1", 5))


def test_duplicates_are_stale_with_the_arrival_kept_for_its_publisher() -> None:
    seq = RoomSequencer()
    seq.start(Position("e1", 0))
    seq.receive(item(1))
    dup = item(1, nonce="n:1")
    assert seq.receive(dup) == Stale(dup)


def test_another_epoch_is_a_break_and_the_old_epoch_is_then_stale() -> None:
    seq = RoomSequencer()
    seq.start(Position("e1", 0))
    seq.receive(item(1))
    seq.receive(item(3))  # held ahead of a gap: dropped by the break
    assert seq.receive(item(7, "e2")) == EpochChanged(Position("e2", 7))
    assert seq.held == 0
    assert seq.receive(item(2, "e1")) == Stale(item(2, "e1"))
    assert offsets(seq.receive(item(8, "e2"))) == [8]


def test_reset_remembers_a_bounded_number_of_epochs() -> None:
    seq = RoomSequencer()
    seq.start(Position("e0", 0))
    for n in range(1, 10):
        seq.reset(Position(f"e{n}", 0))
    assert seq.receive(item(1, "e8")) == Stale(item(1, "e8"))
    # The oldest one was forgotten: it reads as a new epoch again.
    assert isinstance(seq.receive(item(1, "e0")), EpochChanged)


def test_held_arrivals_are_bounded() -> None:
    seq = RoomSequencer(max_held=2)
    seq.start(Position("e1", 0))
    for offset in (3, 4, 5):
        assert seq.receive(item(offset)) == Held(gap=True)
    assert seq.held == 2
    # 5 was not kept: the order stops at 4 until a repair brings 5.
    assert offsets(seq.receive(item(1))) == [1]
    assert offsets(seq.receive(item(2))) == [2, 3, 4]
    assert offsets(seq.receive(item(5))) == [5]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_held"):
        RoomSequencer(max_held=0)
    with pytest.raises(ValueError, match="needs an epoch"):
        RoomSequencer().start(Position("", 0))
    assert repr(RoomSequencer()) == "<RoomSequencer epoch='' offset=0 held=0>"


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(min_value=1, max_value=30),
    start=st.integers(min_value=0, max_value=5),
    actions=st.lists(
        st.one_of(
            st.tuples(st.just("deliver"), st.integers(min_value=1, max_value=35)),
            st.tuples(st.just("replay"), st.integers(min_value=0, max_value=35)),
        ),
        max_size=80,
    ),
)
def test_any_interleaving_of_deliveries_and_replays_emits_each_offset_once_in_order(
    total: int, start: int, actions: list[tuple[str, int]]
) -> None:
    """Live deliveries (any order, repeated) and replays of history ranges, then
    a final repair: offsets start+1..total come out exactly once, ascending."""
    start = min(start, total)
    seq = RoomSequencer()
    emitted: list[int] = []

    def feed(steps: list[SequencerStep]) -> None:
        for step in steps:
            assert not isinstance(step, EpochChanged)
            if isinstance(step, Emit):
                emitted.extend(i.offset for i in step.items)

    def replay(upto: int) -> None:
        # What a repair does: the stored range after the sequencer's offset.
        feed([seq.receive(item(o)) for o in range(seq.offset + 1, upto + 1)])

    started = False
    for index, (kind, value) in enumerate(actions):
        if not started and index == len(actions) // 2:
            feed(seq.start(Position("e1", start)))
            started = True
        if kind == "deliver" and value <= total:
            feed([seq.receive(item(value))])
        elif kind == "replay" and started:
            replay(min(value, total))
    if not started:
        feed(seq.start(Position("e1", start)))
    replay(total)
    assert emitted == list(range(start + 1, total + 1))
    assert seq.held == 0
