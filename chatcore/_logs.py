"""Logs an operator can trust: escaped, structured, one line per event, bounded.

Theory of operation
-------------------

Rule 1: nothing a client controls reaches a log line unescaped. A client
controls request paths, query strings, headers, close reasons and user names;
any of them may hold a line feed, an escape sequence or a bell. :func:`escape`
writes every character that is not printable (C0 and C1 controls, DEL, line
and paragraph separators, lone surrogates) as a backslash escape, and the
backslash and the double quote too, so a quoted field cannot be closed early.
The formatters add a second line of defence: :class:`TextFormatter` escapes
control characters in every message it formats (whoever logged it), and
:class:`JSONFormatter` writes JSON, whose strings cannot hold a raw control
character at all.

Rule 2: one line per event. The access log (:class:`AccessLog`, hypercorn's
``logger_class`` in ``chatcore serve``) logs each request once, whatever path
through hypercorn it took, and every connection is logged once when it ends
(:class:`CloseLog`), at INFO, with its code, cause, duration and bytes.

Rule 3: a flood cannot flood the log. Close lines pass a token bucket
(:attr:`CloseLog.rate` lines per second, bursts of :attr:`CloseLog.burst`);
the lines it holds back are counted, and the next line that passes is
preceded by one line saying how many were suppressed (INFO, like the lines
it stands for; the count is also a metric).

Every line carries stable fields for machines (``event``, ``connection_id``,
``user``, ``code``, ``cause``, ``duration_ms``, ...), attached to the
:class:`logging.LogRecord` as ``record.chatcore``; :class:`JSONFormatter`
writes them as top-level keys, :class:`TextFormatter` writes the message.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any, cast

from hypercorn.logging import Logger as HypercornLogger

from .sansio import TokenBucket

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.typing import ResponseSummary, WWWScope

    from ._connection import Connection

__all__ = [
    "LOG_FORMATS",
    "AccessLog",
    "CloseLog",
    "JSONFormatter",
    "TextFormatter",
    "configure_logging",
    "escape",
]

access_logger = logging.getLogger("chatcore.access")
close_logger = logging.getLogger("chatcore.connection")

#: The formats :func:`configure_logging` (and ``chatcore serve --log-format``) takes.
LOG_FORMATS = ("text", "json")

# Characters that stay as they are in the fast path of escape().
_QUOTED = {"\\": "\\\\", '"': '\\"'}


def _escape_char(char: str) -> str:
    if char in _QUOTED:
        return _QUOTED[char]
    if char.isprintable():
        return char
    point = ord(char)
    if 0xDC80 <= point <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{point - 0xDC00:02x}"
    if point < 0x100:
        return f"\\x{point:02x}"
    if point < 0x10000:
        return f"\\u{point:04x}"
    return f"\\U{point:08x}"


def escape(text: str | bytes, limit: int = 1024) -> str:
    """``text`` with every character that could forge or garble a log line escaped.

    Non-printable characters (controls, separators, lone surrogates) become
    ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``; ``\\`` and ``"`` are escaped too.
    Bytes are decoded as UTF-8, and a byte that is not UTF-8 is written as
    ``\\xNN``. Printable non-ASCII text (names, emoji) stays readable.

    Args:
        text: What a client sent (or anything else).
        limit: Characters kept; a longer text is cut and ends with ``...``.

    Returns:
        The escaped text, on one line.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    if not (text.isprintable() and "\\" not in text and '"' not in text):
        text = "".join([_escape_char(char) for char in text])
    return text + "..." if cut else text


def _escape_controls(text: str) -> str:
    """Only the non-printable characters escaped (the formatters' safety net)."""
    if text.isprintable():
        return text
    return "".join([char if char.isprintable() else _escape_char(char) for char in text])


