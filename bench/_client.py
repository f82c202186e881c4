"""Loopback benchmark clients: many WebSockets in one cheap process.

A bare ``selectors`` (epoll) loop with a minimal RFC 6455 client, so the
clients cost far less CPU than the server they measure (on a 2-core machine
they share the cores with it). Each connection completes the handshake, waits
for the server's first message (``hello``), optionally joins a room, and then
counts ``message`` lines, checking that their offsets are exactly 1, 2, ... K
(no loss, no duplicate, in order). Server frames may carry several
newline-separated messages (chatcore's batching) or one (the raw loop).

Driven over stdin/stdout by the orchestrator (see ``_harness.py``)::

    -> READY <n>            every connection is open (and joined)
    <- GO                   the publisher connection sends its K publishes
    -> DONE {json}          every connection received K messages
    <- QUIT / end of input  close everything and exit

Exits by itself after ``--timeout`` seconds (printing ``TIMEOUT {json}``).
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
import sys
import time

_MESSAGE = re.compile(rb'"type":"message","room":"[^"]*","offset":(\d+)')

_CONNECTING, _HANDSHAKE, _HELLO, _JOINING, _READY, _CLOSED = range(6)


def _frame(text: str) -> bytes:
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
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return header + mask + masked


class _Conn:
    __slots__ = (
        "errors",
        "fragments",
        "inbuf",
        "last",
        "message_frames",
        "outbuf",
        "sock",
        "state",
        "writing",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = _CONNECTING
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.fragments: list[bytes] = []
        self.last = 0  # offset of the last message received
        self.message_frames = 0
        self.errors = 0
        self.writing = True


class Clients:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.selector = selectors.DefaultSelector()
        self.conns: list[_Conn] = []
        self.pending = 0  # connections started and not yet ready
        self.ready = 0
        self.done = 0
        self.failed = 0
        self.announced_ready = False
        self.announced_done = False
        self.quit = False
        self.stdin_buffer = b""
        host = args.host
        key = base64.b64encode(os.urandom(16)).decode()
        self.request = (
            f"GET {args.path} HTTP/1.1\r\nHost: {host}:{args.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.join = _frame(json.dumps({"type": "join", "room": args.join, "ref": "j"}))
        os.set_blocking(sys.stdin.fileno(), False)
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)

    # -- connections ----------------------------------------------------------

    def open_more(self) -> None:
        args = self.args
        while len(self.conns) < args.connections and self.pending < args.parallel:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sock.connect_ex((args.host, args.port))
            conn = _Conn(sock)
            self.conns.append(conn)
            self.pending += 1
            self.selector.register(sock, selectors.EVENT_WRITE, conn)

    def send(self, conn: _Conn, data: bytes) -> None:
        conn.outbuf += data
        self.flush(conn)

    def flush(self, conn: _Conn) -> None:
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.fail(conn, "send failed")
                return
            del conn.outbuf[:sent]
        want_write = bool(conn.outbuf)
        if want_write != conn.writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.selector.modify(conn.sock, events, conn)
            conn.writing = want_write

    def fail(self, conn: _Conn, why: str) -> None:
        if conn.state != _CLOSED:
            print(f"client connection failed: {why}", file=sys.stderr)
            conn.errors += 1
            self.failed += 1
            if conn.state < _READY:
                self.pending -= 1
            conn.state = _CLOSED
            self.selector.unregister(conn.sock)
            conn.sock.close()

    def on_writable(self, conn: _Conn) -> None:
        if conn.state == _CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(conn, os.strerror(err))
                return
            conn.state = _HANDSHAKE
            conn.outbuf += self.request
        self.flush(conn)

    def on_readable(self, conn: _Conn) -> None:
        try:
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

    def parse(self, conn: _Conn) -> None:
        buf = conn.inbuf
        pos = 0
        n = len(buf)
        while n - pos >= 2:
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
            elif opcode == 9:  # ping: answer with a masked pong carrying the same data
                self.send(conn, bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
        del buf[:pos]

    def on_text(self, conn: _Conn, payload: bytes) -> None:
        state = conn.state
        if state == _READY:
            offsets = _MESSAGE.findall(payload)
            if not offsets:
                return
            conn.message_frames += 1
            expected = conn.last + 1
            for raw in offsets:
                if int(raw) != expected:
                    conn.errors += 1
                    print(f"offset {int(raw)} where {expected} was expected", file=sys.stderr)
                expected += 1
            before = conn.last
            conn.last = expected - 1
            if before < self.args.messages <= conn.last:
                self.done += 1
            return
        if state == _HELLO:
            if b'"type":"hello"' not in payload:
                return
            if self.args.join:
                conn.state = _JOINING
                self.send(conn, self.join)
            else:
                self.mark_ready(conn)
        elif state == _JOINING and b'"type":"reply"' in payload:
            self.mark_ready(conn)

    def mark_ready(self, conn: _Conn) -> None:
        conn.state = _READY
        self.pending -= 1
        self.ready += 1

    # -- orchestrator commands ----------------------------------------------------

    def on_stdin(self) -> None:
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            self.quit = True
            return
        self.stdin_buffer += chunk
        while b"\n" in self.stdin_buffer:
            line, _, self.stdin_buffer = self.stdin_buffer.partition(b"\n")
            command = line.decode().strip()
            if command == "GO":
                self.publish()
            elif command == "QUIT":
                self.quit = True
            elif command == "STATUS":
                print("STATUS " + json.dumps(self.report()), flush=True)

    def publish(self) -> None:
        """The first connection sends its publishes, as fast as the socket takes them."""
        conn = self.conns[0]
        room = self.args.join or "bench"
        frames = b"".join(
            _frame(json.dumps({"type": "publish", "room": room, "data": self.args.data, "ref": i}))
            for i in range(self.args.publish)
        )
        self.send(conn, frames)

    def report(self) -> dict[str, object]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "connections": len(self.conns),
            "ready": self.ready,
            "done": self.done,
            "messages": sum(c.last for c in self.conns),
            "message_frames": sum(c.message_frames for c in self.conns),
            "errors": sum(c.errors for c in self.conns),
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }

    # -- the loop -------------------------------------------------------------------

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
            for key, events in self.selector.select(min(left, 1.0)):
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
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--messages", type=int, required=True, help="messages each must receive")
    p.add_argument("--join", default="", help="room to join (chatcore hub protocol)")
    p.add_argument("--publish", type=int, default=0, help="publishes the first connection sends")
    p.add_argument("--data", default="x" * 16, help="publish payload")
    p.add_argument("--parallel", type=int, default=200, help="handshakes in flight at once")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return Clients(args).run()


if __name__ == "__main__":
    sys.exit(main())
