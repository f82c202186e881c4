"""``chatcore serve`` on Redis with 1 and 2 workers, against 1 worker in process: same load.

Scenarios, side by side in one run (each on a fresh server, Redis flushed in between):

* ``local x1``: ``chatcore serve`` with the in-process backplane (one worker:
  more would be islands).
* ``redis x1``: the same with ``--redis-url``: one node on Redis.
* ``redis x2``: ``--redis-url --workers 2``: two worker processes on one port;
  the kernel spreads the receivers over them, and every message crosses Redis
  to both.

Load: M receivers in one room, in N client processes (``bench/_client.py``, the
cheap epoll client; ``--client-processes``, default 4). The first connection
of each client process also publishes K/N of the K messages (about 100 bytes
on the wire) over its WebSocket, as fast as its socket takes them, all client
processes at once, so N publishers land on whichever workers the kernel
chose. Every receiver checks offsets 1..K, in order, none twice; a row is
"verified" only if all got all.

The server is this script itself as a ``chatcore serve`` target
(``redis_workers:hub``: publish rate limit lifted; the hub is built in the
server process only), with the command's defaults (GC tuning on, no
compression, no access log) and the heartbeat out of the measurement window.

Measured from GO until every receiver has every message:

* deliveries/s (M x K over wall time);
* server CPU per delivery: the ``chatcore serve`` process and its workers,
  from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on CPU, every thread;
  ``/proc/<pid>/stat``, in 10 ms ticks, is recorded as a cross-check:
  ``proc_cpu_us_per_delivery`` in the JSON);
* Redis CPU per message and per delivery, read the same way from Redis's
  process: the backplane's own cost (sequencing script, stream append,
  pub/sub to every subscribed node). Redis's background CPU (its cron, the
  nodes' heartbeats and leases: ~1.5 ms/s), measured over one idle second
  just before the window, is subtracted;
* frames per message (from the clients: < 1 means several messages per frame),
  and how the receivers were spread over the workers (from ``/proc``).

Run::

    .venv/bin/python bench/redis_workers.py --quick   # M=200, K=50: ~15 s
    .venv/bin/python bench/redis_workers.py           # M=1000, K=200
    .venv/bin/python bench/redis_workers.py --repeat 3 --json
    .venv/bin/python bench/redis_workers.py --redis-url redis://127.0.0.1:6379 --redis-pid 123

``--redis-url`` uses an existing Redis instead of starting one: it is
FLUSHALL-ed between scenarios.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import _harness as h
from _harness import ROOM, ManagedProcess

#: Seconds of idle measurement before each window (Redis's background CPU).
IDLE_WINDOW = 1.0
#: Heartbeat out of the way (the bench client answers no app-level ping).
HEARTBEAT = "3600"

COLUMNS = [
    ("scenario", "scenario", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("P", "publishers", "d"),
    ("deliveries_per_s", "deliveries/s", ",.0f"),
    ("cpu_us_per_delivery", "server µs/delivery", ".2f"),
    ("spread", "min..max", "s"),
    ("redis_us_per_message", "Redis µs/msg", ".1f"),
    ("redis_us_per_delivery", "Redis µs/delivery", ".3f"),
    ("frames_per_message", "frames/msg", ".3f"),
    ("workers_spread", "receivers per worker", "s"),
    ("client_cpu_s", "client CPU s", ".2f"),
    ("load1", "load", ".1f"),
    ("verified", "all received", "s"),
]


# -- the chatcore serve target ------------------------------------------------------------


def __getattr__(name: str) -> Any:
    """``redis_workers:hub``, built on first access (in the server process only).

    A ``Hub()`` without a backplane picks Redis when ``CHATCORE_REDIS_URL`` is
    set (``chatcore serve --redis-url``), so it must not exist before the
    command line has been read.
    """
    if name != "hub":
        raise AttributeError(name)
    from chatcore import Hub, HubConfig

    hub = Hub(
        config=HubConfig(
            publish_rate=1e9, publish_burst=1_000_000_000, max_connections_per_user=1_000_000
        )
    )
    globals()["hub"] = hub
    return hub


# -- Redis ----------------------------------------------------------------------------------


def redis_command(url: str, *args: str, timeout: float = 5.0) -> Any:
    """One Redis command over a fresh connection (RESP2, enough for FLUSHALL/PUBSUB)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port or 6379), timeout=timeout) as sock:
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        sock.sendall(request.encode())
        reader = sock.makefile("rb")

        def parse() -> Any:
            line = reader.readline().rstrip(b"\r\n")
            kind, rest = line[:1], line[1:]
            if kind == b"+":
                return rest.decode()
            if kind == b"-":
                raise RuntimeError(f"Redis: {rest.decode()}")
            if kind == b":":
                return int(rest)
            if kind == b"$":
                size = int(rest)
                return None if size < 0 else reader.read(size + 2)[:-2].decode()
            if kind == b"*":
                return [parse() for _ in range(int(rest))]
            raise RuntimeError(f"unexpected Redis reply {line!r}")

        return parse()


