"""Keep freed memory in the process (glibc): training allocates and frees the same large
activation and gradient buffers every step.

glibc serves blocks above its mmap threshold with fresh mmap()s and gives freed heap tops
back to the kernel, so each step page-faults its big tensors in again. Raising the mmap
threshold to its maximum (32 MiB) and the trim threshold to 2 GiB keeps those pages mapped
and reused (the measured effect: README, "Memory"). The price is that the resident size stays
at the peak, which a training process reaches every step anyway. jemalloc or tcmalloc (LD_PRELOAD) do the same job; this
needs nothing installed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

#: set to "0" to leave glibc's defaults alone
ENV_SWITCH = "RECBALANCE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Tune this process's glibc allocator (see module docstring). True when applied; False
    on other C libraries or when switched off with RECBALANCE_KEEP_FREED_MEMORY=0."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl, macOS): its allocator has no such knobs
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
