"""``chatcore serve chatcore_cycles:app``: the churn benchmark's control.

The same app as ``chatcore_app``, served the way ``chatcore serve`` did before
a closed connection was freed at once: with hypercorn's own ``TCPServer``
(``chatcore/_hypercorn_tcp.py``) and wsproto's parser as it comes
(``chatcore/_frame_parser.py``), so each closed connection waits in reference
cycles for a full garbage collection. ``bench/fanout.py`` runs it as the
servers ``chatcore-serve-cycles`` and ``chatcore-lean-cycles`` (churn only).
"""

from __future__ import annotations

from chatcore_app import app

from chatcore import _serve, _wire_guard
from chatcore.transports import _lean

__all__ = ["app"]


def _as_it_comes(proto: object) -> object:
    return proto


# Looked up when serving starts (hypercorn's class) and per connection (the parser).
_serve._release_closed_connections = lambda: None
_wire_guard.untie_parser = _as_it_comes  # type: ignore[assignment]
_lean.untie_parser = _as_it_comes  # type: ignore[assignment]
