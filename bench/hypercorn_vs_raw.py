"""Fan-out through hypercorn: chatcore's ASGI app against a raw ASGI broadcast loop.

Both servers run on hypercorn's trio worker, each in its own process
(``_hypercorn_server.py``), side by side in one run (interleaved, a fresh
server per scenario); the clients run in other processes (``_client.py``,
``_latency_client.py``: epoll loops much cheaper than the servers).

* **chatcore**: what ``chatcore serve`` runs for a hub: ``ASGIApp(hub)``,
  permessage-deflate off, ``TCP_USER_TIMEOUT`` on the listening socket,
  ``gc.freeze()`` and ``gc.set_threshold(50000, 20, 100)`` once listening
  (``chatcore._serve.tune_gc``).
* **raw**: a plain ASGI app on ``hypercorn.trio.serve`` (default config,
  Python's default GC): a dict of connections, a writer task per connection
  draining its memory channel with one ``await send({"type":
  "websocket.send", "text": ...})`` per message, each message JSON-encoded
  once per broadcast. ``raw+gc`` is the same with chatcore's GC tuning
  (full run only), to separate what the tuning buys from what batching does.

Scenarios:

1. **Fan-out burst**: M receivers (one room), K messages of about 100 bytes.
   ``client``: one of the receivers writes its K ``publish`` frames at once,
   so everything enters through hypercorn; ``server``: the server process
   publishes the K messages in one scheduler pass (``hub.publish`` K times
   concurrently; the raw app loops over its broadcast). Every receiver checks
   it got offsets 1..K in order.
2. **Steady latency**: R receivers; one more client publishes timestamped
   messages at a steady rate for a bounded time; every receiver checks it got
   them all, in order, and records how long each took (publisher's
   ``send()`` to the kernel's receive timestamp of the receiver's socket,
   ``SO_TIMESTAMPNS``, same ``CLOCK_REALTIME``; also to the moment the
   receiver process read it).

**Server CPU** is read from ``/proc`` for the server process:
``/proc/<pid>/task/*/schedstat`` (time on CPU in ns, all threads; also the
time it spent runnable but waiting for a CPU, ``run-queue wait``, which
shows contention with the clients and other work), cross-checked against
``/proc/<pid>/stat`` utime + stime (10 ms ticks), from just before publishing
starts until the last receiver has its last message.

Run::

    .venv/bin/python bench/hypercorn_vs_raw.py --quick   # M=200, K=50; R=100 for 3 s: < 1 min
    .venv/bin/python bench/hypercorn_vs_raw.py           # M=1000, K=200; R=100,200, 15 s: ~3 min
    .venv/bin/python bench/hypercorn_vs_raw.py --profile bench/results/prof  # + cProfile runs

Only 127.0.0.1; every child is started and stopped by PID (``_harness``);
every wait has a deadline.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _harness as h

#: The issue's targets.
TARGET_RATIO = 1 / 6
TARGET_P99_MS = 10.0

SERVERS = {
    # name: (--app, extra server arguments)
    "chatcore": ("chatcore", ()),
    "raw": ("raw", ()),
    "raw+gc": ("raw", ("--gc-tuning",)),
}

FANOUT_COLUMNS = [
    ("server", "server", "s"),
    ("publish", "publish", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("cpu_us_per_delivery", "server µs/delivery", ".2f"),
    ("spread", "min..max", "s"),
    ("stat_us_per_delivery", "(stat ticks)", ".1f"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    ("gc_share", "GC share", ".0%"),
    ("runqueue_ms", "run-queue wait ms", ",.0f"),
    ("client_cpu_s", "client CPU s", ".2f"),
    ("load1", "load", ".2f"),
    ("verified", "all received", "s"),
]

RATIO_COLUMNS = [
    ("publish", "publish", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("chatcore", "chatcore µs/delivery", ".2f"),
    ("baseline", "vs", "s"),
    ("raw", "raw µs/delivery", ".2f"),
    ("ratio", "chatcore ÷ raw", ".3f"),
    ("met", "≤ 1/6", "s"),
]

LATENCY_COLUMNS = [
    ("server", "server", "s"),
    ("receivers", "receivers", "d"),
    ("rate", "msg/s", ".0f"),
    ("messages", "messages", "d"),
    ("kernel_p50_ms", "p50 ms", ".2f"),
    ("kernel_p99_ms", "p99 ms", ".2f"),
    ("spread", "p99 min..max", "s"),
    ("kernel_p999_ms", "p99.9 ms", ".2f"),
    ("kernel_max_ms", "max ms", ".1f"),
    ("read_p50_ms", "p50 read ms", ".2f"),
    ("read_p99_ms", "p99 read ms", ".2f"),
    ("complete_p99_ms", "p99 all-have-it ms", ".2f"),
    ("last_message_ms", "last msg ms", ".1f"),
    ("server_cpu_share", "server CPU", ".0%"),
    ("cpu_us_per_delivery", "server µs/delivery", ".1f"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("runqueue_ms", "run-queue wait ms", ",.0f"),
    ("client_cpu_s", "client CPU s", ".1f"),
    ("load1", "load", ".2f"),
    ("verified", "all received", "s"),
]


# -- /proc readings ------------------------------------------------------------------


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on CPU, seconds runnable but waiting) over every thread of ``pid``."""
    on_cpu = waiting = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        on_cpu += int(fields[0])
        waiting += int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


