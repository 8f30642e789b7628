"""Activation offloading for training: tensors that autograd saves for backward live in host memory meanwhile.

Built on `torch.autograd.graph.saved_tensors_hooks`: when autograd saves a tensor, the pack hook copies it to
the host (pinned memory, asynchronously on a side stream, when the tensor is on a GPU) and drops the device
copy; in backward the unpack hook brings it back. The values are copied, never transformed, so gradients are
bit-identical to a run without offloading. It composes with activation checkpointing
(`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`): only what the checkpointed graph still saves
is offloaded.

On a CPU-only machine host and device are the same memory; the same code path then copies into separate host
buffers (so that it is exercised and tested) and saves nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch


@dataclass
class OffloadStats:
    tensors: int = 0          # tensors moved to the host
    bytes: int = 0            # their size
    kept: int = 0             # tensors left where they were (too small, or parameters)
    peak_in_flight: int = 0   # most copies not yet known to be finished at once (GPU)
    restored: int = 0


@dataclass
class _Packed:
    host: torch.Tensor
    device: torch.device
    event: object = None      # CUDA event recorded after the device-to-host copy
    extra: dict = field(default_factory=dict)


class offload_activations:
    """Context manager: `with offload_activations(): loss = model(x).sum()` then `loss.backward()` (backward
    may run outside the block; the saved tensors stay on the host until it needs them).

    min_bytes: tensors smaller than this stay put (the bookkeeping would cost more than it saves).
    max_in_flight: on GPUs, at most this many device-to-host copies are queued before the oldest is awaited,
    bounding the device memory still held by tensors in transit.
    """

    def __init__(self, min_bytes: int = 1 << 16, max_in_flight: int = 4, pin_memory: bool | None = None):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.min_bytes = min_bytes
        self.max_in_flight = max_in_flight
        self.pin_memory = pin_memory
        self.stats = OffloadStats()
        self._in_flight: deque = deque()
        self._stream = None
        self._hooks = None

    # -- hooks ---------------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or isinstance(t, torch.nn.Parameter) or t.layout != torch.strided:
            self.stats.kept += 1
            return t
        self.stats.tensors += 1
        self.stats.bytes += nbytes
        if t.device.type == "cuda":
            return self._pack_cuda(t)
        return _Packed(t.detach().clone(memory_format=torch.preserve_format), t.device)

    def _pack_cuda(self, t: torch.Tensor) -> _Packed:
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        pin = True if self.pin_memory is None else self.pin_memory
        host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)
        current = torch.cuda.current_stream(t.device)
        self._stream.wait_stream(current)           # the copy starts after t is computed
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        t.record_stream(self._stream)               # t's memory is not reused until the copy is done
        self._in_flight.append(event)
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(self._in_flight))
        while len(self._in_flight) > self.max_in_flight:
            self._in_flight.popleft().synchronize()
        return _Packed(host, t.device, event)

    def _unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        self.stats.restored += 1
        if packed.device.type == "cuda":
            packed.event.synchronize()
            return packed.host.to(packed.device, non_blocking=True)
        return packed.host

    # -- context -------------------------------------------------------------------------------------------
    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None
        return False
