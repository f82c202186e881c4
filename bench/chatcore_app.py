"""The ``chatcore serve`` target of the benchmarks (``chatcore serve chatcore_app:app``).

A :class:`~chatcore.Hub` with its limits raised out of the measurement's way
(one client publishes everything; every bench client is the same anonymous
user), behind :class:`~chatcore.asgi.ASGIApp` with one extra HTTP endpoint
for server-side bursts::

    GET /burst?count=K   publish K messages in one go (K concurrent hub.publish)

Everything else is what ``chatcore serve`` does by default; the benchmarks
pass ``--heartbeat-interval 3600`` (the bench clients answer WebSocket pings,
not the hub's JSON ``ping``). ``chatcore serve --redis-url`` works too: the
hub is built at import, after the command line set ``CHATCORE_REDIS_URL``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import trio

from chatcore import Hub, HubConfig
from chatcore.asgi import ASGIApp

ROOM = "bench"
DATA = "x" * 16


def make_hub() -> Hub:
    """The benchmarks' hub: rate, burst and per-user limits out of the way."""
    return Hub(
        config=HubConfig(
            publish_rate=1e9, publish_burst=1_000_000_000, max_connections_per_user=1_000_000
        )
    )


async def publish_burst(hub: Hub, count: int) -> None:
    """``count`` concurrent ``hub.publish`` calls: they land in one scheduler pass."""
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(hub.publish, ROOM, DATA)


hub = make_hub()


async def control(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app for HTTP requests other than the health check: ``/burst``."""
    status, body = 404, b"not found\n"
    if scope["type"] == "http" and scope["path"] == "/burst":
        count = int(parse_qs(scope["query_string"].decode()).get("count", ["1"])[0])
        await publish_burst(hub, count)
        status, body = 200, f"published {count}\n".encode()
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


app = ASGIApp(hub, http_app=control)