class ServerReading:
    """What the server process had used at one moment (all from ``/proc``)."""

    def __init__(self, pid: int) -> None:
        self.cpu, self.waiting = schedstat(pid)
        self.stat_cpu = h.proc_cpu_seconds(pid)


def percentile(ordered: Sequence[int], fraction: float) -> float:
    """The ``fraction`` quantile of sorted values (nearest rank), in the values' unit."""
    if not ordered:
        return math.nan
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))])


# -- processes -------------------------------------------------------------------------


def start_server(server: str) -> tuple[h.ManagedProcess, int]:
    app, extra = SERVERS[server]
    process = h.ManagedProcess(
        [h.PYTHON, str(h.BENCH_DIR / "_hypercorn_server.py"), "--app", app, *extra],
        f"server[{server}]",
    )
    try:
        port = int(process.expect("PORT", time.monotonic() + 30))
    except BaseException:
        process.stop()
        raise
    return process, port


def client_argv(script: str, server: str, port: int, connections: int, messages: int) -> list[str]:
    argv = [
        h.PYTHON,
        str(h.BENCH_DIR / script),
        "--port",
        str(port),
        "--path",
        "/ws",
        "--connections",
        str(connections),
        "--messages",
        str(messages),
    ]
    if server == "chatcore":
        argv += ["--join", h.ROOM]
    return argv


def _window_start(server: h.ManagedProcess, deadline: float, profile: str | None) -> dict[str, Any]:
    state: dict[str, Any] = {"gc": json.loads(server.ask("GC", "GC", deadline))}
    if profile:
        server.ask("PROFILE start", "PROFILE", deadline)
    state["cpu"] = float(server.ask("CPU", "CPU", deadline))
    state["stats"] = json.loads(server.ask("STATS", "STATS", deadline))
    state["reading"] = ServerReading(server.pid)
    state["wall"] = time.perf_counter()
    return state


def _window_end(
    server: h.ManagedProcess, start: dict[str, Any], deadline: float, profile: str | None
) -> dict[str, Any]:
    reading = ServerReading(server.pid)
    wall = time.perf_counter() - start["wall"]
    cpu = float(server.ask("CPU", "CPU", deadline)) - start["cpu"]
    if profile:
        server.ask(f"PROFILE stop {profile}", "PROFILE", deadline)
    gc = json.loads(server.ask("GC", "GC", deadline))
    stats = json.loads(server.ask("STATS", "STATS", deadline))
    return {
        "wall_s": wall,
        "server_cpu_s": reading.cpu - start["reading"].cpu,
        "server_stat_cpu_s": reading.stat_cpu - start["reading"].stat_cpu,
        "server_process_time_s": cpu,
        "runqueue_ms": 1e3 * (reading.waiting - start["reading"].waiting),
        "gc_share": (gc["seconds"] - start["gc"]["seconds"]) / max(cpu, 1e-9),
        "gc_collections": [
            b - a for a, b in zip(start["gc"]["collections"], gc["collections"], strict=True)
        ],
        "server_frames": stats["frames"] - start["stats"]["frames"],
        "dropped": stats["dropped"] - start["stats"]["dropped"],
    }


# -- scenario 1: fan-out burst -----------------------------------------------------------


