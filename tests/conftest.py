"""Shared fixtures: an in-memory connection driven by the real actor.

``connect`` starts :func:`chatcore.serve_connection` on one end of a
:func:`~chatcore.transports.memory_stream_pair` in the test's nursery and hands
back the :class:`~chatcore.Connection` and the :class:`~chatcore.transports.MemoryClient`.
Tests that wait on anything timed also take ``autojump_clock``, so every timeout
below runs in virtual time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from chatcore import (
    Accept,
    CloseRecord,
    Config,
    Connection,
    ConnectionHandler,
    ConnectionState,
    HandshakeRequest,
    PeerGone,
    Reject,
    serve_connection,
)
from chatcore.transports import (
    CloseFrame,
    MemoryClient,
    MemoryStream,
    TextFrame,
    memory_stream_pair,
)
from chatcore.transports._memory import Frame

#: Bounds for tests: the heartbeat is far away unless a test asks for it, so
#: it never puts a ``ping`` into frames a test asserts on.
TEST_CONFIG = Config(
    heartbeat_interval=3600.0,
    heartbeat_timeout=60.0,
    close_timeout=5.0,
    send_timeout=10.0,
    handshake_timeout=10.0,
)


def config(**changes: Any) -> Config:
    """:data:`TEST_CONFIG` with some fields changed."""
    return attrs.evolve(TEST_CONFIG, **changes)


class RecordingHandler(ConnectionHandler):
    """A handler that keeps a registry the way an application would, and a log.

    ``handle`` adds the connection to :attr:`registry`; ``connection_closed``
    removes it and records how (and in which state) the connection ended, so a
    test can assert the hook ran exactly once, after the close was recorded.

    Args:
        handle: Replaces the default loop (``async for text in connection``,
            appending to :attr:`received`).
        authenticate: Replaces the default (accept, identity ``"anon"``).
    """

    def __init__(
        self,
        handle: Callable[[Connection], Awaitable[None]] | None = None,
        authenticate: Callable[[HandshakeRequest], Awaitable[Accept | Reject]] | None = None,
    ) -> None:
        self._handle = handle
        self._authenticate = authenticate
        #: Connections whose ``handle`` started and that did not end yet.
        self.registry: set[Connection] = set()
        #: One entry per ``connection_closed`` call: (connection, record, state).
        self.closed: list[tuple[Connection, CloseRecord | None, ConnectionState]] = []
        #: Every text ``handle`` received (default loop only).
        self.received: list[str] = []
        #: How many times ``handle`` was started.
        self.handle_calls = 0

    async def authenticate(self, request: HandshakeRequest) -> Accept | Reject:
        if self._authenticate is not None:
            return await self._authenticate(request)
        await trio.lowlevel.checkpoint()
        return Accept(identity="anon")

    async def handle(self, connection: Connection) -> None:
        self.handle_calls += 1
        self.registry.add(connection)
        if self._handle is not None:
            await self._handle(connection)
            return
        async for text in connection:
            self.received.append(text)

    def connection_closed(self, connection: Connection) -> None:
        self.closed.append((connection, connection.close_record, connection.state))
        self.registry.discard(connection)


@attrs.define(eq=False)
class Served:
    """One connection being served by :func:`serve_connection` in a test.

    Unpacks as ``connection, client``.
    """

    #: The server side (the actor's :class:`Connection`).
    connection: Connection
    #: The client side of the in-memory WebSocket.
    client: MemoryClient
    #: Cancel it to shut the connection down (like server shutdown).
    scope: trio.CancelScope
    #: Set when ``serve_connection`` returned or raised.
    finished: trio.Event = attrs.Factory(trio.Event)
    #: ``trio.current_time()`` when it finished.
    finished_at: float | None = None
    #: What ``serve_connection`` raised (``None`` if it returned).
    error: BaseException | None = None

    def __iter__(self) -> Iterator[Any]:
        yield self.connection
        yield self.client


class _Relay:
    # serve_connection's task_status: wraps the Connection into a Served.
    def __init__(self, outer: trio.TaskStatus[Served], served: dict[str, Any]) -> None:
        self._outer = outer
        self._served = served

    def started(self, connection: Connection) -> None:
        self._served["served"] = served = Served(
            connection, self._served["client"], self._served["scope"]
        )
        self._outer.started(served)


async def serve_in_test(
    stream: MemoryStream,
    client: MemoryClient,
    handler: ConnectionHandler,
    *,
    config: Config | None,
    connection_id: str | None = None,
    task_status: trio.TaskStatus[Served] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``serve_connection`` and record how it ended on the :class:`Served`."""
    box: dict[str, Any] = {"client": client}
    with trio.CancelScope() as scope:
        box["scope"] = scope
        try:
            await serve_connection(
                stream,
                handler,
                config=config,
                connection_id=connection_id,
                task_status=_Relay(task_status, box),  # type: ignore[arg-type]
            )
        except BaseException as exc:
            box["served"].error = exc
            raise
        finally:
            box["served"].finished_at = trio.current_time()
            box["served"].finished.set()


