"""Protocol v1 codec: parsing client frames, encoding server messages.

Plain synchronous tests (docs/protocol.md is the contract they pin).
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore.sansio import Delivery, OutboundMessage
from chatcore.sansio._protocol import (
    MAX_NESTING,
    PROTOCOL_VERSION,
    AppMessage,
    BadFrame,
    ErrorCode,
    Join,
    Leave,
    Ping,
    Pong,
    Publish,
    Since,
    encode_error,
    encode_hello,
    encode_message,
    encode_reply,
    encode_reply_error,
    encode_shutdown,
    parse_client_message,
    valid_room,
    valid_user,
)

ROOM_CHARS = string.ascii_letters + string.digits + "_.:-"
USER_CHARS = string.ascii_letters + string.digits + "_.-"


def parse(message: object) -> object:
    """Parse ``message`` encoded as a client would (compact JSON)."""
    return parse_client_message(json.dumps(message))


class Bad:
    """Equal to any :class:`BadFrame` with this ``code`` and ``ref`` (whatever its text)."""

    def __init__(self, code: str, ref: object = None) -> None:
        self.code = code
        self.ref = ref

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BadFrame) and (other.code, other.ref) == (self.code, self.ref)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BadFrame({self.code!r}, ..., ref={self.ref!r})"


# -- client messages: the typed values ------------------------------------------------


def test_join() -> None:
    assert parse({"type": "join", "room": "lobby"}) == Join("lobby")
    assert parse({"type": "join", "room": "lobby", "ref": 1}) == Join("lobby", 1)


def test_join_with_since() -> None:
    message = {"type": "join", "room": "r", "ref": "a", "since": {"epoch": "e1", "offset": 7}}
    assert parse(message) == Join("r", "a", Since("e1", 7))
    zero = {"type": "join", "room": "r", "since": {"epoch": "", "offset": 0}}
    assert parse(zero) == Join("r", None, Since("", 0))


def test_join_since_null_is_no_since() -> None:
    assert parse({"type": "join", "room": "r", "since": None}) == Join("r")


def test_leave() -> None:
    assert parse({"type": "leave", "room": "r"}) == Leave("r")
    assert parse({"type": "leave", "room": "r", "ref": "x"}) == Leave("r", "x")


@pytest.mark.parametrize(
    "data",
    [
        None,
        True,
        False,
        0,
        -5,
        2**70,
        1.5,
        "",
        "hello\nworld",
        [],
        [1, "two", None, [3.25]],
        {},
        {"text": "hi", "nested": {"list": [{"deep": [None, False]}]}},
    ],
    ids=repr,
)
def test_publish_data_of_every_json_kind(data: Any) -> None:
    parsed = parse({"type": "publish", "room": "r", "data": data, "ref": 3})
    assert isinstance(parsed, Publish)
    assert (parsed.room, parsed.ref) == ("r", 3)
    assert parsed.data == data
    assert type(parsed.data) is type(data)


def test_ping() -> None:
    assert parse({"type": "ping"}) == Ping()
    assert parse({"type": "ping", "ref": 9}) == Ping(9)
    assert parse({"type": "ping", "ref": "p"}) == Ping("p")


def test_pong() -> None:
    assert parse({"type": "pong"}) == Pong()
    # A pong is never answered, so its ref is irrelevant (but still checked).
    assert parse({"type": "pong", "ref": 1}) == Pong()


def test_app_message_keeps_fields_and_ref() -> None:
    fields = {"type": "typing", "room": "r", "ref": "t1", "extra": [1, 2]}
    parsed = parse(fields)
    assert parsed == AppMessage("typing", fields, "t1")
    assert parse({"type": "typing"}) == AppMessage("typing", {"type": "typing"}, None)


@pytest.mark.parametrize("kind", ["hello", "reply", "message", "error", "shutdown", "JOIN"])
def test_server_and_case_variant_types_are_app_messages(kind: str) -> None:
    # Only the five built-in names are special; the hub answers the rest
    # with unknown_type unless the application registered a handler.
    assert parse({"type": kind, "room": "r"}) == AppMessage(kind, {"type": kind, "room": "r"})


def test_unknown_extra_fields_are_ignored() -> None:
    extra = {"x": 1, "since_": None, "data": "unused"}
    assert parse({"type": "join", "room": "r", **extra}) == Join("r")
    assert parse({"type": "leave", "room": "r", **extra}) == Leave("r")
    assert parse({"type": "ping", "room": "??", **extra}) == Ping()
    pub = parse({"type": "publish", "room": "r", "data": 1, "extra": {}})
    assert pub == Publish("r", 1)


def test_whitespace_and_key_order_do_not_matter() -> None:
    text = ' \n{ "ref" : 1 ,\t"room":"r", "type" :"join" }\r\n'
    assert parse_client_message(text) == Join("r", 1)


def test_string_and_integer_refs_are_echoed_exactly() -> None:
    for ref in (0, -1, 2**63, "", "with space", "ünï"):
        assert parse({"type": "ping", "ref": ref}) == Ping(ref)


# -- bad frames ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", "not json", "{'type': 'ping'}", '{"type":"ping"} x', '{"type":"ping",}'],
)
def test_not_json_is_bad_json_without_ref(text: str) -> None:
    assert parse_client_message(text) == Bad(ErrorCode.BAD_JSON)


def test_several_messages_in_one_frame_are_bad_json() -> None:
    # JSON Lines batching is server -> client only: a client frame is one object.
    text = '{"type":"ping","ref":1}\n{"type":"ping","ref":2}'
    assert parse_client_message(text) == Bad(ErrorCode.BAD_JSON)


def test_duplicate_keys_last_one_wins() -> None:
    text = '{"type":"join","room":"a","room":"b","ref":1,"ref":2}'
    assert parse_client_message(text) == Join("b", 2)


def test_truncated_frame_loses_its_ref() -> None:
    assert parse_client_message('{"type":"ping","ref":5') == Bad(ErrorCode.BAD_JSON)


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        '{"type":"publish","room":"r","data":NaN}',
        '{"type":"publish","room":"r","data":Infinity,"ref":1}',
        '{"type":"publish","room":"r","data":[-Infinity]}',
        '{"type":"publish","room":"r","data":1e400}',
        '{"type":"publish","room":"r","data":{"x":-1E999}}',
    ],
)
def test_non_finite_numbers_are_bad_json(text: str) -> None:
    # Python's json accepts these, but no server message could carry them back
    # (the encoder refuses NaN/Infinity), so they are refused at the edge.
    assert parse_client_message(text) == Bad(ErrorCode.BAD_JSON)


def test_large_finite_numbers_are_fine() -> None:
    parsed = parse_client_message('{"type":"publish","room":"r","data":[1e308,-2.5e-300,1e-400]}')
    assert parsed == Publish("r", [1e308, -2.5e-300, 0.0])


@pytest.mark.parametrize("value", [[], [{"type": "ping"}], "ping", 1, 2.5, None, True])
def test_non_object_json_is_bad_message_without_ref(value: object) -> None:
    assert parse(value) == Bad(ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"ref": 1},
        {"type": None, "ref": 1},
        {"type": "", "ref": 1},
        {"type": 1, "ref": 1},
        {"type": ["join"], "ref": 1},
        {"type": {"name": "join"}, "ref": 1},
        {"type": True, "ref": 1},
    ],
)
def test_missing_or_invalid_type_keeps_a_valid_ref(message: dict[str, Any]) -> None:
    assert parse(message) == Bad(ErrorCode.BAD_MESSAGE, message.get("ref"))


def test_invalid_type_with_string_ref() -> None:
    assert parse({"type": "", "ref": "r1"}) == Bad(ErrorCode.BAD_MESSAGE, "r1")


def test_invalid_type_with_invalid_ref_has_no_ref() -> None:
    assert parse({"type": 3, "ref": True}) == Bad(ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize("ref", [True, False, 1.0, 1.5, {"id": 1}, [1], None])
@pytest.mark.parametrize(
    "message",
    [
        {"type": "ping"},
        {"type": "join", "room": "r"},
        {"type": "publish", "room": "r", "data": 1},
        {"type": "custom"},
    ],
    ids=lambda m: m["type"],
)
def test_ref_of_wrong_type_is_bad_message_without_ref(ref: object, message: dict[str, Any]) -> None:
    # ``null`` is not a ref either: a ref is a string or an integer.
    assert parse({**message, "ref": ref}) == Bad(ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize("kind", ["join", "leave", "publish"])
@pytest.mark.parametrize(
    "room",
    [
        pytest.param(None, id="missing"),
        "",
        "a" * 65,
        "has space",
        "slash/no",
        "hash#",
        "at@",
        "ünï",
        "tab\t",
        "newline\n",
        "x\u0000",
        "é" * 10,
        7,
        ["r"],
        {"name": "r"},
        True,
    ],
    ids=repr,
)
def test_invalid_room_is_bad_message_with_ref(kind: str, room: object) -> None:
    message: dict[str, Any] = {"type": kind, "ref": "q", "data": 1}
    if room is not None:
        message["room"] = room
    assert parse(message) == Bad(ErrorCode.BAD_MESSAGE, "q")


def test_room_null_is_invalid() -> None:
    assert parse({"type": "join", "room": None, "ref": 2}) == Bad(ErrorCode.BAD_MESSAGE, 2)


@pytest.mark.parametrize(
    "room",
    ["a" * 64, "A", "z", "0", "9", "_", ".", ":", "-", ROOM_CHARS[:64], "team:eng.backend_2-x"],
)
def test_valid_rooms(room: str) -> None:
    assert valid_room(room)
    assert parse({"type": "join", "room": room}) == Join(room)


def test_every_allowed_room_character() -> None:
    for char in ROOM_CHARS:
        assert parse({"type": "leave", "room": char}) == Leave(char), char


@pytest.mark.parametrize(
    "since",
    [
        {},
        {"offset": 1},
        {"epoch": "e"},
        {"epoch": None, "offset": 1},
        {"epoch": 5, "offset": 1},
        {"epoch": "e", "offset": -1},
        {"epoch": "e", "offset": True},
        {"epoch": "e", "offset": False},
        {"epoch": "e", "offset": 1.0},
        {"epoch": "e", "offset": 1.5},
        {"epoch": "e", "offset": "1"},
        {"epoch": "e", "offset": None},
        "e:1",
        5,
        ["e", 1],
        True,
    ],
    ids=repr,
)
def test_malformed_since_is_bad_message_with_ref(since: object) -> None:
    message = {"type": "join", "room": "r", "ref": 4, "since": since}
    assert parse(message) == Bad(ErrorCode.BAD_MESSAGE, 4)


def test_publish_without_data_is_bad_message_with_ref() -> None:
    assert parse({"type": "publish", "room": "r", "ref": 5}) == Bad(ErrorCode.BAD_MESSAGE, 5)
    assert parse({"type": "publish", "room": "r"}) == Bad(ErrorCode.BAD_MESSAGE)


def test_publish_with_null_data_is_fine() -> None:
    assert parse({"type": "publish", "room": "r", "data": None}) == Publish("r", None)


def nested(depth: int) -> Any:
    """A message whose arrays/objects nest ``depth`` levels (the message is level 1)."""
    data: Any = []
    for i in range(depth - 2):
        data = [data] if i % 2 else {"k": data}
    return {"type": "publish", "room": "r", "ref": 1, "data": data}


def test_nesting_up_to_the_limit_is_accepted() -> None:
    message = nested(MAX_NESTING)
    parsed = parse(message)
    assert isinstance(parsed, Publish)
    assert parsed.data == message["data"]
    # ...and it can be fanned out again (the encoder has the headroom).
    encoded = encode_message("r", 1, "e", "u", parsed.data)
    assert json.loads(encoded.text)["data"] == message["data"]


def test_nesting_beyond_the_limit_is_bad_message() -> None:
    # The walk is iterative: a frame just past the limit is measured, not parsed
    # into the recursion limit.
    assert parse(nested(MAX_NESTING + 1)) == Bad(ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize("depth", [2_000, 65_536])
def test_nesting_past_the_recursion_limit_is_bad_message(depth: int) -> None:
    # Python's decoder raises RecursionError (not ValueError) here; a frame must
    # never make the parser raise, or one client could crash its connection (1011).
    for text in ("[" * depth + "]" * depth, "[" * depth, '{"a":' * depth):
        assert parse_client_message(text) == Bad(ErrorCode.BAD_MESSAGE)


def test_many_brackets_in_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"type": "publish", "room": "r", "data": "[{" * 1000})
    assert parse_client_message(text) == Publish("r", "[{" * 1000)


def test_wide_but_shallow_data_is_fine() -> None:
    data: list[list[int]] = [[] for _ in range(5_000)]
    assert parse({"type": "publish", "room": "r", "data": data}) == Publish("r", data)


# -- names -----------------------------------------------------------------------------


def test_valid_user_boundaries() -> None:
    assert valid_user("a")
    assert valid_user("u" * 64)
    assert valid_user(USER_CHARS[:64])
    assert all(valid_user(c) for c in USER_CHARS)
    assert not valid_user("")
    assert not valid_user("u" * 65)
    assert not valid_user("team:alice")  # ':' is for rooms only
    for invalid in ("a b", "a/b", "é", "a\n", "a@b", None, 1, ["a"], b"alice"):
        assert not valid_user(invalid), invalid


def test_valid_room_boundaries() -> None:
    assert valid_room("r")
    assert valid_room("r" * 64)
    assert valid_room("team:alice")
    assert all(valid_room(c) for c in ROOM_CHARS)
    assert not valid_room("")
    assert not valid_room("r" * 65)
    for invalid in ("a b", "a/b", "é", "r\n", "a@b", "a\u00a0", None, 1, ["r"], b"room"):
        assert not valid_room(invalid), invalid


@pytest.mark.parametrize("char", [chr(c) for c in range(0x80) if chr(c) not in ROOM_CHARS])
def test_every_other_ascii_character_is_refused_in_rooms(char: str) -> None:
    assert not valid_room(char)
    assert not valid_room(f"ab{char}cd")
    assert not valid_user(char)


# -- server messages -------------------------------------------------------------------


def decoded(message: OutboundMessage) -> Any:
    """The message's JSON, after checking it is one line of the right size."""
    assert "\n" not in message.text
    assert "\r" not in message.text
    assert message.nbytes == len(message.text.encode())
    return json.loads(message.text)


