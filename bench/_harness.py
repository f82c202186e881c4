"""The one harness of the benchmarks: processes, readings from /proc, rounds, tables.

Theory of operation
-------------------

The orchestrating scripts (``fanout.py``, ``profile.py``, ``redis_*.py``) are
plain synchronous Python. Each server under test runs in its own process
(:func:`start_server`), every client of a scenario in one more
(:func:`start_clients`, ``_client.py``), and the orchestrator talks to the
clients over stdin/stdout with one-line commands, so every wait is a line read
with a deadline. The servers are black boxes: they are reached over
WebSockets and HTTP on 127.0.0.1 and observed through ``/proc`` only:

* **CPU**: ``utime + stime`` of ``/proc/<pid>/stat`` (clock ticks, 10 ms)
  over the measurement window, summed over the server's worker processes.
* **Memory**: RSS from ``/proc/<pid>/statm``.

Processes are tracked by PID: only those started here are ever signalled
(SIGTERM, then SIGKILL after a bound), all of them in ``finally`` and at exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: The room every benchmark uses.
ROOM = "bench"
#: Heartbeats out of the measurement's way (seconds).
HEARTBEAT = "3600"

#: Every server kind, in the order tables list them.
SERVERS = (
    "chatcore-serve",
    "chatcore-lean",
    "chatcore-trio-ws",
    "websockets",
    "raw-trio-ws",
    "raw-hypercorn",
)
#: The kinds that answer ``GET /burst?count=K`` (server-side bursts).
BURST_SERVERS = ("chatcore-serve", "chatcore-lean", "websockets", "raw-hypercorn")


# -- limits, CPU and memory ---------------------------------------------------


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process from ``/proc/<pid>/stat`` (10 ms ticks)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces; the fields after it are plain.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of a process from ``/proc/<pid>/statm``."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (``chatcore serve --workers N``'s workers)."""
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in path.read_text().split()]
    return found


def tcp_established(local_port: int, remote_port: int) -> bool:
    """Whether the server side of a loopback connection is still ESTABLISHED.

    The socket that ``local_port`` (the server's) shares with ``remote_port``
    (a client's), from ``/proc/net/tcp``: once the server closes it, it leaves
    state 01 (or the table).
    """
    local, remote = f":{local_port:04X}", f":{remote_port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if fields[1].endswith(local) and fields[2].endswith(remote):
                return fields[3] == "01"
    return False


def load_average() -> float:
    """The 1-minute load average (2.0 means both cores of this machine busy)."""
    return os.getloadavg()[0]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    from importlib.metadata import version

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    packages = ("trio", "trio-websocket", "wsproto", "hypercorn", "websockets")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        **{name: version(name) for name in packages},
    }


# -- child processes ------------------------------------------------------------

_started: dict[int, ManagedProcess] = {}


class ManagedProcess:
    """A child process we started, spoken to by lines on stdin/stdout.

    Every read has a deadline; :meth:`stop` signals only this PID.
    """

    def __init__(self, argv: Sequence[str], name: str, cwd: Path = BENCH_DIR) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherited: a crash traceback shows in the run's output
            cwd=cwd,
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

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.proc.returncode}>"

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
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError(f"{self.name} exited with {self.proc.wait(5)}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def expect(
        self,
        word: str,
        deadline: float,
        *,
        tick: Callable[[], None] | None = None,
        interval: float = 0.05,
    ) -> str:
        """Read lines until one starts with ``word``; return the rest of that line.

        Other answers are kept for a later :meth:`expect`. With ``tick``, it is
        called every ``interval`` seconds while waiting (sampling RSS, ...).

        Raises:
            TimeoutError: no such line before ``deadline``.
            RuntimeError: the process exited or reported ``TIMEOUT``/``ERROR``.
        """
        for i, line in enumerate(self._unclaimed):
            head, _, rest = line.partition(" ")
            if head == word:
                del self._unclaimed[i]
                return rest
        while True:
            if tick is not None:
                tick()
            try:
                line = self.read_line(
                    min(deadline, time.monotonic() + interval) if tick else deadline
                )
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                continue
            head, _, rest = line.partition(" ")
            if head == word:
                return rest
            if head in ("TIMEOUT", "ERROR"):
                raise RuntimeError(f"{self.name}: {line[:2000]}")
            self._unclaimed.append(line)

    def expect_json(
        self, word: str, deadline: float, *, before: str = "", **kwargs: Any
    ) -> dict[str, Any]:
        """:meth:`expect`, the rest of the line parsed as JSON.

        With ``before``, that command line is sent first.
        """
        if before:
            self.send(before)
        result: dict[str, Any] = json.loads(self.expect(word, deadline, **kwargs))
        return result

    def stop(self, grace: float = 10.0) -> None:
        """End the process: close stdin, SIGTERM, then SIGKILL after ``grace`` s."""
        proc = self.proc
        try:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.close()
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


