"""Real ``chatcore serve`` processes sharing rooms through a real Redis.

End to end, with nothing in process: the example chat app
(``examples.chat.app:app``, dev mode: ``?user=NAME``) served by ``chatcore
serve --redis-url``, against the ``redis_server`` fixture (a real
``redis-server`` on a free 127.0.0.1 port, see ``tests/redis_server.py``), and
real WebSocket clients (:class:`chatcore.testing.TestClient` over TCP) on both sides.

* Two separate processes on two ports: members on both join one room,
  publishers on both publish concurrently, every member sees one order;
  a client that left process A recovers on process B with ``since``;
  ``/healthz`` of both turns ``degraded`` while Redis hangs (SIGSTOP) and
  ``ok`` again after, with every connection kept.
* ``--workers 2`` on one port: clients land on both workers (checked from
  ``/proc``), and every member receives every message in one order.
* Redis crashes and comes back empty (no persistence): both processes are
  degraded meanwhile, then close every member with 4001, and a member coming
  back with ``since`` on either process is told ``recovered: false``.
* A server started while Redis is down serves, degraded (``join`` is
  ``unavailable``), until Redis is up.

Every process is started here and stopped by PID (SIGTERM, a bounded wait,
then SIGKILL); every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import coredis
import pytest
import trio

from chatcore.testing import TestClient, open_test_client

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TARGET = "examples.chat.app:app"
ROOM = "lobby"
URL = re.compile(r"chatcore: serving on ws://127\.0\.0\.1:(\d+)(/\S*)")
#: How long a server may take to start, and to stop after SIGTERM.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 8.0
_logs = itertools.count()


# -- server processes ---------------------------------------------------------------------


@attrs.define
class ServeProcess:
    """One ``chatcore serve`` process (and its workers, if any)."""

    process: trio.Process
    port: int
    log: Path
    workers: list[int] = attrs.Factory(list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self) -> int:
        """SIGTERM, then wait (bounded) for the exit code."""
        if self.process.returncode is None:
            os.kill(self.pid, signal.SIGTERM)
        with trio.fail_after(STOP_TIMEOUT):
            return await self.process.wait()


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


@asynccontextmanager
async def chatcore_serve(
    redis_url: str, tmp_path: Path, *options: str, workers: int = 1
) -> AsyncIterator[ServeProcess]:
    """``chatcore serve examples.chat.app:app --bind 127.0.0.1:0 --redis-url URL``.

    Yields once it listens (and, with ``workers``, once every worker runs).
    Stopped by PID on the way out if the test did not: SIGTERM, a bounded
    wait, then SIGKILL (its workers first, while they are still its children).
    """
    log = tmp_path / f"serve-{next(_logs)}.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CHAT_SECRET", "CHAT_ORIGINS", "CHATCORE_REDIS_URL")
    }
    argv = [sys.executable, "-m", "chatcore", "serve", TARGET, "--bind", "127.0.0.1:0"]
    argv += ["--redis-url", redis_url, "--drain-grace", "1", "--no-access-log", *options]
    if workers > 1:
        argv += ["--workers", str(workers)]
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    server = ServeProcess(process, 0, log)
    try:
        with trio.fail_after(START_TIMEOUT):
            while not (found := URL.search(server.output())):
                if process.poll() is not None:
                    raise AssertionError(f"chatcore serve exited:\n{server.output()}")
                await trio.sleep(0.05)
            server.port = int(found.group(1))
            if workers > 1:
                while len(server.workers) < workers:
                    assert process.poll() is None, server.output()
                    server.workers = _children(process.pid)
                    await trio.sleep(0.05)
        yield server
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()
        if process.returncode is None:
            for worker in server.workers:
                if _parent_of(worker) == process.pid:
                    os.kill(worker, signal.SIGKILL)
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


async def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """A one-shot HTTP/1.1 GET on 127.0.0.1; the status and the JSON body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def wait_health(server: ServeProcess, status: str, within: float = 5.0) -> float:
    """Poll ``/healthz`` until its ``status`` is ``status``; returns how long it took."""
    start = trio.current_time()
    seen: tuple[int, dict[str, Any]] | None = None
    with trio.move_on_after(within):
        while True:
            seen = await http_get(server.port, "/healthz")
            if seen[1]["status"] == status:
                # Degraded is still ready (200): only a drain takes a node out.
                assert seen[0] == 200, seen
                return trio.current_time() - start
            await trio.sleep(0.05)
    raise AssertionError(f"/healthz of port {server.port} never said {status!r}; last: {seen}")


