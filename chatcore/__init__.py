"""chatcore: race-free chat and real-time WebSocket servers on Trio.

Each connection is an actor: one Trio nursery owns its reader, writer and
heartbeat tasks, one owner decides its close, and every queue is bounded.
See ``docs/lifecycle.md``.
"""

from ._backplane import Backplane as Backplane
from ._backplane import BackplaneError as BackplaneError
from ._backplane import BackplaneEvent as BackplaneEvent
from ._backplane import BackplaneSink as BackplaneSink
from ._backplane import HistoryConfig as HistoryConfig
from ._backplane import LocalBackplane as LocalBackplane
from ._backplane import NodeDown as NodeDown
from ._backplane import Position as Position
from ._backplane import Reconnected as Reconnected
from ._backplane import RoomReset as RoomReset
from ._backplane import Sequenced as Sequenced
from ._config import Config as Config
from ._connection import Connection as Connection
from ._connection import ConnectionHandler as ConnectionHandler
from ._connection import ConnectionStatistics as ConnectionStatistics
from ._connection import serve_connection as serve_connection
from ._exceptions import ChatcoreError as ChatcoreError
from ._exceptions import ConnectionClosed as ConnectionClosed
from ._exceptions import HandshakeRejected as HandshakeRejected
from ._exceptions import LocalProtocolError as LocalProtocolError
from ._exceptions import OutboxFull as OutboxFull
from ._exceptions import PeerGone as PeerGone
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import RemoteProtocolError as RemoteProtocolError
from ._hub import Hub as Hub
from ._hub import HubConfig as HubConfig
from ._hub import HubStatistics as HubStatistics
from ._logs import JSONFormatter as JSONFormatter
from ._logs import configure_logging as configure_logging
from ._rooms import Room as Room
from ._rooms import RoomStatistics as RoomStatistics
from ._server import HandlerHealth as HandlerHealth
from ._server import ServedHandler as ServedHandler
from ._server import serve_websocket as serve_websocket
from ._session import ErrorReply as ErrorReply
from ._session import Identity as Identity
from ._session import Session as Session
from ._transport import MessageStream as MessageStream
from .sansio import Accept as Accept
from .sansio import CloseCause as CloseCause
from .sansio import CloseOutcome as CloseOutcome
from .sansio import CloseRecord as CloseRecord
from .sansio import ConnectionState as ConnectionState
from .sansio import Delivery as Delivery
from .sansio import HandshakeLimits as HandshakeLimits
from .sansio import HandshakeRequest as HandshakeRequest
from .sansio import OutboundMessage as OutboundMessage
from .sansio import PushResult as PushResult
from .sansio import Reject as Reject
from .sansio import encode as encode

__all__ = [
    "Accept",
    "Backplane",
    "BackplaneError",
    "BackplaneEvent",
    "BackplaneSink",
    "ChatcoreError",
    "CloseCause",
    "CloseOutcome",
    "CloseRecord",
    "Config",
    "Connection",
    "ConnectionClosed",
    "ConnectionHandler",
    "ConnectionState",
    "ConnectionStatistics",
    "Delivery",
    "ErrorReply",
    "HandlerHealth",
    "HandshakeLimits",
    "HandshakeRejected",
    "HandshakeRequest",
    "HistoryConfig",
    "Hub",
    "HubConfig",
    "HubStatistics",
    "Identity",
    "JSONFormatter",
    "LocalBackplane",
    "LocalProtocolError",
    "MessageStream",
    "NodeDown",
    "OutboundMessage",
    "OutboxFull",
    "PeerGone",
    "Position",
    "ProtocolError",
    "PushResult",
    "Reconnected",
    "Reject",
    "RemoteProtocolError",
    "Room",
    "RoomReset",
    "RoomStatistics",
    "Sequenced",
    "ServedHandler",
    "Session",
    "configure_logging",
    "encode",
    "serve_connection",
    "serve_websocket",
]

#: The version of this chatcore.
__version__ = "0.1.0.dev0"
