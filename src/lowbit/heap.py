"""When freed memory goes back to the operating system.

PyTorch's CPU tensors come from the C allocator. glibc serves allocations below its mmap threshold (which rises
to 32 MB as large blocks are freed) from heaps that keep freed pages mapped: a loop that allocates and frees
many tensors of a few MB each (a calibration pass over 64 windows, offloaded blocks) leaves the process's
resident size well above what it holds. `malloc_trim` returns those pages; elsewhere (not glibc) this does
nothing. Lowering the mmap threshold instead was measured to double AWQ's time (every large tensor then
faults its pages in afresh), so the callers trim at a few chosen points instead.

The `lowbit` command goes further (`keep_freed_memory`): its process keeps every freed page until one of those
points (a command given a memory budget, `--max-memory` or `--stream`, does not). A page fault is not free, and
under some virtual machines it is dear (likely where the hypervisor takes back the pages a guest frees): on the
2-core AMD EPYC VM of BENCHMARKS.md, allocating, filling and freeing a 100 MB tensor took 5-7x as long as
refilling a kept one. A pass over windows allocates its activations, logits and gradients afresh for each
window; with its pages kept, each window reuses the last one's."""

from __future__ import annotations

import ctypes
import functools
import gc
import os

from .errors import LowbitError


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:   # not glibc
        return None


def _malloc_trim():
    libc = _libc()
    return None if libc is None else libc.malloc_trim


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """From now on this process keeps the pages it frees (glibc only; returns whether it applied): every
    allocation comes from the heap (no mmap: glibc maps blocks above its threshold, 32 MB at most, and unmaps
    them when freed, so the next one faults in afresh), and the heap's free top is never trimmed. What a pass
    frees, the next one reuses; `release_freed_memory` still gives it all back where a caller chooses.
    LOWBIT_HEAP=system leaves the C allocator as it is. For a whole process, not a library call: it cannot be
    undone (restoring glibc's settings would freeze its adaptive mmap threshold at 128 kB)."""
    choice = os.environ.get("LOWBIT_HEAP", "keep")
    if choice not in ("keep", "system"):
        raise LowbitError(f"LOWBIT_HEAP={choice!r}: give keep (the default) or system")
    libc = _libc()
    if choice == "system" or libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory(collect: bool = True) -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim). `collect` runs Python's cycle collector
    first, for objects that only it frees; tensors freed by reference counting need no collection, and a
    collection costs tens of ms in a process with transformers loaded."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
