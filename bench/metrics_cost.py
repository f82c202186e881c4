"""What Prometheus metrics cost: fan-out CPU per delivery with metrics on and off.

Runs ``bench/fanout.py``'s fan-out scenario (one client publishes K messages
to a room of M members) against ``chatcore serve`` twice per round, once with
``--metrics-path none`` (no metric is counted) and once with metrics on and
``/metrics`` scraped every second during the measurement, interleaved and
repeated; prints the median CPU per delivery of each, its spread, and the
difference.

    python bench/metrics_cost.py [--members 200] [--messages 200] --repeat 5
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import _harness as h
import fanout

#: Seconds between two scrapes of /metrics while metrics are on (Prometheus
#: defaults to 60, most setups use 15: this is on the costly side).
SCRAPE_EVERY = 5.0


@contextlib.contextmanager
def serving_with(serve_args: Sequence[str], scrape: bool) -> Iterator[list[int]]:
    """Make fan-out's server start with ``serve_args`` (and be scraped, if asked)."""
    original = h.running_server
    scrapes: list[int] = []

    @contextlib.contextmanager
    def running_server(kind: str, **kwargs: Any) -> Iterator[h.Server]:
        with original(kind, serve_args=serve_args, **kwargs) as server:
            stop = threading.Event()
            thread = threading.Thread(target=scraper, args=(server, stop, scrapes), daemon=True)
            if scrape:
                thread.start()
            try:
                yield server
            finally:
                stop.set()
                if scrape:
                    thread.join(timeout=5)

    h.running_server = running_server
    try:
        yield scrapes
    finally:
        h.running_server = original


def scraper(server: h.Server, stop: threading.Event, scrapes: list[int]) -> None:
    """GET /metrics every :data:`SCRAPE_EVERY` seconds until ``stop``; record body sizes."""
    while not stop.wait(SCRAPE_EVERY):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"/metrics answered {response.status}")
            scrapes.append(len(body))
        finally:
            connection.close()


def run(members: int, messages: int, metrics: bool, timeout: float) -> dict[str, Any]:
    """One fan-out round with metrics on or off."""
    args = [] if metrics else ["--metrics-path", "none"]
    with serving_with(args, scrape=metrics) as scrapes:
        row = fanout.run_fanout("chatcore-serve", members, messages, timeout=timeout)
    row["scrapes"] = len(scrapes)
    return row


def main() -> int:
    parser = h.parser(__doc__)
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    rows = h.run_rounds(
        [
            ("metrics off", lambda: run(args.members, args.messages, False, args.timeout)),
            ("metrics on", lambda: run(args.members, args.messages, True, args.timeout)),
        ],
        args.repeat,
        ["cpu_us_per_delivery", "deliveries_per_s", "frames_per_message"],
    )
    off, on = rows
    difference = 100 * (on["cpu_us_per_delivery"] / off["cpu_us_per_delivery"] - 1)
    print(
        h.format_table(
            rows,
            [
                ("name", "", "s"),
                ("cpu_us_per_delivery", "CPU µs/delivery", ".3f"),
                ("cpu_us_per_delivery_spread", "spread", "s"),
                ("deliveries_per_s", "deliveries/s", ".0f"),
                ("scrapes", "scrapes", "d"),
                ("verified", "verified", "s"),
            ],
        )
    )
    print(f"metrics on vs off: {difference:+.1f} % CPU per delivery (median of {args.repeat})")
    h.write_json(
        getattr(args, "json", None), "metrics_cost", {"rows": rows, "difference": difference}
    )
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
