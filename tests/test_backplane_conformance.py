"""The backplane conformance suite on the three backplanes: in process, a shared
in-memory bus (written with public names only), and Redis (a real redis-server)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
from _bus_backplane import MemoryBus

from chatcore import Backplane, LocalBackplane
from chatcore.testing import BACKPLANE_CHECKS, BackplaneRecorder, check_backplane

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ("tests.redis_server",)


@asynccontextmanager
async def running(backplanes: Sequence[Backplane]) -> AsyncIterator[Sequence[Backplane]]:
    async with trio.open_nursery() as nursery:
        for backplane in backplanes:
            await nursery.start(backplane.run)
        yield backplanes
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_local(nodes: int) -> AsyncIterator[Sequence[Backplane]]:
    assert nodes == 1, "the in-process backplane serves one process"
    async with running([LocalBackplane()]) as backplanes:
        yield backplanes


@asynccontextmanager
async def open_bus(nodes: int) -> AsyncIterator[Sequence[Backplane]]:
    bus = MemoryBus()
    async with running([bus.node(f"n{i}") for i in range(nodes)]) as backplanes:
        yield backplanes


@pytest.mark.parametrize("check", BACKPLANE_CHECKS)
async def test_local_backplane(check: str, autojump_clock: trio.abc.Clock) -> None:
    await check_backplane(open_local, nodes=1, checks=[check])


@pytest.mark.parametrize("check", BACKPLANE_CHECKS)
async def test_bus_backplane(check: str, autojump_clock: trio.abc.Clock) -> None:
    await check_backplane(open_bus, nodes=3, checks=[check])


@pytest.mark.slow
@pytest.mark.parametrize("check", BACKPLANE_CHECKS)
async def test_redis_backplane(check: str, redis_server: RedisServer) -> None:
    from chatcore.redis import RedisBackplane

    prefix = "conformance-" + secrets.token_hex(4)

    @asynccontextmanager
    async def open_redis(nodes: int) -> AsyncIterator[Sequence[Backplane]]:
        backplanes = [
            RedisBackplane(redis_server.url, node_id=f"n{i}", prefix=prefix, heartbeat_interval=0.1)
            for i in range(nodes)
        ]
        async with running(backplanes):
            with trio.fail_after(5):
                for backplane in backplanes:
                    await backplane.wait_connected()
            yield backplanes

    await check_backplane(open_redis, nodes=3, checks=[check], check_timeout=5)


class _Forgetful(LocalBackplane):
    """A broken backplane: replay() leaves out the first message of a range."""

    async def replay(self, room: str, epoch: str, after: int, upto: int):  # type: ignore[no-untyped-def]
        items = await super().replay(room, epoch, after, upto)
        return None if items is None else items[1:]


class _Deaf(LocalBackplane):
    """A broken backplane: directed messages never reach the sender's own node."""

    async def send_to_user(self, user, message):  # type: ignore[no-untyped-def]
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("broken", "check", "why"),
    [
        (_Forgetful, "replay", "replay gave"),
        (_Deaf, "directed", "did not finish"),
    ],
)
async def test_the_suite_catches_a_broken_backplane(
    broken: type[LocalBackplane], check: str, why: str, autojump_clock: trio.abc.Clock
) -> None:
    @asynccontextmanager
    async def open_broken(nodes: int) -> AsyncIterator[Sequence[Backplane]]:
        async with running([broken()]) as backplanes:
            yield backplanes

    with pytest.raises(AssertionError, match=f"{check}: .*{why}"):
        await check_backplane(open_broken, nodes=1, checks=[check], check_timeout=5)


async def test_bad_arguments() -> None:
    with pytest.raises(KeyError, match="no_such_check"):
        await check_backplane(open_local, nodes=1, checks=["no_such_check"])
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        await check_backplane(open_local, nodes=0)
    assert repr(BackplaneRecorder(LocalBackplane())).startswith("<BackplaneRecorder local-")


def test_the_bus_backplane_uses_public_names_only() -> None:
    """It is what someone outside the package can write: no private module or name."""
    import ast
    from pathlib import Path

    source = Path(__file__).with_name("_bus_backplane.py").read_text()
    imported = [
        (node.module or "", alias.name)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    ]
    chatcore_names = [(m, n) for m, n in imported if m.split(".")[0] == "chatcore"]
    assert chatcore_names, "it imports nothing from chatcore?"
    for module, name in chatcore_names:
        assert not any(part.startswith("_") for part in module.split(".")), module
        assert not name.startswith("_"), name
    assert "._" not in source.replace("self._", "")  # no private attribute of another object
