"""glibc malloc settings for processes that move large messages (the KV store server, bulk clients).

Every chunk crosses the process as a fresh 1 MiB `bytes` object (gRPC's receive copy, the
frame the client builds). With glibc's defaults such a block is mmap'ed and unmapped again,
or taken from the heap top that `free` trims straight back to the kernel, so every chunk
pays ~256 page faults plus zeroing of its pages: measured, about a third of the store's CPU
per put. Raising the mmap threshold above the largest message and the trim threshold to a
few batches keeps those pages in the process and reuses them.

Process-wide, so only entry points call it (`python -m services.kvstore`, the benchmark's
client, a worker's startup), never a library function; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit; above the 8 MiB gRPC message cap
TRIM_THRESHOLD = 64 << 20  # free memory kept at the heap top before it is given back


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the thresholds to this process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        log.warning("mallopt refused the thresholds (mmap %d, trim %d)", mmap_threshold, trim_threshold)
    return ok
