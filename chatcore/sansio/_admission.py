"""Admission: which handshakes a server takes, counted by reservations.

Theory of operation
-------------------

Every accepted handshake holds one *reservation* from the moment it is
accepted until its connection has closed, whether or not it ever got as far
as being served. Limits count reservations, so a burst of handshakes cannot
slip past a limit while earlier ones are still opening.

Rule 1: **refuse cheaply first.** :meth:`Admission.screen` runs before the
application's authenticate hook: draining and capacity (503 with
``Retry-After``) and the browser ``Origin`` (403) need no identity.

Rule 2: **decide and reserve in one step.** :meth:`Admission.admit` runs
after the hook, re-checks draining and capacity (the hook may have waited),
then the per-user and per-address limits (429), and reserves. Nothing can
happen between the check and the reservation.

Rule 3: **every reservation is released once**, by :meth:`Admission.release`
with the same user and address, when the connection has closed.

=======================  ======  =====================================
condition                status  body
=======================  ======  =====================================
draining                 503     ``server is draining; reconnect shortly``
at ``max_connections``   503     ``server at capacity``
Origin not allowed       403     ``origin not allowed``
user at its limit        429     ``too many connections for this user``
address at its limit     429     ``too many connections from this address``
=======================  ======  =====================================
"""

from __future__ import annotations

from collections.abc import Iterable

from ._handshake import Accept, Reject

__all__ = ["Admission"]


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class Admission:
    """Connection limits and reservations (see the module docs).

    Args:
        max_connections: Reservations in all; ``None``: no limit.
        max_per_user: Reservations per user.
        max_per_address: Reservations per client address; ``None``: no limit.
        allowed_origins: Browser origins allowed; ``None``: any.
        retry_after: Seconds announced in ``Retry-After`` on 503.
    """

    __slots__ = (
        "_addresses",
        "_users",
        "allowed_origins",
        "draining",
        "max_connections",
        "max_per_address",
        "max_per_user",
        "rejected",
        "reserved",
        "retry_after",
    )

    def __init__(
        self,
        *,
        max_connections: int | None = None,
        max_per_user: int = 20,
        max_per_address: int | None = None,
        allowed_origins: Iterable[str] | None = None,
        retry_after: int = 5,
    ) -> None:
        #: Reservations in all (``None``: no limit).
        self.max_connections = max_connections
        #: Reservations per user.
        self.max_per_user = max_per_user
        #: Reservations per client address (``None``: no limit).
        self.max_per_address = max_per_address
        #: Browser origins allowed (``None``: any).
        self.allowed_origins = None if allowed_origins is None else frozenset(allowed_origins)
        #: Seconds announced in ``Retry-After`` on 503.
        self.retry_after = retry_after
        #: While True every handshake is refused with 503.
        self.draining = False
        #: Reservations held (accepted handshakes not yet closed).
        self.reserved = 0
        #: Handshakes refused so far (by this object or counted by :meth:`count_rejection`).
        self.rejected = 0
        self._users: dict[str, int] = {}
        self._addresses: dict[str, int] = {}

    def __repr__(self) -> str:
        state = "DRAINING" if self.draining else "OPEN"
        return f"<Admission {state} reserved={self.reserved} rejected={self.rejected}>"

    def reserved_by(self, user: str) -> int:
        """Reservations held by ``user``."""
        return self._users.get(user, 0)

    def screen(self, origin: str | None) -> Reject | None:
        """The checks before authentication: draining, capacity, Origin.

        Returns:
            The refusal, or ``None`` to go on.
        """
        refusal = self._closed()
        if refusal is not None:
            return refusal
        if (
            self.allowed_origins is not None
            and origin is not None
            and origin not in self.allowed_origins
        ):
            return self.refuse(403, "origin not allowed")
        return None

    def admit(self, identity: object, user: str, address: str | None) -> Accept | Reject:
        """Check the limits again and reserve: ``Accept(identity)`` or the refusal."""
        refusal = self._closed()
        if refusal is not None:
            return refusal
        if self._users.get(user, 0) >= self.max_per_user:
            return self.refuse(429, "too many connections for this user")
        if (
            self.max_per_address is not None
            and address is not None
            and self._addresses.get(address, 0) >= self.max_per_address
        ):
            return self.refuse(429, "too many connections from this address")
        self.reserved += 1
        self._users[user] = self._users.get(user, 0) + 1
        if address is not None:
            self._addresses[address] = self._addresses.get(address, 0) + 1
        return Accept(identity)

    def release(self, user: str, address: str | None) -> None:
        """Give back the reservation :meth:`admit` made for ``user`` and ``address``."""
        self.reserved -= 1
        _decrement(self._users, user)
        if address is not None:
            _decrement(self._addresses, address)

    def refuse(self, status: int, body: str, headers: tuple[tuple[str, str], ...] = ()) -> Reject:
        """A counted refusal (503 refusals also get ``Retry-After``)."""
        self.rejected += 1
        if status == 503 and not headers:
            headers = (("retry-after", str(self.retry_after)),)
        return Reject(status, body.encode(), headers)

    def count_rejection(self) -> None:
        """Count a refusal decided elsewhere (the application's own hook)."""
        self.rejected += 1

    def _closed(self) -> Reject | None:
        if self.draining:
            return self.refuse(503, "server is draining; reconnect shortly")
        if self.max_connections is not None and self.reserved >= self.max_connections:
            return self.refuse(503, "server at capacity")
        return None
