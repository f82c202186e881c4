"""Fan-out through chatcore's Hub versus the naive per-message broadcast loop.

M receivers in one room, K messages of about 100 bytes. Every receiver counts
its messages and checks their offsets (1..K, in order, none twice); a row is
"verified" only if every receiver got every message.

Transports:

* ``memory``: chatcore's in-memory transport, server and clients in this
  process (see ``_inmemory.py`` for how the server's share is bounded);
  compared with a naive loop (writer task per connection, one ``send`` per
  message) on the same in-memory streams.
* ``loopback``: real WebSockets on 127.0.0.1; the server in its own process
  (``_server.py``), the clients in another (``_client.py``, a cheap epoll
  client); server CPU from the server process only. Compared with a raw
  trio-websocket server without chatcore (``await ws.send_message`` once per
  message per connection, from a per-connection memory channel).

Publishing (``--publish``):

* ``burst``: the server publishes the K messages in one scheduler pass (K
  concurrent ``hub.publish`` calls; the others loop without yielding).
* ``paced``: the server publishes one message per scheduler pass (it yields
  after each).
* ``client``: one of the receivers publishes the K messages over its WebSocket
  as fast as it can (the hub's rate limit is raised out of the way).

Run::

    .venv/bin/python bench/fanout.py --quick     # M=200, K=50: well under a minute
    .venv/bin/python bench/fanout.py             # M=200/1000/2000, K=200: ~9 min on 2 cores
    .venv/bin/python bench/fanout.py --json      # also write bench/results/fanout-*.json
"""

from __future__ import annotations

import sys
import time
from typing import Any

import _harness as h
import _inmemory

#: Server-side GC thresholds of the "gc tuned" variant (Python's default: 700, 10, 10).
GC_TUNED = "50000,20,100"