async def bus_subscribers(redis_url: str) -> int:
    """How many nodes are subscribed to the deployment's bus channel."""
    async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
        counts = await client.pubsub_numsub("chatcore:bus")
    return int(counts["chatcore:bus"])


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def worker_of(client: TestClient, server: ServeProcess) -> int:
    """The worker PID holding the server side of ``client``'s TCP connection."""
    assert client.address is not None
    client_port = client.address[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if (
            state == "01"  # ESTABLISHED
            and int(local.split(":")[1], 16) == server.port
            and int(remote.split(":")[1], 16) == client_port
        ):
            inode = int(fields[9])
    assert inode is not None, "the server side of the connection is not in /proc/net/tcp"
    owners = [pid for pid in server.workers if inode in _socket_inodes(pid)]
    assert len(owners) == 1, owners
    return owners[0]


# -- clients ------------------------------------------------------------------------------


class Member:
    """A client that joined ``ROOM``; a reader task records everything it receives."""

    def __init__(self, client: TestClient, user: str) -> None:
        self.client = client
        self.user = user
        #: Every message received, in order (the client answers pings itself).
        self.received: list[dict[str, Any]] = []
        self.replies: dict[str, dict[str, Any]] = {}
        self.close_code: int | None = None
        self._refs = itertools.count()
        self._changed = trio.Event()

    async def read(self) -> None:
        """Take every message off the client, until the server closes the connection."""
        while self.client.closed is None or self.client.messages:
            try:
                message = await self.client.receive(timeout=math.inf)
            except AssertionError:
                if self.client.closed is None:
                    raise  # not the end of the connection: a real failure
                break
            self.received.append(message)
            if message.get("type") == "reply":
                self.replies[message["ref"]] = message
            self._changed.set()
            self._changed = trio.Event()
        assert self.client.closed is not None
        self.close_code = self.client.closed.code
        self._changed.set()

    async def wait_for(self, check: Callable[[], bool], within: float = 10.0) -> None:
        with trio.fail_after(within):
            while not check():
                assert self.close_code is None, f"{self.user} closed with {self.close_code}"
                await self._changed.wait()

    async def wait_messages(self, count: int, within: float = 10.0) -> None:
        """Until ``count`` room messages arrived."""
        await self.wait_for(lambda: len(self.room_messages()) >= count, within)

    async def wait_closed(self, within: float = 10.0) -> int:
        """Until the connection ended; the server's close code."""
        await self.wait_for(lambda: self.close_code is not None, within)
        assert self.close_code is not None
        return self.close_code

    async def send(self, message: dict[str, Any]) -> str:
        """Send a request with a fresh ``ref``; returns the ref."""
        ref = f"{self.user}-{next(self._refs)}"
        await self.client.send({**message, "ref": ref})
        return ref

    async def answer(self, ref: str, within: float = 10.0) -> dict[str, Any]:
        await self.wait_for(lambda: ref in self.replies, within)
        return self.replies[ref]

    async def request(self, message: dict[str, Any], within: float = 10.0) -> dict[str, Any]:
        return await self.answer(await self.send(message), within)

    async def leave(self) -> int:
        """Close with 1000 (the reader task sees the end); the server's close code."""
        await self.client.close(1000, "bye")
        return await self.wait_closed()

    def room_messages(self) -> list[tuple[int, str, str, Any]]:
        """(offset, epoch, from, data) of every room message received."""
        return [
            (m["offset"], m["epoch"], m["from"], m["data"])
            for m in self.received
            if m.get("type") == "message" and m.get("room") == ROOM
        ]

    def last(self) -> tuple[int, str]:
        offset, epoch, _, _ = self.room_messages()[-1]
        return offset, epoch


async def connected(port: int, user: str, *, task_status: trio.TaskStatus[Member]) -> None:
    """A member connected as ``user`` (``hello`` received), read until the server closes."""
    async with open_test_client(f"ws://127.0.0.1:{port}/ws", user=user, timeout=10) as client:
        joined = Member(client, user)
        task_status.started(joined)
        await joined.read()


async def member(
    nursery: trio.Nursery, port: int, user: str, since: dict[str, Any] | None = None
) -> tuple[Member, dict[str, Any]]:
    """Connect as ``user``, start the reader, join ``ROOM``; the member and the join reply."""
    joined: Member = await nursery.start(connected, port, user)
    request: dict[str, Any] = {"type": "join", "room": ROOM}
    if since is not None:
        request["since"] = since
    reply = await joined.request(request)
    assert reply["status"] == "ok", reply
    return joined, reply["data"]


async def publish(publisher: Member, count: int, tag: str) -> list[int]:
    """Send ``count`` publishes back to back, then collect their offsets (all must be ok)."""
    refs = [
        await publisher.send({"type": "publish", "room": ROOM, "data": {"text": f"{tag}-{i}"}})
        for i in range(count)
    ]
    offsets = []
    for ref in refs:
        reply = await publisher.answer(ref)
        assert reply["status"] == "ok", reply
        offsets.append(reply["data"]["offset"])
    return offsets


async def publish_concurrently(jobs: list[tuple[Member, int, str]]) -> list[int]:
    """Every publisher at once; the offsets their replies carried."""
    offsets: list[int] = []

    async def one(publisher: Member, count: int, tag: str) -> None:
        offsets.extend(await publish(publisher, count, tag))

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, *job)
    return offsets


