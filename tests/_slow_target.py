"""A ``chatcore serve`` target whose import blocks until the test lets it go on.

The test sets ``CHATCORE_TEST_GATE`` to a path; importing this module announces
itself on stderr, then waits (bounded) until that path exists: a stand-in for
an application that takes a while to start.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from chatcore import Hub

_gate = Path(os.environ["CHATCORE_TEST_GATE"])
print("slow target: importing", file=sys.stderr, flush=True)
_deadline = time.monotonic() + 20
while not _gate.exists() and time.monotonic() < _deadline:
    time.sleep(0.01)

#: The hub, once the import is let through.
hub = Hub()