def run_fanout(
    server_name: str,
    publish: str,
    receivers: int,
    messages: int,
    *,
    timeout: float,
    client_processes: int = 1,
    profile: str | None = None,
) -> dict[str, Any]:
    """M receivers, K messages published in a burst; one result row."""
    deadline = time.monotonic() + timeout
    server, port = start_server(server_name)
    clients: list[h.ManagedProcess] = []
    try:
        for i, count in enumerate(h.split_evenly(receivers, client_processes)):
            argv = client_argv("_client.py", server_name, port, count, messages)
            argv += ["--timeout", str(timeout)]
            if publish == "client" and i == 0:
                argv += ["--publish", str(messages)]
            clients.append(h.ManagedProcess(argv, f"client{i}"))
        for client in clients:
            client.expect("READY", deadline)
        time.sleep(0.3)  # let the server finish answering joins before the window opens
        client_cpu0 = sum(c.cpu_seconds() for c in clients)
        start = _window_start(server, deadline, profile)
        if publish == "client":
            clients[0].send("GO")
        else:
            server.send(f"PUBLISH burst {messages}")
        reports = [json.loads(c.expect("DONE", deadline)) for c in clients]
        window = _window_end(server, start, deadline, profile)
        client_cpu = sum(c.cpu_seconds() for c in clients) - client_cpu0
        if publish != "client":
            server.expect("PUBLISHED", deadline)
    finally:
        for client in clients:
            client.stop()
        server.stop()
    deliveries = receivers * messages
    received = sum(r["messages"] for r in reports)
    return {
        "scenario": "fanout",
        "server": server_name,
        "publish": publish,
        "M": receivers,
        "K": messages,
        "deliveries": deliveries,
        "received": received,
        "verified": received == deliveries and all(r["errors"] == 0 for r in reports),
        **window,
        "cpu_us_per_delivery": 1e6 * window["server_cpu_s"] / deliveries,
        "stat_us_per_delivery": 1e6 * window["server_stat_cpu_s"] / deliveries,
        "process_time_us_per_delivery": 1e6 * window["server_process_time_s"] / deliveries,
        "frames_per_message": sum(r["message_frames"] for r in reports) / deliveries,
        "deliveries_per_s": deliveries / window["wall_s"],
        "client_cpu_s": client_cpu,
    }


# -- scenario 2: steady publisher, latency ----------------------------------------------------


def run_latency(
    server_name: str,
    receivers: int,
    rate: float,
    duration: float,
    *,
    timeout: float,
    profile: str | None = None,
) -> dict[str, Any]:
    """R receivers, one publisher at ``rate`` messages/s for ``duration`` s; one row."""
    messages = max(1, round(rate * duration))
    deadline = time.monotonic() + duration + timeout
    server, port = start_server(server_name)
    processes: list[h.ManagedProcess] = []
    try:
        argv = client_argv("_latency_client.py", server_name, port, receivers, messages)
        receiving = h.ManagedProcess([*argv, "--timeout", str(duration + timeout)], "receivers")
        processes.append(receiving)
        receiving.expect("READY", deadline)
        argv = client_argv("_latency_client.py", server_name, port, 1, messages)
        publisher = h.ManagedProcess(
            [
                *argv,
                "--publish",
                str(messages),
                "--rate",
                str(rate),
                "--timeout",
                str(duration + timeout),
            ],
            "publisher",
        )
        processes.append(publisher)
        publisher.expect("READY", deadline)
        time.sleep(0.3)
        client_cpu0 = sum(p.cpu_seconds() for p in processes)
        start = _window_start(server, deadline, profile)
        publisher.send("GO")
        received_report = json.loads(receiving.expect("DONE", deadline))
        publisher_report = json.loads(publisher.expect("DONE", deadline))
        window = _window_end(server, start, deadline, profile)
        client_cpu = sum(p.cpu_seconds() for p in processes) - client_cpu0
    finally:
        for process in processes:
            process.stop()
        server.stop()
    connections = receivers + 1  # the publisher receives its own messages too
    deliveries = connections * messages
    received = received_report["messages"] + publisher_report["messages"]
    kernel = sorted(received_report.pop("kernel_latency_us"))
    read = sorted(received_report.pop("read_latency_us"))
    # Per message: from its send until its last receiver had it (the fan-out's span).
    sent_at = received_report.pop("sent_at")
    arrived = received_report.pop("last_arrival")
    complete = sorted(round(1e6 * (arrived[o] - sent_at[o])) for o in arrived)
    last = str(messages)
    row: dict[str, Any] = {
        "scenario": "latency",
        "server": server_name,
        "receivers": receivers,
        "rate": rate,
        "duration_s": duration,
        "messages": messages,
        "deliveries": deliveries,
        "received": received,
        "verified": received == deliveries
        and received_report["errors"] == 0
        and publisher_report["errors"] == 0,
        "publish_s": publisher_report["publish_s"],
        "client_cpu_s": client_cpu,
        **window,
        "cpu_us_per_delivery": 1e6 * window["server_cpu_s"] / deliveries,
        "server_cpu_share": window["server_cpu_s"] / window["wall_s"],
        "frames_per_message": (
            received_report["message_frames"] + publisher_report["message_frames"]
        )
        / deliveries,
    }
    for name, values in (("kernel", kernel), ("read", read)):
        for label, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            row[f"{name}_{label}_ms"] = percentile(values, fraction) / 1e3
        row[f"{name}_max_ms"] = values[-1] / 1e3 if values else math.nan
    row["complete_p50_ms"] = percentile(complete, 0.5) / 1e3
    row["complete_p99_ms"] = percentile(complete, 0.99) / 1e3
    row["last_message_ms"] = 1e3 * (arrived[last] - sent_at[last]) if last in arrived else math.nan
    return row


