"""What a client presents when it opens a WebSocket: the handshake request."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import cached_property
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs

import attrs

__all__ = ["Accept", "HandshakeRequest", "Reject"]


def _lowercase_names(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    # Lookups compare lowercase names; normalising here means a transport (or a
    # test) that passes ``("Origin", ...)`` cannot make the header invisible.
    # Interned: every connection keeps its request, and the names repeat.
    return tuple((sys.intern(name.lower()), value) for name, value in headers)


# ``slots=False``: ``functools.cached_property`` stores into the instance
# ``__dict__``; attrs only emulates that on slotted classes from 23.2 on, and a
# plain ``__dict__`` works with every attrs (frozenness is unaffected: the
# cache bypasses ``__setattr__``).
@attrs.frozen(slots=False)
class HandshakeRequest:
    """The opening handshake of a WebSocket connection, before it is accepted.

    Transports build this from their library's request at the edge; nothing
    past the transport sees a library object or an ASGI dict.

    Attributes:
        path: The request path without the query string (e.g. ``"/ws"``).
        query_string: The raw query string, without ``?``.
        headers: Header ``(name, value)`` pairs in arrival order; names are
            stored lowercase (converted on construction).
        client: The client's ``(host, port)``, or ``None`` if unknown.
        subprotocols: Subprotocols the client offered, in its order.
        scheme: ``"ws"`` or ``"wss"``.
    """

    path: str
    query_string: str = ""
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_lowercase_names)
    client: tuple[str, int] | None = None
    subprotocols: tuple[str, ...] = ()
    scheme: str = "ws"

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    @property
    def origin(self) -> str | None:
        """The ``Origin`` header (browsers always send it), or ``None``."""
        return self.header("origin")

    @property
    def host(self) -> str | None:
        """The ``Host`` header, or ``None``."""
        return self.header("host")

    @cached_property
    def query(self) -> dict[str, str]:
        """The query parameters; for a repeated name, the first value wins."""
        return {k: v[0] for k, v in parse_qs(self.query_string, keep_blank_values=True).items()}

    @cached_property
    def cookies(self) -> dict[str, str]:
        """Cookies from the ``Cookie`` header (an unparseable header gives ``{}``)."""
        raw = self.header("cookie")
        if not raw:
            return {}
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return {}
        return {k: m.value for k, m in jar.items()}


@attrs.frozen
class Accept:
    """An authenticate hook's answer: accept the handshake.

    Attributes:
        identity: Who the client is (a user id, a claims object...); kept on the
            connection as :attr:`Connection.identity`.
        subprotocol: The subprotocol to select, if the client offered one.
        headers: Extra HTTP headers for the handshake response.
    """

    identity: object = None
    subprotocol: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class Reject:
    """An authenticate hook's answer: refuse the handshake with an HTTP response.

    Attributes:
        status: The HTTP status (401 credentials, 403 forbidden/Origin,
            429 too many connections, 503 draining or at capacity).
        body: The response body (shown to non-browser clients and in logs).
        headers: Extra response headers (e.g. ``("retry-after", "5")``).
    """

    status: int = attrs.field(
        validator=attrs.validators.and_(attrs.validators.ge(400), attrs.validators.le(599))
    )
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
