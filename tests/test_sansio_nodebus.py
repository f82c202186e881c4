"""Node events: every event survives its byte format; malformed bytes are refused."""

from __future__ import annotations

from typing import Any

import pytest

from chatcore.sansio import (
    Delivery,
    NodeEvent,
    PresenceJoin,
    PresenceLeave,
    PresenceStateBegin,
    PresenceStateEnd,
    PresenceSync,
    RoomBroadcast,
    UserDisconnect,
    UserMessage,
    decode_node_event,
    encode,
    encode_node_event,
)

MESSAGE = encode({"type": "note", "text": "h\u00e9"}, delivery=Delivery.EPHEMERAL, key="k")

EVENTS: list[NodeEvent] = [
    UserMessage("n1", "alice", encode({"type": "dm"})),
    UserMessage("n1", "alice", MESSAGE),
    UserDisconnect("n1", "alice", 4002, "kicked\nout"),
    RoomBroadcast("n1", "r", MESSAGE, "c7"),
    RoomBroadcast("n1", "r", MESSAGE, None),
    PresenceJoin("n1", "r", "alice", "c1", 12.5, {"device": "phone"}),
    PresenceJoin("n1", "r", "alice", "c1", 3, {}),
    PresenceLeave("n1", "r", "c1"),
    PresenceSync("n1"),
    PresenceStateBegin("n1"),
    PresenceStateEnd("n1"),
]


@pytest.mark.parametrize("event", EVENTS, ids=[type(e).__name__ for e in EVENTS])
def test_round_trip(event: NodeEvent) -> None:
    assert decode_node_event(encode_node_event(event), room="r") == event


def test_the_byte_format() -> None:
    assert encode_node_event(UserDisconnect("n1", "bob", 4002, "bye")) == b'd["n1","bob",4002]\nbye'
    assert encode_node_event(PresenceSync("n1")) == b'p["n1"]\n{"op":"sync"}'
    assert encode_node_event(RoomBroadcast("n1", "r", encode({"a": 1}))) == (
        b'b["n1",null,"durable",null,7]\n{"a":1}'
    )


MALFORMED: list[tuple[bytes, str]] = [
    (b"", "not enough values"),
    (b"u", "not enough values"),
    (b"u[]\nx", "bad header"),
    (b"unot json\nx", "Expecting value"),
    (b'u[1,"alice","durable",null,1]\nx', "expected a string"),
    (b'u["n","alice","durable",7,1]\nx', "bad message header"),
    (b'u["n","alice","sometimes",null,1]\nx', "is not a valid Delivery"),
    (b'u["n","alice","durable",null,"1"]\nx', "bad message header"),
    (b'd["n","alice","4002"]\nx', "bad close code"),
    (b'd["n","alice"]\nx', "not enough values"),
    (b'b["n",null,"durable",null,1]\nx', "needs its room"),
    (b'p["n"]\n[1]', "must be an object"),
    (b'p["n"]\n{}', "needs an op"),
    (b'p["n"]\n{"op":"join"}', "joined_at"),
    (
        b'p["n"]\n{"op":"join","room":"r","user":"u","connection_id":"c","joined_at":"x"}',
        "bad joined_at",
    ),
    (
        b'p["n"]\n{"op":"join","room":"r","user":"u","connection_id":"c","joined_at":true}',
        "bad joined_at",
    ),
    (
        b'p["n"]\n{"op":"join","room":"r","user":"u","connection_id":"c","joined_at":1e999}',
        "bad joined_at",
    ),
    (
        b'p["n"]\n{"op":"join","room":"r","user":"u","connection_id":"c","joined_at":1,"data":[1]}',
        "bad presence data",
    ),
    (b'p["n"]\n{"op":"leave","room":"r"}', "connection_id"),
    (b'p["n"]\n{"op":"leave","room":1,"connection_id":"c"}', "expected a string"),
    (b'u["n","alice","durable",null,1]\n\xff', "UnicodeDecodeError"),
]


@pytest.mark.parametrize(("data", "why"), MALFORMED, ids=[repr(d)[:40] for d, _ in MALFORMED])
def test_malformed_bytes_raise_value_error(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode_node_event(data, room=None)


@pytest.mark.parametrize("data", [b'x["n"]\n', b'p["n"]\n{"op":"future"}'])
def test_unknown_kinds_and_ops_decode_to_none(data: bytes) -> None:
    assert decode_node_event(data) is None


def test_presence_data_defaults_to_empty() -> None:
    data: Any = b'p["n"]\n{"op":"join","room":"r","user":"u","connection_id":"c","joined_at":1}'
    assert decode_node_event(data) == PresenceJoin("n", "r", "u", "c", 1.0, {})
