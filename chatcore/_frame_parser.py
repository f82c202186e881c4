"""wsproto's frame parser without its reference cycle.

wsproto 1.3's :class:`~wsproto.frame_protocol.FrameProtocol` parses with a
generator over itself, kept on itself (``self._parse_more =
self._parse_more_gen()``): the parser and its generator refer to each other.
When a WebSocket connection ends, that pair and what it owns (the frame and
message decoders, the receive buffer: seven objects) reach no zero reference
count, so they wait for CPython's cyclic garbage collector, which
``chatcore serve``'s collector tuning (see ``docs/deploy.md``) makes rare: on
the lean engine RSS under connection churn grew by 13 % with the tuning.

:func:`untie_parser` gives a parser that has not parsed anything yet a fresh
generator that reaches the parser through a weak proxy. The generator is
still owned by the parser and runs the same code; when the connection drops
the parser, reference counting frees both at once. Both of ``chatcore
serve``'s engines use it for every WebSocket connection (the lean transport
for its parser, :class:`chatcore._wire_guard.AnsweringConnection` for the one
inside hypercorn's wsproto connection). If wsproto ever stops keeping its
parser that way, :func:`untie_parser` leaves the parser as it is (the tests
then fail, not the server).
"""

from __future__ import annotations

import inspect
import weakref
from typing import cast

from wsproto.frame_protocol import FrameProtocol

__all__ = ["untie_parser"]


def untie_parser(proto: FrameProtocol) -> FrameProtocol:
    """Make ``proto`` free with its last reference, not in a garbage collection.

    Args:
        proto: A parser that has not received any bytes yet.

    Returns:
        ``proto``, its parser generator replaced by one that refers to it
        weakly; unchanged if it already parsed something or this wsproto
        keeps its parser differently from 1.3.
    """
    current = getattr(proto, "_parse_more", None)
    make = getattr(FrameProtocol, "_parse_more_gen", None)
    if (
        make is None
        or not inspect.isgenerator(current)
        or inspect.getgeneratorstate(current) != inspect.GEN_CREATED
    ):
        return proto
    # The generator's only reference to proto is the proxy; proto owns the
    # generator, so the generator never outlives what the proxy points to.
    proto._parse_more = make(cast(FrameProtocol, weakref.proxy(proto)))
    return proto