def test_hello_shape() -> None:
    m = encode_hello("c0ffee", "alice", 25.0, 20.0)
    assert m.text == (
        '{"type":"hello","protocol":1,"connection_id":"c0ffee","user":"alice",'
        '"heartbeat":{"interval_ms":25000,"timeout_ms":20000}}'
    )
    assert decoded(m)["protocol"] == PROTOCOL_VERSION == 1
    assert m.delivery is Delivery.DURABLE


def test_hello_heartbeat_is_whole_milliseconds() -> None:
    hb = decoded(encode_hello("c", "u", 0.0015, 2.5))["heartbeat"]
    assert hb == {"interval_ms": 2, "timeout_ms": 2500}
    assert all(type(v) is int for v in hb.values())


def test_reply_ok_shape() -> None:
    assert decoded(encode_reply(7, {"offset": 3})) == {
        "type": "reply",
        "ref": 7,
        "status": "ok",
        "data": {"offset": 3},
    }
    assert encode_reply("r").text == '{"type":"reply","ref":"r","status":"ok","data":null}'


def test_reply_without_ref_has_null_ref() -> None:
    assert decoded(encode_reply(None)) == {
        "type": "reply",
        "ref": None,
        "status": "ok",
        "data": None,
    }


def test_reply_error_shape() -> None:
    assert encode_reply_error("a", ErrorCode.NOT_JOINED, "join first").text == (
        '{"type":"reply","ref":"a","status":"error",'
        '"error":{"code":"not_joined","message":"join first"}}'
    )
    assert "data" not in decoded(encode_reply_error(1, "x", ""))


