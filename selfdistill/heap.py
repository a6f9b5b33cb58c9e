"""Keeping freed large CPU buffers in the process heap, so that a training step does not fault them in again.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to the
system on ``free``. A CPU training step allocates and frees several buffers of the embedding matrix's size each time
(the tied embedding's gradient, its zero fill, its sum with the output head's gradient, the bf16 casts): 113 MiB each
for a 49k x 576 vocabulary. Every such buffer is faulted in page by page, and the kernel zeroes each page first
(docs/performance.md measures what that costs a step of the embedded model).

:func:`reuse_freed_buffers` tells glibc (``mallopt``) to serve large blocks from the heap and never to trim it, so a
freed buffer is reused by the next step's allocation of the same size without new page faults. The change is
process-wide and changes no computed value; the cost is that the process keeps its peak heap instead of returning
freed memory to the system. Nothing is done off Linux or without glibc.
"""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest trim threshold mallopt takes (a C int): the heap's free top is practically never returned.
NEVER_TRIM = 2**31 - 1

_applied: bool | None = None


def _mallopt():
    if platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL(None).mallopt  # the C library the interpreter is linked against
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return None


def reuse_freed_buffers() -> bool:
    """Serve large allocations from the heap and keep freed memory there (glibc); True when it is in effect.

    Idempotent: the first call sets the two ``mallopt`` parameters, later calls return the first call's answer.
    """
    global _applied
    if _applied is None:
        mallopt = _mallopt()
        _applied = bool(mallopt) and mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
        if _applied:
            logger.info("CPU training: large freed buffers stay in the process heap (mallopt); set "
                        "reuse_cpu_buffers=False to leave the allocator alone")
    return _applied