MEMORY_COLUMNS = [
    ("server", "server", "s"),
    ("publish", "publish", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("cpu_us_per_delivery", "process µs/delivery", ".2f"),
    ("server_us_range", "server µs/delivery (low..high)", "s"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    ("gc_share", "GC share", ".0%"),
    ("verified", "all received", "s"),
]

LOOPBACK_COLUMNS = [
    ("server", "server", "s"),
    ("publish", "publish", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("cpu_us_per_delivery", "server µs/delivery", ".2f"),
    ("spread", "min..max", "s"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    ("gc_share", "GC share", ".0%"),
    ("client_cpu_s", "client CPU s", ".2f"),
    ("load1", "load", ".1f"),
    ("verified", "all received", "s"),
]

RATIO_COLUMNS = [
    ("transport", "transport", "s"),
    ("variant", "server GC", "s"),
    ("publish", "publish", "s"),
    ("M", "M", "d"),
    ("chatcore", "chatcore µs/delivery", ".2f"),
    ("raw", "raw loop µs/delivery", ".2f"),
    ("ratio", "chatcore ÷ raw", ".3f"),
    ("ratio_server", "same, server share (in-memory)", ".3f"),
]


def _memory_scenarios(args: Any, sizes: list[int], messages: int) -> list[tuple[str, Any]]:
    scenarios = []
    for publish in args.publish:
        for m in sizes:
            for server in ("hub", "naive"):

                def thunk(server: str = server, publish: str = publish, m: int = m) -> Any:
                    return _inmemory.fan_out(
                        server,
                        publish,
                        m,
                        messages,
                        timeout=args.timeout,
                        split=m <= args.split_max,
                    )

                scenarios.append((f"memory {server:5} {publish:6} M={m}", thunk))
    return scenarios


def _loopback_scenarios(
    args: Any, sizes: list[int], messages: int, gc_variant: str
) -> list[tuple[str, Any]]:
    scenarios = []
    server_args = ("--gc-threshold", gc_variant) if gc_variant else ()
    variant = "tuned" if gc_variant else "default"
    for publish in args.publish:
        for m in sizes:
            for server in ("hub", "raw"):

                def thunk(server: str = server, publish: str = publish, m: int = m) -> Any:
                    row = h.run_loopback(
                        server,
                        publish,
                        m,
                        messages,
                        timeout=args.timeout,
                        client_processes=args.client_processes,
                        server_args=server_args,
                    )
                    row["variant"] = variant
                    return row

                scenarios.append((f"loopback[{variant} gc] {server:3} {publish:6} M={m}", thunk))
    return scenarios


def _ratios(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    by_key = {
        (r["transport"], r.get("variant", "default"), r["publish"], r["M"], r["server"]): r
        for r in rows
    }
    out = []
    for (transport, variant, publish, m, server), row in by_key.items():
        if server != "hub":
            continue
        raw = by_key.get((transport, variant, publish, m, baseline))
        if raw is None:
            continue
        out.append(
            {
                "transport": transport,
                "variant": variant,
                "publish": publish,
                "M": m,
                "chatcore": row["cpu_us_per_delivery"],
                "raw": raw["cpu_us_per_delivery"],
                "ratio": row["cpu_us_per_delivery"] / raw["cpu_us_per_delivery"],
            }
        )
        if "server_us_high" in row and "server_us_high" in raw:
            out[-1]["ratio_server"] = row["server_us_high"] / raw["server_us_high"]
    return out


def main() -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--publish",
        default="burst,client",
        type=lambda s: s.split(","),
        help="comma-separated: burst, paced, client (burst,client)",
    )
    p.add_argument(
        "--transports",
        default="memory,loopback",
        type=lambda s: s.split(","),
        help="comma-separated: memory, loopback (both)",
    )
    p.add_argument(
        "--no-gc-variant",
        action="store_true",
        help=f"skip the loopback rerun with server GC thresholds {GC_TUNED}",
    )
    p.add_argument(
        "--split-max",
        type=int,
        default=1000,
        help="in-memory: largest M that gets the instrumented server/client split pass (1000)",
    )
    p.add_argument("--sizes", default="", help="receiver counts, e.g. 200,1000 (per --quick)")
    p.add_argument("--messages", type=int, default=0, help="K (per --quick)")
    args = p.parse_args()
    h.raise_nofile_limit()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    sizes = sizes or ([200] if args.quick else [200, 1000, 2000])
    messages = args.messages or (50 if args.quick else 200)
    gc_sizes = [sizes[0]] if args.quick else [s for s in sizes if s == 1000] or sizes[:1]

    started = time.monotonic()
    memory_rows: list[dict[str, Any]] = []
    loopback_rows: list[dict[str, Any]] = []
    if "memory" in args.transports:
        print("in-memory transport (server and clients in this process):", file=sys.stderr)
        memory_rows = h.run_repeated(_memory_scenarios(args, sizes, messages), args.repeat)
        for row in memory_rows:
            if "server_us_low" in row:
                row["server_us_range"] = f"{row['server_us_low']:.2f}..{row['server_us_high']:.2f}"
    if "loopback" in args.transports:
        print("loopback trio-websocket (server process, client process):", file=sys.stderr)
        scenarios = _loopback_scenarios(args, sizes, messages, "")
        if not args.no_gc_variant:
            scenarios += _loopback_scenarios(args, gc_sizes, messages, GC_TUNED)
        loopback_rows = h.run_repeated(scenarios, args.repeat)
        for row in loopback_rows:
            row["spread"] = (
                f"{row['cpu_us_per_delivery_min']:.1f}..{row['cpu_us_per_delivery_max']:.1f}"
            )

    ratios = _ratios(memory_rows, "naive") + _ratios(loopback_rows, "raw")
    print()
    if memory_rows:
        print("In-memory transport: process CPU (server + in-process clients) per delivery;")
        print("server share bounded by task-step accounting (see docs/performance.md).")
        print(h.format_table(memory_rows, MEMORY_COLUMNS))
        print()
    if loopback_rows:
        print("Loopback trio-websocket: CPU of the server process per delivery.")
        tuned = [r for r in loopback_rows if r["variant"] == "tuned"]
        print(
            h.format_table(
                [r for r in loopback_rows if r["variant"] == "default"], LOOPBACK_COLUMNS
            )
        )
        if tuned:
            print(f"\nSame, server run with gc.set_threshold({GC_TUNED}):")
            print(h.format_table(tuned, LOOPBACK_COLUMNS))
        print()
    if ratios:
        print("chatcore (hub) ÷ raw per-message loop, CPU per delivery (< 1: chatcore cheaper):")
        print(h.format_table(ratios, RATIO_COLUMNS))
    print(f"\n{time.monotonic() - started:.0f} s in all; load average now {h.load_average():.1f}")
    path = h.write_json(
        args.json,
        "fanout",
        {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "memory": memory_rows,
            "loopback": loopback_rows,
            "ratios": ratios,
        },
    )
    if path:
        print(f"results written to {path}")
    verified = all(r["verified"] for r in memory_rows + loopback_rows)
    if not verified:
        print("SOME RECEIVERS DID NOT GET EVERY MESSAGE", file=sys.stderr)
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
