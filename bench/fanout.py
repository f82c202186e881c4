"""Fan-out side by side: chatcore serve, chatcore on trio-websocket, websockets, raw loops.

Every server runs in its own process on 127.0.0.1 (``_harness.start_server``),
one at a time, interleaved over ``--repeat`` rounds; all clients of a scenario
run in one more process (``_client.py``), which checks every delivery for
count and order. Server CPU and RSS come from ``/proc``. Scenarios
(``--scenarios``, default all):

``fanout``   one client publishes K x 100 B to M members: server CPU µs per
             delivery, frames per message (target: chatcore serve <= websockets).
``latency``  R receivers, one publisher at 100 msg/s for a bounded time:
             p50/p99 publish-to-delivery latency, server CPU % (targets:
             p99 <= 10 ms, CPU <= 2 x websockets).
``burst``    the server publishes K messages in one go (``GET /burst``) to M
             members: CPU per delivery (target: chatcore serve <= 1/6 of raw-hypercorn).
``idle``     N joined idle connections: KiB RSS per connection (targets:
             chatcore serve <= 36, chatcore-trio-ws <= 20).
``churn``    rounds of C connections opened, joined and reset (RST): RSS after
             each round (target: last round within 20 % of the first round's peak).
``slow``     readers reading normally + 1 never-reading client (small receive
             buffer); the publisher sends 64 x 64 KB then S x 100 B: readers and
             publisher closed (target 0), readers that got every message, whether
             the readers stalled (nothing for 5 s), when the never-reading
             client was closed, peak RSS.

Run (from the repository root)::

    .venv/bin/python bench/fanout.py --quick                 # a few minutes
    .venv/bin/python bench/fanout.py                         # the full sizes
    .venv/bin/python bench/fanout.py --scenarios fanout,idle --servers chatcore-serve,websockets
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import _harness as h

SCENARIOS = ("fanout", "latency", "burst", "idle", "churn", "slow")
#: Sizes: (full, quick).
SIZES = {
    "fanout_members": (1000, 200),
    "fanout_messages": (200, 50),
    "latency_receivers": (200, 100),
    "latency_seconds": (10.0, 3.0),
    "burst_members": (1000, 200),
    "burst_messages": (200, 50),
    "idle_connections": (5000, 1000),
    "churn_rounds": (20, 5),
    "churn_connections": (1000, 200),
    "slow_readers": ("5,99", "5,99"),
    "slow_small": (20_000, 2_000),
}
#: Variants of ``chatcore serve`` the churn scenario also runs (``--servers``):
#: name -> (kind, extra ``chatcore serve`` options, target).
CHURN_VARIANTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # As before closed connections were freed at once: left in reference cycles.
    "chatcore-serve-cycles": ("chatcore-serve", (), "chatcore_cycles:app"),
    "chatcore-lean-cycles": ("chatcore-lean", (), "chatcore_cycles:app"),
    "chatcore-serve-no-gc-tuning": ("chatcore-serve", ("--no-gc-tuning",), ""),
    "chatcore-lean-no-gc-tuning": ("chatcore-lean", ("--no-gc-tuning",), ""),
}
RATE = 100.0
BIG_MESSAGES = 64
BIG_SIZE = 64_000


# -- the scenarios ----------------------------------------------------------------


def run_fanout(
    kind: str,
    members: int,
    messages: int,
    *,
    timeout: float,
    on_window: tuple[Callable[[h.Server], None], Callable[[h.Server], None]] | None = None,
) -> dict[str, Any]:
    """One client publishes ``messages`` to ``members`` (itself included); one row.

    ``on_window``: ``(start, stop)`` called with the server around the
    measurement window (the profiler's hook).
    """
    deadline = time.monotonic() + timeout
    with h.running_server(kind, timeout=timeout) as server:
        clients = h.start_clients(
            server, members, timeout=timeout, messages=messages, publish=messages
        )
        try:
            clients.wait_ready(deadline)
            time.sleep(0.3)  # the joins' replies are out before the window opens
            if on_window:
                on_window[0](server)
            window = h.Window(server)
            clients.send("GO")
            report = clients.expect_json("DONE", deadline)
            window.close()
            if on_window:
                on_window[1](server)
        finally:
            clients.stop()
    deliveries = members * messages
    return {
        "server": kind,
        "M": members,
        "K": messages,
        "received": report["messages"],
        "verified": report["messages"] == deliveries and report["errors"] == 0,
        "cpu_us_per_delivery": 1e6 * window.cpu / deliveries,
        "frames_per_message": report["message_frames"] / deliveries,
        "deliveries_per_s": deliveries / window.wall,
    }


def run_latency(
    kind: str,
    receivers: int,
    seconds: float,
    *,
    timeout: float,
    on_window: tuple[Callable[[h.Server], None], Callable[[h.Server], None]] | None = None,
) -> dict[str, Any]:
    """``receivers`` members and a publisher sending ``RATE`` msg/s for ``seconds``.

    ``on_window``: as for :func:`run_fanout`.
    """
    messages = max(1, round(RATE * seconds))
    deadline = time.monotonic() + seconds + timeout
    with h.running_server(kind) as server:
        members = receivers + 1  # the publisher receives its own messages too
        clients = h.start_clients(
            server,
            members,
            timeout=seconds + timeout,
            messages=messages,
            publish=messages,
            rate=RATE,
        )
        try:
            clients.wait_ready(deadline)
            time.sleep(0.3)
            if on_window:
                on_window[0](server)
            window = h.Window(server)
            clients.send("GO")
            report = clients.expect_json("DONE", deadline)
            window.close()
            if on_window:
                on_window[1](server)
        finally:
            clients.stop()
    latencies = sorted(report["latency_us"])
    deliveries = members * messages
    return {
        "server": kind,
        "R": receivers,
        "messages": messages,
        "verified": report["messages"] == deliveries and report["errors"] == 0,
        "p50_ms": h.percentile(latencies, 0.5) / 1e3,
        "p99_ms": h.percentile(latencies, 0.99) / 1e3,
        "max_ms": latencies[-1] / 1e3 if latencies else float("nan"),
        "cpu_percent": 100 * window.cpu / window.wall,
        "frames_per_message": report["message_frames"] / deliveries,
    }


def run_burst(kind: str, members: int, messages: int, *, timeout: float) -> dict[str, Any]:
    """The server publishes ``messages`` in one go to ``members``; one row."""
    deadline = time.monotonic() + timeout
    with h.running_server(kind) as server:
        clients = h.start_clients(server, members, timeout=timeout, messages=messages)
        try:
            clients.wait_ready(deadline)
            time.sleep(0.3)
            window = h.Window(server)
            server.burst(messages, timeout=timeout)
            report = clients.expect_json("DONE", deadline)
            window.close()
        finally:
            clients.stop()
    deliveries = members * messages
    return {
        "server": kind,
        "M": members,
        "K": messages,
        "verified": report["messages"] == deliveries and report["errors"] == 0,
        "cpu_us_per_delivery": 1e6 * window.cpu / deliveries,
        "frames_per_message": report["message_frames"] / deliveries,
        "deliveries_per_s": deliveries / window.wall,
    }


def run_idle(kind: str, connections: int, *, timeout: float) -> dict[str, Any]:
    """``connections`` joined, idle connections: server RSS per connection."""
    deadline = time.monotonic() + timeout
    with h.running_server(kind) as server:
        time.sleep(0.5)
        rss0 = server.rss_bytes()
        # A connection the server closes during the handshake is counted, not fatal.
        clients = h.start_clients(server, connections, timeout=timeout, tolerate_closes=True)
        try:
            report = clients.wait_ready(deadline)
            time.sleep(1.0)  # the last joins settle
            rss1 = server.rss_bytes()
        finally:
            clients.stop()
    return {
        "server": kind,
        "N": connections,
        "refused": report["refused"],
        "verified": report["ready"] == connections,
        "kib_per_connection": (rss1 - rss0) / 1024 / report["ready"],
        "rss_mib": rss1 / 2**20,
    }


def run_churn(kind: str, rounds: int, connections: int, *, timeout: float) -> dict[str, Any]:
    """``rounds`` of ``connections`` opened, joined and reset: RSS per round.

    ``kind`` may also name one of :data:`CHURN_VARIANTS`.
    """
    deadline = time.monotonic() + timeout
    peaks: list[int] = []
    after: list[int] = []
    server_kind, options = kind, {}
    if kind in CHURN_VARIANTS:
        server_kind, serve_args, target = CHURN_VARIANTS[kind]
        options = {"serve_args": serve_args, "target": target}
    with h.running_server(server_kind, **options) as server:
        clients = h.start_clients(server, 0, timeout=timeout)
        try:
            clients.wait_ready(deadline)
            for _ in range(rounds):
                window = h.Window(server)
                clients.send(f"CHURN {connections}")
                clients.expect("CHURNED", deadline, tick=window.sample)
                time.sleep(0.3)  # the server notices the resets
                window.close()
                peaks.append(window.rss_peak)
                after.append(server.rss_bytes())
        finally:
            clients.stop()
    return {
        "server": kind,
        "rounds": rounds,
        "C": connections,
        "verified": len(after) == rounds,
        "first_peak_mib": peaks[0] / 2**20,
        "last_mib": after[-1] / 2**20,
        "growth": after[-1] / peaks[0] - 1,
        "series": " ".join(f"{rss / 2**20:.0f}" for rss in after),
    }


def run_slow(
    kind: str, readers: int, small: int, *, timeout: float, linger: float = 10.0
) -> dict[str, Any]:
    """``readers`` healthy readers (the publisher is the first) + one never-reading client."""
    messages = BIG_MESSAGES + small
    deadline = time.monotonic() + timeout
    with h.running_server(kind) as server:
        clients = h.start_clients(
            server,
            readers,
            timeout=timeout + linger,
            messages=messages,
            publish=small,
            big=BIG_MESSAGES,
            big_size=BIG_SIZE,
            never_read=True,
            tolerate_closes=True,
        )
        never_closed: list[float] = []
        try:
            port = clients.wait_ready(deadline)["never_read_port"]
            time.sleep(0.3)
            window = h.Window(server)

            def tick() -> None:
                window.sample()
                if not never_closed and not h.tcp_established(server.port, port):
                    never_closed.append(time.perf_counter() - window.wall0)

            clients.send("GO")
            try:
                report = clients.expect_json("DONE", deadline, tick=tick)
                report["finished"] = True
            except TimeoutError:  # still delivering: report where it got to
                report = clients.expect_json("STATUS", time.monotonic() + 30, before="STATUS")
                report["finished"] = False
            finish = time.monotonic() + linger  # give the never-reading client's close time
            while not never_closed and time.monotonic() < finish:
                tick()
                time.sleep(0.05)
            window.close()
        finally:
            clients.stop()
    return {
        "server": kind,
        "readers": readers,
        "S": small,
        "verified": True,  # the outcome is the row itself
        "finished": "yes" if report["finished"] else "NO (time limit)",
        "readers_done": report["done"],
        "stalled": "yes" if report.get("stalled") else "no",
        "readers_closed": report["closed"],
        "publisher_closed": "yes" if report["publisher_closed"] else "no",
        "readers_with_gaps": report["gapped"],
        "never_reader_closed_s": never_closed[0] if never_closed else None,
        "peak_rss_mib": window.rss_peak / 2**20,
        "wall_s": window.wall,
    }


# -- tables -------------------------------------------------------------------------


def _ratio(rows: list[dict[str, Any]], key: str, baseline: str, column: str) -> None:
    base = next((r for r in rows if r["server"] == baseline and key in r), None)
    for row in rows:
        if base is not None and key in row:
            row[column] = row[key] / base[key]


Column = tuple[str, str, str]  # (row key, heading, format spec)
SERVER: list[Column] = [("server", "server", "s")]
TAIL: list[Column] = [("load1", "load", ".1f"), ("verified", "all in order", "s")]
CPU: list[Column] = [
    ("cpu_us_per_delivery", "CPU µs/delivery", ".2f"),
    ("cpu_us_per_delivery_spread", "min..max", "s"),
]
FANOUT_COLUMNS = [
    *SERVER,
    ("M", "M", "d"),
    ("K", "K", "d"),
    *CPU,
    ("vs_websockets", "÷ websockets", ".2f"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    *TAIL,
]
LATENCY_COLUMNS = [
    *SERVER,
    ("R", "receivers", "d"),
    ("p50_ms", "p50 ms", ".2f"),
    ("p99_ms", "p99 ms", ".2f"),
    ("p99_ms_spread", "p99 min..max", "s"),
    ("max_ms", "max ms", ".1f"),
    ("cpu_percent", "server CPU %", ".0f"),
    ("vs_websockets", "CPU ÷ websockets", ".2f"),
    ("frames_per_message", "frames/msg", ".3f"),
    *TAIL,
]
BURST_COLUMNS = [
    *SERVER,
    ("M", "M", "d"),
    ("K", "K", "d"),
    *CPU,
    ("vs_raw_hypercorn", "÷ raw-hypercorn", ".3f"),
    ("frames_per_message", "frames/msg", ".3f"),
    *TAIL,
]
IDLE_COLUMNS = [
    *SERVER,
    ("N", "connections", "d"),
    ("refused", "closed before joined", "d"),
    ("kib_per_connection", "KiB RSS/joined connection", ".1f"),
    ("kib_per_connection_spread", "min..max", "s"),
    ("rss_mib", "RSS MiB", ".0f"),
    *TAIL,
]
CHURN_COLUMNS = [
    *SERVER,
    ("rounds", "rounds", "d"),
    ("C", "connections/round", "d"),
    ("first_peak_mib", "1st round peak MiB", ".1f"),
    ("last_mib", "after last MiB", ".1f"),
    ("growth", "last vs 1st peak", "+.0%"),
    ("series", "RSS after each round, MiB", "s"),
    *TAIL,
]
SLOW_COLUMNS = [
    *SERVER,
    ("readers", "readers", "d"),
    ("S", "small msgs", "d"),
    ("finished", "finished", "s"),
    ("readers_done", "readers with every message", "d"),
    ("stalled", "stalled", "s"),
    ("readers_closed", "readers closed", "d"),
    ("publisher_closed", "publisher closed", "s"),
    ("readers_with_gaps", "readers with gaps", "d"),
    ("never_reader_closed_s", "never-reader closed after s", ".2f"),
    ("peak_rss_mib", "peak RSS MiB", ".0f"),
    ("wall_s", "wall s", ".1f"),
    *TAIL[:1],
]


def main() -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        type=lambda s: [x for x in s.split(",") if x],
        help=f"comma-separated subset of: {', '.join(SCENARIOS)} (all)",
    )
    p.add_argument(
        "--servers",
        default=",".join(h.SERVERS),
        type=lambda s: [x for x in s.split(",") if x],
        help=f"comma-separated subset of: {', '.join(h.SERVERS)} (all); with "
        f"--scenarios churn also {', '.join(CHURN_VARIANTS)}",
    )
    for name, (full, quick) in SIZES.items():
        p.add_argument(
            "--" + name.replace("_", "-"), type=type(full), help=f"{full} (quick: {quick})"
        )
    args = p.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS) | set(args.servers) - set(h.SERVERS)
    if args.scenarios == ["churn"]:
        unknown -= set(CHURN_VARIANTS)
    if unknown:
        p.error(f"unknown scenarios or servers: {', '.join(sorted(unknown))}")
    size = {
        name: getattr(args, name) or (quick if args.quick else full)
        for name, (full, quick) in SIZES.items()
    }
    limit = h.raise_nofile_limit()
    # The client process holds every connection (the server as many): keep a margin.
    idle = min(size["idle_connections"], limit - 200)
    servers = args.servers
    burst_servers = [s for s in servers if s in h.BURST_SERVERS]
    t = args.timeout
    started = time.monotonic()
    print(f"load average at start: {h.load_average():.2f}; open files {limit}", file=sys.stderr)

    def scenarios(
        kinds: list[str], run: Callable[..., dict[str, Any]], *params: Any, **kwargs: Any
    ) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
        label = run.__name__.removeprefix("run_")
        return [
            (f"{label} {kind}", lambda kind=kind: run(kind, *params, timeout=t, **kwargs))
            for kind in kinds
        ]

    tables: list[tuple[str, list[dict[str, Any]], list[Column]]] = []
    rows: dict[str, list[dict[str, Any]]] = {}
    if "fanout" in args.scenarios:
        m, k = size["fanout_members"], size["fanout_messages"]
        print(f"fanout: one client publishes {k} to {m} members", file=sys.stderr)
        rows["fanout"] = h.run_rounds(
            scenarios(servers, run_fanout, m, k), args.repeat, ["cpu_us_per_delivery"]
        )
        _ratio(rows["fanout"], "cpu_us_per_delivery", "websockets", "vs_websockets")
        tables.append(
            (
                f"1. One client publishes {k} x 100 B to {m} members: server CPU per delivery "
                "(target: chatcore-serve ÷ websockets <= 1)",
                rows["fanout"],
                FANOUT_COLUMNS,
            )
        )
    if "latency" in args.scenarios:
        r, seconds = size["latency_receivers"], size["latency_seconds"]
        print(f"latency: {r} receivers, {RATE:g} msg/s for {seconds:g} s", file=sys.stderr)
        rows["latency"] = h.run_rounds(
            scenarios(servers, run_latency, r, seconds), args.repeat, ["p99_ms", "cpu_percent"]
        )
        _ratio(rows["latency"], "cpu_percent", "websockets", "vs_websockets")
        tables.append(
            (
                f"2. {r} receivers, one publisher at {RATE:g} msg/s for {seconds:g} s: "
                "publish-to-delivery latency (kernel receive timestamp), server CPU "
                "(targets: p99 <= 10 ms, CPU ÷ websockets <= 2)",
                rows["latency"],
                LATENCY_COLUMNS,
            )
        )
    if "burst" in args.scenarios and burst_servers:
        m, k = size["burst_members"], size["burst_messages"]
        print(f"burst: the server publishes {k} at once to {m} members", file=sys.stderr)
        rows["burst"] = h.run_rounds(
            scenarios(burst_servers, run_burst, m, k), args.repeat, ["cpu_us_per_delivery"]
        )
        _ratio(rows["burst"], "cpu_us_per_delivery", "raw-hypercorn", "vs_raw_hypercorn")
        tables.append(
            (
                f"3. The server publishes {k} messages in one go to {m} members "
                "(target: chatcore-serve ÷ raw-hypercorn <= 1/6)",
                rows["burst"],
                BURST_COLUMNS,
            )
        )
    if "idle" in args.scenarios:
        print(f"idle: {idle} joined connections", file=sys.stderr)
        rows["idle"] = h.run_rounds(
            scenarios(servers, run_idle, idle), args.repeat, ["kib_per_connection"]
        )
        tables.append(
            (
                f"4. {idle} joined idle connections: server RSS growth per connection "
                "(targets: chatcore-serve <= 36 KiB, chatcore-trio-ws <= 20 KiB)",
                rows["idle"],
                IDLE_COLUMNS,
            )
        )
    if "churn" in args.scenarios:
        n, c = size["churn_rounds"], size["churn_connections"]
        print(f"churn: {n} rounds of {c} connections reset", file=sys.stderr)
        rows["churn"] = h.run_rounds(scenarios(servers, run_churn, n, c), args.repeat, ["growth"])
        tables.append(
            (
                f"5. Churn: {n} rounds of {c} connections opened, joined and reset (RST) "
                "(target: after the last round within 20 % of the first round's peak)",
                rows["churn"],
                CHURN_COLUMNS,
            )
        )
    if "slow" in args.scenarios:
        small = size["slow_small"]
        print(f"slow: {BIG_MESSAGES} x {BIG_SIZE} B then {small} x 100 B", file=sys.stderr)
        rows["slow"] = []
        for readers in (int(x) for x in str(size["slow_readers"]).split(",")):
            rows["slow"] += h.run_rounds(
                scenarios(servers, run_slow, readers, small), args.repeat, ["readers_closed"]
            )
        tables.append(
            (
                f"6. Slow consumer: readers (the publisher first) + 1 never-reading client; "
                f"{BIG_MESSAGES} x {BIG_SIZE} B then {small} x 100 B "
                "(target: no reader or publisher closed)",
                rows["slow"],
                SLOW_COLUMNS,
            )
        )

    for title, table, columns in tables:
        for row in table:  # a failed round's row still names its server
            row.setdefault("server", row["name"].split(" ", 1)[1])
        print(f"\n{title}\n")
        print(h.format_table(table, columns))
        for row in table:
            if "error" in row:
                print(f"\n{row['name']} failed: {row['error']}")
    print(
        f"\n{time.monotonic() - started:.0f} s in all; load average now {h.load_average():.2f}; "
        f"rounds: {args.repeat}"
    )
    path = h.write_json(args.json, "fanout", {"args": vars(args) | {"json": None}, **rows})
    if path:
        print(f"results written to {path}")
    verified = all(row.get("verified") for table in rows.values() for row in table)
    if not verified:
        print("SOME SCENARIOS FAILED OR LOST MESSAGES (rows marked NO)", file=sys.stderr)
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
