"""A real Redis Cluster for tests: 3 primaries + 3 replicas on loopback, stopped by PID.

Load it as a plugin (``pytest_plugins = ("tests.redis_cluster",)``) and take
the module-scoped ``redis_cluster`` fixture: six ``redis-server`` processes on
free 127.0.0.1 ports (``cluster-enabled``, ``appendonly``, a short
``cluster-node-timeout`` so a killed primary's replica takes over within
about a second), joined with ``redis-cli --cluster create --cluster-replicas 1``.
One cluster serves a whole test module (starting one takes a few seconds);
each test uses its own key prefix, and a test that kills a primary restarts
it (it rejoins as a replica) so the next test still has three shards.

Without ``redis-server`` / ``redis-cli`` the tests are skipped with the
reason, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.redis_server import redis_executable, unblocked_signals

__all__ = ["ClusterNode", "RedisCluster", "redis_cluster"]

#: How long a start (or a failover) may take before the test fails.
START_TIMEOUT = 20.0
#: ``cluster-node-timeout`` in ms: how soon a dead primary is failed over.
NODE_TIMEOUT_MS = 500


def redis_cli_executable() -> str:
    """The ``redis-cli`` to run; skips (or fails under CI) if there is none."""
    return redis_executable("redis-cli", "redis-tools")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ClusterNode:
    """One ``redis-server`` of the cluster (its port is kept across restarts)."""

    def __init__(self, executable: str, directory: Path, port: int, bus_port: int) -> None:
        self.executable = executable
        self.directory = directory
        self.port = port
        # The cluster bus port (by default port + 10000, which may be taken or too high).
        self.bus_port = bus_port
        self.process: subprocess.Popen[bytes] | None = None
        #: Every PID this node ever had (all stopped by teardown).
        self.pids: list[int] = []

    def __repr__(self) -> str:
        state = "running" if self.process is not None else "stopped"
        return f"<ClusterNode 127.0.0.1:{self.port} {state}>"

    def spawn(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
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
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(self.bus_port),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                # One shard down leaves the others serving (per-shard degradation).
                "--cluster-require-full-coverage",
                "no",
                # A returning replica syncs at once (Redis waits 5 s by
                # default for more replicas to share a diskless transfer).
                "--repl-diskless-sync-delay",
                "0",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=unblocked_signals,
        )
        self.pids.append(self.process.pid)

    def command(self, *args: str) -> str:
        """Run one command with ``redis-cli`` against this node; its output."""
        done = subprocess.run(
            [redis_cli_executable(), "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        return done.stdout.decode(errors="replace").strip()

    def kill(self) -> None:
        """SIGKILL (what it had not replicated is lost with it); waits for the exit."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(timeout=START_TIMEOUT)


class RedisCluster:
    """Six nodes, three shards (see the module docs)."""

    def __init__(self, directory: Path) -> None:
        executable = redis_executable()
        self.cli = redis_cli_executable()
        ports = _free_ports(12)
        self.nodes = [
            ClusterNode(executable, directory / f"n{port}", port, bus_port)
            for port, bus_port in zip(ports[:6], ports[6:], strict=True)
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start_sync(self) -> None:
        for node in self.nodes:
            node.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        for node in self.nodes:
            while node.command("PING") != "PONG":
                assert time.monotonic() < deadline, f"{node} did not start"
                time.sleep(0.02)
        created = subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        assert created.returncode == 0, created.stdout.decode() + created.stderr.decode()
        self.wait_healthy_sync()

    def wait_healthy_sync(self) -> None:
        """Until every running node says ``cluster_state:ok``, three primaries serve and
        every replica is in sync with its primary."""
        deadline = time.monotonic() + START_TIMEOUT
        while not self._healthy():
            assert time.monotonic() < deadline, "the cluster did not become healthy"
            time.sleep(0.05)

    async def wait_healthy(self) -> float:
        """:meth:`wait_healthy_sync` off the event loop; how long it took."""
        start = trio.current_time()
        with trio.fail_after(START_TIMEOUT):
            while not await trio.to_thread.run_sync(self._healthy):
                await trio.sleep(0.05)
        return trio.current_time() - start

    def _healthy(self) -> bool:
        running = [n for n in self.nodes if n.process is not None]
        for node in running:
            if "cluster_state:ok" not in node.command("CLUSTER", "INFO"):
                return False
        primaries = [n for n in running if self.role(n) == "master"]
        if len(primaries) != 3:
            return False
        # Every replica is in sync (one still loading cannot take over).
        for node in running:
            if node not in primaries and "master_link_status:up" not in node.command(
                "INFO", "replication"
            ):
                return False
        # Every primary sees every running node as connected (no stale view).
        return all(
            node.command("CLUSTER", "NODES").count("connected") >= len(running) for node in running
        )

    def role(self, node: ClusterNode) -> str:
        """``master`` or ``slave``, as the node itself says."""
        return node.command("ROLE").split("\n", 1)[0]

    def primary_for(self, key: str) -> ClusterNode | None:
        """The running node that currently serves ``key``'s slot (None: none does yet)."""
        asked = next(n for n in self.nodes if n.process is not None)
        slot = int(asked.command("CLUSTER", "KEYSLOT", key))
        for node in self.nodes:
            if node.process is None or self.role(node) != "master":
                continue
            for line in node.command("CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for span in fields[8:]:
                    if span.startswith("["):
                        continue
                    low, _, high = span.partition("-")
                    if int(low) <= slot <= int(high or low):
                        return node
        return None

    def node_id(self, node: ClusterNode) -> str:
        return node.command("CLUSTER", "MYID")

    def migrate_slot(self, slot: int, source: ClusterNode, target: ClusterNode) -> None:
        """Move one slot with its keys (``SETSLOT IMPORTING/MIGRATING``, ``MIGRATE``, ``NODE``)."""
        source_id, target_id = self.node_id(source), self.node_id(target)
        assert target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id) == "OK"
        assert source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id) == "OK"
        while keys := source.command("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
            moved = source.command(
                "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys
            )
            assert moved == "OK", moved
        for node in self.nodes:
            if node.process is not None and self.role(node) == "master":
                node.command("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)

    async def restart(self, node: ClusterNode) -> None:
        """Start a killed node again on its port (it rejoins; as a replica if failed over)."""
        node.spawn()
        with trio.fail_after(START_TIMEOUT):
            while await trio.to_thread.run_sync(node.command, "PING") != "PONG":
                await trio.sleep(0.02)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A running 3 x 2 Redis Cluster for the test module (see :class:`RedisCluster`)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start_sync()
        yield cluster
    finally:
        cluster.close()
