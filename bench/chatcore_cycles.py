"""``chatcore serve chatcore_cycles:app``: the churn benchmark's control.

The same app as ``chatcore_app``, served the way ``chatcore serve`` did before
it freed closed hypercorn connections at once: with hypercorn's own
``TCPServer``, whose closed connections wait in reference cycles for a full
garbage collection (``chatcore/_hypercorn_tcp.py``). ``bench/fanout.py`` runs
it as the server ``chatcore-serve-cycles`` (churn only).
"""

from __future__ import annotations

from chatcore_app import app

from chatcore import _serve

__all__ = ["app"]

# serve() calls this once before starting hypercorn: leave hypercorn's class.
_serve._release_closed_connections = lambda: None
