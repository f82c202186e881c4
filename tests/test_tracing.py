"""OpenTelemetry spans, recorded with the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from conftest import TEST_CONFIG
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chatcore import Hub, HubConfig, Identity, Reject, _observe, tracing
from chatcore.testing import open_test_client

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    yield exporter
    tracing.disable()


async def authenticate(request: object) -> Identity | str | Reject:
    await trio.lowlevel.checkpoint()
    user = request.query.get("user", "")  # type: ignore[attr-defined]
    return Reject(403, b"no") if user == "mallory" else user


def make_hub() -> Hub:
    return Hub(
        authenticate=authenticate,
        config=HubConfig(publish_rate=1000, publish_burst=1000),
        connection_config=TEST_CONFIG,
    )


def test_off_by_default_and_off_again() -> None:
    assert not tracing.enabled()
    assert _observe.handler_wrapper is None
    assert tracing._spans not in _observe.publish_hooks  # nothing per publish


async def test_spans_for_handshake_publish_and_join_continue_the_clients_trace(
    exporter: InMemorySpanExporter, autojump_clock: trio.testing.MockClock
) -> None:
    hub = make_hub()
    async with open_test_client(hub, user="alice", headers=[("traceparent", TRACEPARENT)]) as alice:
        await alice.join("lobby")
        await alice.publish("lobby", {"n": 1})
        await alice.publish("lobby", {"n": 2})
        await alice.leave("lobby")
        await alice.join("lobby", since={"epoch": "other", "offset": 0})
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [
        "chatcore.handshake",
        "chatcore.join",
        "chatcore.publish",
        "chatcore.publish",
        "chatcore.join",
    ]
    handshake = spans[0]
    assert handshake.kind is SpanKind.SERVER
    assert f"{handshake.context.trace_id:032x}" == TRACE_ID  # the client's trace
    assert handshake.attributes["http.response.status_code"] == 101
    connection_id = handshake.attributes["chatcore.connection_id"]
    for span in spans[1:]:
        assert span.context.trace_id == handshake.context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == handshake.context.span_id
        assert span.attributes["chatcore.connection_id"] == connection_id
        assert span.attributes["chatcore.room"] == "lobby"
        assert span.end_time >= span.start_time
    assert "chatcore.recovered" not in spans[1].attributes
    assert spans[4].attributes["chatcore.recovered"] is False
    assert spans[2].attributes["chatcore.ok"] is True


async def test_a_refused_handshake_is_an_error_span(
    exporter: InMemorySpanExporter, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(Exception, match="403"):
        async with open_test_client(make_hub(), user="mallory"):
            pass  # pragma: no cover
    (span,) = exporter.get_finished_spans()
    assert span.name == "chatcore.handshake"
    assert span.attributes["http.response.status_code"] == 403
    assert span.status.status_code is StatusCode.ERROR
    assert span.parent is None  # no traceparent: a new trace
