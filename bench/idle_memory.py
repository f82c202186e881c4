"""Where an idle connection's memory goes: tracemalloc inside the server process.

``fanout.py --scenarios idle`` measures RSS per connection from outside; this
runs the server in this process instead, opens N joined idle connections from
a client process (``_client.py``), and reports per connection: tasks, objects
by type, RSS, and the Python heap traced by ``tracemalloc``, grouped by the
innermost line of code that is not trio's or the standard library's (the line
that started the task, made the object, or is waiting). Servers
(``--server``):

``chatcore-trio-ws``
    chatcore's Hub on :func:`chatcore.serve_websocket` (as ``_servers.py``).
``trio-websocket-alone``
    trio-websocket's floor: ``wrap_server_stream`` and its reader task per
    connection, which answers the join and is then kept with no task of its
    own waiting on it.

Run (from the repository root)::

    .venv/bin/python bench/idle_memory.py --server chatcore-trio-ws
    .venv/bin/python bench/idle_memory.py --server trio-websocket-alone --connections 2000

RSS is read in a separate run without tracing (``--rss-only``), because
tracemalloc's own records inflate it.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import _harness as h
import _servers
import trio

#: Where an allocation is charged: the innermost frame outside these.
_NOT_OWNERS = ("/trio/", "/outcome/", "<")
_STDLIB = os.path.dirname(os.__file__)


def _short(filename: str) -> str:
    return filename.split("site-packages/")[-1].replace(str(h.BENCH_DIR.parent) + "/", "")


def _owner(traceback: tracemalloc.Traceback) -> str:
    for frame in reversed(list(traceback)):  # innermost first
        name = frame.filename
        if (
            any(part in name for part in _NOT_OWNERS)
            or name.startswith(_STDLIB)
            or name == __file__
        ):
            continue
        return f"{_short(name)}:{frame.lineno}"
    return "(trio's run loop)"


def _tasks() -> int:
    stack = [trio.lowlevel.current_root_task()]
    count = 0
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * h.PAGE_SIZE


async def _start_chatcore(nursery: trio.Nursery) -> int:
    from chatcore_app import make_hub

    from chatcore import Config, serve_websocket

    config = Config(heartbeat_interval=3600.0, heartbeat_timeout=3600.0)
    start = functools.partial(serve_websocket, make_hub(), "127.0.0.1", 0, config=config)
    listeners: list[trio.SocketListener] = await nursery.start(start)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _start_library_alone(nursery: trio.Nursery) -> int:
    import trio_websocket

    kept: list[Any] = []
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]

    async def handshake(stream: trio.SocketStream) -> None:
        request = await trio_websocket.wrap_server_stream(nursery, stream, max_message_size=1 << 20)
        ws = await request.accept()
        await ws.send_message(_servers.HELLO)
        await ws.get_message()  # the join
        await ws.send_message(_servers.REPLY)
        kept.append(ws)  # no task waits on it from here on: only the library's reader

    async def accept() -> None:
        while True:
            nursery.start_soon(handshake, await listener.accept())

    nursery.start_soon(accept)
    port: int = listener.socket.getsockname()[1]
    return port


SERVERS: dict[str, Callable[[trio.Nursery], Awaitable[int]]] = {
    "chatcore-trio-ws": _start_chatcore,
    "trio-websocket-alone": _start_library_alone,
}


def _spawn_clients(port: int, count: int, seconds: float) -> subprocess.Popen[str]:
    argv = [h.PYTHON, str(h.BENCH_DIR / "_client.py"), "--port", str(port)]
    argv += ["--connections", str(count), "--timeout", str(seconds)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


async def _open_clients(port: int, count: int, seconds: float) -> subprocess.Popen[str]:
    """``count`` joined connections from a client process; returns once they are ready."""
    process = _spawn_clients(port, count, seconds)
    assert process.stdout is not None
    try:
        with trio.fail_after(seconds):
            while True:
                line = await trio.to_thread.run_sync(process.stdout.readline)
                if line.startswith("READY"):
                    return process
                if not line:
                    raise RuntimeError("the client process ended before its connections were ready")
    except BaseException:
        _stop(process)
        raise


def _stop(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()  # end of input: the clients close and exit
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"server": args.server, "N": args.connections}
    async with trio.open_nursery() as nursery:
        port = await SERVERS[args.server](nursery)
        warm = await _open_clients(port, 20, args.timeout)  # one-off allocations
        clients = None
        try:
            await trio.sleep(0.5)
            gc.collect()
            if not args.rss_only:
                tracemalloc.start(args.depth)
            tasks0, rss0 = _tasks(), _rss()
            types0 = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            snapshot0 = None if args.rss_only else tracemalloc.take_snapshot()
            clients = await _open_clients(port, args.connections, args.timeout)
            await trio.sleep(1.0)  # the last joins settle
            gc.collect()
            n = args.connections
            result["tasks_per_connection"] = (_tasks() - tasks0) / n
            if args.rss_only:  # tracemalloc's own records would inflate it
                result["rss_kib_per_connection"] = (_rss() - rss0) / 1024 / n
            types = collections.Counter(type(o).__qualname__ for o in gc.get_objects()) - types0
            result["objects_per_connection"] = sum(types.values()) / n
            result["objects_by_type"] = {k: v / n for k, v in types.most_common(25)}
            if snapshot0 is not None:
                stats = tracemalloc.take_snapshot().compare_to(snapshot0, "traceback")
                tracemalloc.stop()
                owners: collections.Counter[str] = collections.Counter()
                for stat in stats:
                    owners[_owner(stat.traceback)] += stat.size_diff
                result["traced_kib_per_connection"] = sum(owners.values()) / 1024 / n
                result["traced_bytes_by_owner"] = {
                    k: round(v / n) for k, v in owners.most_common(args.top)
                }
        finally:
            for process in (clients, warm):
                if process is not None:
                    _stop(process)
            nursery.cancel_scope.cancel()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", choices=sorted(SERVERS), default="chatcore-trio-ws")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--depth", type=int, default=64, help="tracemalloc frames per allocation")
    p.add_argument("--top", type=int, default=30, help="owners listed")
    p.add_argument("--rss-only", action="store_true", help="no tracing: RSS, tasks, objects")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    h.raise_nofile_limit()
    result = trio.run(measure, args)
    print(json.dumps(result, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
