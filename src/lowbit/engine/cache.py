"""Preallocated (static) KV caches: fixed-size tensors written in place, so decode steps keep one shape.

Layout of the 16/32-bit cache: for each layer, keys and values are [1, kv_heads, max_len, head_dim] in the
model's dtype; position p of the sequence lives at index p of dim 2. Entries past the current length hold stale
data and are never read (attention reads the first `visible` positions).

Quantized caches (`kv_bits=8` or `4`) store, per layer and for keys and values alike, one scale per (head,
position, group of group_size channels):
    codes   int8  [1, kv_heads, max_len, head_dim]        8-bit, symmetric: x ≈ q · s, q in [-127, 127],
                                                          s = absmax / 127
            uint8 [1, kv_heads, max_len, head_dim / 2]    4-bit, asymmetric: x ≈ q · s + m, q in [0, 15],
                                                          s = (max − min) / 15, m = min; element 2j in the low
                                                          nibble of byte j, 2j+1 in the high one
    scales  float32 [1, kv_heads, max_len, head_dim / group_size]
    mins    float32 [1, kv_heads, max_len, head_dim / group_size]   (4-bit only)
Keys have channels with large offsets (the rotary pairs), which is why 4-bit needs the offset: measured at 2048
tokens, symmetric INT4 with 64-channel groups cost +42% perplexity on the default model, asymmetric +16%.
Each token's keys and values are quantized once, when written; a read dequantizes the visible positions to the
model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LowbitError


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """x [..., D] -> (codes, scales) for 8 bits, (codes, scales, mins) for 4 bits, in the layout above."""
    g = x.float().unflatten(-1, (-1, group_size))
    if bits == 8:
        scales = (g.abs().amax(-1) / _qmax(8)).clamp_min(1e-12)
        q = torch.round(g / scales.unsqueeze(-1)).clamp_(-_qmax(8), _qmax(8)).flatten(-2).to(torch.int8)
        return q, scales
    mins, maxs = g.amin(-1), g.amax(-1)
    scales = ((maxs - mins) / 15).clamp_min(1e-12)
    u = torch.round((g - mins.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp_(0, 15).flatten(-2).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4), scales, mins


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  dtype: torch.dtype, mins: torch.Tensor | None = None) -> torch.Tensor:
    if bits == 4:
        q = torch.stack(((codes & 0xF), (codes >> 4)), dim=-1).flatten(-2)
        g = q.float().unflatten(-1, (-1, group_size)) * scales.unsqueeze(-1) + mins.unsqueeze(-1)
    else:
        g = codes.float().unflatten(-1, (-1, group_size)) * scales.unsqueeze(-1)
    return g.flatten(-2).to(dtype)


class StaticKVCache(nn.Module):
    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_bits: int | None = None, group_size: int | None = None):
        super().__init__()
        if kv_bits not in (None, 4, 8):
            raise LowbitError(f"KV-cache bits must be 4 or 8 (or none for the model's dtype), got {kv_bits}")
        group_size = group_size or head_dim
        if kv_bits and (head_dim % group_size or group_size % 2):
            raise LowbitError(f"KV-cache group size {group_size} must be even and divide head_dim {head_dim}")
        self.layers, self.max_len, self.dtype = layers, max_len, dtype
        self.kv_bits, self.group_size = kv_bits, group_size
        shape = (1, kv_heads, max_len, head_dim)
        for i in range(layers):
            for kind in "kv":
                if kv_bits is None:
                    self.register_buffer(f"{kind}{i}", torch.zeros(shape, dtype=dtype, device=device),
                                         persistent=False)
                    continue
                width = head_dim // 2 if kv_bits == 4 else head_dim
                codes_dtype = torch.uint8 if kv_bits == 4 else torch.int8
                self.register_buffer(f"{kind}{i}", torch.zeros(*shape[:3], width, dtype=codes_dtype, device=device),
                                     persistent=False)
                for extra in ("scale", "min") if kv_bits == 4 else ("scale",):
                    self.register_buffer(f"{kind}{i}_{extra}", torch.zeros(*shape[:3], head_dim // group_size,
                                                                           device=device), persistent=False)

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v ([1, kv_heads, T, head_dim]) at positions pos ([T])."""
        for kind, x in (("k", k), ("v", v)):
            buf = getattr(self, f"{kind}{layer}")
            if self.kv_bits is None:
                buf.index_copy_(2, pos, x)
            else:
                codes, *params = quantize_kv(x, self.kv_bits, self.group_size)
                buf.index_copy_(2, pos, codes)
                for extra, t in zip(("scale", "min"), params):
                    getattr(self, f"{kind}{layer}_{extra}").index_copy_(2, pos, t)

    def read(self, layer: int, n) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first n positions, [1, kv_heads, n, head_dim] in the model's dtype."""
        out = []
        for kind in "kv":
            buf = getattr(self, f"{kind}{layer}")[:, :, :n]
            if self.kv_bits is not None:
                mins = getattr(self, f"{kind}{layer}_min")[:, :, :n] if self.kv_bits == 4 else None
                buf = dequantize_kv(buf, getattr(self, f"{kind}{layer}_scale")[:, :, :n], self.kv_bits,
                                    self.group_size, self.dtype, mins)
            out.append(buf)
        return out[0], out[1]

    def _layer_buffers(self, layer: int) -> list[str]:
        """Names of the layer's buffers: keys, values, then their scales (and mins, 4-bit)."""
        names = [f"k{layer}", f"v{layer}"]
        extras = {None: (), 8: ("scale",), 4: ("scale", "min")}[self.kv_bits]
        return names + [f"{kind}{layer}_{e}" for e in extras for kind in "kv"]

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """x as the cache will give it back (identity for a 16/32-bit cache)."""
        if self.kv_bits is None:
            return x
        codes, scales, *mins = quantize_kv(x, self.kv_bits, self.group_size)
        return dequantize_kv(codes, scales, self.kv_bits, self.group_size, x.dtype, *mins)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class HostKVCache(StaticKVCache):
    """The same cache kept in host memory (pinned when computing on a GPU), each layer's visible part brought
    to the compute device when attention reads it, and the next layer's copy started meanwhile.

    At decode step n, reading layer L uses the copy of positions [0, n−1) prefetched while layer L−1 ran, plus
    the one position layer L has just written; the copy of layer L+1 then starts (on a side CUDA stream, from
    pinned memory). On a CPU the host and the compute device are the same memory: the code path is the same
    and the copies are plain copies, which the tests use to check it.
    """

    def __init__(self, *args, compute_device: torch.device | str = "cpu", **kwargs):
        kwargs["device"] = "cpu"
        super().__init__(*args, **kwargs)
        self.compute_device = torch.device(compute_device)
        self._cuda = self.compute_device.type == "cuda"
        if self._cuda:
            for name, b in list(self._buffers.items()):
                self._buffers[name] = b.pin_memory()
            self._stream = torch.cuda.Stream(self.compute_device)
        self._prefetched: dict[int, tuple[int, dict, object]] = {}
        self.copied_bytes = 0

    def _copy(self, layer: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        out = {}
        for name in self._layer_buffers(layer):
            part = self._buffers[name][:, :, start:stop]
            self.copied_bytes += part.numel() * part.element_size()
            out[name] = part.to(self.compute_device, non_blocking=self._cuda, copy=True)
        return out

    def _prefetch(self, layer: int, upto: int) -> None:
        if self._cuda:
            with torch.cuda.stream(self._stream):
                parts = self._copy(layer, 0, upto)
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            parts, event = self._copy(layer, 0, upto), None
        self._prefetched[layer] = (upto, parts, event)

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        super().update(layer, pos.cpu(), k.cpu(), v.cpu())

    def read(self, layer: int, n) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(n)
        upto, parts, event = self._prefetched.pop(layer, (0, None, None))
        if parts is None or upto > n:   # nothing prefetched, or for a longer sequence than this one
            upto, parts, event = 0, None, None
        if event is not None:
            compute = torch.cuda.current_stream(self.compute_device)
            compute.wait_event(event)
            for t in parts.values():
                t.record_stream(compute)   # copied on the side stream, read on this one (see offload.stream)
        tail = self._copy(layer, upto, n)
        full = tail if parts is None else {k: torch.cat((parts[k], tail[k]), dim=2) for k in tail}
        nxt = (layer + 1) % self.layers
        # the next layer has written positions [0, n−1) so far at this step (all n when it is the next step's 0)
        self._prefetch(nxt, n if nxt == 0 else n - 1)
        keys, values = full[f"k{layer}"], full[f"v{layer}"]
        if self.kv_bits is not None:
            def deq(kind, codes):
                mins = full[f"{kind}{layer}_min"] if self.kv_bits == 4 else None
                return dequantize_kv(codes, full[f"{kind}{layer}_scale"], self.kv_bits, self.group_size,
                                     self.dtype, mins)
            keys, values = deq("k", keys), deq("v", values)
        return keys, values