async def all_received(members: list[Member], count: int) -> list[tuple[int, str, str, Any]]:
    """Wait until every member has ``count`` room messages; they must be one sequence."""
    for m in members:
        await m.wait_messages(count)
    first = members[0].room_messages()
    for m in members[1:]:
        assert m.room_messages() == first, f"{m.user} saw another order than {members[0].user}"
    assert len(first) == count
    offsets = [offset for offset, *_ in first]
    assert offsets == list(range(offsets[0], offsets[0] + count)), offsets
    assert len({epoch for _, epoch, _, _ in first}) == 1
    return first


def check_reply_before_message(publisher: Member) -> None:
    """Each of the publisher's ``ok`` replies arrived before its own message."""
    replied = {}
    for index, m in enumerate(publisher.received):
        if m.get("type") == "reply" and isinstance(m.get("data"), dict) and "offset" in m["data"]:
            replied[m["data"]["offset"]] = index
    for index, m in enumerate(publisher.received):
        if m.get("type") == "message" and m.get("from") == publisher.user:
            assert replied[m["offset"]] < index, f"{publisher.user}: message {m['offset']}"


def check_publisher_order(sequence: list[tuple[int, str, str, Any]], tags: list[str]) -> None:
    """Each publisher's messages appear in the order it sent them."""
    for tag in tags:
        texts = [data["text"] for _, _, _, data in sequence if data["text"].startswith(tag + "-")]
        assert texts == [f"{tag}-{i}" for i in range(len(texts))], texts


# -- two processes ------------------------------------------------------------------------


