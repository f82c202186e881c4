"""Prometheus metrics: each metric's count after a known sequence, in memory.

A fresh :class:`~chatcore.metrics.ConnectionMetrics` per test observes the
connections; the numbers are read the way Prometheus reads them, by parsing
the text the collector exposes.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from conftest import TEST_CONFIG
from prometheus_client.parser import text_string_to_metric_families

from chatcore import Hub, HubConfig, Identity, Reject, Session, _observe
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


async def test_messages_per_frame_show_batching(
    metrics: ConnectionMetrics, autojump_clock: trio.testing.MockClock
) -> None:
    hub, app = make_app()
    async with open_test_client(hub, user="dave") as dave:
        await dave.join("r")
        before = scrape(app, metrics)
        member = next(iter(metrics.live))
        for n in range(10):
            member.send_nowait({"type": "tick", "n": n})  # one burst: one frame
        for _ in range(10):
            await dave.expect("tick")
        after = scrape(app, metrics)

    def added(key: str) -> float:
        return after[key] - before.get(key, 0)

    assert added('chatcore_messages_per_frame_bucket{le="7"}') == 0
    assert added('chatcore_messages_per_frame_bucket{le="15"}') == 1
    assert added('chatcore_messages_per_frame_bucket{le="+Inf"}') == 1
    assert added("chatcore_messages_per_frame_sum") == 10
    assert added("chatcore_messages_per_frame_count") == 1


# -- the publish-to-delivery lag ---------------------------------------------------------


@pytest.fixture
def virtual_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stamps and lags read from trio's clock (virtual under autojump_clock)."""
    monkeypatch.setattr(_observe, "wall_clock", lambda: 1.7e9 + trio.current_time())


@pytest.fixture
def every_publish() -> Iterator[ConnectionMetrics]:
    observed = ConnectionMetrics(lag_sample_every=1)
    yield observed
    observed.close()


async def wait_then_pass(session: Session, room: str, data: Any) -> Any:
    """An on_publish hook that takes ``data["wait"]`` seconds (after the stamp)."""
    await trio.sleep(data.get("wait", 0) if isinstance(data, dict) else 0)
    return data


