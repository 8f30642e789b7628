"""Streaming decoder blocks from a weight store under a memory budget, with the next block prefetched.

`plan_offload` decides, for a budget in bytes, which blocks stay resident and which stream: everything that
is not a block (embedding, final norm, lm_head) stays; blocks stay resident in order while they fit, leaving
room for two streamed blocks (the one computing and the one being read ahead). `offload_blocks` then moves
the streamed blocks' tensors into a store (RAM or disk) and installs hooks on them:
    before block i runs   its tensors are taken from the prefetch (waiting if the read is not done) and
                          the read of the next streamed block starts on a background thread;
    after block i ran     its tensors are released again.
The values are the stored bytes, so outputs are identical to the fully resident model's. The reader thread
is instrumented (`StreamedModel.events`) so tests can check that reads run ahead of compute.
"""

from __future__ import annotations

import re
from collections import deque
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LowbitError
from ..models.arch import arch_for
from .store import DiskStore, RamStore, block_tensors

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '1.5 GiB', '800MB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise LowbitError(f"cannot read the size '{text}' (examples: 800MB, 2GB, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class OffloadPlan:
    budget: int
    fixed_bytes: int                  # embedding, final norm, lm_head and anything else outside the blocks
    block_bytes: list[int]
    resident: list[int]               # block indices kept in memory
    streamed: list[int]               # block indices read from the store for every forward pass

    @property
    def bytes_moved_per_pass(self) -> int:
        return sum(self.block_bytes[i] for i in self.streamed)

    @property
    def peak_weight_bytes(self) -> int:
        """Weights in memory at the worst moment: fixed + resident + two streamed blocks."""
        two = sorted((self.block_bytes[i] for i in self.streamed), reverse=True)[:2]
        return self.fixed_bytes + sum(self.block_bytes[i] for i in self.resident) + sum(two)

    def describe(self) -> str:
        mb = 1e6
        lines = [f"offload plan: budget {self.budget / mb:.1f} MB; always resident (embedding, norm, lm_head) "
                 f"{self.fixed_bytes / mb:.1f} MB; {len(self.resident)} blocks resident "
                 f"({sum(self.block_bytes[i] for i in self.resident) / mb:.1f} MB), {len(self.streamed)} streamed "
                 f"({self.bytes_moved_per_pass / mb:.1f} MB read per forward pass, i.e. per decoded token); "
                 f"peak weights in memory {self.peak_weight_bytes / mb:.1f} MB"]
        if self.resident:
            lines.append(f"  resident blocks: {_ranges(self.resident)}")
        if self.streamed:
            lines.append(f"  streamed blocks: {_ranges(self.streamed)}")
        return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def plan_offload(fixed_bytes: int, block_bytes: list[int], budget: int) -> OffloadPlan:
    """Keep blocks resident from the first on while the rest still leaves room for two streamed blocks."""
    if not block_bytes:
        raise LowbitError("the model has no decoder blocks to offload")
    largest = max(block_bytes)
    if budget < fixed_bytes + 2 * largest:
        raise LowbitError(f"memory budget {budget / 1e6:.1f} MB is too small: the parts that always stay resident "
                          f"({fixed_bytes / 1e6:.1f} MB) plus two of the largest block ({largest / 1e6:.1f} MB "
                          f"each) need {(fixed_bytes + 2 * largest) / 1e6:.1f} MB")
    if fixed_bytes + sum(block_bytes) <= budget:
        return OffloadPlan(budget, fixed_bytes, block_bytes, list(range(len(block_bytes))), [])
    resident, used = [], fixed_bytes
    for i, b in enumerate(block_bytes):
        rest = block_bytes[i + 1:]
        window = sum(sorted(rest, reverse=True)[:2])
        if used + b + window > budget or not rest:
            break
        resident.append(i)
        used += b
    streamed = [i for i in range(len(block_bytes)) if i not in resident]
    return OffloadPlan(budget, fixed_bytes, block_bytes, resident, streamed)


@dataclass
class StreamedModel:
    """What `offload_blocks` did: the plan, the store, and a log of (event, block, time) for instrumentation."""

    model: nn.Module
    plan: OffloadPlan
    store: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    events: deque = field(default_factory=lambda: deque(maxlen=100_000))
    _executor: ThreadPoolExecutor | None = None
    _pending: dict = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stream: object = None
    _next: dict = field(default_factory=dict)     # streamed block -> the streamed block that runs after it
    _slot_cache: dict = field(default_factory=dict)

    def _log(self, what: str, index: int) -> None:
        with self._lock:
            self.events.append((what, index, time.perf_counter()))

    def _read(self, index: int):
        """On the reader thread: the block's tensors from the store, and on a GPU their copy to the device on a
        side stream (from pinned memory), with the event that marks the copy done."""
        self._log("read_start", index)
        tensors = self.store.load(index)
        event = None
        if self.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._stream):
                tensors = {k: (v if v.is_pinned() else v.pin_memory()).to(self.device, non_blocking=True)
                           for k, v in tensors.items()}
                event = torch.cuda.Event()
                event.record(self._stream)
            # the host buffers go back to the store's pool once these copies are done, so wait for them here,
            # on the reader thread, while the previous block computes
            event.synchronize()
        self._log("read_end", index)
        return tensors, event

    def _prefetch(self, index: int) -> Future:
        if index not in self._pending:
            self._pending[index] = self._executor.submit(self._read, index)
        return self._pending[index]

    def before(self, index: int, block: nn.Module) -> None:
        """Block `index` is about to run: install its tensors (waiting for the read if it is not done), then
        start reading the next streamed block so that it loads while this one computes."""
        tensors, event = self._prefetch(index).result()
        self._pending.pop(index, None)
        if event is not None:       # the compute stream waits for the copy, the host does not
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in tensors.values():
                # allocated on the side stream: without this, once released after the block ran, their
                # memory could take the next prefetch while the compute stream still reads them
                t.record_stream(compute)
        self._slots(index, block).fill(tensors)
        self._log("compute_start", index)
        self._prefetch(self._next[index])

    def after(self, index: int, block: nn.Module) -> None:
        """Block `index` has run: release its tensors (back to empty placeholders)."""
        self._log("compute_end", index)
        slots = self._slots(index, block)
        slots.fill(slots.empty)

    def _slots(self, index: int, block: nn.Module) -> "_Slots":
        key = (index, id(block))
        if key not in self._slot_cache:
            self._slot_cache[key] = _Slots(block)
        return self._slot_cache[key]

    def hook(self, module: nn.Module, index: int, block: nn.Module | None = None) -> None:
        """Stream block `index` around every call of `module`: its tensors are installed into `block` (default:
        module itself) before the call and released after. A runtime that calls the block's parts its own way
        (lowbit's engine) hooks its own wrapper module, with the model's block as `block`."""
        block = module if block is None else block
        self._handles.append(module.register_forward_pre_hook(lambda m, args: self.before(index, block)))
        self._handles.append(module.register_forward_hook(lambda m, args, out: self.after(index, block)))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if _STREAMING.get(self.model) is self:
            del _STREAMING[self.model]


