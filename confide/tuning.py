"""Process tuning for the long-running parts (coordinator, site agent).

Models move as 1-4 MiB messages. glibc serves allocations that large with a fresh
``mmap`` and returns them to the kernel on free, so every message costs about a
thousand page faults (kernel zeroing): ~2 ms per 4 MiB here, a fifth of the time
gRPC needs to move it. Raising glibc's mmap and trim thresholds keeps freed message
buffers in the heap for the next message. This only changes where memory comes
from; a process that never sees large messages is unaffected.

Kept buffers must not multiply: glibc gives each thread that contends for the heap an
arena of its own (up to 8 per core), and a buffer freed into one arena serves only that
arena's next allocations. With 64 gRPC worker threads each arena ended up holding its
own set of 4 MiB buffers, and a coordinator's resident memory grew by a quarter over
two minutes of a 20-site soak (``benchmarks/load.py``). Two arenas keep the reuse and
stop the spread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("confide")

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# glibc caps the mmap threshold at 32 MiB on 64-bit (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
ARENA_MAX = 2

_done = False


def keep_large_buffers() -> bool:
    """Tune glibc malloc for 1-32 MiB buffers; True when applied (Linux/glibc only, once).

    Call it before the process starts its threads (arenas already made stay)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt: nothing to tune
        return False
    ok = (
        bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
    )
    if not ok:
        log.debug("mallopt refused the buffer thresholds; using malloc's defaults")
    _done = ok
    return ok
