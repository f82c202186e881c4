"""``chatcore serve`` as a process: start, serve, SIGTERM drain, workers, exit code.

Each test starts the server on 127.0.0.1 port 0, reads the printed URL from
its output, and stops it by PID only. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from chatcore import HandshakeRejected, PeerGone
from chatcore.testing import TestClient, WebSocketPeer, open_test_client
from chatcore.transports import CloseFrame

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHATCORE = Path(sys.executable).with_name("chatcore")
_logs = itertools.count()
URL = re.compile(r"chatcore: serving on ws://127\.0\.0\.1:(\d+)(/\S*)")


@attrs.define
class ServerProcess:
    process: trio.Process
    port: int
    path: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.returncode is None:
            os.kill(self.pid, signum)

    async def wait(self, seconds: float) -> int:
        with trio.fail_after(seconds):
            return await self.process.wait()


@asynccontextmanager
async def chatcore_serve(
    target: str, *options: str, tmp_path: Path, command: Sequence[str] | None = None
) -> AsyncIterator[ServerProcess]:
    """Run ``chatcore serve TARGET --bind 127.0.0.1:0 OPTIONS``; SIGKILL it if still running."""
    log = tmp_path / f"server-{next(_logs)}.log"
    argv = [*(command or [sys.executable, "-m", "chatcore"]), "serve", target]
    argv += ["--bind", "127.0.0.1:0", *options]
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    server: ServerProcess | None = None
    try:
        with trio.fail_after(20):
            while True:
                found = URL.search(log.read_text(errors="replace"))
                if found:
                    break
                if process.poll() is not None:
                    raise AssertionError(f"the server exited:\n{log.read_text()}")
                await trio.sleep(0.05)
        server = ServerProcess(process, int(found.group(1)), found.group(2), log)
        yield server
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            with trio.move_on_after(5):
                await process.wait()


async def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """A one-shot HTTP/1.1 GET; returns the status and the JSON body."""
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


def url_of(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


async def joined(stack: AsyncExitStack, port: int, room: str = "r") -> TestClient:
    """A protocol client that joined ``room``; ``stack`` closes it."""
    client = await stack.enter_async_context(open_test_client(url_of(port), timeout=10))
    await client.join(room)
    return client


async def hold_joined(
    port: int, release: trio.Event, *, task_status: trio.TaskStatus[TestClient]
) -> None:
    """:func:`joined` in a task of its own (for opening many at once); open until ``release``."""
    async with open_test_client(url_of(port), timeout=10) as client:
        await client.join("r")
        task_status.started(client)
        await release.wait()


def peer_of(port: int, **options: Any) -> AbstractAsyncContextManager[WebSocketPeer]:
    """A frame-level client, for handlers that do not speak chatcore's protocol."""

    @asynccontextmanager
    async def connected() -> AsyncIterator[WebSocketPeer]:
        peer = await WebSocketPeer.connect("127.0.0.1", port, "/ws", **options)
        try:
            await peer.wait_accepted()
            yield peer
        finally:
            await peer.aclose()

    return connected()


async def receive_message(peer: WebSocketPeer) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await peer.receive_text())
    return message


async def close_code(peer: WebSocketPeer) -> int:
    """Read to the end: the server's close code, 1006 if TCP ended without one."""
    while True:
        try:
            frame = await peer.receive_frame()
        except PeerGone:
            return 1006
        if isinstance(frame, CloseFrame):
            return frame.code


# -- the README's command: a plain ConnectionHandler ------------------------------------------


async def test_readme_echo_example(tmp_path: Path) -> None:
    async with chatcore_serve(
        "examples.echo:handler", command=[str(CHATCORE)], tmp_path=tmp_path
    ) as server:
        assert server.path == "/ws"
        with trio.fail_after(10):
            async with (
                peer_of(server.port, compression=True) as a,
                open_test_client(url_of(server.port)) as b,
            ):
                assert a.extensions == ()  # chatcore serve's default: no permessage-deflate
                assert (await receive_message(a))["type"] == "hello"
                await a.send_text("hi all")
                message = await receive_message(a)
                assert (message["type"], message["data"]) == ("message", "hi all")
                await b.expect("message", data="hi all")
                status, health = await http_get(server.port, "/healthz")
                assert (status, health["connections"], health["status"]) == (200, 2, "ok")
                server.signal(signal.SIGTERM)
                assert await close_code(a) == 1012
                await b.expect_closed(1012)
        assert await server.wait(10) == 0
    assert "TCP_USER_TIMEOUT 10 s" in server.output()


