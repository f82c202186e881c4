"""The handshake request and the authenticate hook's answers (plain synchronous tests)."""

from __future__ import annotations

import attrs
import pytest

from chatcore.sansio import Accept, HandshakeRequest, Reject


def request(*headers: tuple[str, str], query: str = "") -> HandshakeRequest:
    return HandshakeRequest("/ws", query, headers)


# -- headers -------------------------------------------------------------------------


def test_defaults() -> None:
    r = HandshakeRequest("/ws")
    assert (r.path, r.query_string, r.headers, r.client, r.subprotocols, r.scheme) == (
        "/ws",
        "",
        (),
        None,
        (),
        "ws",
    )
    assert r.origin is None
    assert r.host is None
    assert r.query == {}
    assert r.cookies == {}


@pytest.mark.parametrize("name", ["origin", "Origin", "ORIGIN", "oRiGiN"])
def test_header_lookup_is_case_insensitive(name: str) -> None:
    r = request(("origin", "https://chat.example"))
    assert r.header(name) == "https://chat.example"


def test_header_names_are_stored_lowercase() -> None:
    # A transport or a test may pass names as they came on the wire.
    r = request(("Origin", "https://a.example"), ("HOST", "a.example:8000"))
    assert r.headers == (("origin", "https://a.example"), ("host", "a.example:8000"))
    assert r.origin == "https://a.example"
    assert r.host == "a.example:8000"
    assert r == request(("origin", "https://a.example"), ("host", "a.example:8000"))


def test_headers_may_be_any_iterable_of_pairs() -> None:
    r = HandshakeRequest("/", headers=[("X-A", "1")])
    assert r.headers == (("x-a", "1"),)
    hash(r)  # still hashable: the list became a tuple


def test_first_header_value_wins() -> None:
    r = request(("x-token", "first"), ("X-Token", "second"), ("x-token", "third"))
    assert r.header("x-token") == "first"


def test_missing_header_gives_the_default() -> None:
    r = request(("a", "1"))
    assert r.header("b") is None
    assert r.header("b", "fallback") == "fallback"
    assert r.header("a", "fallback") == "1"


def test_empty_header_value_is_kept() -> None:
    assert request(("origin", "")).origin == ""


def test_origin_and_host() -> None:
    r = request(("host", "127.0.0.1:8000"), ("origin", "http://127.0.0.1:8000"))
    assert r.origin == "http://127.0.0.1:8000"
    assert r.host == "127.0.0.1:8000"


# -- query ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query_string", "expected"),
    [
        ("", {}),
        ("token=abc", {"token": "abc"}),
        ("a=1&a=2&b=3", {"a": "1", "b": "3"}),  # the first value wins
        ("a=&b", {"a": "", "b": ""}),  # blanks are kept
        ("a=&a=2", {"a": ""}),  # ...and a blank first value still wins
        ("name=J%C3%BCrgen+M&x=%2F", {"name": "Jürgen M", "x": "/"}),  # decoded
        ("a=1;b=2", {"a": "1;b=2"}),  # only & separates
    ],
)
def test_query(query_string: str, expected: dict[str, str]) -> None:
    assert request(query=query_string).query == expected


# -- cookies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("session=abc", {"session": "abc"}),
        ("session=abc; theme=dark", {"session": "abc", "theme": "dark"}),
        ('quoted="a b"', {"quoted": "a b"}),
        ("a=b=c", {"a": "b=c"}),
        ("", {}),
    ],
)
def test_cookies(cookie: str, expected: dict[str, str]) -> None:
    assert request(("cookie", cookie)).cookies == expected


@pytest.mark.parametrize(
    "cookie",
    [
        "a=1; b@=2",  # SimpleCookie raises CookieError (illegal name): all or nothing
        "bad key=1",  # the parser gives up silently
        "no equals sign",
        "\x00\x01",
    ],
)
def test_malformed_cookie_header_gives_no_cookies(cookie: str) -> None:
    assert request(("cookie", cookie)).cookies == {}


def test_only_the_first_cookie_header_is_read() -> None:
    r = request(("cookie", "a=1"), ("Cookie", "b=2"))
    assert r.cookies == {"a": "1"}


# -- frozen, with cached properties -------------------------------------------------------


def test_frozen() -> None:
    r = request(query="a=1")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        r.path = "/other"  # type: ignore[misc]


def test_cached_properties_work_on_the_frozen_class() -> None:
    r = request(("cookie", "a=1"), query="q=1")
    first_query, first_cookies = r.query, r.cookies
    assert first_query == {"q": "1"}
    assert first_cookies == {"a": "1"}
    # Computed once, then the same object on every access.
    assert r.query is first_query
    assert r.cookies is first_cookies


def test_cached_values_do_not_leak_into_equality_or_hash() -> None:
    a = request(("cookie", "a=1"), query="q=1")
    b = request(("cookie", "a=1"), query="q=1")
    a.query  # noqa: B018  (fill a's cache only)
    a.cookies  # noqa: B018
    assert a == b
    assert hash(a) == hash(b)
    assert attrs.asdict(a) == attrs.asdict(b)
    assert "query" not in attrs.asdict(a)


# -- the authenticate hook's answers ----------------------------------------------------------


def test_accept_defaults() -> None:
    assert Accept() == Accept(identity=None, subprotocol=None, headers=())


@pytest.mark.parametrize("status", [400, 401, 403, 429, 500, 503, 599])
def test_reject_accepts_client_and_server_error_statuses(status: int) -> None:
    r = Reject(status, b"why", (("retry-after", "5"),))
    assert (r.status, r.body, r.headers) == (status, b"why", (("retry-after", "5"),))


@pytest.mark.parametrize("status", [0, 101, 200, 302, 399, 600, 1008])
def test_reject_refuses_non_error_statuses(status: int) -> None:
    with pytest.raises(ValueError, match="'status' must be"):
        Reject(status)


def test_reject_needs_a_status() -> None:
    with pytest.raises(TypeError, match="status"):
        Reject()  # type: ignore[call-arg]
