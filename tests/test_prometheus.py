"""A real Prometheus scrapes a real ``chatcore serve`` (one process, then ``--workers 2``).

After a scripted session (connects, joins, publishes, a slow consumer, a
refused handshake) Prometheus' HTTP API must return the expected values.
"""

from __future__ import annotations

import json
import re
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from prometheus_server import (
    dashboard_expressions,
    dashboard_session,
    http_get_text,
    prometheus_binary,
    run_prometheus,
)

from chatcore import HandshakeRejected
from chatcore.testing import open_test_client
from tests.test_serve_cli import chatcore_serve, joined, peer_of, receive_message

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow
pytest_plugins = ("tests.redis_server",)

METRICS_PORT = re.compile(r"metrics of process \d+: http://127\.0\.0\.1:(\d+)/metrics")


async def refused_handshake(port: int) -> None:
    with pytest.raises(HandshakeRejected) as refused:
        async with open_test_client(f"ws://127.0.0.1:{port}/nope", timeout=10):
            pass  # pragma: no cover
    assert refused.value.status == 404


async def test_prometheus_reads_a_single_process_server(tmp_path: Path) -> None:
    prometheus_binary()
    async with (
        chatcore_serve(
            "tests._serve_targets:small_outbox_hub",
            "--tcp-user-timeout",
            "2",
            tmp_path=tmp_path,
        ) as server,
        run_prometheus([f"127.0.0.1:{server.port}"], tmp_path) as prometheus,
        AsyncExitStack() as stack,
    ):
        stack.enter_context(trio.fail_after(90))
        readers = [await joined(stack, server.port) for _ in range(2)]
        publisher = await joined(stack, server.port)
        for n in range(5):
            await publisher.publish("r", {"n": n})
        for reader in readers:
            for _ in range(5):
                await reader.expect("message")
        await refused_handshake(server.port)
        await prometheus.wait_for("chatcore_connections", 3)
        await prometheus.wait_for("chatcore_messages_published_total", 5)
        await prometheus.wait_for('chatcore_handshakes_total{status="404"}', 1)
        await prometheus.wait_for("chatcore_rooms", 1)
        # The first publish of every LAG_SAMPLE_EVERY is stamped: the three
        # frames carrying it (the publisher's with its reply) are measured.
        await prometheus.wait_for("chatcore_delivery_lag_seconds_count", 3)
        await prometheus.wait_for('chatcore_delivery_lag_seconds_bucket{le="1.0"}', 3)
        # A client that stops reading while the room gets ~2 MB: cut off.
        slow = await stack.enter_async_context(peer_of(server.port, receive_buffer=4096))
        assert (await receive_message(slow))["type"] == "hello"
        await slow.send_text(json.dumps({"type": "join", "room": "r", "ref": "j"}))
        assert (await receive_message(slow))["type"] == "reply"
        text = "x" * 4000
        async with trio.open_nursery() as nursery:
            for reader in readers:
                nursery.start_soon(drain_messages, reader, 500)
            for _ in range(500):
                await publisher.send({"type": "publish", "room": "r", "data": text})
        await prometheus.wait_for(
            'sum(chatcore_connections_closed_total{cause=~"slow_consumer|transport"})', 1
        )
        await prometheus.wait_for("chatcore_connections", 3)
        await prometheus.wait_for('chatcore_handshakes_total{status="101"}', 4)
        await prometheus.wait_for("chatcore_messages_published_total", 505)
        assert (await prometheus.value("chatcore_deliveries_total")) >= 505 * 3  # type: ignore[operator]
        assert (await prometheus.value("chatcore_frames_sent_total")) > 0  # type: ignore[operator]
        assert await prometheus.value("chatcore_publish_duration_seconds_count") == 505
        # Frames whose oldest message is one of the burst's stamped publishes.
        lagged = await prometheus.value("chatcore_delivery_lag_seconds_count")
        assert lagged is not None
        assert lagged > 3
        p99 = await prometheus.value(
            "histogram_quantile(0.99, sum by (le) (chatcore_delivery_lag_seconds_bucket))"
        )
        assert p99 is not None
        assert 0 < p99 <= 10.0
        assert await prometheus.value("chatcore_backplane_degraded") == 0
        assert await prometheus.value("chatcore_scheduler_lag_seconds_count") > 0  # type: ignore[operator]
        assert await prometheus.value("process_resident_memory_bytes") > 0  # type: ignore[operator]
        assert await prometheus.value("up") == 1


async def drain_messages(client: object, count: int) -> None:
    for _ in range(count):
        await client.expect("message", timeout=30)  # type: ignore[attr-defined]


async def test_prometheus_reads_every_worker(tmp_path: Path) -> None:
    prometheus_binary()
    async with chatcore_serve(
        "tests._serve_targets:hub",
        "--workers",
        "2",
        "--metrics-bind",
        "127.0.0.1:0",
        tmp_path=tmp_path,
    ) as server:
        with trio.fail_after(30):
            while len(ports := METRICS_PORT.findall(server.output())) < 2:
                await trio.sleep(0.05)
        # The shared port does not answer for one random worker.
        assert (await http_get_text(server.port, "/metrics"))[0] == 404
        async with (
            run_prometheus([f"127.0.0.1:{port}" for port in ports], tmp_path) as prometheus,
            AsyncExitStack() as stack,
        ):
            stack.enter_context(trio.fail_after(90))
            clients = [await joined(stack, server.port, f"room{n % 2}") for n in range(6)]
            for n, client in enumerate(clients):
                await client.publish(f"room{n % 2}", {"n": n})
            await refused_handshake(server.port)
            await prometheus.wait_for("count(up == 1)", 2)
            await prometheus.wait_for("sum(chatcore_connections)", 6)
            await prometheus.wait_for('sum(chatcore_handshakes_total{status="101"})', 6)
            await prometheus.wait_for('sum(chatcore_handshakes_total{status="404"})', 1)
            await prometheus.wait_for("sum(chatcore_messages_published_total)", 6)
            # One series per worker: the sums above add both up.
            per_worker = await prometheus.api("query", query="chatcore_connections")
            assert len({sample["metric"]["instance"] for sample in per_worker["result"]}) == 2
        server.signal(signal.SIGTERM)
        assert await server.wait(20) == 0


DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "dashboards" / "chatcore.json"


async def test_every_dashboard_panel_has_data_from_a_real_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    prometheus_binary()
    async with (
        chatcore_serve(
            "tests._serve_targets:small_outbox_hub",
            "--redis-url",
            redis_server.url,
            "--tcp-user-timeout",
            "2",
            "--no-access-log",
            tmp_path=tmp_path,
        ) as server,
        run_prometheus([f"127.0.0.1:{server.port}"], tmp_path) as prometheus,
    ):
        await dashboard_session(server.port, 12)
        await prometheus.wait_scraped(1)
        missing = []
        for title, legend, expr in dashboard_expressions(DASHBOARD):
            data = await prometheus.api("query", query=expr)  # parses, or the API says 400
            if not data["result"]:
                missing.append(f"{title} / {legend}: {expr}")
        assert missing == []
