"""Prometheus metrics for a chatcore server (the ``chatcore[metrics]`` extra).

:class:`~chatcore.asgi.ASGIApp` serves them at ``/metrics`` (its
``metrics_path``) when ``prometheus-client`` is installed; ``chatcore serve``
says at start-up whether they are on. See ``docs/observability.md`` for what
each metric means.

Theory of operation
-------------------

Rule 1: the hot path pays nothing. Most numbers already exist as plain
counters in chatcore's objects (:meth:`Hub.statistics
<chatcore.Hub.statistics>`, :meth:`Connection.statistics
<chatcore.Connection.statistics>`, the backplane's ``statistics()``); the
:class:`ChatcoreCollector` reads them when Prometheus scrapes, not when a
message moves. Per-connection counters of open connections are summed at
scrape time and added to the totals of closed ones (kept when each closes),
so the ``*_total`` series only go up.

Rule 2: histograms are counted where the event is rare. Connection
durations are counted once per connection, publish latency once per client
publish, GC pauses once per collection, scheduler lag once per probe. A
:class:`Buckets` observation is one ``bisect`` and two additions.

Rule 2b: the publish-to-delivery lag is sampled. The hub stamps one room
publish in :data:`LAG_SAMPLE_EVERY` with the wall-clock time (once per
publish, on the message every outbox shares), the stamp travels with the
message across nodes, and a connection observes a frame only when its oldest
message carries one: per frame the hot path reads one attribute and tests
it (see :mod:`chatcore._observe`).

Rule 3: few labels. No room, user or connection labels; close codes outside
a fixed set are labelled ``other``.

One process, one set of numbers: with ``chatcore serve --workers N`` each
worker serves its own on its own port (``--metrics-bind``), and Prometheus
scrapes them all (see the docs).
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import trio

from . import _observe, _pacer
from ._logs import KNOWN_CODES
from .sansio import ConnectionState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ._connection import Connection
    from .asgi import ASGIApp

__all__ = [
    "LAG_PROBE_INTERVAL",
    "LAG_SAMPLE_EVERY",
    "Buckets",
    "ChatcoreCollector",
    "ConnectionMetrics",
    "available",
    "connection_metrics",
    "handshake_refused",
    "metrics_started",
    "missing_reason",
    "render",
    "serve_metrics",
    "serve_metrics_listener",
]

logger = logging.getLogger("chatcore.metrics")

#: The exposition format served (Prometheus' text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds between two wake-ups of the scheduler-lag probe.
LAG_PROBE_INTERVAL = 0.25
#: One room publish in this many is stamped for the delivery-lag histogram.
LAG_SAMPLE_EVERY = 8

# Bucket bounds (seconds unless said otherwise).
DURATION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DELIVERY_LAG_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
OUTBOX_BUCKETS = (0.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0)


def missing_reason() -> str | None:
    """Why metrics are off here (``prometheus-client`` missing), or ``None``."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        return f"prometheus-client is not installed ({exc}): pip install 'chatcore[metrics]'"
    return None


def available() -> bool:
    """True if ``prometheus-client`` is installed (the ``chatcore[metrics]`` extra)."""
    return missing_reason() is None


