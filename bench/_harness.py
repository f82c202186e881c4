"""Shared machinery of the benchmarks: processes, CPU and memory readings, output.

Theory of operation
-------------------

The orchestrating process (``core.py`` / ``fanout.py``) is plain synchronous
Python. For the loopback scenarios it starts a *server* process
(``_server.py``) and one or more *client* processes (``_client.py``) and talks
to each over its stdin/stdout with one-line commands and answers, so every
wait is a line read with a deadline. Processes are tracked by PID: only those
started here are ever signalled (SIGTERM, then SIGKILL after a bound), and all
of them are stopped in ``finally`` and at exit.

CPU is read from ``/proc/<pid>/stat`` (utime + stime, in clock ticks) and, for
the server, also from its own ``time.process_time()`` over the control pipe,
which has nanosecond resolution (a tick is 10 ms, too coarse for the quick runs).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import os
import platform
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: The room every benchmark uses.
ROOM = "bench"
#: Publish payload: the encoded ``message`` line is about 100 bytes with it.
DATA = "x" * 16


def message_text(offset: int, data: str = DATA) -> str:
    """The JSON line of a room message, as the hub encodes it (key order included).

    Servers without a hub (the trivial handler, the raw loop) send exactly this,
    so every server puts the same bytes on the wire and clients verify offsets
    the same way.
    """
    return json.dumps(
        {
            "type": "message",
            "room": ROOM,
            "offset": offset,
            "epoch": "00000000",
            "from": None,
            "data": data,
        },
        separators=(",", ":"),
    )


class Publisher:
    """How a server under test publishes: ``burst`` or ``paced`` (see the scripts' docs).

    Servers with a synchronous fan-out implement :meth:`publish`; the hub,
    whose ``publish`` is async, overrides both loops.
    """

    def publish(self, offset: int) -> None:
        """Fan message ``offset`` out to every connection, without waiting."""
        raise NotImplementedError

    async def burst(self, first: int, count: int) -> None:
        """Publish messages ``first .. first + count - 1`` in one scheduler pass."""
        import trio

        for offset in range(first, first + count):
            self.publish(offset)
        await trio.lowlevel.checkpoint()

    async def paced(self, first: int, count: int) -> None:
        """Publish them one per scheduler pass (yielding after each)."""
        import trio

        for offset in range(first, first + count):
            self.publish(offset)
            await trio.lowlevel.checkpoint()


# -- limits, CPU and memory -----------------------------------------------------


def raise_nofile_limit(wanted: int = 65_536) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (capped by the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process from ``/proc/<pid>/stat`` (10 ms ticks)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces; fields after it are plain.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def proc_rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one) from ``/proc/<pid>/statm``."""
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import trio
    import trio_websocket
    import wsproto

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "trio": trio.__version__,
        "trio_websocket": trio_websocket.__version__,
        "wsproto": wsproto.__version__,
        "kernel": platform.release(),
    }


