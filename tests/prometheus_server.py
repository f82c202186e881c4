"""A real Prometheus for tests: started on 127.0.0.1 with a temporary config and store.

Without the ``prometheus`` binary (Debian package ``prometheus``) the tests
that need it are skipped with the reason, except under ``CI=true``, where a
missing binary is a failure (CI installs the package). Only the process
started here is stopped, by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

#: Seconds between scrapes (short: the tests wait for a few).
SCRAPE_INTERVAL = "1s"


def prometheus_binary() -> str:
    """The ``prometheus`` to run; skips (or fails under CI) if there is none."""
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
    )
    if found is None:
        reason = "prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run the Prometheus tests")
        pytest.skip(reason)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def http_get_text(port: int, target: str) -> tuple[int, str]:
    """One HTTP/1.1 GET on 127.0.0.1; the status and the body as text."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return int(head.split()[1]), body.decode()


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


@attrs.define
class Prometheus:
    """A running Prometheus and its HTTP API."""

    process: trio.Process
    port: int
    log: Path

    async def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/PATH?params``: the ``data`` of a successful answer."""
        target = f"/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = await http_get_text(self.port, target)
        answer = json.loads(body)
        assert status == 200, body
        assert answer["status"] == "success", body
        return answer["data"]

    async def value(self, expr: str) -> float | None:
        """The value of a PromQL expression that yields one sample, or None if none."""
        data = await self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return float(result[1])
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    async def wait_for(self, expr: str, expected: float, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Wait (bounded) until ``expr`` evaluates to ``expected``."""
        seen: float | None = None
        try:
            with trio.fail_after(timeout):
                while (seen := await self.value(expr)) != expected:
                    await trio.sleep(0.25)
        except trio.TooSlowError:
            raise AssertionError(f"{expr} = {seen}, expected {expected}") from None

    async def wait_scraped(self, count: int, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Wait until ``count`` targets are up and each was scraped since this call."""
        start = (await self.value("time()")) or 0.0
        with trio.fail_after(timeout):
            while True:
                data = await self.api("targets")
                fresh = [
                    t
                    for t in data["activeTargets"]
                    if t["health"] == "up" and _scraped_after(t.get("lastScrape", ""), start)
                ]
                if len(fresh) >= count:
                    return
                await trio.sleep(0.25)


def _scraped_after(stamp: str, start: float) -> bool:
    import datetime

    if not stamp or stamp.startswith("0001"):
        return False
    # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
    main, _, rest = stamp.partition(".")
    digits = "".join(c for c in rest if c.isdigit())[:6]
    zone = rest[len("".join(c for c in rest if c.isdigit())) :] or "+00:00"
    zone = "+00:00" if zone == "Z" else zone
    parsed = datetime.datetime.fromisoformat(f"{main}.{digits or '0'}{zone}")
    return parsed.timestamp() > start + 1.0  # a whole scrape after the session


@asynccontextmanager
async def run_prometheus(targets: Sequence[str], tmp_path: Path) -> AsyncIterator[Prometheus]:
    """Run Prometheus scraping ``targets`` (``host:port``) every second; stop it by PID."""
    binary = prometheus_binary()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL}\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL}\n"
        "scrape_configs:\n"
        "  - job_name: chatcore\n"
        "    static_configs:\n"
        f"      - targets: {json.dumps(list(targets))}\n"
    )
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [
                binary,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with trio.fail_after(30):
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"prometheus exited:\n{log.read_text()}")
                try:
                    status, _ = await http_get_text(port, "/-/ready")
                except OSError:
                    status = 0
                if status == 200:
                    break
                await trio.sleep(0.1)
        yield Prometheus(process, port, log)
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGTERM)
            with trio.move_on_after(10):
                await process.wait()
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            with trio.move_on_after(5):
                await process.wait()


# -- a scripted session with something on every dashboard panel -------------------------------


async def dashboard_session(port: int, seconds: float) -> None:
    """Readers, a publisher, churn, refused handshakes and one slow consumer, for ``seconds``.

    Against a ``chatcore serve`` of ``tests._serve_targets:small_outbox_hub``.
    """
    from contextlib import AsyncExitStack

    from chatcore import HandshakeRejected, PeerGone
    from chatcore.testing import open_test_client
    from tests.test_serve_cli import joined, peer_of, receive_message

    url = f"ws://127.0.0.1:{port}/ws"
    async with AsyncExitStack() as stack:
        stack.enter_context(trio.fail_after(seconds + 60))
        readers = [await joined(stack, port) for _ in range(20)]
        publisher = await joined(stack, port)
        end = trio.current_time() + seconds

        async def read(client: Any) -> None:
            while True:
                await client.receive()

        async def churn() -> None:
            while trio.current_time() < end:
                async with open_test_client(url, timeout=10) as client:
                    await client.join("r")
                try:
                    async with open_test_client(f"ws://127.0.0.1:{port}/nope", timeout=10):
                        pass
                except HandshakeRejected:
                    pass
                await trio.sleep(0.5)

        async def slow_consumer() -> None:
            await trio.sleep(seconds / 3)
            async with peer_of(port, receive_buffer=4096) as slow:
                await receive_message(slow)
                await slow.send_text(json.dumps({"type": "join", "room": "r", "ref": "j"}))
                # The room is busy: its messages may share the reply's frame.
                while not any(
                    json.loads(line).get("ref") == "j"
                    for line in (await slow.receive_text()).split("\n")
                ):
                    pass
                for _ in range(400):  # ~1.6 MB for everyone; the slow one is cut off
                    await publisher.send({"type": "publish", "room": "r", "data": "x" * 4000})
                with trio.move_on_after(20):
                    try:
                        while True:
                            await slow.receive_frame()  # until the server gave up on it
                    except PeerGone:
                        pass

        async with trio.open_nursery() as nursery:
            for client in readers:
                nursery.start_soon(read, client)
            nursery.start_soon(churn)
            nursery.start_soon(slow_consumer)
            n = 0
            while trio.current_time() < end:
                n += 1
                await publisher.send({"type": "publish", "room": "r", "data": {"n": n}})
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()


def dashboard_expressions(path: Path) -> list[tuple[str, str, str]]:
    """``(panel title, legend, PromQL)`` of every target of the dashboard JSON."""
    dashboard = json.loads(path.read_text())
    return [
        (panel["title"], target.get("legendFormat", ""), target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]
