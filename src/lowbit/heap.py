"""Giving freed memory back to the operating system.

PyTorch's CPU tensors come from the C allocator. glibc serves allocations below its mmap threshold (which rises
to 32 MB as large blocks are freed) from heaps that keep freed pages mapped: a loop that allocates and frees
many tensors of a few MB each (a calibration pass over 64 windows, offloaded blocks) leaves the process's
resident size well above what it holds. `malloc_trim` returns those pages; elsewhere (not glibc) this does
nothing. Lowering the mmap threshold instead was measured to double AWQ's time (every large tensor then
faults its pages in afresh), so the callers trim at a few chosen points instead."""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc
        return None


def release_freed_memory(collect: bool = True) -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim). `collect` runs Python's cycle collector
    first, for objects that only it frees; tensors freed by reference counting need no collection, and a
    collection costs tens of ms in a process with transformers loaded."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
