"""Targets for ``chatcore serve`` / ``hypercorn`` in subprocess tests.

Imported by the server process as ``tests._serve_targets:NAME`` (the
repository root is the working directory).
"""

from __future__ import annotations

from chatcore import Config, Connection, ConnectionHandler, Hub, HubConfig
from chatcore.asgi import ASGIApp

#: Publishing is not rate limited: the tests broadcast.
_HUB_CONFIG = HubConfig(publish_rate=1e6, publish_burst=10**6, max_connections_per_user=10**6)

#: A hub with the production connection defaults.
hub = Hub(config=_HUB_CONFIG)

#: The same, as an ASGI application (what ``hypercorn`` CLI users run).
app = ASGIApp(Hub(config=_HUB_CONFIG))

#: A hub whose outboxes are small: a client that stops reading is a slow
#: consumer after 256 KiB queued on top of what the kernel buffers.
small_outbox_hub = Hub(
    config=_HUB_CONFIG,
    connection_config=Config(outbox_max_bytes=262_144, batch_max_bytes=65_536),
)


class Crashy(ConnectionHandler):
    """Echoes; the message ``crash`` raises in the handler."""

    async def handle(self, connection: Connection) -> None:
        async for text in connection:
            if text == "crash":
                raise RuntimeError("handler bug (expected by the test)")
            connection.send_nowait({"type": "echo", "text": text})


crashy = Crashy()

#: Not a chatcore object.
not_a_handler = object()
