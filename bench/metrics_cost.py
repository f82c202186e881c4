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
import statistics
import sys
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


def paired_rounds(
    members: int, messages: int, repeat: int, timeout: float
) -> tuple[list[dict[str, Any]], list[float]]:
    """``repeat`` pairs of rounds, off/on then on/off alternately; rows and on/off ratios.

    The machine's load drifts; comparing the two rounds of each pair (run
    back to back) and taking the median of those ratios cancels most of it.
    """
    rounds: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    ratios: list[float] = []
    for index in range(repeat):
        order = (False, True) if index % 2 == 0 else (True, False)
        pair = {}
        for metrics in order:
            row = run(members, messages, metrics, timeout)
            row["load1"] = h.load_average()
            rounds[metrics].append(row)
            pair[metrics] = row
            print(
                f"  metrics {'on ' if metrics else 'off'} [{index + 1}/{repeat}]: "
                f"{row['cpu_us_per_delivery']:.3f} µs/delivery, load {row['load1']:.1f}",
                file=sys.stderr,
                flush=True,
            )
        ratios.append(pair[True]["cpu_us_per_delivery"] / pair[False]["cpu_us_per_delivery"])
    rows = []
    for metrics in (False, True):
        values = sorted(r["cpu_us_per_delivery"] for r in rounds[metrics])
        rows.append(
            {
                "name": "metrics on" if metrics else "metrics off",
                "cpu_us_per_delivery": statistics.median(values),
                "spread": f"{values[0]:.3g}..{values[-1]:.3g}",
                "scrapes": sum(r["scrapes"] for r in rounds[metrics]),
                "verified": all(r["verified"] for r in rounds[metrics]),
            }
        )
    return rows, ratios


def main() -> int:
    parser = h.parser(__doc__)
    parser.add_argument("--members", type=int, default=300)
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    rows, ratios = paired_rounds(args.members, args.messages, args.repeat, args.timeout)
    print(
        h.format_table(
            rows,
            [
                ("name", "", "s"),
                ("cpu_us_per_delivery", "CPU µs/delivery (median)", ".3f"),
                ("spread", "spread", "s"),
                ("scrapes", "scrapes", "d"),
                ("verified", "verified", "s"),
            ],
        )
    )
    ratios.sort()
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(
        f"metrics on / off, per pair: median {100 * (statistics.median(ratios) - 1):+.1f} %, "
        f"quartiles {100 * (quartiles[0] - 1):+.1f} % .. {100 * (quartiles[2] - 1):+.1f} %, "
        f"range {100 * (ratios[0] - 1):+.1f} % .. {100 * (ratios[-1] - 1):+.1f} % "
        f"({len(ratios)} pairs)"
    )
    h.write_json(args.json, "metrics_cost", {"rows": rows, "ratios": ratios})
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
