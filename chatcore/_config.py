"""Configuration of chatcore's connections: every bound in one place."""

from __future__ import annotations

from typing import Any

import attrs

from .sansio._handshake_limits import HandshakeLimits

__all__ = ["Config"]


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: the value must be > 0 (shared by chatcore's config classes)."""
    if not value > 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be > 0, got {value!r}")


def _positive_or_none(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: ``None`` (no limit) or a value > 0."""
    if value is not None and not value > 0:
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be > 0 or None, got {value!r}"
        )


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: the value must be >= 0 (0 turns the feature off)."""
    if not value >= 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class Config:
    """Bounds and timings of every connection. All defaults are production defaults.

    Every queue is bounded and every wait has a deadline; a value that would
    make a bound meaningless (zero, negative, inconsistent) raises
    :class:`ValueError` at construction.

    Attributes:
        max_message_bytes: Largest inbound text message (UTF-8 bytes). Larger
            closes the connection with 1009.
        outbox_max_bytes: A connection's outbox *budget* (1 MiB). Under it
            every message is queued; over it ephemeral messages are dropped,
            and the connection must keep making progress (below).
        outbox_burst_bytes: Hard bound on a connection's outbox (16 MiB):
            durable messages may take it over the budget up to this, so that a
            burst of large messages never closes a healthy reader. A durable
            message that would pass it closes the connection with 4001.
        outbox_max_messages: A connection's outbox budget by count (16,384).
        outbox_burst_messages: Hard count bound of a connection's outbox
            (262,144), like ``outbox_burst_bytes``.
        slow_consumer_timeout: Seconds a connection may stay over its budget
            without its writer completing a frame; then it is a slow consumer
            (4001) and its transport is aborted. Checked every 0.1 s, like
            ``send_timeout``.
        max_queued_bytes: Memory of the messages queued across every
            connection of the process (256 MiB; a message fanned out to many
            connections counts once) beyond which no outbox may grow past its
            budget with a message that adds memory: the
            connections that are behind are closed (4001), the others are
            untouched. With ``N`` connections the outboxes hold at most about
            ``max_queued_bytes + N * outbox_max_bytes``.
        batch_delay: Longest delay (seconds) the writer's wake-up may be held
            back so that messages arriving in the same burst leave in one
            frame (50 ms). The delay ends as soon as the process has nothing
            else to run, so an idle connection gets each message at once; the
            whole delay is spent only while the process is busy without a
            pause, and then it is what makes each frame carry many messages.
            0 turns batching of wake-ups off.
        batch_max_bytes: Largest frame the writer assembles from queued messages.
        batch_max_messages: Most messages the writer puts in one frame.
        inbox_size: Received messages buffered before the reader stops reading
            (backpressure to the client's TCP window).
        handshake_timeout: Seconds for the opening handshake, authentication included.
        handshake_limits: Bounds on the handshake's request line and headers
            (:class:`~chatcore.HandshakeLimits`; over them: 414 or 431).
        close_timeout: Seconds for a close: flushing what was queued, the close
            frame, and the peer's answer. Past it the transport is aborted.
        send_timeout: Seconds one frame may take to be written. A send that
            stalls longer marks the client a slow consumer (4001) and aborts
            the transport.
        heartbeat_interval: Seconds between the server's ``ping`` messages.
        heartbeat_timeout: Seconds a client has to answer (any message counts)
            before the connection closes with 4000.
    """

    max_message_bytes: int = attrs.field(default=65_536, validator=_positive)
    outbox_max_bytes: int = attrs.field(default=1_048_576, validator=_positive)
    outbox_burst_bytes: int = attrs.field(default=16_777_216, validator=_positive)
    outbox_max_messages: int = attrs.field(default=16_384, validator=_positive)
    outbox_burst_messages: int = attrs.field(default=262_144, validator=_positive)
    slow_consumer_timeout: float = attrs.field(default=5.0, validator=_positive)
    max_queued_bytes: int = attrs.field(default=268_435_456, validator=_positive)
    batch_delay: float = attrs.field(default=0.050, validator=_non_negative)
    batch_max_bytes: int = attrs.field(default=262_144, validator=_positive)
    batch_max_messages: int = attrs.field(default=1_024, validator=_positive)
    inbox_size: int = attrs.field(default=16, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    handshake_limits: HandshakeLimits = attrs.field(factory=HandshakeLimits)
    close_timeout: float = attrs.field(default=5.0, validator=_positive)
    send_timeout: float = attrs.field(default=10.0, validator=_positive)
    heartbeat_interval: float = attrs.field(default=25.0, validator=_positive)
    heartbeat_timeout: float = attrs.field(default=20.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.batch_max_bytes > self.outbox_max_bytes:
            raise ValueError(
                "Config.batch_max_bytes must not exceed outbox_max_bytes "
                f"({self.batch_max_bytes} > {self.outbox_max_bytes})"
            )
        if self.outbox_burst_bytes < self.outbox_max_bytes:
            raise ValueError(
                "Config.outbox_burst_bytes must not be below outbox_max_bytes "
                f"({self.outbox_burst_bytes} < {self.outbox_max_bytes})"
            )
        if self.outbox_burst_messages < self.outbox_max_messages:
            raise ValueError(
                "Config.outbox_burst_messages must not be below outbox_max_messages "
                f"({self.outbox_burst_messages} < {self.outbox_max_messages})"
            )
        for name in (
            "max_message_bytes",
            "outbox_max_bytes",
            "outbox_burst_bytes",
            "outbox_max_messages",
            "outbox_burst_messages",
            "max_queued_bytes",
            "batch_max_bytes",
            "batch_max_messages",
            "inbox_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Config.{name} must be an int, got {value!r}")
