"""Closed hypercorn connections freed at once, without waiting for the cycle collector.

Theory of operation
-------------------

hypercorn 0.18's trio worker serves each TCP connection with a ``TCPServer``
(``hypercorn/trio/tcp_server.py``). Its ``protocol`` (a ``ProtocolWrapper``
and the HTTP/1.1 protocol inside it) holds ``send=self.protocol_send``, a
bound method of that same ``TCPServer``: the server and its protocol refer
to each other. When the connection ends, no reference count reaches zero,
and about 30 objects per connection (the server, its task group, the h11
state, the socket stream and the socket, locks and events) wait for
CPython's cyclic garbage collector. Most of them reached the oldest
generation while the connection was open, so only a full collection frees
them, and ``chatcore serve``'s collector tuning (see ``docs/deploy.md``)
makes full collections rare: under connection churn RSS grew by a third.

:class:`ReleasingTCPServer` drops its ``protocol`` once the connection is
over, when every task of the connection has ended and the socket is closed
(the last ``_close()`` of ``run()``, after its task group has exited).
That reference is the only edge of the cycle the server owns, so reference
counting frees the whole connection the moment ``run()`` returns, whichever
way it ended (reset, close frame, HTTP request, rejected handshake, server
shutdown).

hypercorn's worker (``worker_serve`` in ``hypercorn/trio/run.py``) looks the
class up by its name, ``TCPServer``, each time it starts serving:
:func:`release_closed_connections` rebinds that one name, process-wide, after
checking that the name is still where 0.18 has it (it refuses with
:class:`RuntimeError` otherwise, and the tests fail too).

HTTP/2 over cleartext (prior knowledge or an ``h2c`` upgrade; WebSocket
clients use neither) still leaves a cycle inside the h2 library itself (its
connection's table of bound methods): about 45 objects per such connection,
freed by the next full collection.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hypercorn.trio.tcp_server import TCPServer

__all__ = ["ReleasingTCPServer", "release_closed_connections"]


class ReleasingTCPServer(TCPServer):
    """hypercorn's per-connection ``TCPServer`` that leaves no reference cycle behind.

    Exactly hypercorn's server while the connection lasts; as ``run()`` ends
    it forgets its protocol, so the connection's objects are freed by
    reference counting (see the module docs).
    """

    def __repr__(self) -> str:
        state = "serving" if "protocol" in vars(self) else "closed"
        return f"<{type(self).__name__} {id(self):#x} {state}>"

    async def _close(self) -> None:
        """Close the socket (hypercorn's own ``_close``); at the end of ``run()``, release.

        hypercorn calls ``_close`` in two places: from ``protocol_send`` while
        the connection's task group still runs (the protocol is used right
        after), and last of all in ``run()``'s ``finally``, once the task group
        has exited (hypercorn's ``TaskGroup`` then holds no nursery). Only the
        second releases the protocol. Hooking here rather than wrapping
        ``run()`` keeps an idle connection one coroutine frame smaller.

        Cancellation: as hypercorn's; the protocol is released all the same.
        """
        try:
            await super()._close()
        finally:
            task_group = vars(self).get("_task_group")
            if task_group is None or getattr(task_group, "_nursery", "unknown") is None:
                vars(self).pop("protocol", None)


def _hypercorn_run() -> ModuleType:
    # By path: ``hypercorn.trio`` also has attributes that are not modules.
    return importlib.import_module("hypercorn.trio.run")


def release_closed_connections(enabled: bool) -> bool:
    """Whether hypercorn's trio worker frees a closed connection at once, process-wide.

    Enabled, the worker serves each connection with :class:`ReleasingTCPServer`;
    disabled, with hypercorn's own ``TCPServer`` (a closed connection then waits
    for a full garbage collection). It takes effect for servers started after
    the call; ``chatcore serve`` enables it before it starts hypercorn.

    Args:
        enabled: The new setting.

    Returns:
        The previous setting.

    Raises:
        RuntimeError: this hypercorn does not look ``TCPServer`` up the way
            0.18 does (nothing is changed).
    """
    module = _hypercorn_run()
    current = getattr(module, "TCPServer", None)
    worker_serve = getattr(module, "worker_serve", None)
    if (
        not isinstance(current, type)
        or not issubclass(current, TCPServer)
        or "TCPServer" not in getattr(getattr(worker_serve, "__code__", None), "co_names", ())
    ):
        raise RuntimeError("cannot make this hypercorn version free closed connections at once")
    module.TCPServer = ReleasingTCPServer if enabled else TCPServer  # type: ignore[attr-defined]
    return issubclass(current, ReleasingTCPServer)