Connect = Callable[..., Awaitable[Served]]


@pytest.fixture
def connect(nursery: trio.Nursery) -> Connect:
    """Start a served in-memory connection: ``conn, client = await connect(handler)``.

    Keyword arguments: ``config`` (default :data:`TEST_CONFIG`), ``capacity``
    (frames the memory link buffers each way), ``request``, ``connection_id``,
    ``stream_pair`` (a ``(MemoryStream, MemoryClient)`` to use instead), and
    ``accepted`` (default True: wait for the handshake to be accepted).

    The test must take ``autojump_clock`` (pytest-trio only runs a test on a
    clock the test function itself requests): connections left open at the
    end close on cancellation, which takes virtual time.
    """

    async def connect(
        handler: ConnectionHandler | None = None,
        *,
        config: Config = TEST_CONFIG,
        capacity: int = 64,
        request: HandshakeRequest | None = None,
        connection_id: str | None = None,
        stream_pair: tuple[MemoryStream, MemoryClient] | None = None,
        accepted: bool = True,
    ) -> Served:
        assert isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock), (
            "a test using connect must take the autojump_clock fixture itself"
        )
        stream, client = stream_pair or memory_stream_pair(request, capacity=capacity)
        served: Served = await nursery.start(
            lambda task_status: serve_in_test(
                stream,
                client,
                handler or RecordingHandler(),
                config=config,
                connection_id=connection_id,
                task_status=task_status,
            )
        )
        if accepted:
            with trio.fail_after(1):
                await client.wait_accepted()
        return served

    return connect


async def read_all(client: MemoryClient) -> list[Frame]:
    """Read frames until the link is gone; returns every frame the client received."""
    with trio.fail_after(60):
        while True:
            try:
                await client.receive_frame()
            except PeerGone:
                return client.frames


def is_cancellation(exc: BaseException | None) -> bool:
    """True for ``trio.Cancelled``, or a group of nothing but ``Cancelled``
    (how Trio propagates a cancellation out of a nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


def close_frames(client: MemoryClient) -> list[CloseFrame]:
    """The close frames the client received so far."""
    return [f for f in client.frames if isinstance(f, CloseFrame)]


def texts(client: MemoryClient) -> list[str]:
    """The texts of the text frames the client received so far (one per frame)."""
    return [f.text for f in client.frames if isinstance(f, TextFrame)]


# -- skip report -------------------------------------------------------------------
#
# ``scripts/test`` sets CHATCORE_SKIP_REPORT to a file name: every skipped test
# is written there as a JSON line {"test": nodeid, "reason": ...}, so the script
# can end its output with what was skipped and why (and decide whether the
# coverage floor applies). xfails are not skips.

_SKIP_REPORT_ENV = "CHATCORE_SKIP_REPORT"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record a skipped test in the skip report (if ``scripts/test`` asked for one)."""
    path = os.environ.get(_SKIP_REPORT_ENV)
    if not path or not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"test": report.nodeid, "reason": reason}) + "\n")
