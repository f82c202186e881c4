"""A real ``redis-server`` for tests: started on a free loopback port, stopped by PID.

Load it as a plugin (``pytest_plugins = ("tests.redis_server",)``) and take the
``redis_server`` fixture: a fresh server per test (``--save '' --appendonly no``
unless the test asks for persistence), in the test's tmp dir, with async
helpers to crash, stop, pause (SIGSTOP) and restart it on the same port.

Without ``redis-server`` on the machine the tests are skipped with the reason,
except under ``CI=true``, where a missing server is a failure (CI installs
the Debian package).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

__all__ = ["RedisServer", "redis_executable", "redis_server", "unblocked_signals"]

#: How long a start may take before the test fails.
START_TIMEOUT = 10.0


def redis_executable(name: str = "redis-server", package: str = "redis-server") -> str:
    """The ``redis-server`` (or another Redis binary) to run; skips (or fails under CI) if none."""
    # On PATH only: a PATH without it is how to try the suite as a machine without it.
    found = shutil.which(name)
    if found is None:
        reason = f"{name} is not installed (apt-get install {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run the Redis tests")
        pytest.skip(reason)
    return found


def unblocked_signals() -> None:
    """Run in the child before ``exec``: no blocked signals.

    A child inherits its parent's signal mask, and a test that runs
    ``chatcore serve`` in process can leave SIGTERM blocked in the test
    process: a redis-server started after it would then ignore SIGTERM.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 (see the module docs).

    Args:
        executable: The ``redis-server`` binary.
        directory: Its working directory (data and log files).
        persistent: Keep data across restarts (AOF, ``appendfsync always``).
    """

    def __init__(self, executable: str, directory: Path, *, persistent: bool = False) -> None:
        self.executable = executable
        self.directory = directory
        self.persistent = persistent
        #: The port, fixed at the first start and kept across restarts.
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        #: Every PID this server ever had (all stopped by teardown).
        self.pids: list[int] = []

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>``."""
        return f"redis://127.0.0.1:{self.port}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                "--protected-mode",
                "no",
                *persistence,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=unblocked_signals,
        )
        self.pids.append(process.pid)
        return process

    def start_sync(self) -> None:
        """Start on a free port (or the kept one) and wait until it answers PING."""
        for _ in range(5):
            if not self.port:
                self.port = _free_port()
            process = self._spawn()
            deadline = time.monotonic() + START_TIMEOUT
            while process.poll() is None and time.monotonic() < deadline:
                if _answers_ping(self.port):
                    self.process = process
                    return
                time.sleep(0.01)
            process.kill()
            process.wait()
            self.port = 0  # the port was taken meanwhile: try another
        raise RuntimeError(f"redis-server did not start; see {self.directory / 'redis.log'}")

    async def start(self) -> None:
        """Start again on the same port; returns once it answers PING."""
        assert self.process is None, "already running"
        process = self._spawn()
        with trio.fail_after(START_TIMEOUT):
            while not await trio.to_thread.run_sync(_answers_ping, self.port):
                assert process.poll() is None, "redis-server exited at start"
                await trio.sleep(0.005)
        self.process = process

    async def _signal_and_wait(self, signum: int) -> None:
        process = self.process
        assert process is not None, "not running"
        self.process = None
        process.send_signal(signal.SIGCONT)  # a paused server must be able to die
        process.send_signal(signum)
        with trio.fail_after(START_TIMEOUT):
            while process.poll() is None:
                await trio.sleep(0.005)

    async def crash(self) -> None:
        """SIGKILL: the process dies at once (in-memory data is lost)."""
        await self._signal_and_wait(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM: Redis shuts down (closing every connection)."""
        await self._signal_and_wait(signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing answers)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill the process (by PID) and wait for it; idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(timeout=START_TIMEOUT)


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for this test (see :class:`RedisServer`).

    ``@pytest.mark.parametrize("redis_server", [{"persistent": True}], indirect=True)``
    asks for one that keeps its data across restarts.
    """
    options = getattr(request, "param", {}) or {}
    server = RedisServer(redis_executable(), tmp_path, **options)
    server.start_sync()
    try:
        yield server
    finally:
        server.close()