def test_error_shape() -> None:
    assert encode_error(ErrorCode.BAD_JSON, "frame is not valid JSON").text == (
        '{"type":"error","code":"bad_json","message":"frame is not valid JSON"}'
    )


def test_message_shape() -> None:
    m = encode_message("lobby", 12, "ab12cd34", "alice", {"text": "hi"})
    assert m.text == (
        '{"type":"message","room":"lobby","offset":12,"epoch":"ab12cd34",'
        '"from":"alice","data":{"text":"hi"}}'
    )
    assert m.delivery is Delivery.DURABLE
    assert m.key is None


def test_server_side_message_has_null_from() -> None:
    assert decoded(encode_message("r", 1, "e", None, 1))["from"] is None


def test_shutdown_shape() -> None:
    m = encode_shutdown(1234)
    assert m.text == '{"type":"shutdown","reconnect_after_ms":1234}'
    assert m.delivery is Delivery.DURABLE


def test_error_codes_are_the_documented_ones() -> None:
    codes = {v for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, str)}
    assert codes == {
        "bad_json",
        "bad_message",
        "unknown_type",
        "not_joined",
        "forbidden",
        "rate_limited",
        "too_many_rooms",
        "internal",
        "unavailable",
        "at_capacity",
        "too_many_new_rooms",
    }
    assert frozenset({"bad_json", "bad_message", "unknown_type"}) == ErrorCode.COUNTED