# -- servers ------------------------------------------------------------------


class Server:
    """A server under test, in its own process (and, for workers, its children).

    Attributes:
        kind: One of :data:`SERVERS`.
        port: Where it listens on 127.0.0.1.
        path: Its WebSocket endpoint.
    """

    def __init__(self, kind: str, process: ManagedProcess, port: int, path: str) -> None:
        self.kind = kind
        self.process = process
        self.port = port
        self.path = path

    def __repr__(self) -> str:
        return f"<Server {self.kind} pid={self.process.pid} port={self.port}>"

    @property
    def pids(self) -> list[int]:
        """The process and its worker processes, if any."""
        return [self.process.pid, *children(self.process.pid)]

    def cpu_seconds(self) -> float:
        """User + system CPU so far, all processes."""
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += proc_cpu_seconds(pid)
        return total

    def rss_bytes(self) -> int:
        """Resident set size now, all processes."""
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += proc_rss_bytes(pid)
        return total

    def burst(self, count: int, timeout: float = 60.0) -> None:
        """Ask the server to publish ``count`` messages in one go (``GET /burst``)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", f"/burst?count={count}")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{self.kind}: /burst answered {response.status}")
        finally:
            connection.close()

    def stop(self) -> None:
        """SIGTERM (``chatcore serve`` forwards it to its workers), then SIGKILL."""
        workers = children(self.process.pid)
        self.process.stop()
        for pid in workers:  # only if they outlived their supervisor's SIGKILL
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def start_server(
    kind: str, *, timeout: float = 30.0, serve_args: Sequence[str] = (), target: str = ""
) -> Server:
    """Start a server of ``kind`` on 127.0.0.1, port 0; returns once it listens.

    Args:
        kind: One of :data:`SERVERS`.
        timeout: Seconds it may take to start.
        serve_args: Extra ``chatcore serve`` options (``--workers``, ``--redis-url``).
        target: ``chatcore serve``'s target (default ``chatcore_app:app``).
    """
    deadline = time.monotonic() + timeout
    if kind in ("chatcore-serve", "chatcore-lean"):
        argv = [PYTHON, "-m", "chatcore", "serve", target or "chatcore_app:app"]
        if kind == "chatcore-lean":
            argv += ["--engine", "lean"]
        argv += ["--bind", "127.0.0.1:0", "--no-access-log", "--log-level", "WARNING"]
        argv += ["--heartbeat-interval", HEARTBEAT, "--heartbeat-timeout", HEARTBEAT]
        argv += ["--drain-grace", "1", *serve_args]
        process = ManagedProcess(argv, kind)
        try:
            # "chatcore: serving on ws://127.0.0.1:PORT/ws"
            line = process.expect("chatcore:", deadline)
            return Server(kind, process, int(line.rsplit(":", 1)[1].split("/")[0]), "/ws")
        except BaseException:
            process.stop()
            raise
    if kind not in SERVERS:
        raise ValueError(f"unknown server {kind!r}; choose from {', '.join(SERVERS)}")
    process = ManagedProcess([PYTHON, str(BENCH_DIR / "_servers.py"), kind], kind)
    try:
        return Server(kind, process, int(process.expect("PORT", deadline)), "/ws")
    except BaseException:
        process.stop()
        raise


@contextlib.contextmanager
def running_server(kind: str, **kwargs: Any) -> Any:
    """:func:`start_server` as a context manager that always stops it."""
    server = start_server(kind, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# -- clients ------------------------------------------------------------------


def start_clients(server: Server, connections: int, *, timeout: float, **options: Any) -> Clients:
    """Start the client process of a scenario against ``server`` (see ``_client.py``).

    Args:
        server: Where to connect.
        connections: Reading connections (joined to :data:`ROOM`).
        timeout: The client process exits by itself after this many seconds.
        options: ``_client.py`` options by their Python names
            (``messages=200``, ``never_read=True``...).
    """
    argv = [PYTHON, str(BENCH_DIR / "_client.py"), "--port", str(server.port)]
    argv += ["--path", server.path, "--connections", str(connections)]
    argv += ["--timeout", str(timeout)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    return Clients(argv)


class Clients(ManagedProcess):
    """The client process (``_client.py``)."""

    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__(argv, "clients")
        self.ready: dict[str, Any] = {}

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        """Wait until every connection is open and joined; returns the READY report."""
        self.ready = self.expect_json("READY", deadline)
        return self.ready

    def cpu_seconds(self) -> float:
        """This process's user + system CPU so far."""
        return proc_cpu_seconds(self.pid)