# -- running and reporting ----------------------------------------------------------------------


def repeated(
    scenarios: Sequence[tuple[str, Callable[[], dict[str, Any]]]], repeat: int, key: str
) -> list[dict[str, Any]]:
    """Each scenario ``repeat`` times, interleaved (A B A B); the median row by ``key``."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in scenarios}
    for round_ in range(repeat):
        for name, thunk in scenarios:
            load = h.load_average()
            started = time.monotonic()
            row = thunk()
            row["load1"] = load
            row["load1_after"] = h.load_average()
            results[name].append(row)
            summary = f"{row['cpu_us_per_delivery']:7.2f} us/delivery"
            if "kernel_p99_ms" in row:
                summary += f", p50 {row['kernel_p50_ms']:.2f} ms p99 {row['kernel_p99_ms']:.2f} ms"
            print(
                f"  {name} [{round_ + 1}/{repeat}] {time.monotonic() - started:5.1f}s {summary}"
                f" (load {load:.2f})" + ("" if row["verified"] else "  NOT VERIFIED"),
                file=sys.stderr,
                flush=True,
            )
    rows = [h.median_row(results[name], key) for name, _ in scenarios]
    for row in rows:
        if row["repeats"] > 1:
            row["spread"] = f"{row[key + '_min']:.1f}..{row[key + '_max']:.1f}"
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(r["server"], r["publish"], r["M"], r["K"]): r for r in rows}
    out = []
    for (server, publish, m, k), row in by_key.items():
        if server != "chatcore":
            continue
        for baseline in ("raw", "raw+gc"):
            raw = by_key.get((baseline, publish, m, k))
            if raw is None:
                continue
            ratio = row["cpu_us_per_delivery"] / raw["cpu_us_per_delivery"]
            out.append(
                {
                    "publish": publish,
                    "M": m,
                    "K": k,
                    "chatcore": row["cpu_us_per_delivery"],
                    "baseline": baseline,
                    "raw": raw["cpu_us_per_delivery"],
                    "ratio": ratio,
                    "met": "yes" if ratio <= TARGET_RATIO else "NO",
                }
            )
    return out


def print_profile(path: str, top: int = 25) -> None:
    print(f"\ncProfile of the server ({path}), top {top} by own time:")
    stats = pstats.Stats(path, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)


def main() -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--receivers", type=int, default=0, help="M of the fan-out (1000; quick 200)")
    p.add_argument("--messages", type=int, default=0, help="K of the fan-out (200; quick 50)")
    p.add_argument(
        "--publish",
        default="client,server",
        type=lambda s: s.split(","),
        help="fan-out publishers, comma-separated: client, server (both)",
    )
    p.add_argument(
        "--servers",
        default="",
        type=lambda s: [x for x in s.split(",") if x],
        help="comma-separated: chatcore, raw, raw+gc (all; quick: chatcore,raw)",
    )
    p.add_argument(
        "--latency-receivers",
        default="",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="receivers of the latency scenario, comma-separated (100,200; quick 100)",
    )
    p.add_argument("--rate", type=float, default=100.0, help="steady publisher, msg/s (100)")
    p.add_argument("--duration", type=float, default=0.0, help="steady publishing, s (15; quick 3)")
    p.add_argument(
        "--scenarios",
        default="fanout,latency",
        type=lambda s: s.split(","),
        help="comma-separated: fanout, latency (both)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="afterwards, run each server (not raw+gc) once more under cProfile (the "
        "client-published burst and the steady latency scenario, as selected) and print "
        "the top functions; stats go to DIR",
    )
    args = p.parse_args()
    h.raise_nofile_limit()
    m = args.receivers or (200 if args.quick else 1000)
    k = args.messages or (50 if args.quick else 200)
    servers = args.servers or (["chatcore", "raw"] if args.quick else list(SERVERS))
    latency_sizes = args.latency_receivers or ([100] if args.quick else [100, 200])
    duration = args.duration or (3.0 if args.quick else 15.0)
    started = time.monotonic()
    print(f"load average at start: {h.load_average():.2f}", file=sys.stderr)

    fanout_rows: list[dict[str, Any]] = []
    latency_rows: list[dict[str, Any]] = []
    if "fanout" in args.scenarios:
        print(f"fan-out burst, M={m}, K={k}:", file=sys.stderr)
        scenarios: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        for publish in args.publish:
            for server in servers:

                def thunk(server: str = server, publish: str = publish) -> dict[str, Any]:
                    return run_fanout(
                        server,
                        publish,
                        m,
                        k,
                        timeout=args.timeout,
                        client_processes=args.client_processes,
                    )

                scenarios.append((f"{server:8} {publish:6}", thunk))
        fanout_rows = repeated(scenarios, args.repeat, "cpu_us_per_delivery")
    if "latency" in args.scenarios:
        print(
            f"steady publisher, {args.rate:g} msg/s for {duration:g} s:",
            file=sys.stderr,
        )
        scenarios = []
        for receivers in latency_sizes:
            for server in [s for s in servers if s != "raw+gc"]:

                def latency_thunk(
                    server: str = server, receivers: int = receivers
                ) -> dict[str, Any]:
                    return run_latency(server, receivers, args.rate, duration, timeout=args.timeout)

                scenarios.append((f"{server:8} latency R={receivers}", latency_thunk))
        latency_rows = repeated(scenarios, args.repeat, "kernel_p99_ms")
    profiles: list[str] = []
    if args.profile:
        directory = Path(args.profile)
        directory.mkdir(parents=True, exist_ok=True)
        print("profiled runs (CPU figures include cProfile's overhead):", file=sys.stderr)
        for server in [s for s in servers if s != "raw+gc"]:
            if "fanout" in args.scenarios:
                path = str(directory / f"{server}-fanout-client.prof")
                run_fanout(server, "client", m, k, timeout=args.timeout, profile=path)
                profiles.append(path)
            if "latency" in args.scenarios:
                path = str(directory / f"{server}-latency.prof")
                run_latency(
                    server,
                    latency_sizes[-1],
                    args.rate,
                    duration,
                    timeout=args.timeout,
                    profile=path,
                )
                profiles.append(path)

    ratio_rows = ratios(fanout_rows)
    print()
    if fanout_rows:
        print(
            f"Fan-out burst through hypercorn: M={m} receivers, K={k} messages; "
            "server CPU from /proc (schedstat, all threads) per delivery."
        )
        print(h.format_table(fanout_rows, FANOUT_COLUMNS))
        print()
        print("chatcore ÷ raw, server CPU per delivery (target ≤ 1/6 = 0.167):")
        print(h.format_table(ratio_rows, RATIO_COLUMNS))
        print()
    if latency_rows:
        print(
            f"Steady publisher: R receivers + the publisher, {args.rate:g} msg/s for "
            f"{duration:g} s; latency = publisher's send() to the kernel's receive timestamp "
            "at the receiver (read: to the receiver process's read; all-have-it: to the "
            "last receiver's copy; last msg: that for the final message, i.e. how far "
            f"behind the server ended); target p99 ≤ {TARGET_P99_MS:g} ms for chatcore."
        )
        print(h.format_table(latency_rows, LATENCY_COLUMNS))
    for path in profiles:
        print_profile(path)
    print(f"\n{time.monotonic() - started:.0f} s in all; load average now {h.load_average():.2f}")
    written = h.write_json(
        args.json,
        "hypercorn_vs_raw",
        {
            "args": {key: value for key, value in vars(args).items() if key != "json"},
            "hypercorn": importlib.metadata.version("hypercorn"),
            "fanout": fanout_rows,
            "ratios": ratio_rows,
            "latency": latency_rows,
        },
    )
    if written:
        print(f"results written to {written}")
    verified = all(r["verified"] for r in fanout_rows + latency_rows)
    if not verified:
        print("SOME RECEIVERS DID NOT GET EVERY MESSAGE", file=sys.stderr)
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
