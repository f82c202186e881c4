"""What Prometheus metrics cost: fan-out work per delivery with metrics on and off.

Three measurements of the same question, side by side in one run:

``instructions``
    The deterministic one. chatcore's fan-out runs inside one process with
    no sockets (``_inprocess_fanout.py``: every client scripted, every send
    counted and dropped, virtual time, the same schedule every round) under
    valgrind (``cachegrind``, no cache simulation), which counts the CPU
    instructions executed. Each configuration runs twice, with K and 2K
    messages; the difference is the cost of K messages to every member,
    start-up and imports cancelled. Repeated runs agree to a few parts per
    million, so a difference of a tenth of a percent is visible. Without
    sockets a delivery costs far less than on a real server, so any cost
    the metrics add is a larger share here than there: an upper bound.
    Needs ``valgrind`` on the PATH (Debian: ``apt-get install valgrind``).
``cpu``
    The same in-process rounds timed with ``time.process_time``, metrics
    off and on alternately, in pairs; the median of the per-pair ratios.
``server``
    A real ``chatcore serve``, the fan-out scenario of ``bench/fanout.py``
    (one client publishes K messages to a room of M members), with
    ``--metrics-path none`` and with metrics on and ``/metrics`` scraped
    every :data:`SCRAPE_EVERY` seconds, in pairs run back to back; the
    median of the per-pair ratios of server CPU per delivery. This is the
    real thing, and on a shared machine the noisiest.

Both in-process measurements run both delivery paths: ``task`` (a writer
task per connection: hypercorn and trio-websocket) and ``direct`` (the lean
engine's writes straight from the pacer).

    python bench/metrics_cost.py [--methods instructions,cpu,server] [--repeat 5] [--quick]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import _harness as h
import _inprocess_fanout
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


# -- in process: instructions and CPU time -----------------------------------------------

#: The delivery paths of the in-process rounds.
PATHS = ("task", "direct")
#: Room size and messages of the in-process rounds (``--quick``: a quarter).
INPROCESS_MEMBERS = 200
INPROCESS_MESSAGES = 200
_INSTRUCTIONS = re.compile(r"I\s+refs:\s+([\d,]+)")


def count_instructions(members: int, messages: int, path: str, metrics: bool) -> int:
    """Instructions one in-process round's whole process executes, counted by valgrind."""
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    argv += [h.PYTHON, str(h.BENCH_DIR / "_inprocess_fanout.py"), "--path", path]
    argv += ["--members", str(members), "--messages", str(messages)]
    argv += ["--metrics", "on" if metrics else "off"]
    # The same string hashes every run: the same dict layouts, the same work.
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if metrics and result["observed_publishes"] != messages:
        raise RuntimeError(
            f"metrics counted {result['observed_publishes']} of {messages} publishes"
        )
    found = _INSTRUCTIONS.search(done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-500:]!r}")
    return int(found.group(1).replace(",", ""))


def instructions(members: int, messages: int) -> list[dict[str, Any]]:
    """Instructions per delivery, metrics off and on, for each path (two runs at a time)."""
    jobs = [
        (path, metrics, size)
        for path in PATHS
        for metrics in (False, True)
        for size in (messages, 2 * messages)
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        counts = dict(
            zip(
                jobs,
                pool.map(lambda job: count_instructions(members, job[2], job[0], job[1]), jobs),
                strict=True,
            )
        )
    deliveries = (members + 1) * messages  # the K messages the larger run adds
    rows = []
    for path in PATHS:
        per = {
            metrics: (counts[path, metrics, 2 * messages] - counts[path, metrics, messages])
            / deliveries
            for metrics in (False, True)
        }
        rows.append(
            {
                "path": path,
                "off": per[False],
                "on": per[True],
                "difference": f"{100 * (per[True] / per[False] - 1):+.2f} %",
            }
        )
    return rows


def inprocess_cpu(members: int, messages: int, repeat: int) -> list[dict[str, Any]]:
    """CPU per delivery of in-process rounds, off/on in alternating pairs, for each path."""
    rows = []
    for path in PATHS:
        values: dict[bool, list[float]] = {False: [], True: []}
        ratios = []
        for index in range(max(repeat, 2)):
            pair = {}
            for metrics in (False, True) if index % 2 == 0 else (True, False):
                result = _inprocess_fanout.run_round(
                    members, messages, direct=path == "direct", metrics=metrics
                )
                pair[metrics] = 1e6 * result["cpu"] / result["deliveries"]
                values[metrics].append(pair[metrics])
            ratios.append(pair[True] / pair[False])
        rows.append(
            {
                "path": path,
                "off": statistics.median(values[False]),
                "on": statistics.median(values[True]),
                "difference": _ratio_summary(ratios),
            }
        )
    return rows


def _ratio_summary(ratios: list[float]) -> str:
    """Median and quartiles of on/off ratios, as percentages."""
    ratios = sorted(ratios)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return (
        f"median {100 * (statistics.median(ratios) - 1):+.1f} % "
        f"(quartiles {100 * (quartiles[0] - 1):+.1f} .. {100 * (quartiles[2] - 1):+.1f} %, "
        f"{len(ratios)} pairs)"
    )


# -- the command line ---------------------------------------------------------------------

METHODS = ("instructions", "cpu", "server")


def main() -> int:
    parser = h.parser(__doc__)
    parser.add_argument("--members", type=int, default=300, help="server: room size (300)")
    parser.add_argument("--messages", type=int, default=1000, help="server: messages (1000)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS)} (all; instructions needs valgrind)",
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    scale = 4 if args.quick else 1
    members, messages = INPROCESS_MEMBERS // scale, INPROCESS_MESSAGES // scale
    results: dict[str, Any] = {"load_before": h.load_average()}
    status = 0
    if "instructions" in methods:
        if shutil.which("valgrind") is None:
            print("instructions: skipped, valgrind is not installed", file=sys.stderr)
        else:
            rows = instructions(members, messages)
            results["instructions"] = rows
            print(
                f"\nInstructions per delivery, in process ({members} members, {messages} messages):"
            )
            print(h.format_table(rows, _INPROCESS_COLUMNS))
    if "cpu" in methods:
        rows = inprocess_cpu(members, messages, args.repeat)
        results["cpu"] = rows
        print(f"\nCPU µs per delivery, in process ({members} members, {messages} messages):")
        print(h.format_table(rows, _INPROCESS_COLUMNS))
    if "server" in methods:
        rows, ratios = paired_rounds(args.members, args.messages, args.repeat, args.timeout)
        results["server"] = {"rows": rows, "ratios": ratios}
        print(
            f"\nchatcore serve, CPU µs per delivery "
            f"({args.members} members, {args.messages} messages):"
        )
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
        print(f"metrics on / off, per pair: {_ratio_summary(ratios)}")
        status = 0 if all(r["verified"] for r in rows) else 1
    results["load_after"] = h.load_average()
    print(f"\nload average {results['load_before']:.1f} before, {results['load_after']:.1f} after")
    h.write_json(args.json, "metrics_cost", results)
    return status


_INPROCESS_COLUMNS = [
    ("path", "path", "s"),
    ("off", "metrics off", ",.5g"),
    ("on", "metrics on", ",.5g"),
    ("difference", "on vs off", "s"),
]


if __name__ == "__main__":
    raise SystemExit(main())
