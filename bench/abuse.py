"""Attacks against ``chatcore serve examples.chat.app:app``: what they cost the server.

Runs each attack against a real server process (``CHAT_SECRET`` set, on
127.0.0.1) and prints the server's RSS and a bystander's ping latency
before, during and after it:

* **hoard**: connections join a room, publish six 64 KB messages of emoji,
  leave and move on to the next room (one user, then one user per
  connection). What the history keeps is bounded by the history budget;
  with a short ``max_age`` the sweep then gives the rooms' memory back.
* **typing**: 2,000 ``typing`` frames as fast as the socket takes them into a
  room of 100 members. The frame budget refuses them and closes the sender
  with 1008.
* **bomb**: with ``--compression``, four connections each send one frame of
  about 200 KB that inflates to 200 MB.

Every process (server, bystander, attackers) is started here and stopped by
PID; every wait has a deadline. The attackers and the bystander are this
script again, with ``--role``. ``--chatcore PATH`` runs the server from
another source tree (to measure an older version the same way).

    python bench/abuse.py --quick
    python bench/abuse.py --attacks hoard --json
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(ROOT)]

import _harness as harness  # noqa: E402

SECRET = "bench-abuse-secret"
ATTACKS = ("hoard", "typing", "bomb")
#: 16,000 emoji: 64,000 bytes of UTF-8, under the 64 KiB frame limit.
EMOJI = "😀" * 16_000


# -- the orchestrator --------------------------------------------------------------


def latency_summary(samples: list[float]) -> dict[str, Any]:
    """p50 / p99 / max of ping round trips (ms), and how many."""
    if not samples:
        return {"pings": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples)
    return {
        "pings": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(harness.percentile(ordered, 0.99), 2),
        "max_ms": round(ordered[-1], 2),
    }


class Bystander:
    """A user in another room pinging every 50 ms (its own process)."""

    def __init__(self, port: int) -> None:
        argv = [harness.PYTHON, __file__, "--role", "bystander", "--port", str(port)]
        self.process = harness.ManagedProcess(argv, "bystander")
        self.process.expect("READY", time.monotonic() + 30)

    def take(self) -> list[float]:
        """Every round trip (ms) reported since the last call."""
        samples: list[float] = []
        while True:
            try:
                line = self.process.read_line(time.monotonic() + 0.01)
            except TimeoutError:
                return samples
            head, _, rest = line.partition(" ")
            if head == "PINGS":
                samples.extend(json.loads(rest))

    def stop(self) -> None:
        self.process.stop()


class Phase:
    """RSS (peak and last) and the bystander's pings over one stretch of time."""

    def __init__(self, server: harness.Server, bystander: Bystander) -> None:
        self.server = server
        self.bystander = bystander
        self.peak = 0
        self.last = 0
        self.samples: list[float] = []
        self.cpu_start = server.cpu_seconds()
        self.bystander.take()  # what came before belongs to the previous phase

    def tick(self) -> None:
        self.last = self.server.rss_bytes()
        self.peak = max(self.peak, self.last)

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(0.05)

    def result(self) -> dict[str, Any]:
        self.tick()
        self.samples.extend(self.bystander.take())
        return {
            "rss_mb": round(self.last / 2**20, 1),
            "peak_rss_mb": round(self.peak / 2**20, 1),
            "server_cpu_s": round(self.server.cpu_seconds() - self.cpu_start, 2),
            **latency_summary(self.samples),
        }


