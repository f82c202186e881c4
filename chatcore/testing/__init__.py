"""Testing helpers: the test client for applications, and the conformance suites.

For applications (see ``docs/testing.md``):

* :func:`open_test_client` / :func:`open_test_clients` connect protocol
  clients (:class:`TestClient`) to a handler in memory, or to a running
  server over a real WebSocket (given a ``ws://`` URL).
* :class:`RequestFailed` is what a refused request raises.

For transports (see ``docs/transports.md``):

* :func:`check_message_stream` checks that a transport keeps the
  :class:`~chatcore.MessageStream` contract, running
  :data:`MESSAGE_STREAM_CHECKS` on pairs from a :class:`PairFactory`;
  :func:`open_memory_pair` and :func:`open_trio_websocket_pair` make them for
  the two built-in transports.
* The peers are the frame-level client ends the suite drives
  (:class:`TransportPeer`): :class:`MemoryPeer` in memory and
  :class:`WebSocketPeer` over a socket, which can also misbehave on purpose
  (raw frames, a reset, a client that stops reading). :class:`TestClient`
  runs on them; applications need not touch them.

For backplanes (see ``docs/scale-out.md``):

* :func:`check_backplane` checks that a backplane keeps the
  :class:`~chatcore.Backplane` contract, running :data:`BACKPLANE_CHECKS`
  with a :class:`BackplaneRecorder` in place of a hub, on backplanes from a
  :class:`BackplaneFactory`.
"""

from ._backplane_conformance import BACKPLANE_CHECKS as BACKPLANE_CHECKS
from ._backplane_conformance import BackplaneFactory as BackplaneFactory
from ._backplane_conformance import BackplaneRecorder as BackplaneRecorder
from ._backplane_conformance import check_backplane as check_backplane
from ._client import RequestFailed as RequestFailed
from ._client import TestClient as TestClient
from ._client import open_test_client as open_test_client
from ._client import open_test_clients as open_test_clients
from ._conformance import MESSAGE_STREAM_CHECKS as MESSAGE_STREAM_CHECKS
from ._conformance import PairFactory as PairFactory
from ._conformance import check_message_stream as check_message_stream
from ._conformance import open_lean_pair as open_lean_pair
from ._conformance import open_memory_pair as open_memory_pair
from ._conformance import open_trio_websocket_pair as open_trio_websocket_pair
from ._peers import MemoryPeer as MemoryPeer
from ._peers import TransportPeer as TransportPeer
from ._peers import WebSocketPeer as WebSocketPeer

__all__ = [
    "BACKPLANE_CHECKS",
    "MESSAGE_STREAM_CHECKS",
    "BackplaneFactory",
    "BackplaneRecorder",
    "MemoryPeer",
    "PairFactory",
    "RequestFailed",
    "TestClient",
    "TransportPeer",
    "WebSocketPeer",
    "check_backplane",
    "check_message_stream",
    "open_lean_pair",
    "open_memory_pair",
    "open_test_client",
    "open_test_clients",
    "open_trio_websocket_pair",
]
