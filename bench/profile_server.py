"""Where a server's time goes during the fan-out scenario: py-spy, top functions by own time.

Runs ``fanout.py``'s first scenario (one client publishes K messages to M
members), or with ``--scenario latency`` its second (R receivers, one
publisher at 100 msg/s), against each ``--servers`` kind and records the server process with
``py-spy record --pid`` (a sampling profiler attached from outside: the
server runs unmodified) over the measurement window only. Prints, per
server, the functions with the most samples *on top of the stack* (own time)
and, with ``--cumulative``, those most often anywhere on it.

py-spy needs ptrace rights on the server (root, or
``kernel.yama.ptrace_scope = 0``); install it with ``pip install py-spy``
(or the project's ``bench`` extra).

Run (from the repository root)::

    .venv/bin/python bench/profile_server.py --quick
    .venv/bin/python bench/profile_server.py --servers chatcore-serve --native --top 25

The raw stacks stay in ``--output`` (default ``bench/results/``): one line per
distinct stack, ``frame;frame;...;frame COUNT``, which ``flamegraph.pl`` or
speedscope read.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import _harness as h
from fanout import SIZES, run_fanout, run_latency

_LINE_NUMBER = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """``send_all (trio/_highlevel_socket.py:123)`` -> ``send_all (trio/_highlevel_socket.py)``.

    Line numbers are dropped so a function's samples add up; paths are cut to
    the part after ``site-packages/`` (or the repository).
    """
    frame = _LINE_NUMBER.sub(")", frame)
    for marker in ("site-packages/", "/chatcore/", "/bench/"):
        head, sep, tail = frame.partition(marker)
        if sep:
            name = head.split(" (", 1)[0]
            prefix = "" if marker == "site-packages/" else marker.strip("/") + "/"
            return f"{name} ({prefix}{tail}"
    return frame


def top_functions(raw: str, top: int, cumulative: bool = False) -> list[tuple[str, int, float]]:
    """``(function, samples, share)`` from py-spy's raw output, most samples first."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame_name(f) for f in stack.split(";")]
        if cumulative:
            for name in set(frames):
                counts[name] += count
        else:
            counts[frames[-1]] += count
    return [(name, n, n / total) for name, n in counts.most_common(top)] if total else []


class PySpy:
    """``py-spy record`` attached to a server for the measurement window."""

    def __init__(self, output: Path, rate: int, native: bool) -> None:
        self.output = output
        self.rate = rate
        self.native = native
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, server: h.Server) -> None:
        executable = shutil.which("py-spy", path=str(Path(h.PYTHON).parent)) or "py-spy"
        argv = [executable, "record", "--pid", str(server.process.pid), "--format", "raw"]
        argv += ["--rate", str(self.rate), "--output", str(self.output)]
        if self.native:
            argv.append("--native")
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches and starts sampling

    def stop(self, server: h.Server) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def main() -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--servers",
        default="chatcore-serve,chatcore-trio-ws",
        type=lambda s: [x for x in s.split(",") if x],
        help=f"comma-separated subset of: {', '.join(h.SERVERS)} (the two chatcore ones)",
    )
    p.add_argument("--scenario", choices=("fanout", "latency"), default="fanout", help="(fanout)")
    p.add_argument("--members", type=int, help="M (1000; quick 200); R for latency (200; 100)")
    p.add_argument("--messages", type=int, help="K (200; quick 50)")
    p.add_argument("--top", type=int, default=15, help="functions listed (15)")
    p.add_argument("--cumulative", action="store_true", help="also list by inclusive samples")
    p.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    p.add_argument("--rate", type=int, default=250, help="samples per second (250)")
    p.add_argument("--output", type=Path, default=h.RESULTS_DIR, help="where the stacks go")
    args = p.parse_args()
    full_m, quick_m = SIZES["fanout_members"]
    full_k, quick_k = SIZES["fanout_messages"]
    members = args.members or (quick_m if args.quick else full_m)
    messages = args.messages or (quick_k if args.quick else full_k)
    h.raise_nofile_limit()
    args.output.mkdir(parents=True, exist_ok=True)
    status = 0
    for kind in args.servers:
        path = args.output / f"profile-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        spy = PySpy(path, args.rate, args.native)
        if args.scenario == "latency":
            receivers = args.members or SIZES["latency_receivers"][args.quick]
            seconds = SIZES["latency_seconds"][args.quick]
            row = run_latency(
                kind, receivers, seconds, timeout=args.timeout, on_window=(spy.start, spy.stop)
            )
            print(
                f"\n{kind}: {receivers} receivers, 100 msg/s for {seconds:g} s; "
                f"p50/p99 {row['p50_ms']:.1f}/{row['p99_ms']:.1f} ms and "
                f"{row['cpu_percent']:.0f} % CPU under the profiler, frames/msg "
                f"{row['frames_per_message']:.3f}, all in order: "
                f"{'yes' if row['verified'] else 'NO'}; stacks in {path}"
            )
        else:
            row = run_fanout(
                kind, members, messages, timeout=args.timeout, on_window=(spy.start, spy.stop)
            )
            print(
                f"\n{kind}: one client publishes {messages} to {members} members; "
                f"{row['cpu_us_per_delivery']:.1f} µs/delivery under the profiler, "
                f"frames/msg {row['frames_per_message']:.3f}, all in order: "
                f"{'yes' if row['verified'] else 'NO'}; stacks in {path}"
            )
        if not row["verified"]:
            status = 1
        raw = path.read_text() if path.exists() else ""
        orders = [("own", False)] + ([("inclusive", True)] if args.cumulative else [])
        for label, cumulative in orders:
            rows = [
                {"rank": i + 1, "function": name, "samples": n, "share": share}
                for i, (name, n, share) in enumerate(top_functions(raw, args.top, cumulative))
            ]
            print(f"\nTop {args.top} by {label} samples:\n")
            print(
                h.format_table(
                    rows,
                    [
                        ("rank", "#", "d"),
                        ("function", "function (file)", "s"),
                        ("samples", "samples", "d"),
                        ("share", "share", ".1%"),
                    ],
                )
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
