"""The history ring and reconnect recovery by offset (plain synchronous tests)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore.sansio import Delivery, LocalProtocolError, OutboundMessage
from chatcore.sansio._history import History, HistoryEntry, Recovery, RecoveryStatus

COMPLETE, TRIMMED, AHEAD = RecoveryStatus.COMPLETE, RecoveryStatus.TRIMMED, RecoveryStatus.AHEAD


def msg(offset: int, size: int = 0) -> OutboundMessage:
    """A durable message whose text names its offset (padded to ``size`` bytes)."""
    text = f'{{"offset":{offset}}}'.ljust(size)
    return OutboundMessage(text, len(text))


def filled(first: int, last: int, history: History | None = None, now: float = 0.0) -> History:
    """``history`` (default: a roomy one starting before ``first``) with first..last appended."""
    h = history if history is not None else History(1000, last_offset=first - 1)
    for offset in range(first, last + 1):
        h.append(offset, msg(offset), now)
    return h


def offsets(recovery_or_entries: Recovery | tuple[HistoryEntry, ...]) -> list[int]:
    entries = (
        recovery_or_entries.messages
        if isinstance(recovery_or_entries, Recovery)
        else recovery_or_entries
    )
    return [e.offset for e in entries]


# -- construction ----------------------------------------------------------------------------


def test_a_new_history_starts_before_offset_1() -> None:
    h = History(10)
    assert (len(h), h.first_offset, h.last_offset, h.nbytes) == (0, 1, 0, 0)
    assert h.since(0, now=0).status is COMPLETE  # nothing was missed
    assert h.since(0, now=0).messages == ()
    assert repr(h) == "<History 1..0 held=0/10 nbytes=0>"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_messages": -1},
        {"max_messages": 1, "max_age": 0},
        {"max_messages": 1, "max_age": -1.0},
        {"max_messages": 1, "max_age": float("nan")},
        {"max_messages": 1, "max_bytes": -1},
        {"max_messages": 1, "last_offset": -1},
    ],
)
def test_bad_bounds_are_refused(kwargs: dict[str, float]) -> None:
    bad = list(kwargs)[-1]  # the bound under test (max_messages comes first)
    with pytest.raises(ValueError, match=f"^{bad} must be"):
        History(**kwargs)  # type: ignore[arg-type]


# -- append ----------------------------------------------------------------------------------


def test_append_returns_the_entry() -> None:
    h = History(10)
    m = msg(1)
    entry = h.append(1, m, now=5.0)
    assert entry == HistoryEntry(1, m, 5.0)
    assert (entry.text, entry.nbytes) == (m.text, m.nbytes)
    assert (len(h), h.first_offset, h.last_offset, h.nbytes) == (1, 1, 1, m.nbytes)


@pytest.mark.parametrize("bad", [1, 2, 4, 10])
def test_append_must_be_consecutive(bad: int) -> None:
    h = filled(1, 2)
    with pytest.raises(LocalProtocolError, match=f"got offset {bad}, expected 3"):
        h.append(bad, msg(bad), 0)
    assert (h.first_offset, h.last_offset, len(h)) == (1, 2, 2)  # unchanged
    h.append(3, msg(3), 0)


def test_first_append_may_start_anywhere_ahead() -> None:
    # A restart from a capped stream: the oldest entry is not last_offset + 1.
    h = History(10)
    h.append(41, msg(41), 0)
    assert (h.first_offset, h.last_offset) == (41, 41)
    assert h.since(40, 0).status is COMPLETE
    assert h.since(39, 0).status is TRIMMED  # 40 was never held
    assert h.since(0, 0).status is TRIMMED
    with pytest.raises(LocalProtocolError):
        h.append(43, msg(43), 0)  # now it holds something: consecutive again


def test_restart_at_a_known_position() -> None:
    h = History(10, last_offset=7)
    assert h.since(7, 0) == Recovery(COMPLETE)
    assert h.since(6, 0).status is TRIMMED
    assert h.since(8, 0).status is AHEAD
    with pytest.raises(LocalProtocolError):
        h.append(7, msg(7), 0)  # an offset is never reused
    h.append(8, msg(8), 0)


def test_append_after_trimmed_to_nothing_may_jump_but_never_go_back() -> None:
    h = filled(1, 3, History(10, max_age=1.0))
    assert h.trim(now=5.0) == 3
    assert (len(h), h.first_offset, h.last_offset) == (0, 4, 3)
    with pytest.raises(LocalProtocolError):
        h.append(3, msg(3), 5.0)
    h.append(6, msg(6), 5.0)
    assert h.since(5, 5.0).status is COMPLETE
    assert h.since(3, 5.0).status is TRIMMED  # 4 and 5 are not held


def test_ephemeral_messages_have_no_place_in_history() -> None:
    h = History(10)
    with pytest.raises(LocalProtocolError, match="durable"):
        h.append(1, OutboundMessage("x", 1, Delivery.EPHEMERAL, "k"), 0)
    assert h.last_offset == 0


def test_entry_times_never_go_backwards() -> None:
    h = History(10, max_age=10.0)
    h.append(1, msg(1), now=100.0)
    assert h.append(2, msg(2), now=50.0).at == 100.0
    assert h.trim(now=110.0) == 0
    assert h.trim(now=110.5) == 2


def test_the_same_message_object_is_held() -> None:
    # Encode once: recovery queues the very object that was fanned out.
    h = History(10)
    m = msg(1)
    h.append(1, m, 0)
    assert h.since(0, 0).messages[0].message is m


# -- bounds ----------------------------------------------------------------------------------


def test_count_bound_is_exact() -> None:
    h = filled(1, 3, History(3))
    assert (h.first_offset, len(h)) == (1, 3)
    h.append(4, msg(4), 0)
    assert (h.first_offset, h.last_offset, len(h)) == (2, 4, 3)
    assert h.nbytes == sum(msg(o).nbytes for o in (2, 3, 4))


def test_max_messages_zero_holds_nothing_but_tracks_the_offset() -> None:
    h = filled(1, 5, History(0))
    assert (len(h), h.first_offset, h.last_offset, h.nbytes) == (0, 6, 5, 0)
    assert h.since(5, 0) == Recovery(COMPLETE)
    assert h.since(4, 0) == Recovery(TRIMMED)


def test_age_bound_at_the_exact_boundary() -> None:
    h = History(10, max_age=5.0)
    h.append(1, msg(1), now=10.0)
    h.append(2, msg(2), now=11.0)
    assert h.trim(now=15.0) == 0  # 10 + 5 == now: still held
    assert h.first_offset == 1
    assert h.trim(now=15.25) == 1  # older than now - max_age: gone
    assert (h.first_offset, len(h)) == (2, 1)
    assert h.trim(now=16.0) == 0
    assert h.trim(now=16.25) == 1
    assert (len(h), h.first_offset, h.last_offset, h.nbytes) == (0, 3, 2, 0)


def test_age_is_trimmed_on_every_access() -> None:
    def aged() -> History:
        h = History(10, max_age=1.0)
        h.append(1, msg(1), now=0.0)
        h.append(2, msg(2), now=2.0)
        return h

    h = aged()
    assert h.since(0, now=2.0).status is TRIMMED  # since trims first
    h = aged()
    assert offsets(h.last(5, now=2.0)) == [2]  # last trims first
    h = aged()
    h.append(3, msg(3), now=2.0)  # append trims too
    assert h.first_offset == 2


def test_without_max_age_nothing_ages() -> None:
    h = filled(1, 3, History(10), now=0.0)
    assert h.trim(now=1e12) == 0
    assert len(h) == 3


def test_byte_bound_is_exact() -> None:
    h = History(100, max_bytes=60)
    h.append(1, msg(1, 20), 0)
    h.append(2, msg(2, 20), 0)
    h.append(3, msg(3, 20), 0)
    assert (h.first_offset, h.nbytes) == (1, 60)  # == max_bytes: all held
    h.append(4, msg(4, 21), 0)
    assert (h.first_offset, h.nbytes) == (3, 41)
    h.append(5, msg(5, 60), 0)
    assert (h.first_offset, h.nbytes) == (5, 60)


def test_an_entry_larger_than_max_bytes_is_not_held() -> None:
    h = filled(1, 2, History(100, max_bytes=20))
    h.append(3, msg(3, 21), 0)
    assert (len(h), h.first_offset, h.last_offset, h.nbytes) == (0, 4, 3, 0)
    assert h.since(3, 0) == Recovery(COMPLETE)
    assert h.since(2, 0) == Recovery(TRIMMED)
    h.append(4, msg(4), 0)
    assert offsets(h.since(3, 0)) == [4]


def test_clear_keeps_the_position() -> None:
    h = filled(1, 5)
    assert h.clear() == 5
    assert (len(h), h.first_offset, h.last_offset, h.nbytes) == (0, 6, 5, 0)
    assert h.since(5, 0) == Recovery(COMPLETE)
    assert h.since(4, 0) == Recovery(TRIMMED)
    h.append(9, msg(9), 0)  # holds nothing: may jump past a known hole
    assert h.since(8, 0).complete


# -- since: every boundary -----------------------------------------------------------------------


def test_since_on_a_room_that_started_at_1() -> None:
    h = filled(1, 5)
    assert offsets(h.since(0, 0)) == [1, 2, 3, 4, 5]  # offset == first - 1: everything
    assert offsets(h.since(3, 0)) == [4, 5]
    assert offsets(h.since(4, 0)) == [5]
    assert h.since(5, 0) == Recovery(COMPLETE, ())  # offset == last: nothing missed
    assert h.since(6, 0) == Recovery(AHEAD, ())  # a client from the future
    assert h.since(10**9, 0) == Recovery(AHEAD, ())


def test_since_after_trimming() -> None:
    h = filled(1, 10, History(4))
    assert (h.first_offset, h.last_offset) == (7, 10)
    assert offsets(h.since(6, 0)) == [7, 8, 9, 10]  # first - 1: complete
    assert h.since(5, 0) == Recovery(TRIMMED)  # first - 2: 6 is gone
    assert h.since(0, 0) == Recovery(TRIMMED)
    assert h.since(10, 0) == Recovery(COMPLETE)
    assert h.since(11, 0) == Recovery(AHEAD)


def test_a_negative_offset_is_simply_not_recoverable() -> None:
    h = filled(1, 3)
    assert h.since(-1, 0) == Recovery(TRIMMED)


def test_recovery_status_and_size() -> None:
    h = filled(1, 3)
    r = h.since(1, 0)
    assert r.complete
    assert r.nbytes == msg(2).nbytes + msg(3).nbytes
    assert not h.since(7, 0).complete
    assert Recovery(TRIMMED).nbytes == 0


def test_recovery_is_never_partial_by_construction() -> None:
    entry = HistoryEntry(1, msg(1), 0.0)
    for status in (TRIMMED, AHEAD):
        with pytest.raises(ValueError, match="never partial"):
            Recovery(status, (entry,))


# -- last(n) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [(-1, []), (0, []), (1, [5]), (3, [3, 4, 5]), (5, [1, 2, 3, 4, 5]), (50, [1, 2, 3, 4, 5])],
)
def test_last_n_is_the_newest_oldest_first(n: int, expected: list[int]) -> None:
    assert offsets(filled(1, 5).last(n, now=0)) == expected


def test_last_on_an_empty_history() -> None:
    assert History(10).last(3, now=0) == ()


# -- the property: complete means exactly the suffix; incomplete means it is not held -----------

BOUNDS = st.fixed_dictionaries(
    {
        "max_messages": st.integers(0, 10),
        "max_age": st.none() | st.sampled_from([1.0, 2.5, 4.0]),
        "max_bytes": st.none() | st.integers(0, 120),
    }
)

APPEND = st.tuples(st.just("append"), st.integers(1, 25), st.sampled_from([0.0, 0.0, 0.5, 3.0]))
OPS = st.lists(
    st.one_of(
        APPEND,
        APPEND,  # twice as likely as the others: the window needs something in it
        st.tuples(st.just("trim"), st.just(0), st.sampled_from([0.0, 0.5, 2.0])),
        # ``since`` asks for an offset near either end of the held window (see below).
        st.tuples(st.just("since"), st.integers(0, 19), st.sampled_from([0.0, 0.0, 0.5, 2.0])),
        st.tuples(st.just("last"), st.integers(0, 10), st.sampled_from([0.0, 1.0])),
    ),
    min_size=20,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(bounds=BOUNDS, start=st.integers(0, 5), ops=OPS)
def test_recovery_is_all_or_nothing(
    bounds: dict[str, int | float | None], start: int, ops: list[tuple[str, int, float]]
) -> None:
    max_messages = bounds["max_messages"]
    max_age = bounds["max_age"]
    max_bytes = bounds["max_bytes"]
    assert isinstance(max_messages, int)
    h = History(max_messages, max_age, max_bytes, last_offset=start)  # type: ignore[arg-type]
    # The model: everything ever appended, and the latest time passed in.
    appended: list[tuple[int, OutboundMessage, float]] = []
    now = 0.0

    def expected_held() -> list[int]:
        # The longest suffix of ``appended`` within every bound at ``now``.
        held: list[int] = []
        size = 0
        for offset, m, at in reversed(appended):
            size += m.nbytes
            if (
                len(held) == max_messages
                or (max_bytes is not None and size > max_bytes)
                or (max_age is not None and at + max_age < now)
            ):
                break
            held.append(offset)
        return held[::-1]

    for op, arg, dt in ops:
        now += dt
        last = appended[-1][0] if appended else start
        if op == "append":
            m = msg(last + 1, arg)
            h.append(last + 1, m, now)
            appended.append((last + 1, m, now))
        elif op == "trim":
            h.trim(now)
        elif op == "since":
            held = expected_held()  # what is held once since() trimmed at ``now``
            # Even ``arg``: first - 1 - 3 .. first - 1 + 6; odd: last + 2 .. last - 7.
            first = held[0] if held else last + 1
            asked = first - 1 + arg // 2 - 3 if arg % 2 == 0 else last + 2 - arg // 2
            r = h.since(asked, now)
            # The oracle: complete exactly when every offset after ``asked`` is held.
            if asked > last:
                assert r == Recovery(AHEAD)
            elif set(range(asked + 1, last + 1)) <= set(held):
                assert r.status is COMPLETE
                # Exactly the suffix after ``asked``: the same objects, in order.
                assert [(e.offset, e.message) for e in r.messages] == [
                    (o, m) for o, m, _ in appended if o > asked
                ]
            else:
                assert r == Recovery(TRIMMED)
                assert r.messages == ()
        else:
            got = h.last(arg, now)
            held = expected_held()
            assert offsets(got) == (held[-arg:] if arg else [])
        # The structural invariants, after every step.
        held = expected_held()
        assert list(range(h.first_offset, h.last_offset + 1)) == held or (
            not held and h.first_offset == h.last_offset + 1
        )
        assert len(h) == len(held)
        assert h.last_offset == (appended[-1][0] if appended else start)
        assert h.nbytes == sum(m.nbytes for o, m, _ in appended if o in held)
