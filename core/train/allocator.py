"""Keep freed tensor memory in the process on Linux, so CPU training steps do not page-fault.

glibc hands every allocation above a threshold to `mmap` and returns it on free, so each
training step maps, zero-fills and unmaps hundreds of megabytes of activations. Step times then
swing by 2-5x from one step to the next on a busy machine. Serving large blocks from the heap
and never trimming it makes steps steady and faster, at the price of keeping the peak memory
reserved until the process ends. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; True when the allocator was tuned."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