class GcTimer:
    """Time spent in the cyclic garbage collector, per generation (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.process_time()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.process_time() - self._start
            self.collections[generation] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "seconds": sum(self.seconds),
            "by_generation": self.seconds,
            "collections": self.collections,
            "tracked_objects": len(gc.get_objects()),
        }


# -- child processes -------------------------------------------------------------

_started: dict[int, ManagedProcess] = {}


class ManagedProcess:
    """A child process we started, spoken to by lines on stdin/stdout.

    Every read has a deadline; :meth:`stop` signals only this PID.
    """

    def __init__(self, argv: Sequence[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherited: a crash traceback shows up in the run's output
            cwd=BENCH_DIR.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.pid = self.proc.pid
        _started[self.pid] = self
        self._buffer = b""
        self._unclaimed: list[str] = []
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def send(self, line: str) -> None:
        """Write one command line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self, deadline: float) -> str:
        """The next line of output, waiting until ``deadline`` (``time.monotonic``).

        Raises:
            TimeoutError: nothing came in time.
            RuntimeError: the process exited.
        """
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} (pid {self.pid}): no answer in time")
            if not self._selector.select(min(left, 1.0)):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65_536)
            if not chunk:
                raise RuntimeError(f"{self.name} exited with {self.proc.wait(5)}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def expect(self, word: str, deadline: float) -> str:
        """Read lines until one starts with ``word``; return the rest of that line.

        Answers to other questions (e.g. ``PUBLISHED`` arriving before ``CPU``)
        are kept for a later :meth:`expect`.
        """
        for i, line in enumerate(self._unclaimed):
            head, _, rest = line.partition(" ")
            if head == word:
                del self._unclaimed[i]
                return rest
        while True:
            line = self.read_line(deadline)
            head, _, rest = line.partition(" ")
            if head == word:
                return rest
            if head in ("TIMEOUT", "ERROR"):
                raise RuntimeError(f"{self.name}: {line}")
            self._unclaimed.append(line)

    def ask(self, command: str, word: str, deadline: float) -> str:
        """Send a command and return the answer line's rest."""
        self.send(command)
        return self.expect(word, deadline)

    def cpu_seconds(self) -> float:
        """This process's user + system CPU so far (``/proc``, 10 ms ticks)."""
        return proc_cpu_seconds(self.pid)

    def stop(self, grace: float = 5.0) -> None:
        """End the process: close stdin, SIGTERM, then SIGKILL after ``grace`` s."""
        proc = self.proc
        try:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.close()
                try:
                    proc.wait(min(grace, 1.0))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(grace)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(grace)
        finally:
            self._selector.close()
            with contextlib.suppress(OSError):
                if proc.stdout is not None:
                    proc.stdout.close()
            _started.pop(self.pid, None)


def stop_all() -> None:
    """Stop every process this module started and that is still tracked."""
    for process in list(_started.values()):
        process.stop()


atexit.register(stop_all)


def start_server(mode: str, *extra: str) -> tuple[ManagedProcess, int]:
    """Start ``_server.py`` in ``mode`` (hub, core or raw); returns it and its port."""
    server = ManagedProcess(
        [PYTHON, str(BENCH_DIR / "_server.py"), "--mode", mode, *extra], f"server[{mode}]"
    )
    try:
        port = int(server.expect("PORT", time.monotonic() + 30))
    except BaseException:
        server.stop()
        raise
    return server, port


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal positive counts."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- the loopback scenario ---------------------------------------------------------


def run_loopback(
    server_mode: str,
    publish: str,
    receivers: int,
    messages: int,
    *,
    timeout: float,
    client_processes: int = 1,
    profile: str | None = None,
    server_args: Sequence[str] = (),
) -> dict[str, Any]:
    """One fan-out over real loopback WebSockets; returns a result row.

    Args:
        server_mode: ``hub`` (chatcore Hub), ``core`` (chatcore, trivial
            handler offering to every connection) or ``raw`` (trio-websocket,
            naive per-message loop, no chatcore).
        publish: ``burst`` (server publishes all messages back to back),
            ``paced`` (server yields to the scheduler after each publish) or
            ``client`` (one of the receivers publishes them over its socket).
        receivers: Connections that each must receive every message.
        messages: Messages published.
        timeout: Bound of the whole scenario, in seconds.
        client_processes: Processes the receivers are spread over.
        profile: If given, the server runs cProfile over the measurement
            window and dumps the stats to this path (the CPU figures of such a
            run include the profiler's overhead).
    """
    deadline = time.monotonic() + timeout
    server, port = start_server(server_mode, *server_args)
    clients: list[ManagedProcess] = []
    try:
        rss_before = proc_rss_bytes(server.pid)
        for i, count in enumerate(split_evenly(receivers, client_processes)):
            argv = [
                PYTHON,
                str(BENCH_DIR / "_client.py"),
                "--port",
                str(port),
                "--connections",
                str(count),
                "--messages",
                str(messages),
                "--timeout",
                str(timeout),
            ]
            if server_mode == "hub":
                argv += ["--join", ROOM]
            if publish == "client" and i == 0:
                argv += ["--publish", str(messages)]
            clients.append(ManagedProcess(argv, f"client{i}"))
        for client in clients:
            client.expect("READY", deadline)
        time.sleep(0.3)  # let the server finish answering joins before the window opens
        rss_idle = proc_rss_bytes(server.pid)
        stats_before = json.loads(server.ask("STATS", "STATS", deadline))

        client_cpu0 = sum(c.cpu_seconds() for c in clients)
        proc_cpu0 = server.cpu_seconds()
        gc0 = json.loads(server.ask("GC", "GC", deadline))
        if profile:
            server.ask("PROFILE start", "PROFILE", deadline)
        cpu0 = float(server.ask("CPU", "CPU", deadline))
        wall0 = time.perf_counter()
        if publish == "client":
            clients[0].send("GO")
        else:
            server.send(f"PUBLISH {publish} {messages}")
        reports = [json.loads(c.expect("DONE", deadline)) for c in clients]
        wall1 = time.perf_counter()
        cpu1 = float(server.ask("CPU", "CPU", deadline))
        proc_cpu1 = server.cpu_seconds()
        client_cpu1 = sum(c.cpu_seconds() for c in clients)
        if profile:
            server.ask(f"PROFILE stop {profile}", "PROFILE", deadline)
        gc1 = json.loads(server.ask("GC", "GC", deadline))
        if publish != "client":
            server.expect("PUBLISHED", deadline)
        stats_after = json.loads(server.ask("STATS", "STATS", deadline))
    finally:
        for client in clients:
            client.stop()
        server.stop()

    deliveries = receivers * messages
    received = sum(r["messages"] for r in reports)
    frames = stats_after["frames"] - stats_before["frames"]
    wall = wall1 - wall0
    return {
        "transport": "loopback",
        "server": server_mode,
        "publish": publish,
        "M": receivers,
        "K": messages,
        "deliveries": deliveries,
        "received": received,
        "verified": received == deliveries and all(r["errors"] == 0 for r in reports),
        "cpu_us_per_delivery": (cpu1 - cpu0) / deliveries * 1e6,
        "proc_cpu_us_per_delivery": (proc_cpu1 - proc_cpu0) / deliveries * 1e6,
        "frames_per_message": frames / deliveries,
        "deliveries_per_s": deliveries / wall,
        "wall_s": wall,
        "server_cpu_s": cpu1 - cpu0,
        "gc_share": (gc1["seconds"] - gc0["seconds"]) / max(cpu1 - cpu0, 1e-9),
        "gc_collections": [
            b - a for a, b in zip(gc0["collections"], gc1["collections"], strict=True)
        ],
        "gc_tracked_objects": gc1["tracked_objects"],
        "server_idle_s": gc1["idle_s"] - gc0["idle_s"],
        "server_idle_waits": gc1["idle_waits"] - gc0["idle_waits"],
        "gc_seconds_by_generation": [
            b - a for a, b in zip(gc0["by_generation"], gc1["by_generation"], strict=True)
        ],
        "client_cpu_s": client_cpu1 - client_cpu0,
        "idle_rss_bytes_per_connection": (rss_idle - rss_before) / receivers,
        "dropped": stats_after.get("dropped", 0),
    }


# -- repetitions -------------------------------------------------------------------


def load_average() -> float:
    """The 1-minute load average (other work on the machine skews every number)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def median_row(rows: Sequence[dict[str, Any]], key: str = "cpu_us_per_delivery") -> dict[str, Any]:
    """The repetition with the median ``key``, annotated with the spread."""
    ordered = sorted(rows, key=lambda r: r[key])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["repeats"] = len(rows)
    row[f"{key}_min"] = ordered[0][key]
    row[f"{key}_max"] = ordered[-1][key]
    row["verified"] = all(r["verified"] for r in rows)
    return row


def run_repeated(
    scenarios: Sequence[tuple[str, Any]], repeat: int, *, label: str = ""
) -> list[dict[str, Any]]:
    """Run each ``(name, thunk)`` ``repeat`` times, interleaved; median rows in order.

    Interleaving (A B A B, not A A B B) gives scenarios compared with each
    other the same share of whatever else the machine was doing.
    """
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in scenarios}
    for round_ in range(repeat):
        for name, thunk in scenarios:
            load = load_average()
            started = time.monotonic()
            row = thunk()
            row["load1"] = load
            results[name].append(row)
            print(
                f"  {label}{name} [{round_ + 1}/{repeat}] {time.monotonic() - started:5.1f}s "
                f"{row['cpu_us_per_delivery']:7.2f} us/delivery"
                + ("" if row["verified"] else "  NOT VERIFIED"),
                file=sys.stderr,
                flush=True,
            )
    return [median_row(results[name]) for name, _ in scenarios]


# -- command line and output -------------------------------------------------------


def parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small run (M=200, K=50), well under 1 min")
    p.add_argument(
        "--json",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="also write the results as JSON (default path: bench/results/<name>-<time>.json)",
    )
    p.add_argument(
        "--timeout", type=float, default=180.0, help="bound of each scenario, seconds (180)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario N times (interleaved) and report the median (1)",
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes the loopback clients are spread over (1)",
    )
    return p


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text (and Markdown-compatible) table.

    Args:
        rows: Result dicts.
        columns: ``(key, heading, format spec)`` per column.
    """

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "NO"
        return format(value, spec)

    body = [[cell(row, key, spec) for key, _, spec in columns] for row in rows]
    headings = [heading for _, heading, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headings)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headings, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body
    ]
    return "\n".join(lines)


def write_json(option: str | None, name: str, payload: dict[str, Any]) -> Path | None:
    """Write ``payload`` if ``--json`` was given; returns the path written."""
    if option is None:
        return None
    if option:
        path = Path(option)
    else:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2) + "\n")
    return path