class Buckets:
    """A histogram's counts: fixed upper bounds, one ``bisect`` per observation.

    Args:
        bounds: Upper bounds, ascending (``+Inf`` is implied).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def __repr__(self) -> str:
        return f"<Buckets n={sum(self.counts)} sum={self.sum:g}>"

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        pairs: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return pairs


# Close reasons of a connection whose handshake never completed.
_NEVER_OPENED = frozenset(("client left during handshake", "handshake did not complete"))


def _code_label(code: int) -> str:
    return str(code) if code in KNOWN_CODES else "other"


class ConnectionMetrics:
    """What chatcore counts for metrics, process-wide (see the module docs).

    One per process (:func:`connection_metrics`); it observes every
    connection, client publish and join, the delivery lag of sampled
    frames, and the garbage collector.

    Args:
        lag_sample_every: Stamp one room publish in this many for the
            delivery-lag histogram (1: every one).
    """

    def __init__(self, *, lag_sample_every: int = LAG_SAMPLE_EVERY) -> None:
        # Open connections (a weak set: a connection is never kept alive here).
        self.live: weakref.WeakSet[Connection] = weakref.WeakSet()
        #: Handshakes by HTTP status (101 accepted).
        self.handshakes: dict[int, int] = {}
        #: Closes of opened connections by (code label, cause).
        self.closes: dict[tuple[str, str], int] = {}
        #: Totals of closed connections' counters.
        self.closed_totals = {
            "messages_received": 0,
            "messages_queued": 0,
            "frames_sent": 0,
            "bytes_sent": 0,
        }
        self.duration = Buckets(DURATION_BUCKETS)
        self.publish = Buckets(LATENCY_BUCKETS)
        self.publish_failures = 0
        #: Joins by recovery outcome: "none" (no since), "recovered", "not_recovered".
        self.joins = {"none": 0, "recovered": 0, "not_recovered": 0}
        self.replayed = 0
        self.gc_pauses = [Buckets(GC_BUCKETS) for _ in range(3)]
        #: Sampled frames by how long after its publish their oldest message went out.
        self.delivery_lag = Buckets(DELIVERY_LAG_BUCKETS)
        self.lag_sample_every = lag_sample_every
        self.scheduler_lag = Buckets(LAG_BUCKETS)
        #: The largest scheduler lag seen by the probe since the last scrape.
        self.scheduler_lag_max = 0.0
        self._gc_started = 0.0
        self._probing: set[int] = set()  # trio runs with a lag probe
        _observe.add_connection_observer(self)
        _observe.add_publish_observer(self)
        _observe.add_lag_observer(self)
        gc.callbacks.append(self._gc_callback)

    def __repr__(self) -> str:
        return (
            f"<ConnectionMetrics live={len(self.live)} handshakes={sum(self.handshakes.values())}>"
        )

    def close(self) -> None:
        """Stop observing (tests; a server keeps it for its life)."""
        _observe.remove_observer(self)
        if self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)

    # -- observers ----------------------------------------------------------------------

    def connection_started(self, connection: Connection) -> None:
        """See :class:`chatcore._observe.ConnectionObserver`."""
        self.live.add(connection)

    def connection_ended(self, connection: Connection, duration: float) -> None:
        """See :class:`chatcore._observe.ConnectionObserver`."""
        self.live.discard(connection)
        record = connection.close_record
        if record is None:  # pragma: no cover  (a finished actor always has one)
            return
        if record.http_status is not None:
            status = record.http_status
        elif record.reason in _NEVER_OPENED:
            return  # the client left before the handshake was answered
        else:
            status = 101
        self.handshakes[status] = self.handshakes.get(status, 0) + 1
        if status != 101:
            return
        key = (_code_label(record.code), record.cause.value)
        self.closes[key] = self.closes.get(key, 0) + 1
        self.duration.observe(duration)
        stats = connection.statistics()
        totals = self.closed_totals
        totals["messages_received"] += stats.messages_received
        totals["messages_queued"] += stats.messages_queued
        totals["frames_sent"] += stats.frames_sent
        totals["bytes_sent"] += stats.bytes_sent

    def handshake_refused(self, status: int) -> None:
        """Count a handshake the server refused before any connection ran (404, 503)."""
        self.handshakes[status] = self.handshakes.get(status, 0) + 1

    def publish_acked(self, began_ns: int, connection: Connection, room: str, ok: bool) -> None:
        """See :class:`chatcore._observe.PublishObserver`."""
        if ok:
            self.publish.observe((time.time_ns() - began_ns) / 1e9)
        else:
            self.publish_failures += 1

    def join_done(
        self,
        began_ns: int,
        connection: Connection,
        room: str,
        recovered: bool | None,
        replayed: int,
    ) -> None:
        """See :class:`chatcore._observe.PublishObserver`."""
        key = "none" if recovered is None else "recovered" if recovered else "not_recovered"
        self.joins[key] += 1
        self.replayed += replayed

    def _gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            generation = min(max(int(info.get("generation", 0)), 0), 2)
            self.gc_pauses[generation].observe(time.perf_counter() - self._gc_started)
            self._gc_started = 0.0

    # -- the scheduler-lag probe ----------------------------------------------------------

    def start_lag_probe(self, interval: float = LAG_PROBE_INTERVAL) -> None:
        """Start the scheduler-lag probe in the current Trio run (once per run).

        A system task sleeps ``interval`` seconds at a time and counts how much
        later than asked it woke up: the time runnable tasks waited for the
        CPU. It ends with the run.
        """
        token = id(trio.lowlevel.current_trio_token())
        if token in self._probing:
            return
        self._probing.add(token)

        async def probe() -> None:
            try:
                while True:
                    due = trio.current_time() + interval
                    await trio.sleep_until(due)
                    self.observe_lag(max(0.0, trio.current_time() - due))
            finally:
                self._probing.discard(token)

        trio.lowlevel.spawn_system_task(probe, name="chatcore scheduler-lag probe")

    def observe_lag(self, seconds: float) -> None:
        """Count one measured scheduler lag."""
        self.scheduler_lag.observe(seconds)
        self.scheduler_lag_max = max(self.scheduler_lag_max, seconds)

    # -- reading ---------------------------------------------------------------------------

    def live_totals(self) -> tuple[dict[str, int], Buckets]:
        """Closed connections' totals plus the open ones' counters; outbox bytes now."""
        totals = dict(self.closed_totals)
        outbox = Buckets(OUTBOX_BUCKETS)
        queued = 0
        opened = 0  # open connections: their handshake was answered 101
        for connection in list(self.live):
            stats = connection.statistics()
            if stats.state is ConnectionState.OPEN or stats.state is ConnectionState.CLOSING:
                opened += 1
            totals["messages_received"] += stats.messages_received
            totals["messages_queued"] += stats.messages_queued
            totals["frames_sent"] += stats.frames_sent
            totals["bytes_sent"] += stats.bytes_sent
            outbox.observe(stats.outbox_bytes)
            queued += stats.outbox_bytes
        totals["queued_bytes"] = queued
        totals["opened"] = opened
        return totals, outbox


_metrics: ConnectionMetrics | None = None


def connection_metrics() -> ConnectionMetrics:
    """This process's :class:`ConnectionMetrics`, made (and observing) on first use."""
    global _metrics
    if _metrics is None:
        _metrics = ConnectionMetrics()
    return _metrics


