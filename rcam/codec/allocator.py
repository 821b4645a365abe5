"""glibc malloc settings for rcam's processes: a tile's large, short-lived tensors reuse freed memory.

Why: glibc serves every allocation above its mmap threshold (which it raises to 32 MiB at most) with a fresh
mapping and unmaps it on free, so each of a tile's activations (27-55 MB at the default tile) faults its
pages in again, layer after layer: about a fifth of the analysis' time. With a 128 MiB threshold they come
from the heap and are reused; one arena makes the worker threads (engine.map_tiles) share that heap instead of
each keeping freed memory of its own, so the peak does not grow; freed memory goes back to the system once
256 MiB lie free at the heap's top. 24 MP, 2 threads, in process: encode 10.7-11.0 s -> 9.0-9.9 s, decode
(before the image write) 7.7-8.0 s -> 7.0-7.2 s, peak memory 1820-1937 MiB -> 1833-1890 MiB.

A process-wide setting, so only entry points call tune_allocator (the CLI, batch and cluster workers, the
benchmarks that time them), never library code. Where the user set glibc's malloc tunables in the
environment, theirs stand.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 128 * 2**20
TRIM_THRESHOLD = 256 * 2**20
ARENAS = 1
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator() -> bool:
    """Apply the settings above to this process' malloc; False (nothing changed) off glibc or where the
    environment sets glibc's malloc tunables."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success: all three or report that nothing may be assumed.
    return all(mallopt(parameter, value) == 1 for parameter, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, ARENAS)))