async def test_two_processes_share_one_order_recovery_and_health(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with (
            chatcore_serve(redis_server.url, tmp_path) as a,
            chatcore_serve(redis_server.url, tmp_path) as b,
            trio.open_nursery() as nursery,
        ):
            assert a.port != b.port
            await wait_health(a, "ok")
            await wait_health(b, "ok")

            # Members on both processes; the room starts empty, one epoch for all.
            on_a = [await member(nursery, a.port, f"alice{i}") for i in range(3)]
            on_b = [await member(nursery, b.port, f"bob{i}") for i in range(3)]
            assert {(r["offset"], r["epoch"]) for _, r in on_a + on_b} == {(0, on_a[0][1]["epoch"])}
            members_a = [m for m, _ in on_a]
            members_b = [m for m, _ in on_b]
            everyone = members_a + members_b

            # Concurrent publishers on both processes (12 each: within the
            # example's burst of 40 per connection).
            jobs = [(p, 12, p.user) for p in (*members_a[:2], *members_b[:2])]
            offsets = await publish_concurrently(jobs)
            sequence = await all_received(everyone, 48)
            assert sorted(offsets) == list(range(1, 49))
            assert [offset for offset, *_ in sequence] == list(range(1, 49))
            check_publisher_order(sequence, [p.user for p, _, _ in jobs])
            assert {sender for _, _, sender, _ in sequence} == {p.user for p, _, _ in jobs}
            for p, _, _ in jobs:
                check_reply_before_message(p)

            # Recovery across processes: leave A, miss 10 messages published on
            # B, come back on B with `since`.
            leaver = members_a[2]
            last_offset, epoch = leaver.last()
            assert last_offset == 48
            assert await leaver.leave() == 1000
            everyone.remove(leaver)
            await publish(members_b[0], 10, "missed")
            await all_received(everyone, 58)
            back, reply = await member(
                nursery, b.port, leaver.user, since={"epoch": epoch, "offset": last_offset}
            )
            assert reply == {"room": ROOM, "epoch": epoch, "offset": 58, "recovered": True}
            await back.wait_messages(10)
            assert back.room_messages() == members_b[1].room_messages()[48:58]
            assert [d["text"] for *_, d in back.room_messages()] == [
                f"missed-{i}" for i in range(10)
            ]
            everyone.append(back)

            # Redis hangs: both report degraded, publishes are `unavailable`,
            # connections stay up; then both recover and the room goes on.
            redis_server.pause()
            try:
                await wait_health(a, "degraded")
                await wait_health(b, "degraded")
                refused = await members_a[0].request(
                    {"type": "publish", "room": ROOM, "data": {"text": "lost"}}
                )
                assert refused["status"] == "error", refused
                assert refused["error"]["code"] == "unavailable", refused
            finally:
                redis_server.resume()
            await wait_health(a, "ok")
            await wait_health(b, "ok")
            had = [len(m.room_messages()) for m in everyone]
            offsets = await publish_concurrently(
                [(members_a[0], 5, "after-a"), (members_b[1], 5, "after-b")]
            )
            assert sorted(offsets) == list(range(59, 69))
            for m, count in zip(everyone, had, strict=True):
                await m.wait_messages(count + 10)
            tail = [m.room_messages()[-10:] for m in everyone]
            assert all(t == tail[0] for t in tail)
            assert [offset for offset, *_ in tail[0]] == list(range(59, 69))
            assert all(m.close_code is None for m in everyone)

            # SIGTERM by PID: a clean drain, 1012 for everyone, exit code 0.
            assert await a.stop() == 0
            assert await b.stop() == 0
            for m in everyone:
                await m.wait_closed(STOP_TIMEOUT)
            assert {m.close_code for m in everyone} == {1012}
            assert all(any(msg.get("type") == "shutdown" for msg in m.received) for m in everyone)


# -- one port, two workers ----------------------------------------------------------------


async def test_two_workers_on_one_port_share_one_order(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with trio.fail_after(45):
        async with (
            chatcore_serve(redis_server.url, tmp_path, workers=2) as server,
            trio.open_nursery() as nursery,
        ):
            # Both workers are subscribed before anyone joins.
            while await bus_subscribers(redis_server.url) < 2:
                await trio.sleep(0.05)
            assert "rooms span them through RedisBackplane" in server.output()

            # Connect until each worker holds at least two members (the kernel
            # picks the worker; 40 connections are plenty in practice).
            by_worker: dict[int, list[Member]] = {pid: [] for pid in server.workers}
            members: list[Member] = []
            for i in range(40):
                m, _ = await member(nursery, server.port, f"w{i}")
                members.append(m)
                by_worker[worker_of(m.client, server)].append(m)
                if len(members) >= 8 and all(len(ms) >= 2 for ms in by_worker.values()):
                    break
            counts = {pid: len(ms) for pid, ms in by_worker.items()}
            assert all(count >= 2 for count in counts.values()), counts

            # Two publishers on each worker, concurrently.
            jobs = [(p, 10, p.user) for ms in by_worker.values() for p in ms[:2]]
            offsets = await publish_concurrently(jobs)
            sequence = await all_received(members, 40)
            assert sorted(offsets) == [offset for offset, *_ in sequence] == list(range(1, 41))
            check_publisher_order(sequence, [p.user for p, _, _ in jobs])

            # SIGTERM to the supervisor reaches both workers.
            assert await server.stop() == 0
            for m in members:
                await m.wait_closed(STOP_TIMEOUT)
            assert {m.close_code for m in members} == {1012}


# -- Redis restarted without its data -----------------------------------------------------


async def test_redis_restart_without_its_data_makes_members_on_both_reload(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with trio.fail_after(45):
        async with (
            chatcore_serve(redis_server.url, tmp_path) as a,
            chatcore_serve(redis_server.url, tmp_path) as b,
            trio.open_nursery() as nursery,
        ):
            await wait_health(a, "ok")
            await wait_health(b, "ok")
            members = [
                (await member(nursery, port, f"u{port}-{i}"))[0]
                for port in (a.port, b.port)
                for i in range(2)
            ]
            await publish(members[0], 5, "before")
            await all_received(members, 5)
            offset, epoch = members[0].last()

            # A crash (no persistence) is noticed at once; connections stay up.
            await redis_server.crash()
            await wait_health(a, "degraded")
            await wait_health(b, "degraded")
            assert all(m.close_code is None for m in members)

            # Back, empty: the room starts a new epoch, every member on both
            # processes is closed with 4001 and cannot recover.
            await redis_server.start()
            await wait_health(a, "ok")
            await wait_health(b, "ok")
            for m in members:
                await m.wait_closed()
            assert {m.close_code for m in members} == {4001}
            back_a, reply_a = await member(
                nursery, a.port, members[0].user, since={"epoch": epoch, "offset": offset}
            )
            back_b, reply_b = await member(
                nursery, b.port, members[2].user, since={"epoch": epoch, "offset": offset}
            )
            assert reply_a["recovered"] is reply_b["recovered"] is False
            assert reply_a["epoch"] == reply_b["epoch"] != epoch
            assert back_a.room_messages() == back_b.room_messages() == []
            await publish(back_b, 3, "after")
            sequence = await all_received([back_a, back_b], 3)
            assert [o for o, *_ in sequence] == list(
                range(reply_a["offset"] + 1, reply_a["offset"] + 4)
            )
            assert await a.stop() == 0
            assert await b.stop() == 0


# -- Redis down at start-up ---------------------------------------------------------------


async def test_a_server_starts_degraded_while_redis_is_down(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    await redis_server.crash()  # the port is kept for the restart
    with trio.fail_after(30):
        async with (
            chatcore_serve(redis_server.url, tmp_path) as server,
            trio.open_nursery() as nursery,
        ):
            await wait_health(server, "degraded")
            early: Member = await nursery.start(connected, server.port, "early")
            refused = await early.request({"type": "join", "room": ROOM})
            assert refused["status"] == "error", refused
            assert refused["error"]["code"] == "unavailable", refused

            await redis_server.start()
            await wait_health(server, "ok")
            reply = await early.request({"type": "join", "room": ROOM})
            assert reply["status"] == "ok", reply
            await publish(early, 3, "early")
            await early.wait_messages(3)
            assert [o for o, *_ in early.room_messages()] == [1, 2, 3]
            assert await server.stop() == 0
