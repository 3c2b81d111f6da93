"""glibc's memory allocator, tuned for defectlens's long-running processes: the service (arenas
capped, so resident memory levels off) and Dask workers (large arrays reused, not mapped
afresh for every batch). Elsewhere than glibc (musl, macOS, Windows) nothing is changed.

Why the service caps arenas: glibc gives each thread that allocates its own arena (up to 8 per
core) and rarely hands freed pages back from any of them. A server allocates from many threads
(the event loop, decoding, the scoring worker, the engines' pools), and batches of changing
sizes fragment each arena. Measured at 16 clients (BENCHMARKS.md, inspection service): memory
crept 3-34 MB per 1,000 requests with glibc's default and stayed flat, ~290 MB lower, with 2.

Why workers move the mmap threshold: Dask's nanny starts workers with
`MALLOC_TRIM_THRESHOLD_=65536`, which also freezes glibc's mmap threshold at 128 KiB. Every
batch tensor, map and resampling matrix above that is then a fresh mapping, page-faulted in and
unmapped again when freed: PaDiM's `predict` ran at 58 img/s instead of 88 under that setting
alone, with four times the system time (BENCHMARKS.md, Dask).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
SERVICE_ARENAS = 2
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (64-bit): arrays up to this reuse the heap
TRIM_THRESHOLD = 128 * 1024 * 1024  # free memory kept at the heap's top before it is returned


@cache
def _glibc_mallopt():
    """glibc's `mallopt`, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  glibc's own symbol: not musl's mallopt stub
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def limit_arenas(arenas: int = SERVICE_ARENAS) -> bool:
    """Caps glibc's allocation arenas for threads this process starts from now on; True when
    the cap is in force. Call it before the threads exist (arenas already made stay). A
    `MALLOC_ARENA_MAX` in the environment is the user's choice and wins."""
    if arenas < 1:
        raise ValueError(f"arenas must be at least 1, not {arenas}")
    mallopt = _glibc_mallopt()
    if mallopt is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return mallopt(M_ARENA_MAX, arenas) == 1


def reuse_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Serve allocations up to `mmap_threshold` bytes from the heap and keep up to
    `trim_threshold` bytes of freed memory for reuse: roughly where glibc's own adaptive
    thresholds settle in a process that nobody configured. True when both took effect."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    mapped = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    trimmed = mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1  # set even if the first failed
    return mapped and trimmed
