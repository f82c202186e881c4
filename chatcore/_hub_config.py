"""The hub's settings and statistics: :class:`HubConfig`, :class:`HubStatistics`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from ._config import _positive, _positive_or_none
from .sansio._budget import DEFAULT_FRAME_COSTS

__all__ = ["HubConfig", "HubStatistics"]


def _origins(value: Iterable[str] | None) -> frozenset[str] | None:
    # A typed converter: with ``optional(frozenset)`` mypy cannot infer the
    # parameter type, and passing a set of origins fails type checking.
    return None if value is None else frozenset(value)


def _costs(value: Mapping[str, float]) -> Mapping[str, float]:
    # The defaults, overridden by what was given; read-only (the config is frozen).
    return MappingProxyType({**DEFAULT_FRAME_COSTS, **value})


def _non_negative_costs(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    unknown = set(value) - set(DEFAULT_FRAME_COSTS)
    if unknown:
        raise ValueError(
            f"HubConfig.frame_costs: {sorted(unknown)} are not built-in frame types "
            "(application types declare their cost with Hub.on(type, cost=...))"
        )
    for kind, cost in value.items():
        if not cost >= 0:
            raise ValueError(f"HubConfig.frame_costs[{kind!r}] must be >= 0, got {cost!r}")


@attrs.frozen
class HubConfig:
    """Limits of a hub, with the documented defaults (``docs/protocol.md``).

    Attributes:
        max_rooms_per_connection: Rooms one connection may be in (``too_many_rooms``).
        max_connections_per_user: Open connections per user (429 at the handshake).
        max_connections_per_address: Per client address (429); ``None``: no limit
            (behind a proxy every client shares one address).
        max_connections: Connections of this hub (503 at the handshake); ``None``: no limit.
        publish_rate: Tokens per second of each connection's frame budget
            (a publish costs one: this is the sustained publish rate).
        publish_burst: Capacity of the frame budget (tokens).
        frame_costs: Tokens each built-in frame type costs (``publish``,
            ``join``, ``leave``, ``ping``, ``pong``); the given entries override
            the defaults (1, 1, 1, 0.5, 0.1). Application types cost what their
            :meth:`Hub.on <chatcore.Hub.on>` declares (default 1).
        reply_bytes_per_token: Bytes of an answer to a request (its reply
            and replayed backlog) beyond which each as many bytes more cost the
            connection one more token (the request's own cost covers the first).
        rate_limit_abuse: ``rate_limited`` answers within ``abuse_window`` after
            which the connection is closed with 1008.
        abuse_window: Seconds of the window for ``rate_limit_abuse``.
        bad_frame_limit: Bad frames (bad_json, bad_message, unknown_type) answered
            within ``bad_frame_window``; the next one closes with 1008.
        bad_frame_window: Seconds of the bad-frame window.
        allowed_origins: Browser origins allowed to connect (403 otherwise); a
            request without ``Origin`` (not a browser) is judged by authenticate
            alone. ``None``: no Origin check.
        retry_after: Seconds announced in ``Retry-After`` on 503 refusals.
        presence: Track who is in each room: ``presence_state`` on join and
            ``presence_diff`` after (off by default: it costs traffic).
        presence_grace: Seconds a user stays present after their last
            connection in a room closed, so reconnects and deploys do not flap.
        reconnect_min_ms: Lower bound of the jittered ``reconnect_after_ms`` sent
            in ``shutdown`` during a drain.
        reconnect_max_ms: Upper bound of it (spreads the reconnect storm).
        ephemeral_deliveries_per_token: Deliveries of an ephemeral broadcast
            made on behalf of a client (``Hub.broadcast`` from its message
            handler, e.g. a typing indicator) that cost it one more token: a
            broadcast to a room of n members here costs n / this.
        max_rooms: Rooms with members on this process (``at_capacity``);
            ``None``: no limit.
        new_rooms_per_user: Rooms a user may open (join while no one here is
            in them) within ``new_room_window`` (``too_many_new_rooms``);
            ``None``: no limit.
        new_room_window: Seconds of that window.
    """

    max_rooms_per_connection: int = attrs.field(default=100, validator=_positive)
    max_connections_per_user: int = attrs.field(default=20, validator=_positive)
    max_connections_per_address: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_connections: int | None = attrs.field(default=None, validator=_positive_or_none)
    publish_rate: float = attrs.field(default=20.0, validator=_positive)
    publish_burst: int = attrs.field(default=40, validator=_positive)
    rate_limit_abuse: int = attrs.field(default=200, validator=_positive)
    abuse_window: float = attrs.field(default=60.0, validator=_positive)
    bad_frame_limit: int = attrs.field(default=10, validator=_positive)
    bad_frame_window: float = attrs.field(default=60.0, validator=_positive)
    allowed_origins: frozenset[str] | None = attrs.field(default=None, converter=_origins)
    retry_after: int = attrs.field(default=5, validator=_positive)
    presence: bool = False
    presence_grace: float = attrs.field(default=5.0, validator=_positive)
    reconnect_min_ms: int = attrs.field(default=500, validator=_positive)
    reconnect_max_ms: int = attrs.field(default=5_000, validator=_positive)
    frame_costs: Mapping[str, float] = attrs.field(
        factory=dict, converter=_costs, validator=_non_negative_costs
    )
    reply_bytes_per_token: int = attrs.field(default=16_384, validator=_positive)
    ephemeral_deliveries_per_token: int = attrs.field(default=100, validator=_positive)
    max_rooms: int | None = attrs.field(default=50_000, validator=_positive_or_none)
    new_rooms_per_user: int | None = attrs.field(default=30, validator=_positive_or_none)
    new_room_window: float = attrs.field(default=60.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.reconnect_min_ms > self.reconnect_max_ms:
            raise ValueError("HubConfig.reconnect_min_ms must not exceed reconnect_max_ms")


@attrs.frozen
class HubStatistics:
    """A snapshot of a hub (cheap: counters only).

    Attributes:
        connections: Open connections registered in the hub.
        users: Distinct users with at least one connection.
        rooms: Rooms with at least one member.
        published: Room messages that were given an offset.
        delivered: Messages queued into an outbox (room messages and server sends).
        dropped: Ephemeral messages dropped for a full outbox.
        coalesced: Ephemeral messages that replaced a queued one with the same key.
        slow_consumer_disconnects: Connections closed as slow consumers (4001:
            no progress while over budget, past the hard bound, or a stalled send).
        rejected_handshakes: Handshakes refused (401/403/429/503).
        rate_limited: Frames refused for an empty frame budget (``rate_limited``).
        refused_rooms: Joins refused by the process room cap or the per-user
            new-room rate (``at_capacity``, ``too_many_new_rooms``).
    """

    connections: int
    users: int
    rooms: int
    published: int
    delivered: int
    dropped: int
    coalesced: int
    slow_consumer_disconnects: int
    rejected_handshakes: int
    rate_limited: int = 0
    refused_rooms: int = 0
