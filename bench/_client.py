"""The benchmark clients: every WebSocket of a scenario in one cheap process.

A bare ``selectors`` (epoll) loop with a minimal RFC 6455 client, so the
clients cost far less CPU than the server they measure. Each connection
completes the handshake, waits for the server's ``hello``, joins the room
(``--join``), and then checks every ``message`` line it receives: offsets
must be exactly 1, 2, 3 ... (nothing lost, nothing twice, in order). A server
frame may carry one message or many newline-separated ones (batching); both
are counted (``message_frames``).

Roles (command-line options; connection 0 is the publisher):

* ``--publish K``: on ``GO``, connection 0 sends K ``publish`` messages at
  once (``--big N --big-size B`` sends N messages of B bytes first);
  ``--rate R`` paces them at R per second instead, each carrying its send
  time, and every delivery's latency is recorded (the kernel's receive
  timestamp, ``SO_TIMESTAMPNS``, minus the send time: both ``CLOCK_REALTIME``).
* ``--never-read``: one more connection joins with a small receive buffer
  and then never reads again (the slow consumer). Its local port is in the
  ``READY`` line, so the orchestrator can watch the server close it.
* ``--tolerate-closes``: a connection the server closes is counted
  (``closed``; ``refused`` before it was joined), not fatal; and once
  publishing started, ``DONE`` also comes when no message arrived for
  ``--stall`` seconds (``stalled`` in the report: the readers will not get
  the rest, e.g. the publisher was closed).

Driven over stdin/stdout by the orchestrator (``_harness.Clients``)::

    -> READY {json}         every connection is open and joined
    <- GO                   the publisher starts
    -> DONE {json}          every live connection received every message
    <- CHURN N              open N more connections, join, then reset them all
    -> CHURNED {json}       ... done
    <- QUIT / end of input  close everything and exit

Exits by itself after ``--timeout`` seconds (``TIMEOUT {json}``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import selectors
import socket
import struct
import sys
import time

#: A room message line: its offset, and (for the latency runs) the data string.
_MESSAGE = re.compile(rb'"type":"message","room":"[^"]*","offset":(\d+)')
_STAMPED = re.compile(rb'"offset":(\d+),.*"data":"([0-9.]+)"')
#: Linux's SO_TIMESTAMPNS (the socket module does not export it).
SO_TIMESTAMPNS = 35
_CMSG_SPACE = socket.CMSG_SPACE(16)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST

_CONNECTING, _HANDSHAKE, _HELLO, _JOINING, _READY, _CLOSED = range(6)


def frame(text: str) -> bytes:
    """A masked client text frame (RFC 6455 section 5.2)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = bytes((0x81, 0x80 | n))
    elif n < 65_536:
        header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return header + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def publish_frame(room: str, data: str) -> bytes:
    """One ``publish`` message, framed."""
    return frame(json.dumps({"type": "publish", "room": room, "data": data}))


class Conn:
    """One client WebSocket and what it received."""

    __slots__ = (
        "batch",
        "errors",
        "fragments",
        "inbuf",
        "last",
        "message_frames",
        "outbuf",
        "reads",
        "sock",
        "state",
        "writing",
    )

    def __init__(self, sock: socket.socket, batch: int) -> None:
        self.sock = sock
        self.batch = batch  # which CHURN round opened it (0: the initial ones)
        self.state = _CONNECTING
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.fragments: list[bytes] = []
        self.last = 0  # offset of the last message received
        self.message_frames = 0
        self.errors = 0
        self.reads = True
        self.writing = True