# -- SIGTERM with 500 clients receiving a broadcast ----------------------------------------------


async def test_sigterm_drains_500_clients(tmp_path: Path) -> None:
    receivers = 500
    grace = 3.0
    async with chatcore_serve(
        "tests._serve_targets:hub",
        "--drain-grace",
        str(grace),
        "--no-access-log",
        tmp_path=tmp_path,
    ) as server:
        with trio.fail_after(60):
            async with trio.open_nursery() as holders:
                release = trio.Event()
                clients: list[TestClient] = []
                for _ in range(0, receivers, 100):
                    async with trio.open_nursery() as nursery:

                        async def open_one() -> None:
                            clients.append(await holders.start(hold_joined, server.port, release))

                        for _ in range(100):
                            nursery.start_soon(open_one)
                publisher = await holders.start(hold_joined, server.port, release)
                status, health = await http_get(server.port, "/healthz")
                assert (status, health["connections"], health["rooms"]) == (200, receivers + 1, 1)
                refused: list[HandshakeRejected] = []

                async def publish() -> None:
                    offset = 0
                    while publisher.closed is None:
                        offset += 1
                        try:
                            await publisher.send(
                                {"type": "publish", "room": "r", "data": {"n": offset}}
                            )
                        except AssertionError:  # closed meanwhile: the drain reached it
                            return
                        await trio.sleep(0.1)

                async def knock_during_drain() -> None:
                    # New connections while draining: 503 with Retry-After.
                    while server.process.returncode is None and not refused:
                        try:
                            async with open_test_client(url_of(server.port)):
                                pass
                        except HandshakeRejected as exc:
                            refused.append(exc)
                            return
                        except (OSError, AssertionError):
                            return  # the server is gone, or closed the newcomer
                        await trio.sleep(0.02)

                start_time = 0.0
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish)
                    for client in [*clients, publisher]:  # the broadcast reaches everyone
                        while (await client.receive())["type"] != "message":
                            pass  # the publisher's replies
                    await trio.sleep(0.3)  # and goes on
                    start_time = trio.current_time()
                    server.signal(signal.SIGTERM)
                    nursery.start_soon(knock_during_drain)
                    code = await server.wait(grace + 5)
                took = trio.current_time() - start_time
                outcomes: list[tuple[int, bool]] = []
                for client in [*clients, publisher]:
                    closed = await client.expect_closed(timeout=5)
                    shutdown = [m for m in client.messages if m["type"] == "shutdown"]
                    assert all(m["reconnect_after_ms"] > 0 for m in shutdown)
                    outcomes.append((closed.code, bool(shutdown)))
                release.set()
        assert code == 0
        assert took < grace + 3, took
        codes = sorted({o[0] for o in outcomes})
        assert codes == [1012], f"close codes seen: {codes}"
        assert len(outcomes) == receivers + 1
        assert all(o[1] for o in outcomes), "a client got no shutdown message"
        assert refused
        assert refused[0].status == 503
        assert refused[0].header("retry-after") is not None
        assert "shutting down" in server.output()


# -- a client that stops reading --------------------------------------------------------------


