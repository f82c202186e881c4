"""Encoding and the bounded outbox (plain synchronous tests)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore.sansio import Delivery, OutboundMessage, Outbox, PushResult, QueueTotal, encode

D, E = Delivery.DURABLE, Delivery.EPHEMERAL


def msg(
    text: str, delivery: Delivery = Delivery.DURABLE, key: str | None = None
) -> OutboundMessage:
    return OutboundMessage(text, len(text), delivery, key)


def drain(outbox: Outbox, max_bytes: int = 1 << 30, max_messages: int = 1 << 30) -> list[str]:
    """Every message still queued, in order, taken batch by batch."""
    out: list[str] = []
    while (frame := outbox.take_batch(max_bytes, max_messages)) is not None:
        out.extend(frame.split("\n"))
    return out


# -- encode -------------------------------------------------------------------


def test_encode_is_compact_json() -> None:
    m = encode({"type": "message", "room": "r", "data": [1, {"a": None}]})
    assert m.text == '{"type":"message","room":"r","data":[1,{"a":null}]}'
    assert m.nbytes == len(m.text)
    assert m.delivery is Delivery.DURABLE
    assert m.key is None


def test_encode_passes_delivery_and_key() -> None:
    m = encode({"type": "typing"}, delivery=Delivery.EPHEMERAL, key="typing:r:u")
    assert (m.delivery, m.key) == (Delivery.EPHEMERAL, "typing:r:u")


@pytest.mark.parametrize(
    "data",
    ["line one\nline two", "sep\u2028para\u2029end", "crlf\r\n", "émoji 🎉 ünï", "\x00\x1f"],
)
def test_encode_is_one_utf8_line(data: str) -> None:
    m = encode({"type": "message", "data": data})
    assert m.nbytes == len(m.text.encode("utf-8"))
    for forbidden in ("\n", "\r", "\u2028", "\u2029", "\u0085"):
        assert forbidden not in m.text
    assert json.loads(m.text) == {"type": "message", "data": data}


def test_encode_sends_characters_beyond_ascii_as_utf8() -> None:
    m = encode({"type": "message", "data": "émoji 🎉"})
    assert "🎉" in m.text
    assert "\\u" not in m.text
    assert m.nbytes == len(m.text.encode("utf-8")) == len(m.text) + 4


def test_encode_escapes_a_lone_surrogate_as_ascii_json() -> None:
    # Not encodable as UTF-8: the text falls back to JSON's ASCII escapes.
    m = encode({"type": "message", "data": "a\ud800 🎉"})
    assert m.text.isascii()
    assert "\\ud800" in m.text
    assert json.loads(m.text)["data"] == "a\ud800 🎉"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_rejects_non_finite_numbers(bad: float) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode({"type": "x", "n": bad})


def test_encode_rejects_unserialisable_values() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode({"type": "x", "when": object()})


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.text()
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_encode_round_trips_any_json_on_one_utf8_line(data: object) -> None:
    m = encode({"type": "message", "data": data})
    assert "\n" not in m.text
    assert m.nbytes == len(m.text.encode("utf-8"))
    assert json.loads(m.text) == {"type": "message", "data": data}


# -- push: bounds ----------------------------------------------------------------


def test_fills_to_exactly_max_bytes() -> None:
    outbox = Outbox(max_bytes=10, max_messages=100)
    assert outbox.push(msg("a" * 4)) is PushResult.QUEUED
    assert outbox.has_room_for(6)
    assert not outbox.has_room_for(7)
    assert outbox.push(msg("b" * 6)) is PushResult.QUEUED
    assert outbox.nbytes == 10
    assert len(outbox) == 2
    assert not outbox.has_room_for(1)
    assert outbox.push(msg("c")) is PushResult.OVERFLOW
    assert outbox.push(msg("c", E)) is PushResult.DROPPED
    assert (outbox.nbytes, len(outbox), outbox.dropped) == (10, 2, 1)


def test_one_byte_over_is_refused_even_when_empty() -> None:
    outbox = Outbox(max_bytes=10, max_messages=100)
    assert outbox.push(msg("x" * 11)) is PushResult.OVERFLOW
    assert outbox.push(msg("x" * 11, E)) is PushResult.DROPPED
    assert outbox.push(msg("x" * 10)) is PushResult.QUEUED
    assert outbox.dropped == 1


def test_fills_to_exactly_max_messages() -> None:
    outbox = Outbox(max_bytes=1000, max_messages=3)
    for text in ("a", "b", "c"):
        assert outbox.push(msg(text)) is PushResult.QUEUED
    assert not outbox.has_room_for(0)
    assert outbox.push(msg("d")) is PushResult.OVERFLOW
    assert outbox.push(msg("d", E)) is PushResult.DROPPED
    assert outbox.push(msg("d", E, key="k")) is PushResult.DROPPED
    assert (len(outbox), outbox.nbytes, outbox.dropped) == (3, 3, 2)
    assert drain(outbox) == ["a", "b", "c"]


def test_overflow_leaves_the_queue_untouched() -> None:
    outbox = Outbox(max_bytes=5, max_messages=10)
    outbox.push(msg("abc"))
    assert outbox.push(msg("def")) is PushResult.OVERFLOW
    assert outbox.dropped == 0  # durable messages are never counted as dropped
    assert drain(outbox) == ["abc"]


# -- push: coalescing ----------------------------------------------------------------


def test_coalescing_keeps_the_position_and_latest_text_wins() -> None:
    outbox = Outbox(max_bytes=100, max_messages=10)
    assert outbox.push(msg("typing-1", E, key="t")) is PushResult.QUEUED
    assert outbox.push(msg("chat")) is PushResult.QUEUED
    assert outbox.push(msg("typing-22", E, key="t")) is PushResult.COALESCED
    assert outbox.push(msg("typing-333", E, key="t")) is PushResult.COALESCED
    assert len(outbox) == 2
    assert outbox.nbytes == len("typing-333") + len("chat")
    assert drain(outbox) == ["typing-333", "chat"]
    assert outbox.nbytes == 0


def test_different_keys_do_not_coalesce() -> None:
    outbox = Outbox(max_bytes=100, max_messages=10)
    assert outbox.push(msg("a", E, key="a")) is PushResult.QUEUED
    assert outbox.push(msg("b", E, key="b")) is PushResult.QUEUED
    assert outbox.push(msg("c", E)) is PushResult.QUEUED
    assert outbox.push(msg("d", E)) is PushResult.QUEUED  # no key: never coalesces
    assert drain(outbox) == ["a", "b", "c", "d"]


def test_coalescing_needs_no_free_slot() -> None:
    outbox = Outbox(max_bytes=100, max_messages=2)
    outbox.push(msg("p1", E, key="p"))
    outbox.push(msg("x"))
    assert outbox.push(msg("p2", E, key="p")) is PushResult.COALESCED
    assert drain(outbox) == ["p2", "x"]


def test_coalescing_may_shrink_and_grow_to_exactly_max_bytes() -> None:
    outbox = Outbox(max_bytes=10, max_messages=10)
    outbox.push(msg("aaaaaa", E, key="k"))
    outbox.push(msg("bb"))
    assert outbox.push(msg("a", E, key="k")) is PushResult.COALESCED
    assert outbox.nbytes == 3
    assert outbox.push(msg("a" * 8, E, key="k")) is PushResult.COALESCED
    assert outbox.nbytes == 10
    assert outbox.push(msg("a" * 9, E, key="k")) is PushResult.DROPPED
    assert outbox.dropped == 1
    assert drain(outbox) == ["a" * 8, "bb"]


def test_a_durable_message_is_never_dropped_by_coalescing() -> None:
    # A keyed durable message that cannot replace its predecessor for lack of
    # room must report OVERFLOW (the connection closes with 4001), never DROPPED.
    outbox = Outbox(max_bytes=10, max_messages=10)
    assert outbox.push(msg("state-1", D, key="s")) is PushResult.QUEUED
    assert outbox.push(msg("state-2", D, key="s")) is PushResult.COALESCED
    assert outbox.push(msg("state-three", D, key="s")) is PushResult.OVERFLOW
    assert outbox.dropped == 0
    assert drain(outbox) == ["state-2"]


def test_a_key_is_forgotten_once_its_message_is_taken() -> None:
    outbox = Outbox(max_bytes=100, max_messages=10)
    outbox.push(msg("t1", E, key="t"))
    outbox.push(msg("x"))
    assert outbox.take_batch(100, 1) == "t1"
    # "t1" is on the wire: a new one queues behind "x" instead of replacing it.
    assert outbox.push(msg("t2", E, key="t")) is PushResult.QUEUED
    assert outbox.push(msg("t3", E, key="t")) is PushResult.COALESCED
    assert drain(outbox) == ["x", "t3"]
    assert outbox.push(msg("t4", E, key="t")) is PushResult.QUEUED
    assert len(outbox) == 1


# -- take_batch ------------------------------------------------------------------------


def test_take_batch_on_empty_outbox_is_none() -> None:
    outbox = Outbox(max_bytes=100, max_messages=10)
    assert outbox.take_batch(100, 10) is None
    outbox.push(msg("a"))
    assert outbox.take_batch(100, 10) == "a"
    assert outbox.take_batch(100, 10) is None


def test_take_batch_takes_one_message_bigger_than_the_cap() -> None:
    outbox = Outbox(max_bytes=100, max_messages=10)
    outbox.push(msg("x" * 50))
    outbox.push(msg("y"))
    assert outbox.take_batch(10, 10) == "x" * 50
    assert outbox.nbytes == 1
    assert outbox.take_batch(10, 10) == "y"
    assert outbox.nbytes == 0


@pytest.mark.parametrize(
    ("max_bytes", "expected"),
    [
        (3, ["aaa"]),
        (6, ["aaa"]),  # "aaa\nbbb" is 7 bytes: the separator counts
        (7, ["aaa", "bbb"]),
        (10, ["aaa", "bbb"]),
        (11, ["aaa", "bbb", "ccc"]),
        (1000, ["aaa", "bbb", "ccc"]),
    ],
)
def test_take_batch_respects_max_bytes_including_separators(
    max_bytes: int, expected: list[str]
) -> None:
    outbox = Outbox(max_bytes=100, max_messages=10)
    for text in ("aaa", "bbb", "ccc"):
        outbox.push(msg(text))
    frame = outbox.take_batch(max_bytes, 10)
    assert frame == "\n".join(expected)
    assert outbox.nbytes == 9 - 3 * len(expected)
    assert len(outbox) == 3 - len(expected)


def test_take_batch_stops_at_the_first_message_that_does_not_fit() -> None:
    # FIFO: a small message behind a big one is not taken ahead of it.
    outbox = Outbox(max_bytes=100, max_messages=10)
    for text in ("aa", "b" * 20, "c"):
        outbox.push(msg(text))
    assert outbox.take_batch(10, 10) == "aa"
    assert drain(outbox) == ["b" * 20, "c"]


@pytest.mark.parametrize(("max_messages", "taken"), [(0, 1), (1, 1), (2, 2), (4, 4), (5, 4)])
def test_take_batch_respects_max_messages(max_messages: int, taken: int) -> None:
    outbox = Outbox(max_bytes=100, max_messages=10)
    for text in ("a", "b", "c", "d"):
        outbox.push(msg(text))
    frame = outbox.take_batch(1000, max_messages)
    assert frame == "\n".join("abcd"[:taken])
    assert len(outbox) == 4 - taken
    assert outbox.nbytes == 4 - taken


def test_take_batch_frees_room_for_new_messages() -> None:
    outbox = Outbox(max_bytes=4, max_messages=2)
    outbox.push(msg("ab"))
    outbox.push(msg("cd"))
    assert outbox.push(msg("e")) is PushResult.OVERFLOW
    assert outbox.take_batch(4, 10) == "ab"
    assert outbox.push(msg("ef")) is PushResult.QUEUED
    assert drain(outbox) == ["cd", "ef"]


def test_clear() -> None:
    outbox = Outbox(max_bytes=100, max_messages=10)
    outbox.push(msg("a", E, key="k"))
    outbox.push(msg("bb"))
    outbox.push(msg("x" * 200, E))
    assert outbox.clear() == 2
    assert (len(outbox), outbox.nbytes, outbox.dropped) == (0, 0, 1)
    assert outbox.take_batch(100, 10) is None
    # The key went with its message.
    assert outbox.push(msg("a2", E, key="k")) is PushResult.QUEUED
    assert outbox.clear() == 1
    assert outbox.clear() == 0


def test_the_same_message_object_can_go_to_many_outboxes() -> None:
    shared = encode({"type": "message", "data": "hi"})
    outboxes = [Outbox(max_bytes=100, max_messages=10) for _ in range(3)]
    assert [o.push(shared) for o in outboxes] == [PushResult.QUEUED] * 3
    assert [o.take_batch(100, 10) for o in outboxes] == [shared.text] * 3


# -- property: accounting, bounds and order ------------------------------------------------


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, int, int, str | None]]:
    """("push", size, delivery, key) and ("take", max_bytes, max_messages, None)."""
    push = st.tuples(
        st.just("push"),
        st.integers(1, 40),
        st.integers(0, 1),
        st.none() | st.sampled_from(["a", "b", "c"]),
    )
    take = st.tuples(st.just("take"), st.integers(0, 80), st.integers(0, 6), st.none())
    return draw(st.lists(push | take, max_size=60))


@settings(max_examples=300, deadline=None)
@given(
    max_bytes=st.integers(1, 120),
    max_messages=st.integers(1, 8),
    ops=operations(),
)
def test_random_pushes_and_takes_keep_accounting_bounds_and_order(
    max_bytes: int, max_messages: int, ops: list[tuple[str, int, int, str | None]]
) -> None:
    outbox = Outbox(max_bytes, max_messages)
    # The model: queued (key, text) in order; coalescing replaces in place.
    model: list[tuple[str | None, str]] = []
    sent: list[str] = []  # split batches, in the order they were taken
    dropped = 0
    for serial, (op, a, b, key) in enumerate(ops):
        if op == "push":
            text = f"{serial}:".ljust(a, "x")  # unique, so order is checkable
            delivery = (D, E)[b]
            size = sum(len(t) for _, t in model)
            same = next((i for i, (k, _) in enumerate(model) if key is not None and k == key), None)
            if same is not None:
                fits = size - len(model[same][1]) + len(text) <= max_bytes
                expected = PushResult.COALESCED if fits else None
            else:
                fits = size + len(text) <= max_bytes and len(model) < max_messages
                expected = PushResult.QUEUED if fits else None
            if expected is None:
                expected = PushResult.DROPPED if delivery is E else PushResult.OVERFLOW
            assert outbox.push(msg(text, delivery, key)) is expected
            if expected is PushResult.QUEUED:
                model.append((key, text))
            elif expected is PushResult.COALESCED:
                assert same is not None
                model[same] = (key, text)
            elif expected is PushResult.DROPPED:
                dropped += 1
        else:
            frame = outbox.take_batch(a, b)
            if not model:
                assert frame is None
                continue
            assert frame is not None
            assert not frame.startswith("\n")
            assert not frame.endswith("\n")
            parts = frame.split("\n")
            assert "" not in parts
            assert parts == [t for _, t in model[: len(parts)]]
            del model[: len(parts)]
            # At least one; more only within both caps; stop only when the next
            # one would not fit.
            if len(parts) > 1:
                assert len(frame) <= a
                assert len(parts) <= b
            if model and len(parts) < max(b, 1):
                assert len(frame) + 1 + len(model[0][1]) > a
            sent.extend(parts)
        # The bounds and the accounting hold after every operation.
        assert len(outbox) == len(model) <= max_messages
        assert outbox.nbytes == sum(len(t) for _, t in model) <= max_bytes
        assert outbox.dropped == dropped
    # Everything accepted reaches the client once, in order, coalescing applied.
    assert drain(outbox) == [t for _, t in model]
    assert (outbox.nbytes, len(outbox)) == (0, 0)
    assert len(set(sent)) == len(sent)


# -- budget and burst allowance ------------------------------------------------------


def test_durable_messages_burst_past_the_budget_up_to_the_hard_bound() -> None:
    outbox = Outbox(max_bytes=10, max_messages=100, burst_bytes=25)
    assert outbox.push(msg("a" * 10)) is PushResult.QUEUED
    assert not outbox.over_budget
    assert outbox.push(msg("b" * 10)) is PushResult.QUEUED
    assert outbox.over_budget
    assert outbox.push(msg("e", E)) is PushResult.DROPPED  # ephemeral: only within budget
    assert outbox.push(msg("c" * 5)) is PushResult.QUEUED  # exactly the hard bound
    assert outbox.push(msg("d")) is PushResult.OVERFLOW
    assert (outbox.nbytes, len(outbox), outbox.dropped) == (25, 3, 1)
    assert not outbox.has_room_for(1)  # callers that wait see the budget, not the burst
    assert drain(outbox) == ["a" * 10, "b" * 10, "c" * 5]
    assert not outbox.over_budget


def test_the_count_budget_and_its_burst_bound() -> None:
    outbox = Outbox(max_bytes=1000, max_messages=2, burst_messages=3)
    for text in ("a", "b"):
        assert outbox.push(msg(text)) is PushResult.QUEUED
    assert not outbox.over_budget
    assert outbox.push(msg("t", E)) is PushResult.DROPPED
    assert outbox.push(msg("c")) is PushResult.QUEUED
    assert outbox.over_budget
    assert outbox.push(msg("d")) is PushResult.OVERFLOW


def test_push_without_burst_refuses_at_the_budget() -> None:
    outbox = Outbox(max_bytes=10, max_messages=100, burst_bytes=1000)
    assert outbox.push(msg("a" * 10), burst=False) is PushResult.QUEUED
    assert outbox.push(msg("b"), burst=False) is PushResult.OVERFLOW
    assert outbox.push(msg("k", D, key="k"), burst=False) is PushResult.OVERFLOW
    assert outbox.push(msg("b")) is PushResult.QUEUED


def test_coalescing_over_the_budget_uses_the_burst_allowance_for_durable_only() -> None:
    outbox = Outbox(max_bytes=10, max_messages=100, burst_bytes=20)
    assert outbox.push(msg("s1", D, key="s")) is PushResult.QUEUED
    assert outbox.push(msg("e1", E, key="e")) is PushResult.QUEUED
    assert outbox.push(msg("x" * 6)) is PushResult.QUEUED  # 10: at the budget
    assert outbox.push(msg("s-longer", D, key="s")) is PushResult.COALESCED
    assert outbox.push(msg("e-longer", E, key="e")) is PushResult.DROPPED
    assert drain(outbox) == ["s-longer", "e1", "x" * 6]


def test_bursts_are_bounded_by_the_shared_total() -> None:
    total = QueueTotal()
    a = Outbox(max_bytes=10, max_messages=100, burst_bytes=100, total=total, max_total_bytes=30)
    b = Outbox(max_bytes=10, max_messages=100, burst_bytes=100, total=total, max_total_bytes=30)
    assert a.push(msg("a" * 10)) is PushResult.QUEUED
    assert a.push(msg("a" * 10)) is PushResult.QUEUED  # a bursts: total 20
    assert b.push(msg("b" * 10)) is PushResult.QUEUED  # b within its budget: total 30
    assert a.push(msg("a")) is PushResult.OVERFLOW  # over budget and over the total
    assert b.push(msg("b")) is PushResult.OVERFLOW  # the same for b now
    assert total.nbytes == 30
    a.take_batch(10, 1)
    assert total.nbytes == 20
    assert b.push(msg("b" * 5)) is PushResult.QUEUED
    b.clear()
    assert total.nbytes == a.nbytes == 10


def test_a_burst_bound_below_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="burst_bytes"):
        Outbox(max_bytes=10, max_messages=10, burst_bytes=9)
    with pytest.raises(ValueError, match="burst_messages"):
        Outbox(max_bytes=10, max_messages=10, burst_messages=9)


TEXTS = {size: "x" * size for size in range(1, 31)}  # one object per size


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["push", "take"]),
            st.integers(1, 30),
            st.sampled_from([D, E]),
            st.sampled_from([None, "k1", "k2"]),
        ),
        max_size=60,
    )
)
def test_bounds_and_the_shared_total_hold_for_any_sequence(
    ops: list[tuple[str, int, Delivery, str | None]],
) -> None:
    total = QueueTotal()
    outbox = Outbox(max_bytes=50, max_messages=5, burst_bytes=120, burst_messages=9, total=total)
    for op, size, delivery, key in ops:
        if op == "push":
            result = outbox.push(msg(TEXTS[size], delivery, key))
            if delivery is E:
                assert result is not PushResult.OVERFLOW
        else:
            outbox.take_batch(size * 3, 3)
        assert outbox.nbytes <= 120
        assert len(outbox) <= 9
        # Repeated texts (the same object) are memory once.
        assert total.nbytes <= outbox.nbytes
        assert outbox.over_budget == (outbox.nbytes > 50 or len(outbox) > 5)
    drain(outbox)
    assert total.nbytes == outbox.nbytes == 0


def test_a_message_fanned_out_to_many_outboxes_is_memory_once() -> None:
    total = QueueTotal()
    shared = msg("m" * 100)
    outboxes = [
        Outbox(max_bytes=150, max_messages=10, burst_bytes=1000, total=total, max_total_bytes=250)
        for _ in range(50)
    ]
    for outbox in outboxes:
        assert outbox.push(shared) is PushResult.QUEUED
    assert total.nbytes == 100  # not 50 * 100
    other = msg("n" * 100)
    for outbox in outboxes:
        assert outbox.push(other) is PushResult.QUEUED  # over budget: the burst allowance
    assert total.nbytes == 200
    # A third distinct text would pass the process-wide limit for a queue over
    # its budget; the same text already held costs nothing and is accepted.
    assert outboxes[0].push(msg("o" * 100)) is PushResult.OVERFLOW
    assert outboxes[0].push(other) is PushResult.QUEUED
    for outbox in outboxes[:-1]:
        drain(outbox)
    assert total.nbytes == 200  # the last outbox still holds both texts
    drain(outboxes[-1])
    assert total.nbytes == 0
