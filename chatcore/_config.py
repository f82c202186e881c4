"""Configuration of chatcore's connections: every bound in one place."""

from __future__ import annotations

from typing import Any

import attrs

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


@attrs.frozen
class Config:
    """Bounds and timings of every connection. All defaults are production defaults.

    Every queue is bounded and every wait has a deadline; a value that would
    make a bound meaningless (zero, negative, inconsistent) raises
    :class:`ValueError` at construction.

    Attributes:
        max_message_bytes: Largest inbound text message (UTF-8 bytes). Larger
            closes the connection with 1009.
        outbox_max_bytes: Byte bound of a connection's outbox (≈1 MiB).
        outbox_max_messages: Count bound of a connection's outbox.
        batch_max_bytes: Largest frame the writer assembles from queued messages.
        batch_max_messages: Most messages the writer puts in one frame.
        inbox_size: Received messages buffered before the reader stops reading
            (backpressure to the client's TCP window).
        handshake_timeout: Seconds for the opening handshake, authentication included.
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
    outbox_max_messages: int = attrs.field(default=16_384, validator=_positive)
    batch_max_bytes: int = attrs.field(default=262_144, validator=_positive)
    batch_max_messages: int = attrs.field(default=1_024, validator=_positive)
    inbox_size: int = attrs.field(default=16, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
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
        for name in (
            "max_message_bytes",
            "outbox_max_bytes",
            "outbox_max_messages",
            "batch_max_bytes",
            "batch_max_messages",
            "inbox_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Config.{name} must be an int, got {value!r}")