_STREAMING: "weakref.WeakKeyDictionary[nn.Module, StreamedModel]" = weakref.WeakKeyDictionary()


def streaming_of(model: nn.Module) -> StreamedModel | None:
    """The streaming state installed on `model` (None if its blocks are all resident)."""
    return _STREAMING.get(model)


def _set_tensors(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        mod_name, _, leaf = name.rpartition(".")
        mod = block.get_submodule(mod_name) if mod_name else block
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t


class _Slots:
    """Where each of a block's tensors is held (its Parameter object, or its module's buffer dict), looked up
    once: a streamed block's tensors are swapped in and out twice per block per token, and resolving names
    and wrapping new Parameters each time cost more than a small block's compute. Parameters keep their
    identity; only their `.data` changes."""

    def __init__(self, block: nn.Module):
        self.params, self.buffers = {}, {}
        for name, t in block_tensors(block).items():
            mod_name, _, leaf = name.rpartition(".")
            mod = block.get_submodule(mod_name) if mod_name else block
            if leaf in mod._parameters:
                self.params[name] = mod._parameters[leaf]
            else:
                self.buffers[name] = (mod._buffers, leaf)
        self.empty = _placeholders(block_tensors(block))

    def fill(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            p = self.params.get(name)
            if p is not None:
                p.data = t
            else:
                holder, leaf = self.buffers[name]
                holder[leaf] = t


def _placeholders(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(0, dtype=v.dtype, device=v.device) for k, v in tensors.items()}


def offload_blocks(model: nn.Module, budget: int | str, offload_dir: str | None = None,
                   pin_memory: bool | None = None) -> StreamedModel:
    """Stream the model's decoder blocks that do not fit in `budget` (bytes or '2GB') from a store: disk shards in
    offload_dir if given, else host RAM (pinned when the model is on a GPU). The model may sit on a GPU: streamed
    blocks then move to it on a side stream, overlapping the previous block's compute. Prints nothing;
    `result.plan.describe()` says what was decided."""
    device = next(model.parameters()).device
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    budget = parse_size(budget) if isinstance(budget, str) else int(budget)
    arch = arch_for(model.config)
    blocks = model.get_submodule(arch.blocks)
    per_block = [block_tensors(b) for b in blocks]
    block_ids = {id(t) for ts in per_block for t in ts.values()}
    seen, fixed = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in block_ids and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            fixed += t.numel() * t.element_size()
    plan = plan_offload(fixed, [_nbytes(ts.values()) for ts in per_block], budget)
    streamed = {i: per_block[i] for i in plan.streamed}
    if offload_dir is not None:
        store = DiskStore.create(offload_dir, streamed, pin_memory)
    else:
        store = RamStore(pin_memory)
        for i, ts in streamed.items():
            store.put(i, ts)
    for i in plan.streamed:
        _set_tensors(blocks[i], _placeholders(per_block[i]))
    del per_block, streamed
    release_freed_memory()
    return install_streaming(model, plan, store, blocks, device)


def release_freed_memory() -> None:
    """Hand memory that was freed back to the operating system. Weight tensors of a few MB come from the C
    allocator's heap, which keeps freed pages mapped: without this, offloading blocks would not lower RSS."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def install_streaming(model: nn.Module, plan: OffloadPlan, store, blocks: nn.ModuleList,
                      device: torch.device | str | None = None) -> StreamedModel:
    """Hooks that bring each streamed block's tensors from `store` before it runs (prefetching the next one)
    and release them after; the streamed blocks must already hold empty placeholders. `device`: where the
    model computes (default: where its first parameter is)."""
    if device is None:
        device = next(model.parameters()).device
    sm = StreamedModel(model, plan, store, torch.device(device))
    if not plan.streamed:
        return sm
    sm._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-prefetch")
    order = plan.streamed
    for pos, i in enumerate(order):
        sm._next[i] = order[(pos + 1) % len(order)]
        sm.hook(blocks[i], i)
    _STREAMING[model] = sm
    sm._prefetch(order[0])
    return sm
