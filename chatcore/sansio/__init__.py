"""The pure core of chatcore: data in, data out.

Nothing in this package imports trio or any I/O library, and nothing reads a
clock (callers pass ``now``). ``tests/test_sansio_purity.py`` enforces it.

``__all__`` is the public surface, pinned by ``tests/test_exports.py``: the
connection state machine and close arbiter, the handshake decision, the
outbox, the wire protocol (parsing client frames, encoding server messages),
room history, presence, rate limits, and the exception base classes. The
runtime (hub, connection, backplanes) imports only these names.
"""

from ._admission import Admission as Admission
from ._errors import (
    ChatcoreError as ChatcoreError,
)
from ._errors import (
    LocalProtocolError as LocalProtocolError,
)
from ._errors import (
    ProtocolError as ProtocolError,
)
from ._errors import (
    RemoteProtocolError as RemoteProtocolError,
)
from ._handshake import Accept as Accept
from ._handshake import HandshakeRequest as HandshakeRequest
from ._handshake import Reject as Reject
from ._handshake_limits import HandshakeLimits as HandshakeLimits
from ._handshake_limits import RequestHeadScanner as RequestHeadScanner
from ._handshake_limits import check_request_head as check_request_head
from ._handshake_limits import check_websocket_key as check_websocket_key
from ._history import History as History
from ._history import HistoryEntry as HistoryEntry
from ._history import Recovery as Recovery
from ._history import RecoveryStatus as RecoveryStatus
from ._limits import TokenBucket as TokenBucket
from ._limits import WindowCounter as WindowCounter
from ._nodebus import NodeEvent as NodeEvent
from ._nodebus import PresenceEvent as PresenceEvent
from ._nodebus import PresenceJoin as PresenceJoin
from ._nodebus import PresenceLeave as PresenceLeave
from ._nodebus import PresenceStateBegin as PresenceStateBegin
from ._nodebus import PresenceStateEnd as PresenceStateEnd
from ._nodebus import PresenceSync as PresenceSync
from ._nodebus import RoomBroadcast as RoomBroadcast
from ._nodebus import UserDisconnect as UserDisconnect
from ._nodebus import UserMessage as UserMessage
from ._nodebus import decode_node_event as decode_node_event
from ._nodebus import encode_node_event as encode_node_event
from ._outbox import Delivery as Delivery
from ._outbox import OutboundMessage as OutboundMessage
from ._outbox import Outbox as Outbox
from ._outbox import PushResult as PushResult
from ._outbox import QueueTotal as QueueTotal
from ._outbox import encode as encode
from ._presence import PresenceDiff as PresenceDiff
from ._presence import PresenceMeta as PresenceMeta
from ._presence import PresenceTable as PresenceTable
from ._protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._protocol import AppMessage as AppMessage
from ._protocol import BadFrame as BadFrame
from ._protocol import ClientMessage as ClientMessage
from ._protocol import ErrorCode as ErrorCode
from ._protocol import Join as Join
from ._protocol import Leave as Leave
from ._protocol import Ping as Ping
from ._protocol import Pong as Pong
from ._protocol import Publish as Publish
from ._protocol import Ref as Ref
from ._protocol import Since as Since
from ._protocol import encode_error as encode_error
from ._protocol import encode_hello as encode_hello
from ._protocol import encode_message as encode_message
from ._protocol import encode_reply as encode_reply
from ._protocol import encode_reply_error as encode_reply_error
from ._protocol import encode_shutdown as encode_shutdown
from ._protocol import parse_client_message as parse_client_message
from ._protocol import valid_room as valid_room
from ._protocol import valid_user as valid_user
from ._sequencer import Emit as Emit
from ._sequencer import EpochChanged as EpochChanged
from ._sequencer import Held as Held
from ._sequencer import Position as Position
from ._sequencer import RoomSequencer as RoomSequencer
from ._sequencer import Sequenced as Sequenced
from ._sequencer import SequencerStep as SequencerStep
from ._sequencer import Stale as Stale
from ._state import TRANSITIONS as TRANSITIONS
from ._state import CloseArbiter as CloseArbiter
from ._state import CloseCause as CloseCause
from ._state import CloseOutcome as CloseOutcome
from ._state import CloseRecord as CloseRecord
from ._state import ConnectionState as ConnectionState
from ._state import Input as Input
from ._state import handshake_status_for as handshake_status_for

__all__ = [
    "PROTOCOL_VERSION",
    "TRANSITIONS",
    "Accept",
    "Admission",
    "AppMessage",
    "BadFrame",
    "ChatcoreError",
    "ClientMessage",
    "CloseArbiter",
    "CloseCause",
    "CloseOutcome",
    "CloseRecord",
    "ConnectionState",
    "Delivery",
    "Emit",
    "EpochChanged",
    "ErrorCode",
    "HandshakeLimits",
    "HandshakeRequest",
    "Held",
    "History",
    "HistoryEntry",
    "Input",
    "Join",
    "Leave",
    "LocalProtocolError",
    "NodeEvent",
    "OutboundMessage",
    "Outbox",
    "Ping",
    "Pong",
    "Position",
    "PresenceDiff",
    "PresenceEvent",
    "PresenceJoin",
    "PresenceLeave",
    "PresenceMeta",
    "PresenceStateBegin",
    "PresenceStateEnd",
    "PresenceSync",
    "PresenceTable",
    "ProtocolError",
    "Publish",
    "PushResult",
    "QueueTotal",
    "Recovery",
    "RecoveryStatus",
    "Ref",
    "Reject",
    "RemoteProtocolError",
    "RequestHeadScanner",
    "RoomBroadcast",
    "RoomSequencer",
    "Sequenced",
    "SequencerStep",
    "Since",
    "Stale",
    "TokenBucket",
    "UserDisconnect",
    "UserMessage",
    "WindowCounter",
    "check_request_head",
    "check_websocket_key",
    "decode_node_event",
    "encode",
    "encode_error",
    "encode_hello",
    "encode_message",
    "encode_node_event",
    "encode_reply",
    "encode_reply_error",
    "encode_shutdown",
    "handshake_status_for",
    "parse_client_message",
    "valid_room",
    "valid_user",
]
