"""keep_freed_host_memory: large freed blocks stay in the process instead of going back to the kernel;
release_freed_host_memory: and go back when a run ends."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Reads glibc's own bookkeeping (mallinfo2), which does not depend on what the kernel does with
# the pages: a 64 MiB block is either mapped for itself and unmapped on free (the default), or
# carved from the heap and kept there for the next allocation.
_PROBE = """
import ctypes, sys
from dapo_rl.training.host_memory import keep_freed_host_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
block = libc.malloc(64 << 20)
mapped = libc.mallinfo2().hblkhd
libc.free(block)
print(applied, mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


def _probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_large_freed_blocks_stay_in_the_heap():
    applied, mapped_mib, free_kept_mib = _probe("keep")
    assert applied == "True" and mapped_mib == 0 and free_kept_mib >= 64
    _, mapped_mib, free_kept_mib = _probe("default")
    assert mapped_mib >= 64 and free_kept_mib < 64  # the default: mapped for itself, unmapped on free


# Resident memory as the kernel counts it: a touched 256 MiB block, freed, stays resident while
# it is kept in the heap, and leaves once released.
_RELEASE = """
import ctypes
from dapo_rl.training.host_memory import keep_freed_host_memory, release_freed_host_memory
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) >> 10
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
keep_freed_host_memory()
before = rss_mib()
block = libc.malloc(256 << 20)
ctypes.memset(block, 1, 256 << 20)
libc.free(block)
kept = rss_mib()
released = release_freed_host_memory()
print(released, kept - before, rss_mib() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_freed_blocks_kept_for_the_next_step_go_back_to_the_kernel_when_released():
    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True).stdout.split()
    released, kept_mib, after_mib = out[0], int(out[1]), int(out[2])
    assert kept_mib >= 250  # kept: still resident after free
    assert released == "True" and after_mib < 16