TRICKY = 'line\nbreak\r\n\u2028\u2029\u0085 tab\t nul\x00 quote" back\\ é 🎉 \ud800'


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            encode_message("r", 1, "e", "u", {TRICKY: [TRICKY]}),
            {
                "type": "message",
                "room": "r",
                "offset": 1,
                "epoch": "e",
                "from": "u",
                "data": {TRICKY: [TRICKY]},
            },
        ),
        (
            encode_reply(TRICKY, TRICKY),
            {"type": "reply", "ref": TRICKY, "status": "ok", "data": TRICKY},
        ),
        (
            encode_reply_error(TRICKY, "internal", TRICKY),
            {
                "type": "reply",
                "ref": TRICKY,
                "status": "error",
                "error": {"code": "internal", "message": TRICKY},
            },
        ),
        (
            encode_error("bad_message", TRICKY),
            {"type": "error", "code": "bad_message", "message": TRICKY},
        ),
        (
            encode_hello(TRICKY, TRICKY, 1, 1),
            {
                "type": "hello",
                "protocol": 1,
                "connection_id": TRICKY,
                "user": TRICKY,
                "heartbeat": {"interval_ms": 1000, "timeout_ms": 1000},
            },
        ),
    ],
    ids=["message", "reply", "reply-error", "error", "hello"],
)
def test_every_server_message_is_one_line(message: OutboundMessage, expected: Any) -> None:
    # Line separators inside strings are escaped, so the JSON Lines framing
    # (split on "\n") can never cut a message, whatever a client sent.
    assert decoded(message) == expected
    for separator in ("\n", "\r", "\u2028", "\u2029", "\u0085"):
        assert separator not in message.text