class TextFormatter(logging.Formatter):
    """The plain one-line format, with control characters escaped in every message.

    ``2026-12-07 12:00:00,000 INFO chatcore.connection: connection 1a2b closed ...``.
    A traceback, when there is one, follows on its own lines as usual (it is
    not client input).
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Format the record, its message escaped."""
        record.message = _escape_controls(record.message)
        return super().formatMessage(record)


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines.

    Keys: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``event`` (a stable
    name such as ``connection_closed`` or ``http_request``; ``log`` for a
    plain message), ``message``, then the event's own fields (see
    ``docs/observability.md``), ``exception`` with the traceback if any.
    Every string is JSON-escaped, so no value can break the line.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        fields: Mapping[str, Any] = getattr(record, "chatcore", None) or {}
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "event": fields.get("event", "log"),
            "message": record.getMessage(),
        }
        for key, value in fields.items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


def configure_logging(
    level: int | str = "INFO", log_format: str = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log line to ``stream`` in ``log_format``: what ``chatcore serve`` does.

    Adds one stream handler to the root logger, in place of the one an
    earlier call added (other handlers stay).

    Args:
        level: The root level (``"INFO"``, ``logging.DEBUG``, ...).
        log_format: ``"text"`` (:class:`TextFormatter`) or ``"json"``
            (:class:`JSONFormatter`).
        stream: Where to write (default ``sys.stderr``).

    Returns:
        The handler installed.

    Raises:
        ValueError: an unknown ``log_format`` or ``level``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for old in root.handlers[:]:
        if getattr(old, "chatcore_configured", False):
            root.removeHandler(old)
    handler.chatcore_configured = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    return handler


# -- the access log -----------------------------------------------------------------------

# Set in a scope once its request was logged (hypercorn may report a request twice).
_LOGGED = "chatcore.access_logged"


def _header(scope: WWWScope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return b"-"


class AccessLog(HypercornLogger):
    """hypercorn's logger with chatcore's access log: one escaped line per request.

    ``chatcore serve`` sets it as hypercorn's ``logger_class``. The line goes
    to the ``chatcore.access`` logger at INFO::

        127.0.0.1:50412 "GET /x%0a HTTP/1.1" 404 10 0.4ms "-" "curl/8.0"

    The path is the one the client sent (``raw_path``, still percent-encoded),
    escaped like every other client-controlled field. A WebSocket handshake
    is logged once with its answer (101, or the refusal's status). Errors
    still go to ``hypercorn.error``.

    Args:
        config: hypercorn's configuration (as for hypercorn's own logger).
    """

    def __init__(self, config: HypercornConfig) -> None:
        super().__init__(config)
        # hypercorn's own access logger stays unused; ours is always on unless
        # the config turned access logging off.
        self.enabled = config.accesslog is not None
        self.access_logger = None

    def __repr__(self) -> str:
        return f"<AccessLog {'on' if self.enabled else 'off'} -> {access_logger.name}>"

    async def access(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> None:
        """Log one request (hypercorn's hook; a second report of it is ignored).

        hypercorn reports an HTTP request twice: with no response while its
        stream closes, then with the response it sent. The first report is
        skipped; so a request abandoned before any answer is not logged.
        """
        if not self.enabled or response is None or request.get(_LOGGED):
            return
        cast("dict[str, Any]", request)[_LOGGED] = True
        log_request(request, response, request_time)


def log_request(
    scope: WWWScope | Mapping[str, Any], response: ResponseSummary | None, seconds: float
) -> None:
    """Write the access line of one request (see :class:`AccessLog`)."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "-"
    method = scope.get("method", "GET") if scope.get("type") == "http" else "GET"
    raw = scope.get("raw_path") or str(scope.get("path", "")).encode("utf-8", "surrogateescape")
    query = scope.get("query_string") or b""
    target = escape(bytes(raw) + (b"?" + bytes(query) if query else b""))
    protocol = f"HTTP/{scope.get('http_version', '1.1')}"
    if scope.get("type") == "websocket":
        protocol = "WS"
    status: int | None = None
    length = "-"
    if response is not None:
        status = int(response["status"])
        for key, value in response.get("headers", ()):
            if bytes(key).lower() == b"content-length":
                length = escape(bytes(value), 20)
    referer = escape(_header(scope, b"referer"), 256)  # type: ignore[arg-type]
    agent = escape(_header(scope, b"user-agent"), 256)  # type: ignore[arg-type]
    duration_ms = round(seconds * 1000, 1)
    access_logger.info(
        '%s "%s %s %s" %s %s %.1fms "%s" "%s"',
        peer,
        method,
        target,
        protocol,
        "-" if status is None else status,
        length,
        duration_ms,
        referer,
        agent,
        extra={
            "chatcore": {
                "event": "http_request",
                "client": peer,
                "method": escape(str(method), 16),
                "path": target,
                "protocol": protocol,
                "status": status,
                "bytes": None if length == "-" else length,
                "duration_ms": duration_ms,
                "referer": referer,
                "user_agent": agent,
            }
        },
    )


# -- the close log ------------------------------------------------------------------------


# Close codes written as they are in metrics labels; any other is "other" (a
# client may send any code from 1000 to 4999: labels must stay few).
KNOWN_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 4000, 4001, 4002)
)


def _user(connection: Connection) -> str | None:
    identity = connection.identity
    user = getattr(identity, "user", identity)
    return None if user is None else escape(str(user), 128)


class CloseLog:
    """One INFO line per ended connection, rate-limited (see the module docs).

    Args:
        rate: Lines per second in the long run.
        burst: Lines allowed at once.
        clock: Seconds, monotonic (default :func:`time.monotonic`: one
            clock for the whole process, whatever Trio runs it has).
    """

    def __init__(self, rate: float = 20.0, burst: int = 100, clock: Any = None) -> None:
        self._rate = rate
        self._burst = burst
        # Made at the first close (it needs the clock's time).
        self._bucket: TokenBucket | None = None
        self._clock = clock or time.monotonic
        #: Lines held back since the last line that passed.
        self.suppressed = 0
        #: Lines held back since the process started (a metric).
        self.suppressed_total = 0

    def __repr__(self) -> str:
        return f"<CloseLog {self._rate:g}/s burst={self._burst} suppressed={self.suppressed}>"

    @property
    def rate(self) -> float:
        """Lines per second in the long run."""
        return self._rate

    @property
    def burst(self) -> int:
        """Lines allowed at once."""
        return self._burst

    def connection_ended(self, connection: Connection, duration: float) -> None:
        """Log how ``connection`` ended (after its close completed)."""
        record = connection.close_record
        if record is None or not close_logger.isEnabledFor(logging.INFO):
            return
        now = self._clock()
        if self._bucket is None:
            self._bucket = TokenBucket(self._rate, self._burst, now)
        if not self._bucket.take(now):
            self.suppressed += 1
            self.suppressed_total += 1
            return
        if self.suppressed:
            close_logger.info(
                "%d close line(s) suppressed (close log limit: %g/s, bursts of %d)",
                self.suppressed,
                self.rate,
                self.burst,
                extra={"chatcore": {"event": "close_log_suppressed", "count": self.suppressed}},
            )
            self.suppressed = 0
        stats = connection.statistics()
        client = connection.request.client
        fields: dict[str, Any] = {
            "connection_id": connection.id,
            "user": _user(connection),
            "client": f"{client[0]}:{client[1]}" if client else None,
            "code": record.code,
            "cause": record.cause.value,
            "reason": escape(record.reason, 128),
            "duration_ms": round(duration * 1000),
            "messages_received": stats.messages_received,
            "frames_sent": stats.frames_sent,
            "bytes_sent": stats.bytes_sent,
        }
        if record.http_status is not None:
            fields["event"] = "handshake_rejected"
            fields["status"] = record.http_status
            close_logger.info(
                'connection %s refused: status=%d reason="%s" client=%s duration_ms=%d',
                connection.id,
                record.http_status,
                fields["reason"],
                fields["client"],
                fields["duration_ms"],
                extra={"chatcore": fields},
            )
            return
        fields["event"] = "connection_closed"
        close_logger.log(
            logging.WARNING if record.code == 1011 else logging.INFO,
            'connection %s closed: code=%d cause=%s reason="%s" user=%s client=%s '
            "duration_ms=%d messages_received=%d frames_sent=%d bytes_sent=%d",
            connection.id,
            record.code,
            fields["cause"],
            fields["reason"],
            fields["user"],
            fields["client"],
            fields["duration_ms"],
            stats.messages_received,
            stats.frames_sent,
            stats.bytes_sent,
            extra={"chatcore": fields},
        )
