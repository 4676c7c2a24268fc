"""Keep freed host memory in the process instead of handing it back to the kernel (glibc).

A training step allocates and frees the same large host buffers every step: the rollout's KV
cache, activations, gradients. With glibc's default ``malloc`` settings, a block above the mmap
threshold (128 KiB, rising with use to at most 32 MiB) is unmapped when freed, and the top of the
heap is trimmed, so the next step gets fresh pages from the kernel, each a page fault that zeroes
a page: every step pays again for memory it already had. :func:`keep_freed_host_memory` raises
both thresholds so that freed blocks are reused; the process's resident memory then stays near
its high-water mark instead of going up and down, and the peak can grow a little with
fragmentation (the price of keeping the blocks). ``dapo train`` calls it; library users may too.
"""

from __future__ import annotations

import ctypes
import functools
import platform

# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 30  # blocks below 1 GiB come from the heap, reused after free
_TRIM_THRESHOLD_BYTES = 1 << 30  # free memory at the heap top is kept up to 1 GiB


@functools.cache
def keep_freed_host_memory() -> bool:
    """Have glibc's ``malloc`` reuse freed blocks instead of returning them to the kernel.

    Returns whether the setting took effect: False on a C library other than glibc (the
    defaults then stay). Process-wide and idempotent.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
