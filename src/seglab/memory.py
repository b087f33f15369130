"""Memory settings for the processes seglab's commands run in.

glibc's malloc hands any freed block above its mmap threshold (dynamic, at most 32 MB by
default) straight back to the system, and trims the top of its heap beyond a similar bound.
A segmentation network at 512 x 512 allocates and frees activation maps of tens to hundreds
of megabytes at every call, so each call maps them afresh and the kernel zero-fills them page
by page: a fresh process running FPN-R34 at batch 8 spent ~40% of its time in minor page
faults (docs/bench.md). Raising both thresholds keeps freed blocks in the heap for the next
call, as a caching allocator would; the process then holds on to its peak memory, which is
what a command that trains, evaluates or predicts wants. Only seglab's command line does
this (it owns its process), never `import seglab`.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "keeps_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and are reused
_TRIM_THRESHOLD = (1 << 31) - 1  # the largest value mallopt's int takes: the heap is never trimmed
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_applied = False


def keeps_freed_memory() -> bool:
    """Whether `keep_freed_memory` changed this process's malloc settings (benchmarks record it)."""
    return _applied


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed large blocks for reuse instead of returning them to the
    system. Does nothing off Linux, with a C library without `mallopt`, or when the user set
    malloc's environment variables (theirs win). Returns whether the setting was applied."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _applied
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied
