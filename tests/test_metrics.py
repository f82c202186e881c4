"""Prometheus metrics: each metric's count after a known sequence, in memory.

A fresh :class:`~chatcore.metrics.ConnectionMetrics` per test observes the
connections; the numbers are read the way Prometheus reads them, by parsing
the text the collector exposes.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest
import trio
from conftest import TEST_CONFIG
from prometheus_client.parser import text_string_to_metric_families

from chatcore import Hub, HubConfig, Identity, Reject
from chatcore.asgi import ASGIApp
from chatcore.metrics import (
    Buckets,
    ChatcoreCollector,
    ConnectionMetrics,
    available,
    missing_reason,
)
from chatcore.testing import open_test_client
from tests.test_asgi import call_http


@pytest.fixture
def metrics() -> Iterator[ConnectionMetrics]:
    observed = ConnectionMetrics()
    yield observed
    observed.close()


def scrape(app: ASGIApp, metrics: ConnectionMetrics) -> dict[str, float]:
    """Every sample as ``name{label="v",...}`` -> value."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ChatcoreCollector(app, metrics))
    text = generate_latest(registry).decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def authenticate(request: object) -> Identity | str | Reject:
    await trio.lowlevel.checkpoint()
    user = request.query.get("user", "")  # type: ignore[attr-defined]
    return Reject(401, b"no") if user == "mallory" else user


def make_app() -> tuple[Hub, ASGIApp]:
    hub = Hub(
        authenticate=authenticate,
        config=HubConfig(publish_rate=1000, publish_burst=1000),
        connection_config=TEST_CONFIG,
    )
    return hub, ASGIApp(hub, metrics_path=None)


def test_buckets_are_cumulative_with_inf_last() -> None:
    buckets = Buckets((1.0, 10.0))
    for value in (0.5, 1.0, 5.0, 50.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("1.0", 2), ("10.0", 3), ("+Inf", 4)]
    assert buckets.sum == 56.5


def test_the_extra_is_detected() -> None:
    assert available()
    assert missing_reason() is None


async def test_a_known_session_gives_known_counts(
    metrics: ConnectionMetrics, autojump_clock: trio.testing.MockClock
) -> None:
    hub, app = make_app()
    before = scrape(app, metrics)
    assert before["chatcore_connections"] == 0
    async with (
        open_test_client(hub, user="alice") as alice,
        open_test_client(hub, user="bob") as bob,
    ):
        await alice.join("lobby")
        await bob.join("lobby", since={"epoch": "nope", "offset": 0})
        for n in range(3):
            await alice.publish("lobby", {"n": n})
        for _ in range(3):
            await bob.expect("message")
        await trio.sleep(30)
        during = scrape(app, metrics)
        assert during["chatcore_connections"] == 2
        assert during["chatcore_rooms"] == 1
        assert during["chatcore_users"] == 2
        # Sent so far, read from the open connections.
        assert during["chatcore_frames_sent_total"] >= 2 + 2 + 3 + 3
    with pytest.raises(Exception, match="401"):
        async with open_test_client(hub, user="mallory"):
            pass  # pragma: no cover
    after = scrape(app, metrics)
    assert after["chatcore_connections"] == 0
    assert after['chatcore_handshakes_total{status="101"}'] == 2
    assert after['chatcore_handshakes_total{status="401"}'] == 1
    assert after['chatcore_connections_closed_total{cause="peer",code="1000"}'] == 2
    assert after["chatcore_messages_published_total"] == 3
    # Each publish reaches both members; the publisher also gets its reply.
    assert after["chatcore_deliveries_total"] >= 6
    assert after["chatcore_publish_duration_seconds_count"] == 3
    assert after['chatcore_joins_total{recovery="none"}'] == 1
    assert after['chatcore_joins_total{recovery="not_recovered"}'] == 1
    assert after["chatcore_connection_duration_seconds_count"] == 2
    assert after['chatcore_connection_duration_seconds_bucket{le="10.0"}'] == 0
    assert after['chatcore_connection_duration_seconds_bucket{le="60.0"}'] == 2
    # Counters of closed connections are kept: the totals never go down.
    assert after["chatcore_frames_sent_total"] >= during["chatcore_frames_sent_total"]
    assert after["chatcore_messages_received_total"] == 2 + 3  # the joins and the publishes
    assert after["chatcore_backplane_degraded"] == 0


async def test_outbox_bytes_show_a_client_that_does_not_read(
    metrics: ConnectionMetrics, autojump_clock: trio.testing.MockClock
) -> None:
    hub, app = make_app()
    async with open_test_client(hub, user="carol") as carol:
        await carol.join("r")
        member = next(iter(metrics.live))
        member.send_nowait({"type": "big", "data": "y" * 5000})
        samples = scrape(app, metrics)
        assert samples["chatcore_queued_bytes"] >= 5000
        assert samples['chatcore_outbox_bytes_bucket{le="4096.0"}'] == 0
        assert samples['chatcore_outbox_bytes_bucket{le="16384.0"}'] == 1
        await carol.expect("big")


def test_gc_pauses_are_counted_by_generation(metrics: ConnectionMetrics) -> None:
    before = metrics.gc_pauses[2].counts[:]
    gc.collect()
    assert sum(metrics.gc_pauses[2].counts) == sum(before) + 1


async def test_the_scheduler_lag_probe_sees_a_blocked_loop(metrics: ConnectionMetrics) -> None:
    metrics.start_lag_probe(interval=0.01)
    metrics.start_lag_probe(interval=0.01)  # once per run
    await trio.sleep(0.05)
    time.sleep(0.2)  # noqa: ASYNC251 (the point: the loop is blocked, every task waits)
    with trio.fail_after(5):
        while metrics.scheduler_lag_max < 0.15:
            await trio.sleep(0.01)
    assert metrics.scheduler_lag.counts[-1] + metrics.scheduler_lag.counts[-2] >= 0
    assert metrics.scheduler_lag_max < 5


async def test_the_metrics_path_serves_the_text_exposition(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = ASGIApp(Hub(connection_config=TEST_CONFIG), metrics_path="/m")
    status, headers, body = await call_http(app, "/m")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"chatcore_connections", "chatcore_handshakes", "process_cpu_seconds"} <= names
    assert (await call_http(app, "/m", method="POST"))[0] == 405
    assert (await call_http(ASGIApp(Hub(), metrics_path=None), "/metrics"))[0] == 404


async def test_the_metrics_port_answers_get_and_refuses_anything_else(
    metrics: ConnectionMetrics,
) -> None:
    from chatcore.metrics import serve_metrics_listener

    app = ASGIApp(Hub(connection_config=TEST_CONFIG))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def ask(request: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        return data

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics_listener, app, listeners[0])
            answer = await ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200 OK")
            assert b"text/plain; version=0.0.4" in head
            assert b"\nchatcore_connections 0.0\n" in body
            assert (await ask(b"HEAD / HTTP/1.1\r\n\r\n")).endswith(b"content-length: 0\r\n\r\n")
            assert (await ask(b"POST / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.0 400")
            assert (await ask(b"GET / HTTP/1.1\r\n")).startswith(b"HTTP/1.0 400")  # no blank line
            nursery.cancel_scope.cancel()
