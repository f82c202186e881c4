"""What a client may ask of the server: one budget per connection, a cost per frame.

Theory of operation
-------------------

Every frame a client sends makes the server work: a ``publish`` is sequenced
and fanned out, a ``join`` reads the room's position, an application message
runs a handler, a ``history`` request may answer with a quarter of a megabyte.
One :class:`FrameBudget` per connection pays for all of them.

Rule 1: **one bucket, a price per frame type.** The budget is a
:class:`~chatcore.sansio.TokenBucket` (``rate`` tokens per second, at most
``burst``). Before a frame is handled, its type's cost is taken from the
bucket (:meth:`FrameBudget.spend`); if the bucket does not hold that much the
frame is refused (``rate_limited``) and nothing else happens.

Rule 2: **an answer costs what it weighs.** What the server sends back to
the asker (a reply, a replayed backlog) is charged after the fact by size
(:meth:`FrameBudget.charge_bytes`): the frame's own cost covers the first
``reply_bytes_per_token`` bytes, each further ``reply_bytes_per_token`` one
more token.
The charge may leave the bucket in debt: the next frames are refused until
the refill has paid it back. So a cheap request with an expensive answer is
paid for by its answer.

Work the server does on the client's behalf besides answering it (the
fan-out of its ephemeral broadcasts) is charged the same way
(:meth:`FrameBudget.charge`).

Rule 3: **sustained abuse ends the connection.** Every refusal is counted in
a sliding window; more than ``abuse_limit`` refusals within ``abuse_window``
seconds is :attr:`Spend.ABUSE`, and the hub closes the connection with 1008.
A client that backs off when refused never gets there.

Nothing here reads a clock: callers pass ``now``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from ._limits import TokenBucket, WindowCounter

__all__ = ["DEFAULT_FRAME_COSTS", "FrameBudget", "Spend"]

#: Tokens each built-in frame type costs by default (application types: 1).
DEFAULT_FRAME_COSTS: Mapping[str, float] = {
    "publish": 1.0,
    "join": 1.0,
    "leave": 1.0,
    "ping": 0.5,
    "pong": 0.1,
}


class Spend(enum.Enum):
    """What :meth:`FrameBudget.spend` decided."""

    #: Paid: handle the frame.
    OK = "ok"
    #: Not enough tokens: answer ``rate_limited``, do nothing else.
    REFUSED = "refused"
    #: Refused, and too often: close the connection with 1008.
    ABUSE = "abuse"


class FrameBudget:
    """The budget of one connection (see the module docs).

    Args:
        rate: Tokens added per second.
        burst: Most tokens held (the bucket starts full).
        abuse_limit: Refusals allowed within ``abuse_window``; one more is abuse.
        abuse_window: Seconds of the refusal window.
        reply_bytes_per_token: Bytes sent back to the client that cost one token.
        now: The time the budget starts.

    Raises:
        ValueError: on a rate, burst, window or byte price that is not positive.
    """

    __slots__ = ("_bucket", "_refusals", "reply_bytes_per_token")

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        abuse_limit: int,
        abuse_window: float,
        reply_bytes_per_token: int,
        now: float,
    ) -> None:
        if reply_bytes_per_token < 1:
            raise ValueError(f"reply_bytes_per_token must be >= 1, got {reply_bytes_per_token!r}")
        self._bucket = TokenBucket(rate, burst, now)
        self._refusals = WindowCounter(abuse_limit, abuse_window)
        #: Bytes of answer that cost one token.
        self.reply_bytes_per_token = reply_bytes_per_token

    def __repr__(self) -> str:
        bucket = self._bucket
        return f"<FrameBudget rate={bucket.rate}/s burst={bucket.burst}>"

    def spend(self, cost: float, now: float) -> Spend:
        """Pay ``cost`` tokens for a frame at ``now``, or say why not."""
        if self._bucket.take(now, cost):
            return Spend.OK
        if self._refusals.hit(now):
            return Spend.ABUSE
        return Spend.REFUSED

    def charge(self, cost: float, now: float) -> None:
        """Charge ``cost`` tokens for work done on the client's behalf (may leave a debt)."""
        self._bucket.charge(now, cost)

    def charge_bytes(self, nbytes: int, now: float) -> None:
        """Charge an answer of ``nbytes`` sent to the client (may leave a debt).

        The first ``reply_bytes_per_token`` bytes are free (the frame paid for them).
        """
        extra = nbytes - self.reply_bytes_per_token
        if extra > 0:
            self._bucket.charge(now, extra / self.reply_bytes_per_token)

    def tokens(self, now: float) -> float:
        """The balance at ``now`` (below zero while a debt is paid back)."""
        return self._bucket.tokens(now)