def _frame_sizes() -> tuple[tuple[int, ...], int] | None:
    """This Trio run's frames by messages per frame, or ``None`` before any connection."""
    try:
        found = _pacer._RUN_PACER.get()
    except (LookupError, RuntimeError):  # no connection yet, or outside a Trio run
        return None
    stats = found.statistics()
    return stats.frames_by_size, stats.framed_messages


def _families(app: ASGIApp, metrics: ConnectionMetrics) -> Iterator[Metric]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeHistogramMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=value)

    def histogram(
        name: str,
        doc: str,
        buckets: Buckets,
        labels: Sequence[str] = (),
        values: Sequence[str] = (),
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(values), buckets.cumulative(), buckets.sum)
        return family

    health = app.health()
    totals, outbox_now = metrics.live_totals()
    yield gauge("chatcore_connections", "Open WebSocket connections.", health.connections)
    yield gauge(
        "chatcore_draining", "1 while the server drains (refusing handshakes).", health.draining
    )
    handshakes = CounterMetricFamily(
        "chatcore_handshakes", "WebSocket handshakes answered, by HTTP status.", labels=["status"]
    )
    counts = dict(metrics.handshakes)
    if totals["opened"]:
        counts[101] = counts.get(101, 0) + totals["opened"]
    for status, count in sorted(counts.items()):
        handshakes.add_metric([str(status)], count)
    yield handshakes
    closes = CounterMetricFamily(
        "chatcore_connections_closed",
        "Opened connections that closed, by close code and cause.",
        labels=["code", "cause"],
    )
    for (code, cause), count in sorted(metrics.closes.items()):
        closes.add_metric([code, cause], count)
    yield closes
    yield histogram(
        "chatcore_connection_duration_seconds",
        "How long closed connections were open.",
        metrics.duration,
    )
    yield counter(
        "chatcore_messages_received",
        "Text messages received from clients.",
        totals["messages_received"],
    )
    yield counter(
        "chatcore_messages_queued",
        "Messages queued into outboxes (divide by frames for messages per frame).",
        totals["messages_queued"],
    )
    yield counter("chatcore_frames_sent", "WebSocket frames written.", totals["frames_sent"])
    yield counter("chatcore_sent_bytes", "Message bytes written.", totals["bytes_sent"])
    yield gauge(
        "chatcore_queued_bytes", "Bytes queued in all outboxes now.", totals["queued_bytes"]
    )
    outbox = GaugeHistogramMetricFamily(
        "chatcore_outbox_bytes", "Open connections by bytes queued in their outbox now."
    )
    outbox.add_metric([], outbox_now.cumulative(), outbox_now.sum)
    yield outbox
    yield histogram(
        "chatcore_publish_duration_seconds",
        "From a client's publish frame to the backplane's acknowledgement.",
        metrics.publish,
    )
    yield histogram(
        "chatcore_delivery_lag_seconds",
        "From a room message's publish at its origin node to a frame carrying it"
        " being written to a member here (sampled; across nodes includes clock skew).",
        metrics.delivery_lag,
    )
    yield counter(
        "chatcore_publish_failures",
        "Client publishes the backplane could not take (answered unavailable).",
        metrics.publish_failures,
    )
    joins = CounterMetricFamily(
        "chatcore_joins", "Successful joins by recovery outcome.", labels=["recovery"]
    )
    for key, count in metrics.joins.items():
        joins.add_metric([key], count)
    yield joins
    yield counter(
        "chatcore_replayed_messages", "Messages replayed to joins with since.", metrics.replayed
    )
    yield histogram(
        "chatcore_scheduler_lag_seconds",
        "How late a periodic Trio wake-up ran (CPU saturation).",
        metrics.scheduler_lag,
    )
    yield gauge(
        "chatcore_scheduler_lag_max_seconds",
        "The largest scheduler lag since the previous scrape.",
        metrics.scheduler_lag_max,
    )
    metrics.scheduler_lag_max = 0.0
    pauses = HistogramMetricFamily(
        "chatcore_gc_pause_seconds",
        "Garbage-collector pauses by generation.",
        labels=["generation"],
    )
    for generation, buckets in enumerate(metrics.gc_pauses):
        pauses.add_metric([str(generation)], buckets.cumulative(), buckets.sum)
    yield pauses
    if (framing := _frame_sizes()) is not None:
        by_size, messages = framing
        frames = HistogramMetricFamily(
            "chatcore_messages_per_frame",
            "Frames written, by how many messages each carried (batching).",
        )
        running = 0
        frame_buckets: list[tuple[str, float]] = []
        for k, count in enumerate(by_size):
            running += count
            last = k == len(by_size) - 1
            frame_buckets.append(("+Inf" if last else str(2 ** (k + 1) - 1), running))
        frames.add_metric([], frame_buckets, messages)
        yield frames
    yield counter(
        "chatcore_close_log_suppressed",
        "Close log lines held back by the close log's rate limit.",
        _observe.close_log.suppressed_total,
    )
    yield from _handler_families(app)