def lag_added(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Observations added per upper bound (not cumulative), and the count."""
    added: dict[str, float] = {}
    below = 0.0
    for key, value in after.items():
        if key.startswith("chatcore_delivery_lag_seconds_bucket"):
            bound = key.split('"')[1]
            cumulative = value - before.get(key, 0.0)
            added[bound] = cumulative - below
            below = cumulative
    added["count"] = after["chatcore_delivery_lag_seconds_count"] - before.get(
        "chatcore_delivery_lag_seconds_count", 0.0
    )
    return {k: v for k, v in added.items() if v}


async def test_delivery_lag_counts_each_members_frame_in_its_bucket(
    every_publish: ConnectionMetrics,
    virtual_wall_clock: None,
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub(
        on_publish=wait_then_pass,
        config=HubConfig(publish_rate=1000, publish_burst=1000),
        connection_config=TEST_CONFIG,
    )
    app = ASGIApp(hub, metrics_path=None)
    async with (
        open_test_client(hub, user="alice") as alice,
        open_test_client(hub, user="bob") as bob,
        open_test_client(hub, user="carol") as carol,
    ):
        await alice.join("lobby")
        await bob.join("lobby")
        await carol.join("elsewhere")
        start = scrape(app, every_publish)
        # The hook holds the publish 0.3 s after the frame was taken up: each
        # member's frame carrying it (alice's with her reply) is 0.3 s late.
        await alice.publish("lobby", {"wait": 0.3})
        await bob.expect("message", data={"wait": 0.3})
        await alice.expect("message", data={"wait": 0.3})
        slow = scrape(app, every_publish)
        assert lag_added(start, slow) == {"0.5": 2, "count": 2}
        assert slow["chatcore_delivery_lag_seconds_sum"] - start.get(
            "chatcore_delivery_lag_seconds_sum", 0
        ) == pytest.approx(0.6, abs=1e-3)
        # From the server side, delivered at once.
        await hub.publish("lobby", "now", sender="system")
        await bob.expect("message", data="now")
        await alice.expect("message", data="now")
        prompt = scrape(app, every_publish)
        assert lag_added(slow, prompt) == {"0.0005": 2, "count": 2}
        # Messages outside a room's order are not publishes: not measured.
        await hub.broadcast("lobby", {"type": "typing"})
        assert hub.send_to_connection(bob.connection.id, {"type": "note"})
        await bob.expect("typing")
        await bob.expect("note")
        await alice.expect("typing")
        assert lag_added(prompt, scrape(app, every_publish)) == {}
        await carol.assert_nothing_received()


async def test_delivery_lag_samples_one_publish_in_n(
    virtual_wall_clock: None, autojump_clock: trio.testing.MockClock
) -> None:
    sampled = ConnectionMetrics(lag_sample_every=3)
    try:
        hub, app = make_app()
        async with open_test_client(hub, user="dave") as dave:
            await dave.join("r")
            for n in range(6):
                await hub.publish("r", n)
                await dave.expect("message", data=n)  # one frame per message
            samples = scrape(app, sampled)
        assert samples["chatcore_delivery_lag_seconds_count"] == 2
        assert samples['chatcore_delivery_lag_seconds_bucket{le="0.0005"}'] == 2
    finally:
        sampled.close()


async def test_a_replay_is_not_delivery_lag(
    every_publish: ConnectionMetrics,
    virtual_wall_clock: None,
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub, app = make_app()
    async with open_test_client(hub, user="erin") as erin:
        joined = await erin.join("r")
        await erin.leave("r")
        await hub.publish("r", "old")  # stamped, stored, delivered to nobody
        await trio.sleep(60)
        replayed = await erin.join("r", since={"epoch": joined["epoch"], "offset": 0})
        assert replayed["recovered"]
        await erin.expect("message", data="old")
        samples = scrape(app, every_publish)
    # The recovery replay is history, not a delivery 60 s late.
    assert samples["chatcore_delivery_lag_seconds_count"] == 0


def test_a_clock_behind_the_origin_counts_as_no_lag(
    every_publish: ConnectionMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_observe, "wall_clock", lambda: 1000.0)
    _observe.frame_delivered(1002.5)  # stamped by a node whose clock is ahead
    _observe.frame_delivered(999.0)
    assert every_publish.delivery_lag.cumulative()[0] == ("0.0005", 1)
    assert every_publish.delivery_lag.sum == 1.0


async def test_delivery_lag_on_the_lean_engine_counts_its_socket_writes(
    every_publish: ConnectionMetrics,
) -> None:
    from tests.test_lean_engine import lean_server

    hub = Hub(config=HubConfig(publish_rate=1000, publish_burst=1000))
    lag = every_publish.delivery_lag
    with trio.fail_after(10):
        async with lean_server(ASGIApp(hub, metrics_path=None)) as (_, port):
            url = f"ws://127.0.0.1:{port}/ws"
            async with open_test_client(url) as ann, open_test_client(url) as bob:
                await ann.join("r")
                await bob.join("r")
                assert sum(lag.counts) == 0
                await ann.publish("r", "hi")
                await bob.expect("message", data="hi")
                await ann.expect("message", data="hi")
                # Written by the pacer straight to each socket: two frames,
                # each measured once, on the real clock (well under a second).
                assert dict(lag.cumulative())["1.0"] == sum(lag.counts) == 2


class _BrokenHistogram:
    def observe(self, value: float) -> None:
        raise RuntimeError("broken")


class _BrokenObserver:
    lag_sample_every = 1
    delivery_lag = _BrokenHistogram()


def test_a_failing_lag_observer_is_logged_and_delivery_goes_on(
    every_publish: ConnectionMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    broken = _BrokenObserver()
    _observe.add_lag_observer(broken)
    try:
        _observe.frame_delivered(_observe.wall_clock())
    finally:
        _observe.remove_observer(broken)
    assert sum(every_publish.delivery_lag.counts) == 1  # the others still count it
    assert "failed on a delivery lag" in caplog.text
    every_publish.close()
    # A closed observer is told nothing more.
    _observe.frame_delivered(_observe.wall_clock())
    assert sum(every_publish.delivery_lag.counts) == 1
