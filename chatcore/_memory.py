"""Giving freed memory back to the operating system (glibc's ``malloc_trim``).

CPython hands a freed block of more than 512 bytes back to the C allocator,
but glibc's ``malloc`` returns memory to the system only from the top of its
heap or when the block had a mapping of its own: thousands of freed message
texts in the middle of the heap stay in the process's RSS, reserved for the
next allocations. ``malloc_trim(0)`` releases every free page of the heap.
It is called only after a large release (the history sweep), never on a hot
path; elsewhere (other C libraries, other systems) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    return trim


def release_free_memory() -> bool:
    """Ask the C allocator to return its free pages to the system.

    Returns:
        True if the allocator supports it (glibc) and was asked.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