async def test_slow_consumer_is_cut_off_and_sigterm_still_completes(tmp_path: Path) -> None:
    count = 1500
    text = "x" * 4000  # about 6 MB per receiver: more than the kernel buffers
    async with chatcore_serve(
        "tests._serve_targets:small_outbox_hub",
        "--drain-grace",
        "2",
        "--tcp-user-timeout",
        "1",
        "--no-access-log",
        tmp_path=tmp_path,
    ) as server:
        async with AsyncExitStack() as stack:
            stack.enter_context(trio.fail_after(60))
            readers = [await joined(stack, server.port) for _ in range(3)]
            # A tiny receive buffer and no reading: the server's writes stall.
            slow = await stack.enter_async_context(peer_of(server.port, receive_buffer=4096))
            assert (await receive_message(slow))["type"] == "hello"
            await slow.send_text(json.dumps({"type": "join", "room": "r", "ref": "j"}))
            assert (await receive_message(slow))["type"] == "reply"
            publisher = await joined(stack, server.port)
            _, health = await http_get(server.port, "/healthz")
            assert health["connections"] == 5
            received: list[list[int]] = []
            all_received = trio.Event()
            reader_codes: list[int] = []

            async def read_all(client: TestClient) -> None:
                offsets = []
                while len(offsets) < count:
                    message = await client.expect("message", timeout=30)
                    offsets.append(message["offset"])
                received.append(offsets)
                if len(received) == len(readers):
                    all_received.set()
                reader_codes.append((await client.expect_closed(timeout=30)).code)

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for client in readers:
                    nursery.start_soon(read_all, client)
                for _ in range(count):
                    await publisher.send({"type": "publish", "room": "r", "data": text})
                await all_received.wait()
                broadcast_took = trio.current_time() - start
                # Every reader got everything, in order, however stuck the slow one is.
                assert received == [list(range(1, count + 1))] * 3
                # The slow one is cut off: the writer is stuck in hypercorn's
                # shielded send until TCP_USER_TIMEOUT drops the connection.
                while (await http_get(server.port, "/healthz"))[1]["connections"] > 4:
                    await trio.sleep(0.1)
                cut_off = trio.current_time() - start
                sigterm = trio.current_time()
                server.signal(signal.SIGTERM)
                assert await server.wait(10) == 0
                shutdown_took = trio.current_time() - sigterm
            # The slow client's connection is gone (it reads what was buffered, then EOF/reset).
            code = await close_code(slow)
            assert code in (1006, 4001)
        assert reader_codes == [1012] * 3
        assert broadcast_took < 20, broadcast_took
        assert cut_off < broadcast_took + 5
        assert shutdown_took < 2 + 3, shutdown_took


# -- handler crash, second signal, workers, bad targets -----------------------------------------


async def test_handler_crash_is_1011_and_serving_goes_on(tmp_path: Path) -> None:
    async with chatcore_serve("tests._serve_targets:crashy", tmp_path=tmp_path) as server:
        with trio.fail_after(10):
            async with peer_of(server.port) as client:
                await client.send_text("crash")
                assert await close_code(client) == 1011
            async with peer_of(server.port) as other:
                await other.send_text("still there?")
                assert await receive_message(other) == {"type": "echo", "text": "still there?"}
                server.signal()
                assert await close_code(other) == 1012
            assert await server.wait(10) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_while_the_target_is_still_importing(tmp_path: Path, workers: str) -> None:
    """A SIGTERM before the server listens is kept until it can drain: exit 0, not -15."""
    gate = tmp_path / "gate"
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "chatcore", "serve", "tests._slow_target:hub"]
    argv += ["--bind", "127.0.0.1:0", "--workers", workers]
    env = {**os.environ, "CHATCORE_TEST_GATE": str(gate)}
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        with trio.fail_after(30):
            while "slow target: importing" not in log.read_text(errors="replace"):
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.02)
            os.kill(process.pid, signal.SIGTERM)  # the import is blocked on the gate
            gate.touch()
            assert await process.wait() == 0, log.read_text()
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
    assert "received SIGTERM" in log.read_text()


async def test_second_signal_skips_the_wait(tmp_path: Path) -> None:
    async with chatcore_serve(
        "tests._serve_targets:hub", "--drain-grace", "30", tmp_path=tmp_path
    ) as server:
        async with AsyncExitStack() as stack:
            stack.enter_context(trio.fail_after(15))
            clients = [await joined(stack, server.port) for _ in range(20)]
            start = trio.current_time()
            server.signal(signal.SIGTERM)
            await trio.sleep(0.3)
            server.signal(signal.SIGINT)
            assert await server.wait(5) == 0
            assert trio.current_time() - start < 3
            for client in clients:
                await client.expect_closed(1012)
        assert "second shutdown request" in server.output()


async def test_workers_share_the_port(tmp_path: Path) -> None:
    async with chatcore_serve(
        "tests._serve_targets:hub", "--workers", "2", "--drain-grace", "5", tmp_path=tmp_path
    ) as server:
        with trio.fail_after(20):
            children = await wait_for_children(server.pid, 2)
            async with AsyncExitStack() as stack:
                clients = [await joined(stack, server.port) for _ in range(10)]
                server.signal(signal.SIGTERM)
                for client in clients:
                    await client.expect_closed(1012)
            assert await server.wait(10) == 0
        assert "its own island" in server.output()
        assert all(_gone(pid) for pid in children)


