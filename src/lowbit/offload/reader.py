"""Reading tensors out of a safetensors file fast: one positioned read per tensor, straight into its own buffer.

Streaming pays for every byte it reads on each decoded token, so the read path matters. Going through
`safe_open(...).get_tensor(name).clone()` maps the file, page-faults it in, and copies it again (about 4 GB/s
on small quantized blocks here). Instead a block's tensors go into one buffer (each 64-byte aligned, as ATen's
packed kernels need; pinned on request, so a GPU copy can start from it at once; reused from read to read,
see `BufferPool`), filled by `os.preadv` (scatter reads from the page cache that release the GIL, so a reader
thread does not hold up the computing one): 11-20 GB/s here.

Where each tensor lies in the file comes from its header (`io.safetensors.read_header`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import LowbitError
from ..io.safetensors import TensorEntry

ALIGN = 64   # bytes; ATen's packed CPU kernels read with aligned vector loads


def _in_use(buf: torch.Tensor) -> bool:
    """Whether anything but `buf` itself still references its memory (views handed out earlier)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:       # cannot tell: never reuse
        return True
    # one reference from buf, one from the temporary storage object made to ask
    return use_count(buf.untyped_storage()._cdata) > 2


class BufferPool:
    """Host buffers reused from one read to the next.

    Streaming reads every streamed block on every token. Fresh memory for each read costs a page fault per
    4 KiB page, and buffers above the C allocator's mmap threshold (32 MiB at most) are always fresh: reading
    into new memory ran at 2.4 GB/s here against 7.4 GB/s into a reused buffer. A buffer is handed out again
    only once no tensor read into it is alive any more (the block it held was released), so in steady state a
    stream needs as many buffers as blocks it holds at once (the one computing and the one read ahead).
    """

    def __init__(self, pin_memory: bool = False, keep: int = 3):
        self.pin_memory, self.keep = pin_memory, keep
        self.buffers: list[torch.Tensor] = []
        self.allocated = 0      # buffers ever allocated (tests check reuse)

    def take(self, nbytes: int) -> torch.Tensor:
        free = [b for b in self.buffers if not _in_use(b)]
        fit = [b for b in free if b.numel() >= nbytes]
        if fit:
            return min(fit, key=torch.Tensor.numel)
        while free and len(self.buffers) >= self.keep:   # too small and idle: make room
            b = free.pop()
            self.buffers = [x for x in self.buffers if x is not b]
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin_memory)
        self.buffers.append(buf)
        self.allocated += 1
        return buf


@dataclass(frozen=True)
class ReadPlan:
    """Where each of a set of tensors goes in one buffer (each at a multiple of ALIGN bytes) and which file
    ranges fill it: tensors that sit back to back in the file (as safetensors writes them) make one run, read
    by one `preadv`. Made once per block; reading a streamed block again only follows it."""

    total: int                                               # buffer bytes
    runs: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]  # (file offset, ((buffer start, bytes), ...))
    tensors: tuple[tuple[str, int, TensorEntry], ...]        # (name, buffer start, entry)

    @classmethod
    def make(cls, entries: dict[str, TensorEntry], names=None) -> "ReadPlan":
        names = sorted(entries if names is None else names, key=lambda k: entries[k].offset)
        tensors, runs, total, run_end = [], [], 0, None
        for name in names:
            e = entries[name]
            total = -(-total // ALIGN) * ALIGN
            tensors.append((name, total, e))
            if e.nbytes:
                if run_end == e.offset and len(runs[-1][1]) < 512:   # 512: well under the kernel's IOV_MAX
                    runs[-1][1].append((total, e.nbytes))
                else:
                    runs.append((e.offset, [(total, e.nbytes)]))
                run_end = e.offset + e.nbytes
            total += e.nbytes
        return cls(total, tuple((o, tuple(v)) for o, v in runs), tuple(tensors))

    def read(self, path: str | os.PathLike, pool: BufferPool | None = None,
             pin_memory: bool = False) -> dict[str, torch.Tensor]:
        buf = pool.take(self.total) if pool is not None else \
            torch.empty(max(self.total, 1), dtype=torch.uint8, pin_memory=pin_memory)
        whole = memoryview(buf.numpy())
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, pieces in self.runs:
                _read_fully(fd, [whole[at:at + n] for at, n in pieces], offset, path)
        finally:
            os.close(fd)
        return {name: buf[at:at + e.nbytes].view(e.dtype).view(e.shape) if e.nbytes
                else torch.empty(e.shape, dtype=e.dtype) for name, at, e in self.tensors}


def read_tensors(path: str | os.PathLike, entries: dict[str, TensorEntry], names=None,
                 pin_memory: bool = False, pool: BufferPool | None = None) -> dict[str, torch.Tensor]:
    """The named tensors (all by default) read from `path` into CPU memory, by name: one buffer (from `pool` if
    given, else fresh; pinned if asked) laid out and filled as `ReadPlan` says."""
    return ReadPlan.make(entries, names).read(path, pool, pin_memory)


def _read_fully(fd: int, views: list[memoryview], offset: int, path) -> None:
    """Fill `views` from the file at `offset` (consecutive bytes), however the reads come back short."""
    while views:
        got = os.preadv(fd, views, offset)
        if got <= 0:
            raise LowbitError(f"truncated safetensors file {path}: it ends before its tensors do")
        offset += got
        while views and got >= views[0].nbytes:
            got -= views[0].nbytes
            views = views[1:]
        if views and got:
            views = [views[0][got:]] + views[1:]