def run_attack(
    attack: str, options: list[str], *, quick: bool, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    """One attack against a fresh server: phases before / during / after (/ swept)."""
    serve_args = ["--compression"] if attack == "bomb" else []
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        server = harness.start_server(
            "chatcore-serve", target="examples.chat.app:app", serve_args=serve_args
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    bystander = None
    attacker = None
    try:
        bystander = Bystander(server.port)
        role = "hoard" if attack.startswith("hoard") else attack
        argv = [harness.PYTHON, __file__, "--role", role, "--port", str(server.port), *options]
        attacker = harness.ManagedProcess(argv, attack)
        attacker.expect("READY", time.monotonic() + timeout)
        before = Phase(server, bystander)
        before.wait(1.0 if quick else 3.0)
        phases = {"before": before.result()}
        during = Phase(server, bystander)
        attacker.send("go")
        outcome = json.loads(
            attacker.expect("DONE", time.monotonic() + timeout, tick=during.tick, interval=0.05)
        )
        phases["during"] = during.result()
        after = Phase(server, bystander)
        attacker.send("close")
        attacker.expect("CLOSED", time.monotonic() + 60, tick=after.tick)
        after.wait(1.0 if quick else 5.0)
        phases["after"] = after.result()
        if attack.startswith("hoard"):
            # The history's max_age (set short for this run) passes: the
            # sweep forgets the rooms nobody is in.
            swept = Phase(server, bystander)
            swept.wait(float(env["CHATCORE_HISTORY_MAX_AGE"]) * 1.3)
            phases["swept"] = swept.result()
        return {"attack": attack, "outcome": outcome, "phases": phases}
    finally:
        for process in (attacker, bystander):
            if process is not None:
                process.stop()
        server.stop()


def print_result(result: dict[str, Any]) -> None:
    print(f"\n== {result['attack']}: {json.dumps(result['outcome'], sort_keys=True)}")
    rows = [{"phase": name, **values} for name, values in result["phases"].items()]
    columns = [
        ("phase", "phase", "{}"),
        ("rss_mb", "RSS MB", "{}"),
        ("peak_rss_mb", "peak MB", "{}"),
        ("server_cpu_s", "server CPU s", "{}"),
        ("pings", "pings", "{}"),
        ("p50_ms", "p50 ms", "{}"),
        ("p99_ms", "p99 ms", "{}"),
        ("max_ms", "max ms", "{}"),
    ]
    print(harness.format_table(rows, columns))


#: The history budget of ``--quick`` runs (the default is 256 MiB).
QUICK_BUDGET = 16 * 2**20


def environment(
    *, quick: bool, chatcore: str | None = None, budget: int | None = None
) -> dict[str, str]:
    """The server's environment: the secret, where chatcore comes from, history bounds."""
    paths = [str(ROOT)] if chatcore is None else [chatcore, str(ROOT)]
    env = {
        "CHAT_SECRET": SECRET,
        "PYTHONPATH": os.pathsep.join(paths),
        # Short, so the run can show the sweep giving the rooms' memory back.
        "CHATCORE_HISTORY_MAX_AGE": "2" if quick else "20",
    }
    budget = budget or (QUICK_BUDGET if quick else None)
    if budget is not None:
        env["CHATCORE_HISTORY_BYTES"] = str(budget)
    return env


def plan(attacks: list[str], *, quick: bool) -> list[tuple[str, list[str]]]:
    """The runs: (name, attacker options)."""
    plans: list[tuple[str, list[str]]] = []
    if "hoard" in attacks:
        if quick:  # four users: the history budget, not the new-room rate, is what holds
            plans.append(("hoard-many-users", ["--conns", "4", "--rooms", "48", "--many-users"]))
        else:
            plans.append(("hoard-one-user", ["--conns", "20", "--rooms", "1800"]))
            plans.append(("hoard-many-users", ["--conns", "20", "--rooms", "1800", "--many-users"]))
    if "typing" in attacks:
        plans.append(("typing", ["--members", "20" if quick else "100", "--frames", "2000"]))
    if "bomb" in attacks:
        plans.append(("bomb", ["--bombs", "1" if quick else "4"]))
    return plans


def orchestrate(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated (all)")
    p.add_argument("--chatcore", metavar="PATH", help="run the server from this source tree")
    p.add_argument("--history-bytes", type=int, help="the server's history budget (default)")
    args = p.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attacks {sorted(unknown)}; choose from {', '.join(ATTACKS)}")
    harness.raise_nofile_limit()
    env = environment(quick=args.quick, chatcore=args.chatcore, budget=args.history_bytes)
    plans = plan(attacks, quick=args.quick)
    results = []
    for attack, options in plans:
        result = run_attack(attack, options, quick=args.quick, timeout=args.timeout, env=env)
        print_result(result)
        results.append(result)
    print(
        f"\nhistory budget: {env.get('CHATCORE_HISTORY_BYTES', 'default')} bytes; "
        f"history max_age {env['CHATCORE_HISTORY_MAX_AGE']} s; "
        f"load average {harness.load_average():.2f}"
    )
    harness.write_json(args.json, "abuse", {"quick": args.quick, "results": results})
    return 0


# -- the clients (--role) -----------------------------------------------------------


def url(port: int, user: str) -> str:
    from examples.chat.token import token_for

    return f"ws://127.0.0.1:{port}/ws?user={user}&token={token_for(user, SECRET)}"


async def wait_for_line(word: str) -> None:
    """Block (in a thread) until stdin says ``word``; EOF counts too."""
    import trio

    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line or line.strip() == word:
            return


class Client:
    """One WebSocket: requests by ref; everything else counted by type."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.refs = 0
        self.seen: Counter[str] = Counter()

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.refs += 1
        ref = self.refs
        await self.ws.send_message(json.dumps({**message, "ref": ref}, ensure_ascii=False))
        while True:
            for line in (await self.ws.get_message()).split("\n"):
                reply = json.loads(line)
                if reply.get("type") == "reply" and reply.get("ref") == ref:
                    return dict(reply)
                self.seen[str(reply.get("type"))] += 1


def code_of(reply: dict[str, Any]) -> str:
    return "ok" if reply.get("status") == "ok" else str(reply["error"]["code"])


async def role_bystander(port: int) -> None:
    import trio
    import trio_websocket

    async with trio_websocket.open_websocket_url(url(port, "bystander")) as ws:
        client = Client(ws)
        await ws.get_message()  # hello
        await client.request({"type": "join", "room": "quiet"})
        print("READY", flush=True)
        window: list[float] = []
        reported = time.monotonic()
        while True:
            start = time.perf_counter()
            reply = await client.request({"type": "ping"})
            if reply.get("status") == "ok":
                window.append((time.perf_counter() - start) * 1000)
            if time.monotonic() - reported >= 0.25:
                print("PINGS", json.dumps([round(x, 3) for x in window]), flush=True)
                window, reported = [], time.monotonic()
            await trio.sleep(0.05)


async def role_hoard(port: int, conns: int, rooms: int, many_users: bool, seconds: float) -> None:
    import trio
    import trio_websocket

    codes: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    next_room = iter(range(rooms))
    async with trio.open_nursery() as nursery:
        clients = []
        for n in range(conns):
            user = f"hoarder{n}" if many_users else "hoarder"
            ws = await trio_websocket.connect_websocket_url(
                nursery, url(port, user), message_queue_size=64
            )
            await ws.get_message()  # hello
            clients.append(Client(ws))
        print("READY", flush=True)
        await wait_for_line("go")
        started = time.monotonic()

        async def request(client: Client, message: dict[str, Any]) -> str:
            for _ in range(50):  # paced: back off while rate limited
                code = code_of(await client.request(message))
                codes[f"{message['type']}:{code}"] += 1
                if code != "rate_limited":
                    return code
                await trio.sleep(0.2)
            return "rate_limited"

        async def hoarder(client: Client) -> None:
            try:
                for room in next_room:
                    if time.monotonic() - started > seconds:
                        return
                    name = f"hoard-{room}"
                    if await request(client, {"type": "join", "room": name}) != "ok":
                        continue
                    for _ in range(6):
                        await request(client, {"type": "publish", "room": name, "data": EMOJI})
                    await request(client, {"type": "leave", "room": name})
            except trio_websocket.ConnectionClosed as exc:
                closes[str(exc.reason.code if exc.reason else 1006)] += 1

        async with trio.open_nursery() as attack:
            for client in clients:
                attack.start_soon(hoarder, client)
        outcome = {
            "seconds": round(time.monotonic() - started, 1),
            "rooms_tried": min(next(next_room, rooms), rooms),
            "codes": dict(codes),
            "closed": dict(closes),
        }
        print("DONE", json.dumps(outcome), flush=True)
        await wait_for_line("close")
        for client in clients:
            await client.ws.aclose()
        print("CLOSED", flush=True)
        nursery.cancel_scope.cancel()


async def role_typing(port: int, members: int, frames: int) -> None:
    import trio
    import trio_websocket

    received = Counter[str]()
    async with trio.open_nursery() as nursery:

        async def member(ws: Any) -> None:
            try:
                while True:
                    for line in (await ws.get_message()).split("\n"):
                        received[str(json.loads(line).get("type"))] += 1
            except trio_websocket.ConnectionClosed:
                return

        sockets = []
        for n in range(members):
            ws = await trio_websocket.connect_websocket_url(nursery, url(port, f"member{n // 20}"))
            await ws.get_message()
            await Client(ws).request({"type": "join", "room": "crowd"})
            nursery.start_soon(member, ws)
            sockets.append(ws)
        typer = await trio_websocket.connect_websocket_url(nursery, url(port, "typer"))
        await typer.get_message()
        await Client(typer).request({"type": "join", "room": "crowd"})
        print("READY", flush=True)
        await wait_for_line("go")
        received.clear()
        frame = json.dumps({"type": "typing", "room": "crowd"})
        sent = 0
        close_code: int | None = None
        started = time.monotonic()
        try:
            for _ in range(frames):
                await typer.send_message(frame)
                sent += 1
            with trio.move_on_after(5):
                while True:
                    await typer.get_message()
        except trio_websocket.ConnectionClosed as exc:
            close_code = exc.reason.code if exc.reason else 1006
        await trio.sleep(1.0)  # the fan-out already queued reaches the members
        outcome = {
            "sent": sent,
            "seconds": round(time.monotonic() - started, 2),
            "typer_closed": close_code,
            "typing_delivered": received["typing"],
        }
        print("DONE", json.dumps(outcome), flush=True)
        await wait_for_line("close")
        for ws in [*sockets, typer]:
            await ws.aclose()
        print("CLOSED", flush=True)
        nursery.cancel_scope.cancel()


def bomb_frame(inflated: int) -> bytes:
    """A masked, compressed (RSV1) text frame of ``inflated`` bytes of 'a'."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"a" * 2**20
    parts = [compressor.compress(chunk) for _ in range(inflated // len(chunk))]
    payload = b"".join(parts) + compressor.flush(zlib.Z_SYNC_FLUSH)
    payload = payload[:-4]  # permessage-deflate drops the 00 00 ff ff tail
    n = len(payload)
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return bytes((0xC1, 0x80 | 127)) + n.to_bytes(8, "big") + mask + masked


def close_code(data: bytes) -> int | None:
    """The code of the first close frame (opcode 8) among the server's frames, if any."""
    i = 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        if i + length > len(data):
            return None  # not all here yet
        if opcode == 8:
            return int.from_bytes(data[i : i + 2], "big") if length >= 2 else 1005
        i += length
    return None


def bomb_once(port: int, frame: bytes, user: str) -> dict[str, Any]:
    """Handshake with permessage-deflate, send the bomb, read the close code."""
    from examples.chat.token import token_for

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        request = (
            f"GET /ws?user={user}&token={token_for(user, SECRET)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        )
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return {"handshake": "closed"}
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        negotiated = b"permessage-deflate" in head.lower()
        try:
            sock.sendall(frame)
        except OSError as exc:
            return {"negotiated": negotiated, "send": type(exc).__name__}
        data = rest
        code = None
        try:
            while code is None:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                code = close_code(data)
        except OSError:
            pass
        return {"negotiated": negotiated, "close": code or 1006}


async def role_bomb(port: int, bombs: int) -> None:
    import trio

    frame = bomb_frame(200 * 2**20)
    print("READY", flush=True)
    await wait_for_line("go")
    results: list[dict[str, Any]] = []

    async def one(n: int) -> None:
        results.append(await trio.to_thread.run_sync(bomb_once, port, frame, f"bomber{n}"))

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for n in range(bombs):
            nursery.start_soon(one, n)
    outcome = {
        "frame_bytes": len(frame),
        "inflates_to": 200 * 2**20,
        "seconds": round(time.monotonic() - started, 2),
        "results": results,
    }
    print("DONE", json.dumps(outcome), flush=True)
    await wait_for_line("close")
    print("CLOSED", flush=True)


def role_main(argv: list[str]) -> int:
    import argparse

    import trio

    p = argparse.ArgumentParser()
    p.add_argument("--role", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=20)
    p.add_argument("--rooms", type=int, default=1_800)
    p.add_argument("--many-users", action="store_true")
    p.add_argument("--seconds", type=float, default=60.0, help="hoard: stop opening rooms after")
    p.add_argument("--members", type=int, default=100)
    p.add_argument("--frames", type=int, default=2_000)
    p.add_argument("--bombs", type=int, default=4)
    a = p.parse_args(argv)
    if a.role == "bystander":
        trio.run(role_bystander, a.port)
    elif a.role == "hoard":
        trio.run(role_hoard, a.port, a.conns, a.rooms, a.many_users, a.seconds)
    elif a.role == "typing":
        trio.run(role_typing, a.port, a.members, a.frames)
    elif a.role == "bomb":
        trio.run(role_bomb, a.port, a.bombs)
    else:
        p.error(f"unknown role {a.role!r}")
    return 0


if __name__ == "__main__":
    if "--role" in sys.argv:
        sys.exit(role_main(sys.argv[1:]))
    sys.exit(orchestrate())
