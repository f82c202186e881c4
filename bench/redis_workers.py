"""``chatcore serve`` on Redis with 1 and 2 workers, against 1 worker in process: same load.

Scenarios, side by side in one run (each on a fresh server, Redis flushed in between):

* ``local x1``: ``chatcore serve`` with the in-process backplane (one worker:
  more would be islands).
* ``redis x1``: the same with ``--redis-url``: one node on Redis.
* ``redis x2``: ``--redis-url --workers 2``: two worker processes on one port;
  the kernel spreads the receivers over them, and every message crosses Redis
  to both.

The server is ``chatcore serve chatcore_app:app`` (the benchmarks' hub, limits
raised) with the command's defaults. Load: M receivers in one room, in P client
processes (``_client.py``; ``--publishers``, default 4); the first connection
of each also publishes K/P of the K messages, all at once, so P publishers land
on whichever workers the kernel chose. Every receiver checks offsets 1..K, in
order, none twice.

Measured from GO until every receiver has every message: deliveries/s; server
CPU per delivery (the ``chatcore serve`` process and its workers, from
``/proc``); Redis CPU per message and per delivery (its background CPU over
one idle second before the window subtracted); frames per message; how the
receivers were spread over the workers.

Run (from the repository root)::

    .venv/bin/python bench/redis_workers.py --quick   # M=200, K=50
    .venv/bin/python bench/redis_workers.py           # M=1000, K=200
    .venv/bin/python bench/redis_workers.py --repeat 3 --json
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import _harness as h

#: Seconds of idle measurement before each window (Redis's background CPU).
IDLE_WINDOW = 1.0
SETTINGS = {"local x1": (1, False), "redis x1": (1, True), "redis x2": (2, True)}

COLUMNS = [
    ("name", "scenario", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("P", "publishers", "d"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    ("cpu_us_per_delivery", "server µs/delivery", ".2f"),
    ("cpu_us_per_delivery_spread", "min..max", "s"),
    ("redis_us_per_message", "Redis µs/msg", ".1f"),
    ("redis_us_per_delivery", "Redis µs/delivery", ".3f"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("workers_spread", "receivers per worker", "s"),
    ("load1", "load", ".1f"),
    ("verified", "all in order", "s"),
]


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def receivers_per_worker(server: h.Server) -> list[int]:
    """Established connections on the server's port, per worker process (from ``/proc``)."""
    established: set[int] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].split(":")[1], 16) == server.port:
            established.add(int(fields[9]))
    counts = []
    for pid in server.pids[1:] or server.pids:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
        counts.append(len(established & inodes))
    return counts


def run_scenario(
    name: str, redis: h.RedisProcess, receivers: int, messages: int, publishers: int, timeout: float
) -> dict[str, Any]:
    workers, on_redis = SETTINGS[name]
    deadline = time.monotonic() + timeout
    redis.command("FLUSHALL")
    serve_args = ["--workers", str(workers)] + (["--redis-url", redis.url] if on_redis else [])
    with h.running_server("chatcore-serve", serve_args=serve_args) as server:
        # Every worker up (and subscribed to Redis) before anyone connects.
        while len(server.pids) < (workers + 1 if workers > 1 else 1) or (
            on_redis and redis.command("PUBSUB", "NUMSUB", "chatcore:bus")[1] < workers
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: workers not up")
            time.sleep(0.05)
        clients = [
            h.start_clients(
                server, count, timeout=timeout, messages=messages, publish=share, parallel=100
            )
            for count, share in zip(
                split_evenly(receivers, publishers),
                split_evenly(messages, publishers),
                strict=True,
            )
        ]
        try:
            for client in clients:
                client.wait_ready(deadline)
            time.sleep(0.3)  # the joins' replies and presence settle
            spread = receivers_per_worker(server)
            idle0 = redis.cpu_seconds()
            time.sleep(IDLE_WINDOW)
            redis_idle_rate = (redis.cpu_seconds() - idle0) / IDLE_WINDOW
            redis0 = redis.cpu_seconds()
            window = h.Window(server)
            for client in clients:
                client.send("GO")
            reports = [client.expect_json("DONE", deadline) for client in clients]
            window.close()
            redis_cpu = max(redis.cpu_seconds() - redis0 - redis_idle_rate * window.wall, 0.0)
        finally:
            for client in clients:
                client.stop()
    deliveries = receivers * messages
    received = sum(r["messages"] for r in reports)
    return {
        "M": receivers,
        "K": messages,
        "P": publishers,
        "verified": received == deliveries and all(r["errors"] == 0 for r in reports),
        "deliveries_per_s": deliveries / window.wall,
        "cpu_us_per_delivery": 1e6 * window.cpu / deliveries,
        "redis_us_per_message": 1e6 * redis_cpu / messages if on_redis else None,
        "redis_us_per_delivery": 1e6 * redis_cpu / deliveries if on_redis else None,
        "frames_per_message": sum(r["message_frames"] for r in reports) / deliveries,
        "workers_spread": "/".join(str(n) for n in spread),
    }


def main() -> int:
    p = h.parser(__doc__.splitlines()[0])
    p.add_argument("--receivers", "-M", type=int, help="receivers (1000; quick 200)")
    p.add_argument("--messages", "-K", type=int, help="messages (200; quick 50)")
    p.add_argument("--publishers", "-P", type=int, default=4, help="client processes (4)")
    p.add_argument(
        "--scenarios",
        default=",".join(SETTINGS),
        type=lambda s: [part.strip() for part in s.split(",")],
        help=f"comma-separated subset of: {', '.join(SETTINGS)}",
    )
    args = p.parse_args()
    unknown = [s for s in args.scenarios if s not in SETTINGS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {list(SETTINGS)}")
    h.raise_nofile_limit()
    receivers = args.receivers or (200 if args.quick else 1000)
    messages = args.messages or (50 if args.quick else 200)
    publishers = max(1, min(args.publishers, messages, receivers))
    started = time.monotonic()
    redis = h.RedisProcess()
    try:
        rows = h.run_rounds(
            [
                (
                    name,
                    lambda name=name: run_scenario(
                        name, redis, receivers, messages, publishers, args.timeout
                    ),
                )
                for name in args.scenarios
            ],
            args.repeat,
            ["cpu_us_per_delivery"],
        )
    finally:
        redis.stop()
    print()
    print(h.format_table(rows, COLUMNS))
    print(
        f"\n{os.cpu_count()} CPUs; server CPU = the chatcore serve process and its workers; "
        f"{time.monotonic() - started:.0f} s in all; load average now {h.load_average():.1f}"
    )
    path = h.write_json(args.json, "redis_workers", {"rows": rows})
    if path:
        print(f"results written to {path}")
    return 0 if all(row["verified"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