class Window:
    """Server CPU, wall time and peak RSS over a measurement window.

    :meth:`sample` (pass it as ``tick=`` to :meth:`ManagedProcess.expect`)
    records the RSS peak while waiting.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.rss_start = self.rss_peak = server.rss_bytes()
        self.cpu0 = server.cpu_seconds()
        self.wall0 = time.perf_counter()
        self.cpu = self.wall = 0.0

    def sample(self) -> None:
        """Note the server's RSS now (for the peak)."""
        self.rss_peak = max(self.rss_peak, self.server.rss_bytes())

    def close(self) -> Window:
        """End the window: CPU and wall time since it opened."""
        self.cpu = self.server.cpu_seconds() - self.cpu0
        self.wall = time.perf_counter() - self.wall0
        self.sample()
        return self


# -- rounds and results ---------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of sorted ``values`` (nearest rank), NaN if empty."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(fraction * len(values)))]


def run_rounds(
    scenarios: Sequence[tuple[str, Callable[[], dict[str, Any]]]],
    repeat: int,
    keys: Sequence[str],
) -> list[dict[str, Any]]:
    """Run each scenario ``repeat`` times, interleaved (A B C A B C ...).

    Returns one row per scenario: the round with the median ``keys[0]``, plus
    ``<key>_spread`` (``"min..max"`` over the rounds) for every key, and
    ``verified`` only if every round was verified. A round that raised is
    reported and counted as not verified.
    """
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in scenarios}
    for round_ in range(repeat):
        for name, thunk in scenarios:
            load = load_average()
            started = time.monotonic()
            try:
                row = thunk()
            except Exception as exc:  # one failed round must not lose the others
                print(f"  {name} [{round_ + 1}/{repeat}] FAILED: {exc}", file=sys.stderr)
                row = {"verified": False, "error": str(exc)[:300], "failed": name}
            row["load1"] = load
            results[name].append(row)
            summary = ", ".join(
                f"{key} {row[key]:.3g}" for key in keys if isinstance(row.get(key), int | float)
            )
            print(
                f"  {name} [{round_ + 1}/{repeat}] {time.monotonic() - started:5.1f} s: {summary}"
                + ("" if row.get("verified") else "  NOT VERIFIED"),
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for name, _ in scenarios:
        rounds = results[name]
        measured = [r for r in rounds if keys[0] in r] or rounds
        measured.sort(key=lambda r: r.get(keys[0], 0.0))
        row = dict(measured[len(measured) // 2])
        row["name"] = name
        row["repeats"] = len(rounds)
        row["verified"] = all(r.get("verified") for r in rounds)
        for key in keys:
            values = [r[key] for r in rounds if isinstance(r.get(key), int | float)]
            if len(values) > 1:
                row[f"{key}_spread"] = f"{min(values):.3g}..{max(values):.3g}"
        rows.append(row)
    return rows


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table.

    Args:
        rows: Result dicts.
        columns: ``(key, heading, format spec)`` per column; a missing value is blank.
    """

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "NO"
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)

    body = [[cell(row, key, spec) for key, _, spec in columns] for row in rows]
    headings = [heading for _, heading, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headings)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headings, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    # Text left, numbers right.
    left = [spec == "s" for _, _, spec in columns]
    lines += [
        "| "
        + " | ".join(
            c.ljust(w) if is_text else c.rjust(w)
            for c, w, is_text in zip(r, widths, left, strict=True)
        )
        + " |"
        for r in body
    ]
    return "\n".join(lines)


def parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all")
    p.add_argument("--repeat", type=int, default=1, help="rounds, interleaved; median (1)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per scenario (180)")
    p.add_argument(
        "--json",
        nargs="?",
        const="",
        metavar="PATH",
        help="also write the results as JSON (default bench/results/<name>-<time>.json)",
    )
    return p


def write_json(option: str | None, name: str, payload: dict[str, Any]) -> Path | None:
    """Write ``payload`` and the machine description if ``--json`` was given."""
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


def median(values: Sequence[float]) -> float:
    """The median, NaN if empty."""
    return statistics.median(values) if values else float("nan")


# -- Redis --------------------------------------------------------------------


class RedisProcess:
    """A throwaway redis-server on a free loopback port (stopped by PID)."""

    def __init__(self) -> None:
        executable = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.directory = tempfile.mkdtemp(prefix="chatcore-bench-redis-")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        argv = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", self.directory]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        self.pid = self.process.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self, *args: str) -> Any:
        """One command over a fresh connection (RESP2: enough for PING, FLUSHALL, PUBSUB)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
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

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
