"""Every bound is validated at construction, with the class and field named."""

from __future__ import annotations

from typing import Any

import pytest

from chatcore import Config, HistoryConfig, HubConfig


@pytest.mark.parametrize(
    ("cls", "field"),
    [
        (Config, "outbox_max_bytes"),
        (Config, "close_timeout"),
        (Config, "heartbeat_interval"),
        (HubConfig, "publish_rate"),
        (HubConfig, "max_connections"),
        (HubConfig, "presence_grace"),
        (HistoryConfig, "max_messages"),
        (HistoryConfig, "max_age"),
        (HistoryConfig, "rooms"),
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_a_bound_that_is_not_positive_is_refused(cls: Any, field: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field} must be > 0"):
        cls(**{field: value})


@pytest.mark.parametrize(
    ("cls", "field"),
    [
        (HubConfig, "max_connections"),
        (HubConfig, "max_connections_per_address"),
        (HistoryConfig, "max_age"),
        (HistoryConfig, "max_bytes"),
    ],
)
def test_optional_bounds_accept_none_as_no_limit(cls: Any, field: str) -> None:
    assert getattr(cls(**{field: None}), field) is None


def test_inconsistent_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_max_bytes must not exceed outbox_max_bytes"):
        Config(outbox_max_bytes=1000, batch_max_bytes=2000)
    with pytest.raises(ValueError, match="reconnect_min_ms must not exceed"):
        HubConfig(reconnect_min_ms=2000, reconnect_max_ms=1000)
    with pytest.raises(TypeError, match="inbox_size must be an int"):
        Config(inbox_size=2.5)  # type: ignore[arg-type]


def test_burst_bounds_below_the_budget_are_refused() -> None:
    with pytest.raises(ValueError, match="outbox_burst_bytes must not be below outbox_max_bytes"):
        Config(outbox_max_bytes=2_048, outbox_burst_bytes=1_024, batch_max_bytes=1_024)
    with pytest.raises(
        ValueError, match="outbox_burst_messages must not be below outbox_max_messages"
    ):
        Config(outbox_max_messages=100, outbox_burst_messages=99)
    with pytest.raises(ValueError, match=r"Config\.batch_delay must be >= 0"):
        Config(batch_delay=-0.001)
    assert Config(batch_delay=0).batch_delay == 0  # 0 turns batching of wake-ups off
