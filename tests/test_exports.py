"""The public API, pinned: what each public module exports, and that it is documented.

Adding or removing a public name is a decision; this test makes it a visible
one (update the expected set in the same change). Every exported name must be
importable, and documented: a docstring for classes, functions and
submodules, a ``#:`` comment above the assignment for constants and type
aliases (which cannot carry a docstring).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

PACKAGE = Path(importlib.import_module("chatcore").__file__ or "").parent

EXPECTED: dict[str, set[str]] = {
    "chatcore": {
        # the application API
        "Hub",
        "HubConfig",
        "HubStatistics",
        "Identity",
        "Room",
        "RoomStatistics",
        "Session",
        "ErrorReply",
        # connections
        "Config",
        "Connection",
        "ConnectionHandler",
        "ConnectionStatistics",
        "ConnectionState",
        "CloseCause",
        "CloseOutcome",
        "CloseRecord",
        "serve_connection",
        "serve_websocket",
        # the handshake
        "Accept",
        "Reject",
        "HandshakeRequest",
        "HandshakeLimits",
        # messages
        "Delivery",
        "OutboundMessage",
        "PushResult",
        "encode",
        # logs
        "JSONFormatter",
        "configure_logging",
        # serving
        "ServedHandler",
        "HandlerHealth",
        # backplanes and transports
        "Backplane",
        "BackplaneError",
        "BackplaneSink",
        "BackplaneEvent",
        "NodeDown",
        "Reconnected",
        "RoomReset",
        "HistoryConfig",
        "LocalBackplane",
        "Position",
        "Sequenced",
        "MessageStream",
        # exceptions
        "ChatcoreError",
        "ConnectionClosed",
        "HandshakeRejected",
        "LocalProtocolError",
        "OutboxFull",
        "PeerGone",
        "ProtocolError",
        "RemoteProtocolError",
    },
    "chatcore.sansio": {
        # errors
        "ChatcoreError",
        "LocalProtocolError",
        "ProtocolError",
        "RemoteProtocolError",
        # the connection state machine
        "TRANSITIONS",
        "CloseArbiter",
        "CloseCause",
        "CloseOutcome",
        "CloseRecord",
        "ConnectionState",
        "Input",
        "handshake_status_for",
        # the handshake
        "Accept",
        "HandshakeRequest",
        "Reject",
        "HandshakeLimits",
        "RequestHeadScanner",
        "check_request_head",
        "check_websocket_key",
        # the outbox
        "Delivery",
        "OutboundMessage",
        "Outbox",
        "PushResult",
        "QueueTotal",
        "encode",
        # the wire protocol
        "PROTOCOL_VERSION",
        "AppMessage",
        "BadFrame",
        "ClientMessage",
        "ErrorCode",
        "Join",
        "Leave",
        "Ping",
        "Pong",
        "Publish",
        "Ref",
        "Since",
        "encode_error",
        "encode_hello",
        "encode_message",
        "encode_reply",
        "encode_reply_error",
        "encode_shutdown",
        "parse_client_message",
        "valid_room",
        "valid_user",
        # room order: the sequencer and its steps
        "RoomSequencer",
        "SequencerStep",
        "Position",
        "Sequenced",
        "Emit",
        "EpochChanged",
        "Held",
        "Stale",
        # admission
        "Admission",
        # node-to-node events and their byte format
        "NodeEvent",
        "PresenceEvent",
        "PresenceJoin",
        "PresenceLeave",
        "PresenceStateBegin",
        "PresenceStateEnd",
        "PresenceSync",
        "RoomBroadcast",
        "UserDisconnect",
        "UserMessage",
        "decode_node_event",
        "encode_node_event",
        # history, presence, limits
        "History",
        "HistoryEntry",
        "Recovery",
        "RecoveryStatus",
        "PresenceDiff",
        "PresenceMeta",
        "PresenceTable",
        "TokenBucket",
        "WindowCounter",
    },
    "chatcore.testing": {
        # for applications
        "TestClient",
        "RequestFailed",
        "open_test_client",
        "open_test_clients",
        # for backplanes
        "BACKPLANE_CHECKS",
        "BackplaneFactory",
        "BackplaneRecorder",
        "check_backplane",
        # for transports
        "MESSAGE_STREAM_CHECKS",
        "PairFactory",
        "TransportPeer",
        "MemoryPeer",
        "WebSocketPeer",
        "check_message_stream",
        "open_lean_pair",
        "open_memory_pair",
        "open_trio_websocket_pair",
    },
    "chatcore.asgi": {
        "ASGIApp",
        "ASGIApplication",
        "ASGIMessage",
        "ASGIReceive",
        "ASGIScope",
        "ASGISend",
        "ASGIStream",
        "Health",
    },
    "chatcore.redis": {
        "RedisBackplane",
        "RedisBackplaneStatistics",
        "RedisClusterBackplane",
        "ShardStatistics",
    },
}


def module(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_all_is_the_expected_public_surface(name: str) -> None:
    exported = module(name).__all__
    assert len(exported) == len(set(exported)), "a name is listed twice"
    assert set(exported) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)  # what users get
    assert set(EXPECTED[name]) <= set(namespace)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_public_names_are_not_hidden_from_all(name: str) -> None:
    """Every public class or function defined by the module (or its private
    submodules) is in ``__all__``; names it merely imports need not be."""
    mod = module(name)
    own = (name, f"{name}._")
    public = {
        attr
        for attr, value in vars(mod).items()
        if not attr.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", "").startswith(own)
    }
    assert public <= set(mod.__all__)


def _has_doc_comment(name: str) -> bool:
    """A ``#:`` comment right above ``name = ...`` / ``name: T = ...`` in the package."""
    assignment = re.compile(rf"^{re.escape(name)}\s*(:[^=]*)?=")
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            if assignment.match(line) and index and lines[index - 1].startswith("#:"):
                return True
    return False


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_exported_name_is_documented(name: str) -> None:
    mod = module(name)
    assert (mod.__doc__ or "").strip(), f"{name} has no module docstring"
    undocumented = []
    for attr in mod.__all__:
        value = getattr(mod, attr)
        if inspect.isclass(value) or inspect.isfunction(value) or inspect.ismodule(value):
            # A class's __doc__ is its own (never inherited).
            if not (value.__doc__ or "").strip():
                undocumented.append(attr)
        elif not _has_doc_comment(attr):
            undocumented.append(attr)
    assert undocumented == []


def test_the_version_is_a_string() -> None:
    version = module("chatcore").__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|a\d+|b\d+|rc\d+)?", version), version
