"""Rate limits without a clock: TokenBucket and WindowCounter (plain synchronous tests)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore.sansio._limits import TokenBucket, WindowCounter


def takes(bucket: TokenBucket, now: float, n: int) -> list[bool]:
    return [bucket.take(now) for _ in range(n)]


# -- TokenBucket -------------------------------------------------------------------------


def test_bucket_starts_full() -> None:
    bucket = TokenBucket(rate=1.0, burst=5, now=100.0)
    assert takes(bucket, 100.0, 5) == [True] * 5
    assert not bucket.take(100.0)
    assert not bucket.take(100.0)


def test_bucket_burst_of_one() -> None:
    bucket = TokenBucket(rate=2.0, burst=1, now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.25)  # half a token
    assert bucket.take(0.5)
    assert not bucket.take(0.5)


def test_protocol_default_20_per_second_burst_40() -> None:
    # docs/protocol.md: publishes per connection, token bucket 20/s, burst 40.
    bucket = TokenBucket(rate=20.0, burst=40, now=0.0)
    assert takes(bucket, 0.0, 41) == [True] * 40 + [False]
    # One token takes 1/20 s to come back: not before...
    assert not bucket.take(0.049)
    # ...and exactly then (0.049 s worth was already credited above).
    assert bucket.take(0.05)
    assert not bucket.take(0.05)
    # A second later, exactly 20 more.
    assert takes(bucket, 1.05, 21) == [True] * 20 + [False]


@pytest.mark.parametrize("start", [0.0, 123_456.789])  # trio's clock starts at a random offset
def test_bucket_sustains_exactly_its_rate(start: float) -> None:
    # Publishing at exactly 20/s never runs dry once the burst is spent, even
    # though e.g. 0.15 - 0.10 is a hair under 0.05 in floating point...
    bucket = TokenBucket(rate=20.0, burst=40, now=start)
    assert takes(bucket, start, 40) == [True] * 40
    refused = [i for i in range(1, 2001) if not bucket.take(start + i / 20)]
    assert refused == []
    # ...and there is nothing left over for one more in the same instant.
    assert not bucket.take(start + 2000 / 20)


def test_bucket_refills_with_fractional_time() -> None:
    bucket = TokenBucket(rate=4.0, burst=2, now=0.0)
    assert takes(bucket, 0.0, 2) == [True, True]
    # Quarter tokens add up across calls that fail.
    assert not bucket.take(0.0625)  # 0.25 token
    assert not bucket.take(0.125)  # 0.5
    assert not bucket.take(0.1875)  # 0.75
    assert bucket.take(0.25)  # 1.0
    assert not bucket.take(0.25)
    # 1.5 tokens: one take, half a token kept for later.
    assert bucket.take(0.625)
    assert not bucket.take(0.625)
    assert bucket.take(0.75)


def test_bucket_never_exceeds_burst_after_a_long_idle() -> None:
    bucket = TokenBucket(rate=20.0, burst=40, now=0.0)
    assert takes(bucket, 0.0, 40) == [True] * 40
    assert takes(bucket, 1e6, 41) == [True] * 40 + [False]


def test_bucket_ignores_time_going_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, now=10.0)
    assert takes(bucket, 10.0, 2) == [True, True]
    # An earlier ``now`` adds nothing (and does not move the refill reference).
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_bucket_works_with_any_epoch() -> None:
    # ``now`` is whatever clock the caller uses (trio.current_time() may be huge).
    bucket = TokenBucket(rate=10.0, burst=1, now=1e9)
    assert bucket.take(1e9)
    assert not bucket.take(1e9 + 0.05)
    assert bucket.take(1e9 + 0.1)


def test_bucket_attributes() -> None:
    bucket = TokenBucket(rate=20.0, burst=40, now=0.0)
    assert (bucket.rate, bucket.burst) == (20.0, 40)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0, 1), (-1, 1), (math.nan, 1), (-math.inf, 1), (1, 0), (1, -1)],
)
def test_bucket_invalid_arguments_raise(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate must be > 0 and burst >= 1"):
        TokenBucket(rate, burst, now=0.0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=1000),
    burst=st.integers(min_value=1, max_value=100),
    steps=st.lists(st.floats(min_value=0, max_value=10), max_size=50),
)
def test_bucket_never_grants_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, steps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    granted = 0
    for step in steps:
        now += step
        while bucket.take(now):
            granted += 1
            assert granted <= burst + rate * now + 1e-6
    assert granted <= burst + rate * now + 1e-6


# -- WindowCounter -----------------------------------------------------------------------


def test_window_the_limit_plus_one_th_hit_exceeds() -> None:
    counter = WindowCounter(limit=3, window=10.0)
    assert [counter.hit(t) for t in (0.0, 1.0, 2.0)] == [False, False, False]
    assert counter.hit(3.0)
    # It stays exceeded while limit+1 events are within the window.
    assert counter.hit(4.0)


def test_window_all_hits_at_one_instant() -> None:
    counter = WindowCounter(limit=2, window=1.0)
    assert [counter.hit(5.0) for _ in range(4)] == [False, False, True, True]


def test_window_old_hits_expire() -> None:
    counter = WindowCounter(limit=2, window=10.0)
    assert not counter.hit(0.0)
    assert not counter.hit(1.0)
    # At 10.5 the hit at 0.0 is older than the window: 2 hits in it, not 3.
    assert not counter.hit(10.5)
    # At 11.0 the hit at 1.0 is exactly 10 s old: expired too.
    assert not counter.hit(11.0)
    assert counter.hit(11.0)


def test_window_boundary_exactly_window_seconds_old_is_expired() -> None:
    counter = WindowCounter(limit=1, window=60.0)
    assert not counter.hit(0.0)
    assert counter.hit(59.999)  # 0.0 is still in the window
    counter = WindowCounter(limit=1, window=60.0)
    assert not counter.hit(0.0)
    assert not counter.hit(60.0)  # 0.0 is exactly 60 s old: gone


def test_window_limit_zero_fires_on_every_hit() -> None:
    counter = WindowCounter(limit=0, window=1.0)
    assert counter.hit(0.0)
    assert counter.hit(5.0)


def test_window_memory_is_bounded() -> None:
    counter = WindowCounter(limit=10, window=60.0)
    for i in range(100_000):
        counter.hit(i * 1e-6)  # all within the window
    assert counter._stamps.maxlen == 11
    assert len(counter._stamps) == 11
    assert (counter.limit, counter.window) == (10, 60.0)


def test_window_bounded_memory_does_not_forget_a_burst() -> None:
    # Dropping the oldest stamps (beyond limit + 1) must not hide that the
    # newest limit + 1 are all within the window.
    counter = WindowCounter(limit=3, window=1.0)
    for i in range(50):
        assert counter.hit(i * 0.01) is (i >= 3)
    # After a quiet window, the count starts from zero again.
    assert [counter.hit(10.0 + i) for i in range(5)] == [False] * 5


@pytest.mark.parametrize(
    ("limit", "window"), [(-1, 1.0), (-2, 1.0), (1, 0.0), (1, -1.0), (1, math.nan)]
)
def test_window_invalid_arguments_raise(limit: int, window: float) -> None:
    with pytest.raises(ValueError, match="limit must be >= 0 and window > 0"):
        WindowCounter(limit, window)


def test_bad_frame_rule_10_within_60_s_answered_11th_closes() -> None:
    # docs/protocol.md: "bad_json, bad_message and unknown_type count; 10 within
    # 60 s are answered, the 11th closes with 1008." The hub answers while
    # hit() is False and closes on the first True (HubConfig.bad_frame_limit=10,
    # bad_frame_window=60).
    counter = WindowCounter(10, 60.0)
    answered = [not counter.hit(t) for t in range(0, 50, 5)]  # 10 bad frames in 45 s
    assert answered == [True] * 10
    assert counter.hit(59.0)  # the 11th within 60 s of the first: close


def test_bad_frame_rule_is_a_sliding_window() -> None:
    counter = WindowCounter(10, 60.0)
    assert not any(counter.hit(float(t)) for t in range(10))  # t = 0..9
    # At t = 60 the frame from t = 0 is exactly 60 s old and no longer counts.
    assert not counter.hit(60.0)
    # At t = 60.5 the one from t = 1 still counts: 11 within 60 s.
    assert counter.hit(60.5)


def test_bad_frame_rule_a_steady_trickle_is_never_closed() -> None:
    # One bad frame every 6 s is exactly 10 per 60 s: always answered.
    counter = WindowCounter(10, 60.0)
    assert not any(counter.hit(6.0 * i) for i in range(1_000))
    # Any faster, and the 11th within a window closes.
    counter = WindowCounter(10, 60.0)
    assert any(counter.hit(5.9 * i) for i in range(11))


def test_rate_limit_abuse_rule_200_within_60_s() -> None:
    # docs/protocol.md: more than 200 rate_limited answers within 60 s -> 1008
    # (HubConfig.rate_limit_abuse=200, abuse_window=60).
    counter = WindowCounter(200, 60.0)
    assert not any(counter.hit(i * 0.1) for i in range(200))
    assert counter.hit(20.0)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=0, max_value=8),
    window=st.floats(min_value=0.5, max_value=20),
    gaps=st.lists(st.floats(min_value=0, max_value=5), max_size=60),
)
def test_window_matches_a_naive_count(limit: int, window: float, gaps: list[float]) -> None:
    counter = WindowCounter(limit, window)
    now = 0.0
    history: list[float] = []
    for gap in gaps:
        now += gap
        history.append(now)
        # The same comparison as the implementation, on the full history.
        in_window = [t for t in history if t > now - window]
        assert counter.hit(now) is (len(in_window) > limit)
