"""Rate limiting without a clock: callers pass ``now`` (seconds, any epoch)."""

from __future__ import annotations

from collections import deque

__all__ = ["TokenBucket", "WindowCounter"]

# Refill is ``elapsed * rate`` in floating point, which can fall an ulp or so
# short (0.15 - 0.10 == 0.04999999999999999): without slack a client pacing
# itself at exactly ``rate`` would now and then be refused. A millionth of a
# token is far below anything a client could exploit.
_SLACK = 1e-6


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, holding at most ``burst``.

    Starts full. :meth:`take` spends ``cost`` tokens (one by default) if there
    are that many; :meth:`charge` spends them regardless, so the balance can
    go below zero (a debt the refill pays back before the next :meth:`take`).
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        # ``not rate > 0`` also refuses NaN, which would empty the bucket forever.
        if not rate > 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate!r} and {burst!r}")
        #: Tokens added per second.
        self.rate = rate
        #: Capacity of the bucket.
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens at time ``now``; False (nothing spent) if fewer are left."""
        self._refill(now)
        if self._tokens >= cost - _SLACK:
            self._tokens -= cost
            return True
        return False

    def charge(self, now: float, cost: float) -> None:
        """Spend ``cost`` tokens at time ``now`` even if the balance goes below zero."""
        self._refill(now)
        self._tokens -= cost

    def tokens(self, now: float) -> float:
        """The balance at time ``now`` (negative while a debt is being paid back)."""
        self._refill(now)
        return self._tokens

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now


class WindowCounter:
    """Counts events in a sliding time window, remembering at most ``limit + 1``.

    :meth:`hit` records one event and says whether the count within the last
    ``window`` seconds now exceeds ``limit``.
    """

    __slots__ = ("_stamps", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        # A window <= 0 would expire every event at once (the counter would
        # never fire); a negative limit is meaningless (and -2 or less would
        # fail obscurely in deque()).
        if limit < 0 or not window > 0:
            raise ValueError(f"limit must be >= 0 and window > 0, got {limit!r} and {window!r}")
        #: Events allowed within the window.
        self.limit = limit
        #: Window length in seconds.
        self.window = window
        # Made on the first event: most connections never have one, and an
        # empty deque already holds a block of 64 slots.
        self._stamps: deque[float] | None = None

    def hit(self, now: float) -> bool:
        """Record an event at ``now``; True if more than ``limit`` fall in the window."""
        stamps = self._stamps
        if stamps is None:
            stamps = self._stamps = deque(maxlen=self.limit + 1)
        stamps.append(now)
        return self.count(now) > self.limit

    def count(self, now: float) -> int:
        """How many recorded events fall in the window ending at ``now`` (at most ``limit + 1``)."""
        stamps = self._stamps
        if stamps is None:
            return 0
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        return len(stamps)
