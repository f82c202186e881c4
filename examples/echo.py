"""The smallest chatcore server: every message is broadcast to every client.

Run it with::

    chatcore serve examples.echo:handler

then connect with any WebSocket client to ``ws://127.0.0.1:8000/ws`` and send
text. Each message reaches every connected client as
``{"type":"message","from":"<connection id>","data":"<text>"}``.
"""

from __future__ import annotations

from chatcore import Connection, ConnectionHandler, PushResult, encode


class Broadcast(ConnectionHandler):
    """Broadcasts every text message to all open connections."""

    def __init__(self) -> None:
        #: Open connections (added and removed by each connection's own task).
        self.connections: set[Connection] = set()

    async def handle(self, connection: Connection) -> None:
        """Register the connection, then fan out everything it sends."""
        self.connections.add(connection)
        connection.send_nowait({"type": "hello", "connection_id": connection.id})
        async for text in connection:
            # Encode once, offer the same bytes to everyone: never waits on a client.
            message = encode({"type": "message", "from": connection.id, "data": text})
            for member in tuple(self.connections):
                if member.offer(message) is PushResult.OVERFLOW:
                    pass  # that member is being closed as a slow consumer (4001)

    def connection_closed(self, connection: Connection) -> None:
        """Remove the connection, however it ended."""
        self.connections.discard(connection)


#: The object ``chatcore serve examples.echo:handler`` serves.
handler = Broadcast()
