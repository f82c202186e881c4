"""Transports: adapters from WebSocket libraries to :class:`chatcore.MessageStream`."""

from ._lean import LeanStream as LeanStream
from ._memory import BinaryFrame as BinaryFrame
from ._memory import CloseFrame as CloseFrame
from ._memory import MemoryClient as MemoryClient
from ._memory import MemoryStream as MemoryStream
from ._memory import TextFrame as TextFrame
from ._memory import memory_stream_pair as memory_stream_pair
from ._trio_websocket import TrioWebSocketStream as TrioWebSocketStream
from ._trio_websocket import open_trio_websocket_stream as open_trio_websocket_stream
