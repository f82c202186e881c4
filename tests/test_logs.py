"""Logs an operator can trust: escaping, JSON lines, one close line per connection, rate limit.

The unit tests run in memory on virtual time; the last tests start a real
``chatcore serve`` and attack its access log with a raw socket.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import Connect, RecordingHandler, read_all

from chatcore import Accept, Reject, _observe
from chatcore._logs import (
    CloseLog,
    JSONFormatter,
    TextFormatter,
    configure_logging,
    escape,
)
from tests.test_serve_cli import chatcore_serve

# -- escaping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ("plain text", "plain text"),
        ("a\nb", "a\\x0ab"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x1b[31mred\x07", "\\x1b[31mred\\x07"),
        ("del\x7f", "del\\x7f"),
        ("c1\x85", "c1\\x85"),
        ("line\u2028sep", "line\\u2028sep"),
        ('say "hi" \\ bye', 'say \\"hi\\" \\\\ bye'),
        ("caf\u00e9 \U0001f600", "caf\u00e9 \U0001f600"),  # printable text stays readable
        (b"ok \xff\xfe", "ok \\xff\\xfe"),  # bytes that are not UTF-8
        (b"\xe2\x82\xac", "\u20ac"),
    ],
)
def test_escape_writes_every_unprintable_character_as_an_escape(
    raw: str | bytes, logged: str
) -> None:
    assert escape(raw) == logged
    assert "\n" not in escape(raw)
    assert "\r" not in escape(raw)


def test_escape_cuts_long_text() -> None:
    assert escape("x" * 2000, limit=10) == "x" * 10 + "..."


def _record(message: str, *args: object, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("chatcore.test", logging.INFO, __file__, 1, message, args, None)
    if fields:
        record.chatcore = fields
    return record


def test_text_formatter_escapes_control_characters_in_any_message() -> None:
    line = TextFormatter().format(_record("client said %s", "hi\n2026-01-01 CRITICAL forged"))
    assert "\n" not in line
    assert line.endswith("chatcore.test: client said hi\\x0a2026-01-01 CRITICAL forged")


def test_json_formatter_writes_one_parseable_line_with_the_fields() -> None:
    record = _record(
        "connection %s closed", "c1", event="connection_closed", code=1008, user="al\x1bice"
    )
    line = JSONFormatter().format(record)
    assert "\n" not in line
    assert "\x1b" not in line
    data = json.loads(line)
    assert data["event"] == "connection_closed"
    assert data["code"] == 1008
    assert data["user"] == "al\x1bice"  # escaped by JSON, exact once parsed
    assert data["message"] == "connection c1 closed"
    assert data["level"] == "INFO"
    assert data["logger"] == "chatcore.test"


def test_json_formatter_keeps_the_traceback_inside_the_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), exc_info=__import__("sys").exc_info()
        )
    data = json.loads(JSONFormatter().format(record))
    assert data["event"] == "log"
    assert "ValueError: bad\nthing" in data["exception"]


def test_configure_logging_installs_one_handler_and_checks_its_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        out = io.StringIO()
        configure_logging("INFO", "json", stream=out)
        configure_logging("INFO", "json", stream=out)  # again: still one handler of ours
        assert [h for h in root.handlers if isinstance(h.formatter, JSONFormatter)] == [
            root.handlers[-1]
        ]
        logging.getLogger("chatcore.test").info("hello %s", "\x07")
        assert json.loads(out.getvalue())["message"] == "hello \x07"
        with pytest.raises(ValueError, match="log format"):
            configure_logging("INFO", "xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# -- the close log ----------------------------------------------------------------------


@pytest.fixture
def close_log() -> Iterator[CloseLog]:
    """A fresh close log on the test's (virtual) clock, in place of the process's."""
    fresh = CloseLog(clock=trio.current_time)
    saved, _observe.close_log = _observe.close_log, fresh
    yield fresh
    _observe.close_log = saved


def _close_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "chatcore.connection"]


async def test_every_close_is_logged_once_at_info_with_code_cause_duration_and_bytes(
    connect: Connect,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    close_log: CloseLog,
) -> None:
    caplog.set_level(logging.INFO, "chatcore.connection")
    connection, client = await connect(RecordingHandler(), connection_id="c0ffee")
    connection.send_nowait({"type": "x"})
    await trio.sleep(2.5)
    await client.send("x" * 2_000_000)  # over max_message_bytes: 1009
    await read_all(client)
    await connection.wait_closed()
    lines = [r for r in _close_lines(caplog) if r.levelno >= logging.INFO]
    assert len(lines) == 1
    fields = lines[0].chatcore  # type: ignore[attr-defined]
    assert fields["event"] == "connection_closed"
    assert fields["connection_id"] == "c0ffee"
    assert (fields["code"], fields["cause"]) == (1009, "protocol")
    assert fields["user"] == "anon"
    assert 2500 <= fields["duration_ms"] < 3000
    assert fields["frames_sent"] == 1
    assert fields["bytes_sent"] == len('{"type":"x"}')
    assert lines[0].levelno == logging.INFO
    assert "code=1009 cause=protocol" in lines[0].getMessage()


async def test_a_refused_handshake_is_logged_once_with_its_status(
    connect: Connect,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    close_log: CloseLog,
) -> None:
    caplog.set_level(logging.INFO, "chatcore.connection")

    async def refuse(request: object) -> Accept | Reject:
        await trio.lowlevel.checkpoint()
        return Reject(429, b"slow down\n\x1b[2J")

    served = await connect(RecordingHandler(authenticate=refuse), accepted=False)
    await served.finished.wait()
    (line,) = _close_lines(caplog)
    assert line.chatcore["event"] == "handshake_rejected"  # type: ignore[attr-defined]
    assert line.chatcore["status"] == 429  # type: ignore[attr-defined]
    assert "\x1b" not in line.getMessage()
    assert "\\x1b[2J" in line.getMessage()


async def test_a_flood_of_closes_is_rate_limited_with_a_summary_line(
    connect: Connect, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "chatcore.connection")
    limited = CloseLog(rate=5.0, burst=10, clock=trio.current_time)
    saved, _observe.close_log = _observe.close_log, limited
    try:
        for _ in range(25):  # 25 closes at the same (virtual) instant
            connection, client = await connect(RecordingHandler())
            await client.close(1000)
            await connection.wait_closed()
        assert len(_close_lines(caplog)) == 10
        assert limited.suppressed == 15
        await trio.sleep(1.0)  # 5 tokens back
        connection, client = await connect(RecordingHandler())
        await client.close(1000)
        await connection.wait_closed()
    finally:
        _observe.close_log = saved
    summary, last = _close_lines(caplog)[-2:]
    assert summary.levelno == logging.INFO
    assert summary.chatcore == {"event": "close_log_suppressed", "count": 15}  # type: ignore[attr-defined]
    assert last.chatcore["event"] == "connection_closed"  # type: ignore[attr-defined]
    assert limited.suppressed == 0
    assert limited.suppressed_total == 15


# -- against a real chatcore serve ---------------------------------------------------------

FORGED = "2026-12-07 12:00:00,000 CRITICAL chatcore.serve: forged"


async def _raw_request(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


def _access_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "chatcore.access" in line]


async def _wait_for(server: object, pattern: str, count: int = 1) -> str:
    with trio.fail_after(10):
        while len(re.findall(pattern, out := server.output())) < count:  # type: ignore[attr-defined]
            await trio.sleep(0.05)
    return out


@pytest.mark.slow
async def test_the_access_log_cannot_be_forged_and_logs_each_request_once(
    tmp_path: Path,
) -> None:
    async with chatcore_serve("tests._serve_targets:hub", tmp_path=tmp_path) as server:
        path = "/x%0a" + FORGED.replace(" ", "%20")
        answer = await _raw_request(
            server.port,
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            + b'User-Agent: evil\x1b[31m\x07\r\nReferer: a"b\r\n\r\n',
        )
        assert answer.startswith(b"HTTP/1.1 404")
        await _raw_request(
            server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        await _raw_request(
            server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        output = await _wait_for(server, "chatcore.access", 3)
    assert "CRITICAL" not in "".join(
        line for line in output.splitlines() if line.startswith("2026-12-07 12:00")
    )
    assert not any(line.startswith("2026-12-07 12:00:00,000") for line in output.splitlines())
    lines = _access_lines(output)
    assert len(lines) == 3, lines  # one line per request, none with status "-"
    forged = lines[0]
    assert '"GET /x%0a2026-12-07%2012:00:00,000%20CRITICAL' in forged
    assert '" 404 ' in forged
    assert '"evil\\x1b[31m\\x07"' in forged
    assert '"a\\"b"' in forged
    assert "\x1b" not in output
    assert "\x07" not in output
    assert '"GET /healthz HTTP/1.1" 200 ' in lines[1]
    assert '"HEAD /healthz HTTP/1.1" 200 ' in lines[2]


@pytest.mark.slow
async def test_json_logs_of_a_real_server_parse_and_show_abuse_closes(tmp_path: Path) -> None:
    from chatcore.testing import open_test_client

    async with chatcore_serve(
        "tests._serve_targets:hub", "--log-format", "json", tmp_path=tmp_path
    ) as server:
        url = f"ws://127.0.0.1:{server.port}/ws"
        async with open_test_client(url, timeout=10) as client:
            await client.join("r")
            await client.send_text("x" * 70_000)  # over the 64 KiB limit
            await client.expect_closed(1009)
        await _raw_request(
            server.port,
            b"GET /nope%0aX HTTP/1.1\r\nHost: x\r\nUser-Agent: \x1b]0;pwn\x07\r\n"
            b"Connection: close\r\n\r\n",
        )
        output = await _wait_for(server, '"event":"connection_closed"')
        output = await _wait_for(server, '"event":"http_request"', 2)
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert all(
        "\x1b" not in json.dumps(r, ensure_ascii=False)
        for r in records
        if r["event"] == "http_request"
    )
    requests = [r for r in records if r["event"] == "http_request"]
    assert [r["status"] for r in requests] == [101, 404]
    assert requests[1]["path"] == "/nope%0aX"
    assert requests[1]["user_agent"] == "\\x1b]0;pwn\\x07"
    (closed,) = [r for r in records if r["event"] == "connection_closed"]
    assert closed["level"] == "INFO"
    assert (closed["code"], closed["cause"]) == (1009, "protocol")
    assert closed["duration_ms"] >= 0
    assert closed["bytes_sent"] > 0
