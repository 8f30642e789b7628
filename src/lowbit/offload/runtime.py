"""Streaming decoder blocks from a weight store with the next block prefetched: the hooks, the reader thread,
and moving a loaded model's blocks into a store.

`offload_blocks` plans (`offload.planner`) which blocks stream under a budget, moves their tensors into a
store (RAM or disk) and leaves empty placeholders; `install_streaming` then hooks every streamed block:
    before block i runs   its tensors are taken from the prefetch (waiting if the read is not done) and
                          the read of the next streamed block starts on a background thread;
    after block i ran     its tensors are released again.
The values are the stored bytes, so outputs are identical to the fully resident model's. The reader thread
is instrumented (`StreamedModel.events`) so tests can check that reads run ahead of compute.

The streaming state of a model is its attribute `lowbit_streaming` (a `StreamedModel`, set by
`install_streaming`, removed by `StreamedModel.close`); `streaming_of(model)` reads it. Runtimes that call
the blocks their own way (lowbit's engine) look there to hook their own wrappers.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from ..heap import release_freed_memory
from ..models.arch import arch_for
from ..nn.surgery import TensorSlots, module_tensors, placeholders, set_tensors
from .planner import OffloadPlan, budget_bytes, plan_offload
from .store import DiskStore, RamStore

STREAMING_ATTR = "lowbit_streaming"


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

    def __deepcopy__(self, memo):
        # the state travels with the model as an attribute; a deep copy of the model keeps pointing at the one
        # stream (its copied hooks call this object too) rather than failing on the lock and thread pool
        return self

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

    def _slots(self, index: int, block: nn.Module) -> TensorSlots:
        key = (index, id(block))
        if key not in self._slot_cache:
            self._slot_cache[key] = TensorSlots(block)
        return self._slot_cache[key]

    def hook(self, module: nn.Module, index: int, block: nn.Module | None = None) -> None:
        """Stream block `index` around every call of `module`: its tensors are installed into `block` (default:
        module itself) before the call and released after. A runtime that calls the block's parts its own way
        (lowbit's engine) hooks its own wrapper module, with the model's block as `block`."""
        block = module if block is None else block
        self._handles.append(module.register_forward_pre_hook(lambda m, args: self.before(index, block)))
        self._handles.append(module.register_forward_hook(lambda m, args, out: self.after(index, block)))

    def close(self, remove_store: bool = False) -> None:
        """Remove the hooks, stop the reader thread and detach from the model; with `remove_store`, also delete
        an offload directory the store wrote (`DiskStore.remove`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.model.__dict__.get(STREAMING_ATTR) is self:
            delattr(self.model, STREAMING_ATTR)
        if remove_store and hasattr(self.store, "remove"):
            self.store.remove()


def streaming_of(model: nn.Module) -> StreamedModel | None:
    """The streaming state `install_streaming` set on `model` (None if its blocks are all resident)."""
    return getattr(model, STREAMING_ATTR, None)


def offload_blocks(model: nn.Module, budget: int | str, offload_dir: str | None = None,
                   pin_memory: bool | None = None) -> StreamedModel:
    """Stream the model's decoder blocks that do not fit in `budget` (bytes or '2GB') from a store: disk shards in
    offload_dir if given, else host RAM (pinned when the model is on a GPU). The model may sit on a GPU: streamed
    blocks then move to it on a side stream, overlapping the previous block's compute. Prints nothing;
    `result.plan.describe()` says what was decided."""
    device = next(model.parameters()).device
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    budget = budget_bytes(budget)
    arch = arch_for(model)
    blocks = model.get_submodule(arch.blocks)
    per_block = [module_tensors(b) for b in blocks]
    block_ids = {id(t) for ts in per_block for t in ts.values()}
    seen, fixed = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in block_ids and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            fixed += t.numel() * t.element_size()
    plan = plan_offload(fixed, [sum(t.numel() * t.element_size() for t in ts.values()) for ts in per_block], budget)
    streamed = {i: per_block[i] for i in plan.streamed}
    if offload_dir is not None:
        store = DiskStore.create(offload_dir, streamed, pin_memory)
    else:
        store = RamStore(pin_memory)
        for i, ts in streamed.items():
            store.put(i, ts)
    for i in plan.streamed:
        set_tensors(blocks[i], placeholders(per_block[i]))
    del per_block, streamed
    release_freed_memory()
    return install_streaming(model, plan, store, blocks, device)


def install_streaming(model: nn.Module, plan: OffloadPlan, store, blocks: nn.ModuleList,
                      device: torch.device | str | None = None) -> StreamedModel:
    """Hooks that bring each streamed block's tensors from `store` before it runs (prefetching the next one)
    and release them after; the streamed blocks must already hold empty placeholders. `device`: where the
    model computes (default: where its first parameter is). When blocks stream, the state is also set as
    `model.lowbit_streaming` (see the module docstring)."""
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
    # a plain attribute (not a submodule: nn.Module keeps it in __dict__), so that whatever holds the model
    # can find its streaming state without a registry
    setattr(model, STREAMING_ATTR, sm)
    sm._prefetch(order[0])
    return sm