def _handler_families(app: ASGIApp) -> Iterable[Metric]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    statistics = getattr(app.handler, "statistics", None)
    hub = statistics() if callable(statistics) else None
    for attribute, name, doc, kind in (
        ("users", "chatcore_users", "Distinct users with a connection here.", "gauge"),
        ("rooms", "chatcore_rooms", "Rooms with at least one member here.", "gauge"),
        ("published", "chatcore_messages_published", "Room messages given an offset.", "c"),
        ("delivered", "chatcore_deliveries", "Messages queued to a member's outbox.", "c"),
        ("dropped", "chatcore_ephemeral_dropped", "Ephemeral messages dropped (full outbox).", "c"),
        ("coalesced", "chatcore_ephemeral_coalesced", "Ephemeral messages replaced by newer.", "c"),
        (
            "slow_consumer_disconnects",
            "chatcore_slow_consumer_disconnects",
            "Connections closed as slow consumers (4001).",
            "c",
        ),
        ("history_bytes", "chatcore_history_bytes", "Bytes of room history kept here.", "gauge"),
    ):
        value = getattr(hub, attribute, None)
        if isinstance(value, int | float):
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, doc, value=value)
    backplane = getattr(app.handler, "backplane", None)
    if backplane is None:
        return
    yield GaugeMetricFamily(
        "chatcore_backplane_degraded",
        "1 while the backplane cannot do its whole job (e.g. Redis unreachable).",
        value=bool(getattr(backplane, "degraded", False)),
    )
    statistics = getattr(backplane, "statistics", None)
    stats = statistics() if callable(statistics) else None
    for attribute, name, doc in (
        ("sessions", "chatcore_redis_sessions", "Redis sessions established."),
        ("session_failures", "chatcore_redis_session_failures", "Redis sessions that failed."),
        ("publish_failures", "chatcore_redis_publish_failures", "Publishes Redis did not take."),
        ("caught_up", "chatcore_redis_gap_fills", "Gaps in a room's order filled from Redis."),
        ("duplicates", "chatcore_redis_duplicates", "Messages received twice and skipped."),
        ("room_resets", "chatcore_redis_room_resets", "Rooms whose order began anew."),
    ):
        value = getattr(stats, attribute, None)
        if isinstance(value, int):
            yield CounterMetricFamily(name, doc, value=value)
    trips = getattr(stats, "round_trips", None)
    if trips:
        from .redis._records import ROUND_TRIP_BOUNDS

        running = 0
        trip_buckets: list[tuple[str, float]] = []
        for bound, count in zip((*ROUND_TRIP_BOUNDS, float("inf")), trips, strict=True):
            running += count
            trip_buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        round_trips = HistogramMetricFamily(
            "chatcore_redis_round_trip_seconds",
            "Time Redis took to answer a pipelined batch of publishes.",
        )
        seconds = float(getattr(stats, "round_trip_seconds", 0.0))
        round_trips.add_metric([], trip_buckets, seconds)
        yield round_trips
    shards = getattr(stats, "shards", None)
    if shards:
        yield GaugeMetricFamily(
            "chatcore_redis_degraded_shards",
            "Redis Cluster shards without a session now (0 on one Redis).",
            value=int(getattr(stats, "degraded_shards", 0)),
        )
    queued = getattr(stats, "queued_publishes", None)
    if isinstance(queued, int):
        yield GaugeMetricFamily(
            "chatcore_redis_queued_publishes", "Publishes waiting for Redis.", value=queued
        )


