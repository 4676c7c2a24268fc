"""Keep freed host memory in the process instead of handing it back to the kernel (glibc).

A training step allocates and frees the same large host buffers every step: the rollout's KV
cache, activations, gradients. With glibc's default ``malloc`` settings, a block above the mmap
threshold (128 KiB, rising with use to at most 32 MiB) is unmapped when freed, and the top of the
heap is trimmed, so the next step gets fresh pages from the kernel, each a page fault that zeroes
a page: every step pays again for memory it already had. :func:`keep_freed_host_memory` raises
both thresholds so that freed blocks are reused; the process's resident memory then stays near
its high-water mark instead of going up and down, and the peak can grow a little with
fragmentation (the price of keeping the blocks). ``dapo train`` calls it; library users may too.

The blocks kept for the next step are worth keeping only while the run goes on. A process that
trains several runs one after another (``dapo ablate``'s runs, ``DAPOTrainer`` in a notebook)
would carry each run's kept, fragmented heap into the next, and its resident memory would creep
up run by run; :func:`release_freed_host_memory` hands it back when a run ends.
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
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def keep_freed_host_memory() -> bool:
    """Have glibc's ``malloc`` reuse freed blocks instead of returning them to the kernel.

    Returns whether the setting took effect: False on a C library other than glibc (the
    defaults then stay). Process-wide and idempotent.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


def release_freed_host_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim(0)``, which
    releases whole free pages anywhere in the heap, not only at its top). For the end of a run in
    a process that goes on; the settings of :func:`keep_freed_host_memory` stay. Returns whether
    any memory was released (False on a C library other than glibc)."""
    libc = _glibc()
    return False if libc is None else bool(libc.malloc_trim(0))
