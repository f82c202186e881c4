"""The connection core's cost: CPU per delivered message, batching, idle memory.

(a) In-memory transport: M connections served by ``serve_connection`` with a
    trivial handler; the server offers K encoded messages of about 100 bytes
    to every connection (``Connection.offer``) and the clients drain. Server
    and clients share this process: the table shows the process total and the
    server's share bounded by task-step accounting (see ``_inmemory.py``).
(b) Memory per idle open connection (trivial handler, hub with one room
    joined, and the naive two-task loop for reference), each measured in a
    fresh process: tracemalloc diff and RSS delta over N connections.
(c) Real loopback WebSockets: the same trivial handler on chatcore's
    trio-websocket transport in a server process, clients in another; server
    CPU from the server process only; raw trio-websocket (no chatcore) for
    reference.

Run::

    .venv/bin/python bench/core.py --quick   # M=200, K=50
    .venv/bin/python bench/core.py           # M=1000, K=200, N=1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import _harness as h
import _inmemory

MEMORY_COLUMNS = [
    ("server", "server", "s"),
    ("publish", "publish", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("cpu_us_per_delivery", "process µs/delivery", ".2f"),
    ("server_us_range", "server µs/delivery (low..high)", "s"),
    ("client_us", "clients µs/delivery", ".2f"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    ("gc_share", "GC share", ".0%"),
    ("verified", "all received", "s"),
]

IDLE_COLUMNS = [
    ("server", "server", "s"),
    ("N", "N", "d"),
    ("traced_bytes_per_connection", "traced B/conn", ",.0f"),
    ("traced[chatcore]", "chatcore", ",.0f"),
    ("traced[trio]", "trio", ",.0f"),
    ("traced[transport (in-memory pair)]", "in-memory pair", ",.0f"),
    ("traced[other]", "other", ",.0f"),
    ("rss_bytes_per_connection", "RSS B/conn", ",.0f"),
]

LOOPBACK_COLUMNS = [
    ("server", "server", "s"),
    ("publish", "publish", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("cpu_us_per_delivery", "server µs/delivery", ".2f"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    ("gc_share", "GC share", ".0%"),
    ("idle_rss_bytes_per_connection", "idle RSS B/conn", ",.0f"),
    ("load1", "load", ".1f"),
    ("verified", "all received", "s"),
]


def _idle_in_fresh_process(server: str, count: int, timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [h.PYTHON, __file__, "--idle-child", server, str(count)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        cwd=h.BENCH_DIR.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--idle-child", nargs=2, metavar=("SERVER", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.idle_child:
        server, count = args.idle_child
        print(json.dumps(_inmemory.idle_memory(server, int(count), timeout=args.timeout)))
        return 0
    h.raise_nofile_limit()
    receivers = 200 if args.quick else 1000
    messages = 50 if args.quick else 200
    idle = 200 if args.quick else 1000
    started = time.monotonic()

    print("(a) in-memory core:", file=sys.stderr)
    memory_rows = h.run_repeated(
        [
            (
                f"memory core {publish} M={receivers}",
                lambda publish=publish: _inmemory.fan_out(
                    "core", publish, receivers, messages, timeout=args.timeout
                ),
            )
            for publish in ("burst", "paced")
        ],
        args.repeat,
    )
    for row in memory_rows:
        row["server_us_range"] = f"{row['server_us_low']:.2f}..{row['server_us_high']:.2f}"

    print("(b) idle memory:", file=sys.stderr)
    idle_rows = [_idle_in_fresh_process(s, idle, args.timeout) for s in ("core", "hub", "naive")]

    print("(c) loopback core:", file=sys.stderr)
    loopback_rows = h.run_repeated(
        [
            (
                f"loopback {server} {publish} M={receivers}",
                lambda server=server, publish=publish: h.run_loopback(
                    server,
                    publish,
                    receivers,
                    messages,
                    timeout=args.timeout,
                    client_processes=args.client_processes,
                ),
            )
            for server, publish in (("core", "burst"), ("core", "paced"), ("raw", "paced"))
        ],
        args.repeat,
    )

    print()
    print("(a) In-memory transport, trivial handler, Connection.offer to every connection.")
    print("    process = server + in-process clients; server share bounded (docs/performance.md)")
    print(h.format_table(memory_rows, MEMORY_COLUMNS))
    print()
    print("(b) Memory per idle open connection (tracemalloc by package; RSS: fresh process).")
    print(h.format_table(idle_rows, IDLE_COLUMNS))
    print()
    print("(c) Loopback trio-websocket, server process CPU only (raw: no chatcore).")
    print(h.format_table(loopback_rows, LOOPBACK_COLUMNS))
    print(f"\n{time.monotonic() - started:.0f} s in all; load average now {h.load_average():.1f}")
    path = h.write_json(
        args.json,
        "core",
        {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "memory": memory_rows,
            "idle": idle_rows,
            "loopback": loopback_rows,
        },
    )
    if path:
        print(f"results written to {path}")
    verified = all(r["verified"] for r in memory_rows + loopback_rows)
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
