"""The HTTP side of the example: the page and its scripts, as a tiny ASGI app.

Serves a fixed set of files from ``static/`` (no directory walking, so no path
traversal to get wrong); anything else is 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


class Pages:
    """An ASGI app serving ``index.html`` at ``/`` and the other files by name."""

    def __init__(self, directory: Path) -> None:
        #: URL path -> (content type, bytes), read once at start-up.
        self.files: dict[str, tuple[str, bytes]] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix in _TYPES:
                body = path.read_bytes()
                self.files["/" + path.name] = (_TYPES[path.suffix], body)
                if path.name == "index.html":
                    self.files["/"] = (_TYPES[path.suffix], body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one HTTP request (GET/HEAD of a known file, else 404/405)."""
        if scope["type"] != "http":  # pragma: no cover  (ASGIApp only forwards HTTP)
            return
        found = self.files.get(scope["path"])
        if scope["method"] not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain; charset=utf-8", b"method not allowed"
        elif found is None:
            status, ctype, body = 404, "text/plain; charset=utf-8", b"not found"
        else:
            status, (ctype, body) = 200, found
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", ctype.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