class Clients:
    """The epoll loop over every connection (see the module docs)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.selector = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.wanted = args.connections + (1 if args.never_read else 0)
        self.batch = 0
        self.pending = 0  # connections started and not yet ready
        self.ready = 0
        self.done = 0
        self.closed = 0  # closed by the server once joined (with --tolerate-closes)
        self.refused = 0  # closed by the server before it was joined (same)
        self.failed = 0
        self.announced_ready = False
        self.announced_done = False
        self.quit = False
        self.stdin_buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.request = (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.join = frame(json.dumps({"type": "join", "room": args.join, "ref": "j"}))
        # The publisher: frames still to write (bursts), or the pacing state.
        self.to_publish = 0
        self.sent = 0
        self.publish_start = 0.0
        self.first_message = 0  # when conn 0 published its first message (GO)
        self.latency_us: list[int] = []
        self.last_progress = 0.0  # when a message last arrived (or publishing started)
        self.stalled = False
        self.kernel_time = 0.0
        os.set_blocking(sys.stdin.fileno(), False)
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)

    # -- connections -----------------------------------------------------------

    def open_more(self) -> None:
        args = self.args
        while len(self.conns) < self.wanted and self.pending < args.parallel:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if args.never_read and self.batch == 0 and len(self.conns) == args.connections:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.never_read_rcvbuf)
            if args.rate:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
            sock.connect_ex((args.host, args.port))
            conn = Conn(sock, self.batch)
            self.conns.append(conn)
            self.pending += 1
            self.selector.register(sock, selectors.EVENT_WRITE, conn)

    @property
    def never_reader(self) -> Conn | None:
        if self.args.never_read and len(self.conns) > self.args.connections:
            return self.conns[self.args.connections]
        return None

    def send(self, conn: Conn, data: bytes) -> None:
        conn.outbuf += data
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.fail(conn, f"send failed: {exc}")
                return
            del conn.outbuf[:sent]
        self.update_events(conn)

    def update_events(self, conn: Conn) -> None:
        want_write = bool(conn.outbuf)
        if want_write != conn.writing or not conn.reads:
            events = (selectors.EVENT_READ if conn.reads else 0) | (
                selectors.EVENT_WRITE if want_write else 0
            )
            if events:
                self.selector.modify(conn.sock, events, conn)
            else:  # the never-reading client, once joined
                self.selector.unregister(conn.sock)
            conn.writing = want_write

    def fail(self, conn: Conn, why: str) -> None:
        if conn.state == _CLOSED:
            return
        if not self.args.tolerate_closes:
            print(f"client connection failed (state {conn.state}): {why}", file=sys.stderr)
            conn.errors += 1
            self.failed += 1
        elif conn.state == _READY:
            self.closed += 1
        else:
            self.refused += 1
        if conn.state < _READY:
            self.pending -= 1
        conn.state = _CLOSED
        if conn.reads or conn.writing:
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def on_writable(self, conn: Conn) -> None:
        if conn.state == _CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(conn, os.strerror(err))
                return
            conn.state = _HANDSHAKE
            conn.outbuf += self.request
        self.flush(conn)
        if conn is self.conns[0] and self.to_publish and not conn.outbuf:
            self.publish_some()

    def on_readable(self, conn: Conn) -> None:
        try:
            if self.args.rate:
                data, ancillary, _, _ = conn.sock.recvmsg(262_144, _CMSG_SPACE)
                self.kernel_time = time.time()
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        seconds, nanoseconds = struct.unpack("qq", payload[:16])
                        self.kernel_time = seconds + nanoseconds * 1e-9
            else:
                data = conn.sock.recv(262_144)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, str(exc))
            return
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

    def parse(self, conn: Conn) -> None:
        buf = conn.inbuf
        pos = 0
        n = len(buf)
        while n - pos >= 2 and conn.state != _CLOSED:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            payload = bytes(buf[start:end])
            pos = end
            opcode = b0 & 0x0F
            if opcode in (0, 1):
                if not b0 & 0x80:
                    conn.fragments.append(payload)
                    continue
                if conn.fragments:
                    payload = b"".join([*conn.fragments, payload])
                    conn.fragments.clear()
                self.on_text(conn, payload)
            elif opcode == 8:
                self.fail(conn, f"close frame {payload[:2].hex()} {payload[2:]!r}")
                return
            elif opcode == 9:  # ping: a masked pong with the same data
                self.send(conn, bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
        del buf[:pos]

    def on_text(self, conn: Conn, payload: bytes) -> None:
        state = conn.state
        if state == _READY:
            self.on_messages(conn, payload)
        elif state == _HELLO and b'"type":"hello"' in payload:
            if self.args.join:
                conn.state = _JOINING
                self.send(conn, self.join)
            else:
                self.mark_ready(conn)
        elif state == _JOINING and b'"type":"reply"' in payload:
            self.mark_ready(conn)

    def on_messages(self, conn: Conn, payload: bytes) -> None:
        if self.args.rate:
            found = [(int(m[1]), float(m[2])) for m in _STAMPED.finditer(payload)]
            now = self.kernel_time
            self.latency_us += [round((now - sent) * 1e6) for _, sent in found]
            offsets = [offset for offset, _ in found]
        else:
            offsets = [int(raw) for raw in _MESSAGE.findall(payload)]
        if not offsets:
            return
        self.last_progress = time.monotonic()
        conn.message_frames += 1
        expected = conn.last + 1
        for offset in offsets:
            if offset != expected:
                conn.errors += 1
                if conn.errors <= 3:
                    print(f"offset {offset} where {expected} was expected", file=sys.stderr)
            expected = offset + 1
        before = conn.last
        conn.last = expected - 1
        if before < self.args.messages <= conn.last:
            self.done += 1

    def mark_ready(self, conn: Conn) -> None:
        conn.state = _READY
        self.pending -= 1
        self.ready += 1
        if conn is self.never_reader:
            conn.reads = False  # from now on it never reads
            self.update_events(conn)

    # -- orchestrator commands --------------------------------------------------

    def on_stdin(self) -> None:
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            self.quit = True
            return
        self.stdin_buffer += chunk
        while b"\n" in self.stdin_buffer:
            line, _, self.stdin_buffer = self.stdin_buffer.partition(b"\n")
            words = line.decode().split()
            if words == ["GO"]:
                self.go()
            elif words[:1] == ["CHURN"]:
                self.batch += 1
                self.wanted += int(words[1])
            elif words == ["QUIT"]:
                self.quit = True
            elif words == ["STATUS"]:
                print("STATUS " + json.dumps(self.report()), flush=True)

    def go(self) -> None:
        """The publisher starts: everything at once, or paced (``--rate``)."""
        self.publish_start = self.last_progress = time.monotonic()
        if not self.args.rate:
            self.to_publish = self.args.big + self.args.publish
            self.publish_some()

    def publish_some(self) -> None:
        """Queue publishes on connection 0 while its socket takes them (bounded chunks)."""
        args = self.args
        conn = self.conns[0]
        while self.to_publish and not conn.outbuf and conn.state != _CLOSED:
            chunk = min(self.to_publish, 256)
            total = args.big + args.publish
            frames = []
            for index in range(total - self.to_publish, total - self.to_publish + chunk):
                size = args.big_size if index < args.big else args.data_size
                frames.append(publish_frame(args.join, "x" * size))
            self.to_publish -= chunk
            self.send(conn, b"".join(frames))

    def publish_due(self) -> float:
        """Paced publishing: send what is due; seconds until the next one."""
        args = self.args
        if not self.publish_start or self.sent >= args.publish:
            return 1.0
        while self.sent < args.publish:
            wait = self.publish_start + self.sent / args.rate - time.monotonic()
            if wait > 0:
                return wait
            self.send(self.conns[0], publish_frame(args.join, f"{time.time():.6f}"))
            self.sent += 1
        return 1.0

    def finish_churn(self) -> None:
        """Reset every connection of the current CHURN round (RST: SO_LINGER 0)."""
        keep = []
        for conn in self.conns:
            if conn.batch != self.batch:
                keep.append(conn)
                continue
            if conn.state != _CLOSED:
                self.selector.unregister(conn.sock)
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.sock.close()
                conn.state = _CLOSED
        self.ready -= len(self.conns) - len(keep)
        self.wanted = len(keep)
        self.conns = keep
        print("CHURNED " + json.dumps({"open": len(keep)}), flush=True)

    def report(self) -> dict[str, object]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        readers = self.conns[: self.args.connections]
        never = self.never_reader
        return {
            "connections": len(self.conns),
            "ready": self.ready,
            "done": self.done,
            "closed": self.closed,
            "refused": self.refused,
            "messages": sum(c.last for c in readers),
            "message_frames": sum(c.message_frames for c in readers),
            "errors": sum(c.errors for c in readers),
            "gapped": sum(1 for c in readers if c.errors),
            "stalled": self.stalled,
            "publisher_closed": bool(readers) and readers[0].state == _CLOSED,
            "never_read_port": never.sock.getsockname()[1] if never else None,
            "latency_us": self.latency_us,
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        deadline = time.monotonic() + args.timeout
        while not self.quit:
            self.open_more()
            if self.ready + self.refused == self.wanted and not self.pending:
                if not self.announced_ready:
                    self.announced_ready = True
                    print("READY " + json.dumps(self.report()), flush=True)
                elif self.batch and any(c.batch == self.batch for c in self.conns):
                    self.finish_churn()
            live = args.connections - self.closed
            if (
                args.tolerate_closes
                and self.publish_start
                and time.monotonic() - self.last_progress > args.stall
            ):
                self.stalled = True
            if (
                self.announced_ready
                and not self.announced_done
                and (self.done >= live or self.stalled)
            ):
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
    p.add_argument("--connections", type=int, required=True, help="reading connections")
    p.add_argument("--messages", type=int, default=0, help="messages each must receive")
    p.add_argument("--join", default="bench", help="room to join")
    p.add_argument("--publish", type=int, default=0, help="publishes connection 0 sends on GO")
    p.add_argument("--data-size", type=int, default=16, help="publish payload length")
    p.add_argument("--big", type=int, default=0, help="large publishes sent first")
    p.add_argument("--big-size", type=int, default=64_000, help="their payload length")
    p.add_argument("--rate", type=float, default=0.0, help="paced publishes per second")
    p.add_argument("--never-read", action="store_true", help="add one never-reading client")
    p.add_argument("--never-read-rcvbuf", type=int, default=4096)
    p.add_argument("--tolerate-closes", action="store_true")
    p.add_argument("--stall", type=float, default=5.0, help="see --tolerate-closes")
    p.add_argument("--parallel", type=int, default=200, help="handshakes in flight at once")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return Clients(args).run()


if __name__ == "__main__":
    sys.exit(main())
