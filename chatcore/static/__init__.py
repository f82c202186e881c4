"""Files chatcore ships for browsers: ``chatcore.js`` and its ``chatcore.d.ts``.

:class:`~chatcore.asgi.ASGIApp` serves ``chatcore.js`` at its
:attr:`~chatcore.asgi.ASGIApp.client_path` (``/chatcore.js`` by default), so
a page of any chatcore app can ``import { ChatClient } from "/chatcore.js"``.
:func:`client_script` returns the file for applications that serve it
themselves (a CDN, a bundler, another web server).
"""

from __future__ import annotations

import functools
from importlib import resources

from ..transports._asgi_stream import ASGIScope, ASGISend

__all__ = ["client_script", "client_types", "serve_client_script"]

_JS = (b"content-type", b"text/javascript; charset=utf-8")


@functools.cache
def client_script() -> bytes:
    """The browser client, ``chatcore.js`` (an ES module), as shipped in the package."""
    return resources.files(__name__).joinpath("chatcore.js").read_bytes()


def client_types() -> bytes:
    """Its TypeScript declarations, ``chatcore.d.ts``."""
    return resources.files(__name__).joinpath("chatcore.d.ts").read_bytes()


async def serve_client_script(scope: ASGIScope, send: ASGISend) -> None:
    """Answer one HTTP request for ``chatcore.js``: the file on GET/HEAD, else 405.

    Args:
        scope: The request's ASGI ``http`` scope.
        send: The ASGI send callable.
    """
    method = scope.get("method", "GET")
    if method in ("GET", "HEAD"):
        body = client_script()
        status, headers = 200, [_JS, (b"cache-control", b"no-cache")]
        length = len(body)
        if method == "HEAD":
            body = b""
    else:
        body = b"method not allowed\n"
        status, length = 405, len(body)
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"allow", b"GET, HEAD")]
    headers.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
