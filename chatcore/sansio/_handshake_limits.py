"""Bounds on the opening handshake, and the HTTP answer to a request that breaks them.

Rules
-----

Rule 1: **a head is judged while it arrives.** :class:`RequestHeadScanner` is
fed the raw bytes as they come and refuses as soon as a line, the header count
or the whole head passes its bound, so a client cannot make the server buffer
more than :attr:`HandshakeLimits.max_head_bytes` of it. Where a server parses
the head itself (an ASGI server), :func:`check_request_head` applies the same
bounds to the parsed request.

Rule 2: **each kind of excess has its status**, as HTTP defines them and
as the ``websockets`` library answers them: a request line that is too long
gets ``414 URI Too Long``; too many header lines, one that is too long, or a
head that is too large gets ``431 Request Header Fields Too Large``.

Rule 3: **exactly one key.** A WebSocket request carries exactly one
``Sec-WebSocket-Key``, the base64 encoding of 16 bytes (RFC 6455, section
4.2.1); anything else gets ``400 Bad Request`` (:func:`check_websocket_key`).

Every refusal is a :class:`~chatcore.Reject` whose body says which bound was
passed, so a client developer can tell what to fix.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

import attrs

from ._handshake import Reject

__all__ = [
    "HandshakeLimits",
    "RequestHeadScanner",
    "check_request_head",
    "check_websocket_key",
]

# "GET " + target + " HTTP/1.1": what a parsed request's target adds up to on
# the wire (a WebSocket handshake is always a GET).
_REQUEST_LINE_OVERHEAD = len(b"GET ") + len(b" HTTP/1.1")
# ": " between a header's name and value, and each line's CRLF.
_HEADER_SEPARATOR = 2
_CRLF = 2


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be an int > 0, got {value!r}"
        )


@attrs.frozen
class HandshakeLimits:
    """Bounds on a client's opening handshake (the HTTP request head).

    The defaults are those of common HTTP servers and of the ``websockets``
    library, and they leave room for large cookies.

    Attributes:
        max_request_line_bytes: Longest request line (``GET /ws?token=... HTTP/1.1``,
            without its CRLF); longer gets 414.
        max_header_line_bytes: Longest header line (``name: value``); longer gets 431.
        max_headers: Most header lines; more gets 431.
        max_head_bytes: Largest request head, every line and CRLF included;
            larger gets 431. This is also how much of a head the server buffers
            before deciding (``chatcore serve`` gives it to hypercorn as
            ``h11_max_incomplete_size``; the trio-websocket transport's HTTP
            parser, from wsproto, stops at 16 KiB whatever this says).

    Raises:
        ValueError: a bound is not a positive int.
    """

    max_request_line_bytes: int = attrs.field(default=8_192, validator=_positive)
    max_header_line_bytes: int = attrs.field(default=8_192, validator=_positive)
    max_headers: int = attrs.field(default=128, validator=_positive)
    max_head_bytes: int = attrs.field(default=16_384, validator=_positive)


def _refuse(status: int, text: str) -> Reject:
    return Reject(status, f"{text}\n".encode())


def _request_line_too_long(limits: HandshakeLimits) -> Reject:
    return _refuse(414, f"request line too long (limit {limits.max_request_line_bytes} bytes)")


def _header_line_too_long(limits: HandshakeLimits) -> Reject:
    return _refuse(431, f"header line too long (limit {limits.max_header_line_bytes} bytes)")


def _too_many_headers(limits: HandshakeLimits) -> Reject:
    return _refuse(431, f"too many header lines (limit {limits.max_headers})")


def _head_too_large(limits: HandshakeLimits) -> Reject:
    return _refuse(431, f"request head too large (limit {limits.max_head_bytes} bytes)")


class RequestHeadScanner:
    """Checks a request head against :class:`HandshakeLimits` as its bytes arrive (Rule 1).

    Feed it everything the client sends until :attr:`complete` (the blank line
    that ends the head was seen; bytes after it are not looked at) or until
    :meth:`feed` returns a refusal. Lines end with LF, with or without CR
    before it (as the HTTP parsers chatcore runs on accept both).

    Args:
        limits: The bounds to apply.
    """

    def __init__(self, limits: HandshakeLimits) -> None:
        #: The bounds applied.
        self.limits = limits
        #: True once the blank line that ends the head arrived.
        self.complete = False
        #: The refusal, once a bound was passed (then nothing more is read).
        self.refusal: Reject | None = None
        # Bytes of the head so far.
        self._total = 0
        # Bytes of the line in progress (a trailing CR included).
        self._line = 0
        # The line in progress ends with CR (it arrived at the end of a chunk).
        self._line_ends_with_cr = False
        # Non-empty lines seen: the request line, then headers.
        self._lines = 0

    def __repr__(self) -> str:
        state = "refused" if self.refusal else "complete" if self.complete else "reading"
        return f"<RequestHeadScanner {state} bytes={self._total} lines={self._lines}>"

    def feed(self, data: bytes | bytearray | memoryview) -> Reject | None:
        """Take the next bytes from the client.

        Returns:
            The refusal (also kept in :attr:`refusal`) if a bound was passed,
            else ``None``. Once complete or refused, further data is ignored.
        """
        if self.complete or self.refusal is not None:
            return self.refusal
        data = bytes(data)
        start = 0
        while not self.complete:
            newline = data.find(b"\n", start)
            if newline < 0:
                tail = len(data) - start
                self._total += tail
                if tail:
                    self._line += tail
                    self._line_ends_with_cr = data[-1] == 0x0D
                # A CR at the end may be the start of the line's CRLF.
                return self._check(self._line - self._line_ends_with_cr, partial=True)
            segment = newline - start
            self._total += segment + 1
            length = self._line + segment
            ends_with_cr = data[newline - 1] == 0x0D if segment else self._line_ends_with_cr
            if ends_with_cr:
                length -= 1
            self._line = 0
            self._line_ends_with_cr = False
            start = newline + 1
            if length == 0:
                # A blank line ends the head (before the request line, it is
                # the stray CRLF that RFC 9112 lets servers skip).
                self.complete = self._lines > 0
                continue
            self._lines += 1
            refusal = self._check(length, partial=False)
            if refusal is not None:
                return refusal
        return None

    def _check(self, length: int, *, partial: bool) -> Reject | None:
        limits = self.limits
        # The line in progress counts as a header once the request line is done.
        is_request_line = self._lines == (1 if not partial else 0)
        refusal: Reject | None = None
        if is_request_line and length > limits.max_request_line_bytes:
            refusal = _request_line_too_long(limits)
        elif not is_request_line and length > limits.max_header_line_bytes:
            refusal = _header_line_too_long(limits)
        elif self._lines - 1 > limits.max_headers:
            refusal = _too_many_headers(limits)
        elif self._total > limits.max_head_bytes:
            refusal = _head_too_large(limits)
        self.refusal = refusal
        return refusal


def check_request_head(
    target: bytes, headers: Iterable[tuple[bytes, bytes]], limits: HandshakeLimits
) -> Reject | None:
    """Apply :class:`HandshakeLimits` to a request head an HTTP server already parsed.

    The lengths are those of the head on the wire, rebuilt from its parts
    (``GET target HTTP/1.1``, ``name: value`` lines, CRLFs).

    Args:
        target: The request target as sent (path and query, still encoded).
        headers: The header ``(name, value)`` pairs.
        limits: The bounds to apply.

    Returns:
        The refusal (414 or 431, see the module docs), or ``None`` if the head
        is within every bound.
    """
    request_line = _REQUEST_LINE_OVERHEAD + len(target)
    if request_line > limits.max_request_line_bytes:
        return _request_line_too_long(limits)
    total = request_line + _CRLF + _CRLF
    for count, (name, value) in enumerate(headers, start=1):
        line = len(name) + _HEADER_SEPARATOR + len(value)
        if line > limits.max_header_line_bytes:
            return _header_line_too_long(limits)
        if count > limits.max_headers:
            return _too_many_headers(limits)
        total += line + _CRLF
    if total > limits.max_head_bytes:
        return _head_too_large(limits)
    return None


def check_websocket_key(headers: Iterable[tuple[str, str]]) -> Reject | None:
    """Rule 3: exactly one ``Sec-WebSocket-Key``, the base64 encoding of 16 bytes.

    Args:
        headers: The request's header ``(name, value)`` pairs (names in any case).

    Returns:
        A 400 refusal saying what is wrong, or ``None`` if the key is valid.
    """
    keys = [value for name, value in headers if name.lower() == "sec-websocket-key"]
    if not keys:
        return _refuse(400, "missing Sec-WebSocket-Key header")
    if len(keys) > 1:
        return _refuse(400, "more than one Sec-WebSocket-Key header")
    try:
        decoded = base64.b64decode(keys[0].strip().encode("latin-1"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        decoded = b""
    if len(decoded) != 16:
        return _refuse(400, "Sec-WebSocket-Key is not the base64 encoding of 16 bytes")
    return None
