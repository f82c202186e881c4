"""Testing helpers for chatcore users: a protocol test client, and the conformance suites.

* :func:`open_test_client` / :func:`open_test_clients` connect protocol
  clients (:class:`TestClient`) to a handler through the in-memory transport
  (see ``docs/testing.md``).
* :func:`check_message_stream` checks that a transport keeps the
  :class:`~chatcore.MessageStream` contract (see ``docs/transports.md``);
  :func:`open_memory_pair` and :func:`open_trio_websocket_pair` make
  ``(server stream, client)`` pairs for the two built-in transports.
* :func:`check_backplane` checks that a backplane keeps the
  :class:`~chatcore.Backplane` contract (see ``docs/scale-out.md``), with a
  :class:`BackplaneRecorder` in place of a hub.
* :class:`WebSocketPeer` is a small WebSocket client (wsproto over a trio
  stream) that can also misbehave on purpose, for tests against a real server.
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
from ._conformance import MemoryPeer as MemoryPeer
from ._conformance import PairFactory as PairFactory
from ._conformance import TransportPeer as TransportPeer
from ._conformance import WebSocketPeer as WebSocketPeer
from ._conformance import check_message_stream as check_message_stream
from ._conformance import open_memory_pair as open_memory_pair
from ._conformance import open_trio_websocket_pair as open_trio_websocket_pair