def _children(pid: int) -> list[int]:
    """The PIDs of a process's children (any of its threads may have forked them)."""
    return [
        int(child)
        for path in Path(f"/proc/{pid}/task").glob("*/children")
        for child in path.read_text().split()
    ]


async def wait_for_children(pid: int, count: int) -> list[int]:
    while len(children := _children(pid)) < count:
        await trio.sleep(0.05)
    return children


def _gone(pid: int) -> bool:
    """The process exited (no /proc entry, or a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests._serve_targets:not_a_handler", "is not a chatcore Hub"),
        ("tests._serve_targets:missing", "has no attribute"),
        ("no_such_module:app", "cannot import"),
        ("no-colon", "expected MODULE:ATTRIBUTE"),
    ],
)
async def test_bad_targets(target: str, message: str) -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "chatcore", "serve", target, "--bind", "127.0.0.1:0"],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode != 0
    assert message in result.stderr.decode()


# -- plain hypercorn CLI users still get 1012 ----------------------------------------------------


async def test_plain_hypercorn_cli_sigterm_gives_1012(tmp_path: Path) -> None:
    log = tmp_path / "hypercorn.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "hypercorn",
                "--worker-class",
                "trio",
                "--bind",
                "127.0.0.1:0",
                "--graceful-timeout",
                "1",
                "tests._serve_targets:app",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with trio.fail_after(30):
            while not (
                found := re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())
            ):
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
            port = int(found.group(1))
            async with AsyncExitStack() as stack:
                clients = [await joined(stack, port) for _ in range(5)]
                os.kill(process.pid, signal.SIGTERM)
                for client in clients:
                    await client.expect_closed(1012)  # not 1006
            await process.wait()
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            with trio.move_on_after(5):
                await process.wait()


# -- the command line, in process -------------------------------------------------------------


def test_build_app_wraps_handlers_and_applies_options() -> None:
    from chatcore import Config, Hub
    from chatcore._cli import build_app
    from chatcore.asgi import ASGIApp
    from examples.echo import Broadcast

    hub = Hub(connection_config=Config(heartbeat_interval=30.0))
    app = build_app(hub, heartbeat_timeout=7.0)
    assert isinstance(app, ASGIApp)
    assert app.handler is hub
    assert (app.config.heartbeat_interval, app.config.heartbeat_timeout) == (30.0, 7.0)
    assert hub.connection_config.heartbeat_timeout != 7.0  # the hub's own config is untouched

    plain = build_app(Broadcast(), path="/chat", health_path="/ready")
    assert (plain.path, plain.health_path) == ("/chat", "/ready")

    given = ASGIApp(Broadcast())
    assert build_app(given, path="/x", heartbeat_interval=1.0) is given
    assert (given.path, given.config.heartbeat_interval) == ("/x", 1.0)

    with pytest.raises(SystemExit, match="not a chatcore"):
        build_app(object())
    with pytest.raises(SystemExit, match="heartbeat_interval"):
        build_app(Broadcast(), heartbeat_interval=-1.0)
    with pytest.raises(SystemExit, match="path"):
        build_app(Broadcast(), path="ws")


def test_parser_and_worker_command_line() -> None:
    from chatcore._cli import _worker_argv, build_parser

    args = build_parser().parse_args(
        ["serve", "m:a", "--bind", "[::1]:9000", "--workers", "3", "--compression"]
    )
    assert args.bind == [("::1", 9000)]
    assert (args.workers, args.compression, args.access_log) == (3, True, True)
    assert (args.drain_grace, args.tcp_user_timeout) == (8.0, 10.0)
    argv = _worker_argv(args)
    assert argv[:5] == [sys.executable, "-m", "chatcore", "serve", "m:a"]
    assert "--compression" in argv
    assert "--workers" not in argv
    assert "--bind" not in argv  # workers inherit the socket instead
    for bad in (["--bind", "nope"], ["--workers", "0"], ["--drain-grace", "-1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "m:a", *bad])