class ChatcoreCollector:
    """A prometheus-client collector of one :class:`~chatcore.asgi.ASGIApp`'s metrics.

    Reads everything at scrape time (see the module docs).

    Args:
        app: The application whose handler (hub) is read.
        metrics: The process's counters (default :func:`connection_metrics`).
    """

    def __init__(self, app: ASGIApp, metrics: ConnectionMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics or connection_metrics()

    def __repr__(self) -> str:
        return f"<ChatcoreCollector {self.app!r}>"

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now."""
        return _families(self.app, self.metrics)


def render(app: ASGIApp) -> tuple[bytes, str]:
    """The text exposition of ``app``'s metrics and the process's default registry.

    The default registry holds prometheus-client's process, platform and GC
    collectors and any metric the application defined itself.

    Returns:
        The body and its content type.

    Raises:
        ImportError: ``prometheus-client`` is not installed.
    """
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ChatcoreCollector(app))
    # The classic text format: every Prometheus 2.x reads it.
    return generate_latest(REGISTRY) + generate_latest(registry), CONTENT_TYPE


# -- serving ---------------------------------------------------------------------------------


def metrics_started(app: ASGIApp) -> None:
    """At an app's start-up: say whether metrics are on; start the scheduler-lag probe."""
    reason = missing_reason()
    if reason is not None:
        logger.info("metrics off: %s", reason)
        return
    logger.info("Prometheus metrics at %s", app.metrics_path)
    # Counting starts here, before the first connection (not at import: an
    # app whose metrics are switched off afterwards must cost nothing).
    connection_metrics().start_lag_probe()


def handshake_refused(status: int) -> None:
    """Count a handshake the app refused itself (wrong path, draining)."""
    if _metrics is not None:
        _metrics.handshake_refused(status)


async def serve_metrics(app: ASGIApp, scope: Any, send: Any) -> None:
    """Answer one ASGI HTTP request for the metrics path."""
    method = scope.get("method", "GET")
    headers: list[tuple[bytes, bytes]]
    if method not in ("GET", "HEAD"):
        status, body = 405, b"method not allowed\n"
        headers = [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain; charset=utf-8")]
    elif (reason := missing_reason()) is not None:
        status, body = 404, f"metrics are off: {reason}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
    else:
        status = 200
        connection_metrics()  # an app run without lifespan events counts from here
        body, content_type = render(app)
        headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body if method != "HEAD" else b""})


#: Bytes a metrics request may have before its blank line.
MAX_REQUEST_BYTES = 8192
#: Seconds a metrics client has to send its request.
REQUEST_TIMEOUT = 5.0


async def serve_metrics_listener(
    app: ASGIApp,
    listener: trio.SocketListener,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app``'s metrics over plain HTTP/1.0 on ``listener``; never returns.

    The per-worker metrics port of ``chatcore serve --workers N
    --metrics-bind``: ``GET`` of any path answers the metrics, once per
    connection (then it closes). Requests are bounded by
    :data:`MAX_REQUEST_BYTES` and :data:`REQUEST_TIMEOUT`.

    Cancellation: the listener closes; requests in flight are dropped.
    """
    connection_metrics().start_lag_probe()

    async def answer(stream: trio.abc.Stream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                    chunk = await stream.receive_some(MAX_REQUEST_BYTES)
                    if not chunk:
                        break
                    request += chunk
            method = request.split(b" ", 1)[0]
            if b"\r\n\r\n" not in request or method not in (b"GET", b"HEAD"):
                head, body = b"HTTP/1.0 400 Bad Request\r\ncontent-type: text/plain\r\n", b"bad\n"
            else:
                body, content_type = render(app)
                head = f"HTTP/1.0 200 OK\r\ncontent-type: {content_type}\r\n".encode()
                if method == b"HEAD":
                    body = b""
            try:
                await stream.send_all(head + b"content-length: %d\r\n\r\n" % len(body) + body)
            except trio.BrokenResourceError:
                pass

    await trio.serve_listeners(answer, [listener], task_status=task_status)
