"""Fan-out inside one process, with no sockets: only what the server itself spends.

One round is one ``trio.run``: ``members`` connections join a room of a
:class:`~chatcore.Hub` (the benchmarks' hub, limits raised), then one more
member publishes ``messages`` messages, client frames one after the other,
and every member receives all of them. The transports are
:class:`NullStream`\\ s: a scripted client whose frames are ready at once and
whose sends are counted and dropped. What the clock measures is therefore
chatcore's own work per delivery (parsing, sequencing, fan-out, batching,
framing into JSON lines, the metrics hooks), without the system calls and
the WebSocket framing a real server adds on top. Any fixed cost per
delivery (a metrics hook, say) is a *larger* share of this number than of
a real server's: a ratio measured here bounds the real one from above.

``direct=True`` runs the lean engine's path (frames written straight from
the pacer, :attr:`MessageStream.direct_send`); ``direct=False`` the path of
hypercorn and trio-websocket (a writer task per connection).
"""

from __future__ import annotations

import collections
import gc
import time
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from chatcore import HandshakeRequest, MessageStream, PeerGone, serve_connection
from chatcore._serve import GC_THRESHOLDS

ROOM = "bench"
#: Frames sent in the current round (all connections).
frames = [0]
JOIN = '{"type": "join", "room": "bench"}'
PUBLISH = '{"type": "publish", "room": "bench", "data": "xxxxxxxxxxxxxxxx"}'


class NullStream(MessageStream):
    """A client whose frames are all there at once and whose received frames are counted."""

    def __init__(
        self, script: list[str], lines: int, done: Callable[[], None], direct: bool
    ) -> None:
        self.request = HandshakeRequest("/ws")
        self.direct_send = direct
        self._script = collections.deque(script)
        self._wanted = lines  # JSON lines (replies and messages) until this client is done
        self._done = done
        self._gone = trio.Event()

    def __repr__(self) -> str:
        return f"<NullStream {self._wanted} lines to go>"

    async def accept(
        self, *, subprotocol: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._answer()
        await trio.lowlevel.checkpoint()

    async def reject(
        self, status: int, *, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        raise AssertionError(f"handshake refused with {status}: {body!r}")

    async def receive(self) -> str | bytes:
        if self._script:
            await trio.lowlevel.checkpoint()
            return self._script.popleft()
        await self._gone.wait()
        raise PeerGone()

    def _count(self, text: str) -> None:
        frames[0] += 1
        self._wanted -= text.count("\n") + 1
        if self._wanted == 0:
            self._done()

    async def send(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        self._count(text)

    def send_nowait(self, text: str) -> bool:
        self._count(text)
        return True

    async def close(self, code: int, reason: str = "") -> None:
        self._gone.set()
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        self._gone.set()
        await trio.lowlevel.checkpoint()


class _Countdown:
    """An event set once :meth:`one_done` was called ``count`` times."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.event = trio.Event()

    def one_done(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.event.set()


def run_round(
    members: int, messages: int, *, direct: bool, metrics: bool, timeout: float = 120.0
) -> dict[str, Any]:
    """One round in a fresh ``trio.run``: the CPU seconds of its publish phase and more.

    Returns:
        ``cpu``: CPU seconds of the publish phase; ``deliveries``; ``frames``
        sent in that phase; ``observed_publishes``: client publishes the
        metrics counted (0 with metrics off).

    Args:
        members: Members that only read (the publisher is one more).
        messages: Messages the publisher sends.
        direct: The lean engine's direct writes instead of writer tasks.
        metrics: Count Prometheus metrics (``chatcore.metrics.ConnectionMetrics``)
            as ``chatcore serve`` does with metrics on.
        timeout: Seconds the round may take in all.

    Raises:
        trio.TooSlowError: not every member got every message in time.
    """
    import chatcore_app

    async def main() -> dict[str, Any]:
        observed = None
        if metrics:
            from chatcore.metrics import ConnectionMetrics

            observed = ConnectionMetrics()
            observed.start_lag_probe()
        hub = chatcore_app.make_hub()
        thresholds = gc.get_threshold()
        try:
            with trio.fail_after(timeout):
                async with trio.open_nursery() as nursery:
                    joined = _Countdown(members)
                    received = _Countdown(members + 1)
                    readers = []
                    for _ in range(members):
                        stream = NullStream([JOIN], 2, joined.one_done, direct)  # hello, reply
                        readers.append(stream)
                        nursery.start_soon(serve_connection, stream, hub)
                    await joined.event.wait()
                    for stream in readers:  # now wait for the messages
                        stream._wanted, stream._done = messages, received.one_done
                    publisher = NullStream(
                        [JOIN] + [PUBLISH] * messages,
                        2 + 2 * messages,  # hello, join reply, an ack and a message each
                        received.one_done,
                        direct,
                    )
                    frames[0] = 0
                    # As `chatcore serve` runs: what exists now is out of the
                    # collector's view, thresholds raised. The same collections
                    # then run whatever the set-up (and metrics' imports) left.
                    gc.collect()
                    gc.freeze()
                    gc.set_threshold(*GC_THRESHOLDS)
                    began = time.process_time()
                    nursery.start_soon(serve_connection, publisher, hub)
                    await received.event.wait()
                    spent = time.process_time() - began
                    nursery.cancel_scope.cancel()
        finally:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
            if observed is not None:
                observed.close()
        return {
            "cpu": spent,
            "deliveries": (members + 1) * messages,
            "frames": frames[0],
            "observed_publishes": sum(observed.publish.counts) if observed is not None else 0,
        }

    # The same schedule every round: virtual time (no deadline expires while
    # the round runs, so the pacer flushes exactly when the process runs out
    # of work) and trio's scheduling shuffle seeded alike.
    trio._core._run._r.seed(0)
    return trio.run(main, clock=trio.testing.MockClock())


def main() -> int:
    """One round from the command line; its result as a line of JSON (for valgrind runs)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="one in-process fan-out round")
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--path", choices=("task", "direct"), default="task")
    parser.add_argument("--metrics", choices=("on", "off"), default="off")
    args = parser.parse_args()
    result = run_round(
        args.members, args.messages, direct=args.path == "direct", metrics=args.metrics == "on"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
