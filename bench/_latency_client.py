"""Loopback clients that also measure delivery latency (``hypercorn_vs_raw.py``).

The epoll clients of ``_client.py`` (handshake, optional join, offsets checked
to be exactly 1..N), plus:

* **A steady publisher.** With ``--rate R --publish N`` the first connection
  sends N ``publish`` messages after ``GO``, the i-th at ``start + i / R``
  (a late one goes out as soon as the loop gets to it, with its own
  timestamp); the payload is the send time, ``time.time()`` formatted to the
  microsecond (17 characters, so the message line stays about 100 bytes).
* **Latency per delivered message.** Every socket has ``SO_TIMESTAMPNS`` on,
  so each read carries the kernel's receive time (``CLOCK_REALTIME``, the
  clock of ``time.time()``, system-wide): ``kernel - sent`` is how long the
  message took from the publisher's ``send()`` to the receiver's socket
  buffer, which is the server's doing and not this process's scheduling.
  ``read - sent`` (``time.time()`` right after the read) adds this process's
  own delay in getting to the socket. For TCP the kernel stamps a read with
  its latest segment, so a read that carries several frames gives all of
  them the latest time (an overestimate for the earlier ones).

``DONE`` reports both lists (microseconds, integers) and, per offset, when
it was sent and when its last copy arrived here (kernel time), next to the
counters of ``_client.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import selectors
import socket
import struct
import sys
import time

from _client import _CLOSED, _HANDSHAKE, _HELLO, _READY, Clients, _Conn, _frame

#: Linux's SO_TIMESTAMPNS (SCM_TIMESTAMPNS is the same number); the socket
#: module does not export it.
SO_TIMESTAMPNS = 35
_CMSG_SPACE = socket.CMSG_SPACE(16)
_LINE = re.compile(rb'"offset":(\d+),.*"data":"([0-9.]+)"')


class LatencyClients(Clients):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.kernel_us: list[int] = []
        self.read_us: list[int] = []
        # Per offset: when it was sent, and when its last copy arrived (kernel time).
        self.sent_at: dict[int, float] = {}
        self.arrived: dict[int, float] = {}
        self.sent = 0
        self.publish_start = 0.0
        self.publish_end = 0.0
        self._kernel_time = 0.0
        self._read_time = 0.0

    def open_more(self) -> None:
        before = len(self.conns)
        super().open_more()
        for conn in self.conns[before:]:
            conn.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def on_readable(self, conn: _Conn) -> None:
        try:
            data, ancillary, _, _ = conn.sock.recvmsg(262_144, _CMSG_SPACE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, str(exc))
            return
        self._read_time = time.time()
        self._kernel_time = self._read_time
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = struct.unpack("qq", payload[:16])
                self._kernel_time = seconds + nanoseconds * 1e-9
        if not data:
            self.fail(conn, "server closed the TCP connection")
            return
        buf = conn.inbuf
        buf += data
        if conn.state == _HANDSHAKE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.fail(conn, bytes(buf[: buf.find(b"\r\n")]).decode(errors="replace"))
                return
            del buf[: end + 4]
            conn.state = _HELLO
        self.parse(conn)

    def on_text(self, conn: _Conn, payload: bytes) -> None:
        if conn.state != _READY:
            super().on_text(conn, payload)
            return
        found = False
        expected = conn.last + 1
        for line in payload.split(b"\n"):
            match = _LINE.search(line)
            if match is None:
                continue
            found = True
            offset = int(match[1])
            if offset != expected:
                conn.errors += 1
                print(f"offset {offset} where {expected} was expected", file=sys.stderr)
            expected += 1
            sent = float(match[2])
            if self._kernel_time > self.arrived.get(offset, 0.0):
                self.arrived[offset] = self._kernel_time
                self.sent_at[offset] = sent
            self.kernel_us.append(round((self._kernel_time - sent) * 1e6))
            self.read_us.append(round((self._read_time - sent) * 1e6))
        if not found:
            return
        conn.message_frames += 1
        before = conn.last
        conn.last = expected - 1
        if before < self.args.messages <= conn.last:
            self.done += 1

    def publish(self) -> None:
        """Start the steady publisher (the loop sends what is due)."""
        self.publish_start = time.monotonic()

    def publish_due(self) -> float:
        """Send the publishes that are due; seconds until the next one (or 1.0)."""
        args = self.args
        if not self.publish_start or self.sent >= args.publish:
            return 1.0
        conn = self.conns[0]
        room = args.join or "bench"
        while self.sent < args.publish:
            due = self.publish_start + self.sent / float(args.rate)
            wait = due - time.monotonic()
            if wait > 0:
                return wait
            data = f"{time.time():.6f}"
            self.send(conn, _frame(json.dumps({"type": "publish", "room": room, "data": data})))
            self.sent += 1
        self.publish_end = time.monotonic()
        return 1.0

    def report(self) -> dict[str, object]:
        report = super().report()
        report["published"] = self.sent
        report["publish_s"] = self.publish_end - self.publish_start if self.publish_end else 0.0
        report["kernel_latency_us"] = self.kernel_us
        report["sent_at"] = self.sent_at
        report["last_arrival"] = self.arrived
        report["read_latency_us"] = self.read_us
        return report

    def run(self) -> int:
        args = self.args
        deadline = time.monotonic() + args.timeout
        while not self.quit:
            self.open_more()
            if not self.announced_ready and self.ready == args.connections:
                self.announced_ready = True
                print(f"READY {self.ready}", flush=True)
            if self.announced_ready and not self.announced_done and self.done == args.connections:
                self.announced_done = True
                print("DONE " + json.dumps(self.report()), flush=True)
            left = deadline - time.monotonic()
            if left <= 0:
                print("TIMEOUT " + json.dumps(self.report()), flush=True)
                return 1
            if self.failed:
                print("ERROR " + json.dumps(self.report()), flush=True)
                return 1
            wait = self.publish_due() if args.rate else 1.0
            for key, events in self.selector.select(min(left, wait, 1.0)):
                conn = key.data
                if conn is None:
                    self.on_stdin()
                    continue
                if conn.state == _CLOSED:
                    continue
                if events & selectors.EVENT_WRITE:
                    self.on_writable(conn)
                if events & selectors.EVENT_READ and conn.state != _CLOSED:
                    self.on_readable(conn)
        for conn in self.conns:
            if conn.state != _CLOSED:
                conn.sock.close()
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/ws")
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--messages", type=int, required=True, help="messages each must receive")
    p.add_argument("--join", default="", help="room to join (chatcore hub protocol)")
    p.add_argument("--publish", type=int, default=0, help="publishes the first connection sends")
    p.add_argument("--rate", type=float, default=0.0, help="publishes per second (steady)")
    p.add_argument("--parallel", type=int, default=200, help="handshakes in flight at once")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    if args.publish and not args.rate:
        p.error("--publish needs --rate")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return LatencyClients(args).run()


if __name__ == "__main__":
    sys.exit(main())