# -- properties ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
parsed_types = (Join, Leave, Publish, Ping, Pong, AppMessage, BadFrame)


@settings(max_examples=300, deadline=None)
@given(data=json_values, offset=st.integers(min_value=0), sender=st.none() | st.text())
def test_encode_message_round_trips(data: Any, offset: int, sender: str | None) -> None:
    m = encode_message("room:1", offset, "epoch", sender, data)
    assert decoded(m) == {
        "type": "message",
        "room": "room:1",
        "offset": offset,
        "epoch": "epoch",
        "from": sender,
        "data": data,
    }


@settings(max_examples=300, deadline=None)
@given(data=json_values, ref=st.integers() | st.text())
def test_publish_parses_back_what_a_client_encoded(data: Any, ref: int | str) -> None:
    text = json.dumps({"type": "publish", "room": "r", "data": data, "ref": ref})
    assert parse_client_message(text) == Publish("r", data, ref)


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_parse_never_raises_on_any_text(text: str) -> None:
    assert isinstance(parse_client_message(text), parsed_types)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_parse_never_raises_on_any_json_value(value: Any) -> None:
    result = parse_client_message(json.dumps(value))
    assert isinstance(result, parsed_types)
    if not isinstance(value, dict):
        assert result == Bad(ErrorCode.BAD_MESSAGE)


message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["join", "leave", "publish", "ping", "pong", "x", ""]) | json_values},
    optional={
        "ref": st.integers() | st.text() | json_values,
        "room": st.text(alphabet=ROOM_CHARS, max_size=66) | json_values,
        "data": json_values,
        "since": st.fixed_dictionaries(
            {}, optional={"epoch": st.text() | json_values, "offset": st.integers() | json_values}
        )
        | json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(message_like)
def test_parse_never_raises_on_message_like_objects(message: dict[str, Any]) -> None:
    result = parse_client_message(json.dumps(message))
    assert isinstance(result, parsed_types)
    if isinstance(result, BadFrame):
        assert result.code == ErrorCode.BAD_MESSAGE
        # A ref is kept only when it is a usable one, and then it is the client's.
        if result.ref is not None:
            assert result.ref == message["ref"]
            assert type(result.ref) in (int, str)
    else:
        ref = getattr(result, "ref", None)
        if ref is not None:
            assert ref == message["ref"]
