"""Tools for the sans-I/O layer: ``python -m chatcore.sansio --diagram``.

The diagram in ``docs/lifecycle.md`` is this command's output, pasted; a test
compares the two so the document cannot drift from :data:`TRANSITIONS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._state import TRANSITIONS, CloseArbiter, ConnectionState

__all__ = ["main", "mermaid_state_diagram"]


def mermaid_state_diagram() -> str:
    """A Mermaid ``stateDiagram-v2`` of the connection state machine.

    One edge per entry of :data:`TRANSITIONS`, in table order, labelled with
    the input's name (self-loops included: they are what makes closing
    idempotent). ``[*]`` marks the initial state (a new
    :class:`CloseArbiter`'s) and the final ones (states every input of which
    loops back to themselves).

    Returns:
        The diagram's text, lines joined with ``"\\n"``, no trailing newline.
    """
    initial = CloseArbiter().state
    lines = ["stateDiagram-v2", f"    [*] --> {initial.name}"]
    lines.extend(
        f"    {state.name} --> {target.name}: {event.value}"
        for (state, event), target in TRANSITIONS.items()
    )
    lines.extend(
        f"    {state.name} --> [*]"
        for state in ConnectionState
        if all(target is state for (src, _), target in TRANSITIONS.items() if src is state)
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m chatcore.sansio",
        description="Tools for chatcore's sans-I/O layer.",
    )
    parser.add_argument(
        "--diagram",
        action="store_true",
        help="print the connection state machine as a Mermaid stateDiagram-v2",
    )
    args = parser.parse_args(argv)
    if not args.diagram:
        parser.print_help(sys.stderr)
        return 2
    print(mermaid_state_diagram())
    return 0


if __name__ == "__main__":
    sys.exit(main())