def subscribed_nodes(url: str) -> int:
    """Nodes subscribed to the bus channel (each running RedisBackplane is one)."""
    reply = redis_command(url, "PUBSUB", "NUMSUB", "chatcore:bus")
    return int(reply[1])


# -- the server -------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    return [
        int(child)
        for path in Path(f"/proc/{pid}/task").glob("*/children")
        for child in path.read_text().split()
    ]


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads, from ``/proc/<pid>/task/*/schedstat`` (ns).

    Falls back to ``/proc/<pid>/stat`` (10 ms ticks) without schedstat.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just exited
                total += int((task / "schedstat").read_text().split()[0])
    except FileNotFoundError:
        return h.proc_cpu_seconds(pid)
    return total / 1e9


class Serve:
    """One ``chatcore serve redis_workers:hub`` (and its workers), tracked by PID."""

    def __init__(self, workers: int, redis_url: str | None, deadline: float) -> None:
        argv = [h.PYTHON, "-m", "chatcore", "serve", "redis_workers:hub"]
        argv += ["--bind", "127.0.0.1:0", "--workers", str(workers)]
        argv += ["--heartbeat-interval", HEARTBEAT, "--heartbeat-timeout", HEARTBEAT]
        argv += ["--no-access-log", "--log-level", "WARNING", "--drain-grace", "2"]
        if redis_url:
            argv += ["--redis-url", redis_url]
        self.name = f"serve[{'redis' if redis_url else 'local'} x{workers}]"
        self.process = ManagedProcess(argv, self.name)
        self.workers: list[int] = []
        try:
            line = self.process.expect("chatcore:", deadline)  # "serving on ws://HOST:PORT/ws"
            self.port = int(line.rsplit(":", 1)[1].split("/")[0])
            if workers > 1:
                while len(self.workers) < workers:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.name}: workers did not start")
                    self.workers = _children(self.process.pid)
                    time.sleep(0.05)
            if redis_url:
                # Every node subscribed before anyone joins.
                while subscribed_nodes(redis_url) < workers:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.name}: not connected to Redis")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return [self.process.pid, *self.workers]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def proc_cpu_seconds(self) -> float:
        return sum(h.proc_cpu_seconds(pid) for pid in self.pids)

    def receivers_per_worker(self) -> list[int]:
        """Established connections on the server port, per worker (from ``/proc``)."""
        established: set[int] = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].split(":")[1], 16) == self.port:
                established.add(int(fields[9]))
        counts = []
        for pid in self.workers or [self.process.pid]:
            inodes = set()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(int(link[8:-1]))
            counts.append(len(established & inodes))
        return counts

    def stop(self) -> None:
        """SIGTERM (the supervisor forwards it), bounded wait, then SIGKILL workers and all."""
        proc = self.process.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                proc.wait(10)
        if proc.poll() is None:
            for worker in self.workers:
                if _parent_of(worker) == proc.pid:
                    os.kill(worker, signal.SIGKILL)
        self.process.stop(grace=5)


# -- one scenario --------------------------------------------------------------------------


def run_scenario(
    name: str,
    workers: int,
    redis_url: str | None,
    redis_pid: int | None,
    receivers: int,
    messages: int,
    client_processes: int,
    timeout: float,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    if redis_url:
        redis_command(redis_url, "FLUSHALL")
    server = Serve(workers, redis_url, deadline)
    clients: list[ManagedProcess] = []
    try:
        shares = h.split_evenly(messages, client_processes)
        for i, (count, publish) in enumerate(
            zip(h.split_evenly(receivers, client_processes), shares, strict=True)
        ):
            argv = [h.PYTHON, str(h.BENCH_DIR / "_client.py"), "--port", str(server.port)]
            argv += ["--path", "/ws", "--connections", str(count), "--messages", str(messages)]
            argv += ["--join", ROOM, "--publish", str(publish), "--timeout", str(timeout)]
            clients.append(ManagedProcess(argv, f"client{i}"))
        for client in clients:
            client.expect("READY", deadline)
        time.sleep(0.3)  # the joins' replies and presence settle before the window opens
        spread = server.receivers_per_worker()

        # Redis's own background work (cron, the nodes' heartbeats and leases)
        # over one idle second, subtracted from the window below.
        idle0 = (cpu_seconds(redis_pid) if redis_pid else 0.0, server.cpu_seconds())
        time.sleep(IDLE_WINDOW)
        redis_idle_rate = ((cpu_seconds(redis_pid) if redis_pid else 0.0) - idle0[0]) / IDLE_WINDOW
        server_idle_rate = (server.cpu_seconds() - idle0[1]) / IDLE_WINDOW

        client_cpu0 = sum(c.cpu_seconds() for c in clients)
        redis_cpu0 = cpu_seconds(redis_pid) if redis_pid else 0.0
        proc_cpu0 = server.proc_cpu_seconds()
        cpu0 = server.cpu_seconds()
        wall0 = time.perf_counter()
        for client in clients:
            client.send("GO")
        reports = [json.loads(c.expect("DONE", deadline)) for c in clients]
        wall1 = time.perf_counter()
        cpu1 = server.cpu_seconds()
        proc_cpu1 = server.proc_cpu_seconds()
        redis_cpu1 = cpu_seconds(redis_pid) if redis_pid else 0.0
        client_cpu1 = sum(c.cpu_seconds() for c in clients)
    finally:
        for client in clients:
            client.stop()
        server.stop()

    deliveries = receivers * messages
    received = sum(r["messages"] for r in reports)
    wall = wall1 - wall0
    redis_gross = redis_cpu1 - redis_cpu0
    redis_cpu = max(redis_gross - redis_idle_rate * wall, 0.0)
    return {
        "scenario": name,
        "workers": workers,
        "backplane": "redis" if redis_url else "local",
        "M": receivers,
        "K": messages,
        "P": client_processes,
        "deliveries": deliveries,
        "received": received,
        "verified": received == deliveries and all(r["errors"] == 0 for r in reports),
        "wall_s": wall,
        "deliveries_per_s": deliveries / wall,
        "server_cpu_s": cpu1 - cpu0,
        "cpu_us_per_delivery": (cpu1 - cpu0) / deliveries * 1e6,
        "proc_cpu_us_per_delivery": (proc_cpu1 - proc_cpu0) / deliveries * 1e6,
        "redis_cpu_s": redis_cpu if redis_pid else None,
        "redis_cpu_gross_s": redis_gross if redis_pid else None,
        "redis_idle_cpu_per_s": redis_idle_rate if redis_pid else None,
        "server_idle_cpu_per_s": server_idle_rate,
        "redis_us_per_message": redis_cpu / messages * 1e6 if redis_url and redis_pid else None,
        "redis_us_per_delivery": redis_cpu / deliveries * 1e6 if redis_url and redis_pid else None,
        "frames_per_message": sum(r["message_frames"] for r in reports) / deliveries,
        "receivers_per_worker": spread,
        "workers_spread": "/".join(str(n) for n in spread),
        "client_cpu_s": client_cpu1 - client_cpu0,
    }


def main() -> int:
    p = h.parser(__doc__.splitlines()[0] if __doc__ else None)
    p.set_defaults(client_processes=4)
    p.add_argument("--redis-url", help="use this Redis instead of starting one (FLUSHALL-ed!)")
    p.add_argument("--redis-pid", type=int, help="its PID, to read its CPU time")
    p.add_argument("--receivers", "-M", type=int, help="receivers (default 1000; --quick 200)")
    p.add_argument("--messages", "-K", type=int, help="messages (default 200; --quick 50)")
    p.add_argument(
        "--scenarios",
        default="local x1,redis x1,redis x2",
        type=lambda s: [part.strip() for part in s.split(",")],
        help="comma-separated subset of: local x1, redis x1, redis x2",
    )
    args = p.parse_args()
    h.raise_nofile_limit()
    receivers = args.receivers or (200 if args.quick else 1000)
    messages = args.messages or (50 if args.quick else 200)
    publishers = max(1, min(args.client_processes, messages, receivers))
    # The server processes import this file as their target.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(h.BENCH_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    os.environ.pop("CHATCORE_REDIS_URL", None)

    names = ("local x1", "redis x1", "redis x2")
    unknown = [s for s in args.scenarios if s not in names]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {list(names)}")

    redis = None
    if args.redis_url:
        url, pid = args.redis_url, args.redis_pid
    else:
        from redis_fanout import RedisProcess

        redis = RedisProcess()
        url, pid = redis.url, redis.process.pid
    settings = {
        "local x1": (1, None),
        "redis x1": (1, url),
        "redis x2": (2, url),
    }
    scenarios = []
    rounds: list[dict[str, Any]] = []  # every repetition, for the JSON
    for name in args.scenarios:
        workers, redis_url = settings[name]

        def thunk(
            name: str = name, workers: int = workers, redis_url: str | None = redis_url
        ) -> dict[str, Any]:
            row = run_scenario(
                name, workers, redis_url, pid, receivers, messages, publishers, args.timeout
            )
            rounds.append(row)
            print(
                f"    {name}: {row['deliveries_per_s']:,.0f} deliveries/s, "
                f"{row['frames_per_message']:.3f} frames/msg, "
                f"receivers per worker {row['workers_spread']}",
                file=sys.stderr,
                flush=True,
            )
            return row

        scenarios.append((name, thunk))

    started = time.monotonic()
    try:
        rows = h.run_repeated(scenarios, args.repeat)
    finally:
        if redis is not None:
            redis.stop()
    for row in rows:
        row["spread"] = (
            f"{row['cpu_us_per_delivery_min']:.1f}..{row['cpu_us_per_delivery_max']:.1f}"
        )
    print()
    print(h.format_table(rows, COLUMNS))
    print(
        f"\n{os.cpu_count()} CPUs; Redis {'started here' if redis else url}; server CPU = the "
        f"chatcore serve process and its workers; {time.monotonic() - started:.0f} s in all; "
        f"load average now {h.load_average():.1f}"
    )
    path = h.write_json(
        args.json,
        "redis_workers",
        {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "rows": rows,
            "rounds": rounds,
        },
    )
    if path:
        print(f"results written to {path}")
    verified = all(row["verified"] for row in rows)
    if not verified:
        print("SOME RECEIVERS DID NOT GET EVERY MESSAGE", file=sys.stderr)
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
