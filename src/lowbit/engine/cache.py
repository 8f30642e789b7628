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
                                                          (lowbit's 4-bit packing, `formats.packing`)
    scales  float32 [1, kv_heads, max_len, head_dim / group_size]
    mins    float32 [1, kv_heads, max_len, head_dim / group_size]   (4-bit only)
Keys have channels with large offsets (the rotary pairs), which is why 4-bit needs the offset: measured at 2048
tokens, symmetric INT4 with 64-channel groups cost +42% perplexity on the default model, asymmetric +16.7%.
Scaling keys per channel instead (`ChannelKeyKVCache`, over groups of 64 positions, values still per token)
brings INT4 to +1.3%; the engine uses it for 4-bit caches by default.
Each token's keys and values are quantized once, when written; a read dequantizes the visible positions to the
model's dtype. One codec (`quantize_kv` / `dequantize_kv`) serves both granularities: per token over groups of
channels, per channel over groups of positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from ..formats.packing import pack_nibbles, unpack_nibbles


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize_kv(x: torch.Tensor, bits: int, group_size: int, axis: int = -1,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """x [..., T, D] -> (codes, scales) for 8 bits, (codes, scales, mins) for 4 bits: one scale (and min) per
    group of `group_size` consecutive entries along `axis`.

    axis = -1: per token, groups of channels; scales [..., T, D / group_size] (the layout above).
    axis = -2: per channel, groups of positions; scales [..., T / group_size, D] (ChannelKeyKVCache).
    `valid` (bool, full-sized along `axis` and broadcastable to x: [T, 1] for axis = -2) marks the entries the
    scales are computed from (the positions written so far of a filling group); the others are still encoded,
    with those scales. Codes keep x's shape, 4-bit ones packed two per byte along the channels."""
    g = x.float().unflatten(axis, (-1, group_size))         # a group's members along `axis`
    if valid is not None:
        valid = valid.unflatten(axis, (-1, group_size))
    if bits == 8:
        mag = g.abs() if valid is None else torch.where(valid, g.abs(), 0.0)
        scales = (mag.amax(axis) / _qmax(8)).clamp_min(1e-12)
        q = torch.round(g / scales.unsqueeze(axis)).clamp_(-_qmax(8), _qmax(8)).flatten(axis - 1, axis)
        return q.to(torch.int8), scales
    if valid is None:
        mins, maxs = g.amin(axis), g.amax(axis)
    else:
        mins = torch.where(valid, g, float("inf")).amin(axis)
        maxs = torch.where(valid, g, float("-inf")).amax(axis)
    scales = ((maxs - mins) / 15).clamp_min(1e-12)
    u = torch.round((g - mins.unsqueeze(axis)) / scales.unsqueeze(axis)).clamp_(0, 15).flatten(axis - 1, axis)
    return pack_nibbles(u.to(torch.uint8)), scales, mins


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  dtype: torch.dtype, mins: torch.Tensor | None = None, axis: int = -1) -> torch.Tensor:
    """The inverse of `quantize_kv` (same `group_size` and `axis`), in dtype."""
    q = unpack_nibbles(codes) if bits == 4 else codes
    g = q.float().unflatten(axis, (-1, group_size)) * scales.unsqueeze(axis)
    if bits == 4:
        g = g + mins.unsqueeze(axis)
    return g.flatten(axis - 1, axis).to(dtype)


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
        self._write("k", layer, pos, k)
        self._write("v", layer, pos, v)

    def _write(self, kind: str, layer: int, pos: torch.Tensor, x: torch.Tensor) -> None:
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
        return self._read("k", layer, n), self._read("v", layer, n)

    def _read(self, kind: str, layer: int, n, bufs: dict | None = None) -> torch.Tensor:
        """bufs: the layer's buffers by name, when they are read from copies (HostKVCache), else this cache's."""
        get = (lambda name: bufs[name]) if bufs is not None else (lambda name: getattr(self, name))
        buf = get(f"{kind}{layer}")[:, :, :n]
        if self.kv_bits is None:
            return buf
        mins = get(f"{kind}{layer}_min")[:, :, :n] if self.kv_bits == 4 else None
        return dequantize_kv(buf, get(f"{kind}{layer}_scale")[:, :, :n], self.kv_bits, self.group_size,
                             self.dtype, mins)

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of a prefill from position 0 over the new keys and values as this cache gives them
        back ([1, heads, T, head_dim] each; k and v may have fewer heads)."""
        return F.scaled_dot_product_attention(q, self.roundtrip(k), self.roundtrip(v), scale=scale,
                                              is_causal=q.shape[2] > 1, enable_gqa=q.shape[1] != k.shape[1])

    def layer_buffers(self, layer: int) -> dict[str, int]:
        """The layer's buffers by name, each with how many positions one index of its dim 2 covers: 1 for
        per-position buffers, G for one entry per group of G positions, 0 for a buffer read whole."""
        names = [f"k{layer}", f"v{layer}"]
        extras = {None: (), 8: ("scale",), 4: ("scale", "min")}[self.kv_bits]
        return dict.fromkeys(names + [f"{kind}{layer}_{e}" for e in extras for kind in "kv"], 1)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """x as the cache will give it back (identity for a 16/32-bit cache)."""
        if self.kv_bits is None:
            return x
        codes, scales, *mins = quantize_kv(x, self.kv_bits, self.group_size)
        return dequantize_kv(codes, scales, self.kv_bits, self.group_size, x.dtype, *mins)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class ChannelKeyKVCache(StaticKVCache):
    """Keys quantized per channel over groups of `key_group` positions; values per token, as in StaticKVCache.

    This is the split KIVI (Liu et al., 2024) makes: a few key channels carry large values at every position
    (the rotary pairs), so one scale per channel fits keys far better than one per token; values have no such
    channels. Layout of a layer's keys: codes as in StaticKVCache ([1, kv_heads, max_len, head_dim / 2] uint8
    for 4 bits, [1, kv_heads, max_len, head_dim] int8 for 8), but scales (and 4-bit mins) per (head, group of
    key_group positions, channel): float32 [1, kv_heads, max_len / key_group, head_dim]. The newest group is
    incomplete while it fills: its keys stay exact in `k{layer}_recent` ([1, kv_heads, key_group, head_dim],
    model dtype) and attention reads them from there; its codes are re-made from the positions written so far
    at each write, and are final once the group is full. Each query thus sees the completed groups quantized and
    its own group exact, in decoding and, identically, in a prefill.
    """

    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_bits: int | None = 4, group_size: int | None = None,
                 key_group: int = 64):
        if kv_bits not in (4, 8):
            raise LowbitError(f"per-channel keys need a 4- or 8-bit cache, got {kv_bits}")
        if key_group < 1 or max_len % key_group:
            raise LowbitError(f"KV-cache key group {key_group} must divide the cache length {max_len}")
        super().__init__(layers, kv_heads, max_len, head_dim, dtype, device, kv_bits, group_size)
        self.key_group = key_group
        for i in range(layers):
            for extra in ("scale", "min") if kv_bits == 4 else ("scale",):
                self.register_buffer(f"k{i}_{extra}", torch.zeros(1, kv_heads, max_len // key_group, head_dim,
                                                                  device=device), persistent=False)
            self.register_buffer(f"k{i}_recent", torch.zeros(1, kv_heads, key_group, head_dim, dtype=dtype,
                                                             device=device), persistent=False)
        self.register_buffer("_rows", torch.arange(key_group, device=device), persistent=False)

    def _key_params(self, layer: int, get=None) -> list[torch.Tensor]:
        get = get or (lambda name: getattr(self, name))
        return [get(f"k{layer}_{e}") for e in (("scale", "min") if self.kv_bits == 4 else ("scale",))]

    def layer_buffers(self, layer: int) -> dict[str, int]:
        out = super().layer_buffers(layer)
        for e in ("scale", "min") if self.kv_bits == 4 else ("scale",):
            out[f"k{layer}_{e}"] = self.key_group
        out[f"k{layer}_recent"] = 0
        return out

    def _write(self, kind: str, layer: int, pos: torch.Tensor, x: torch.Tensor) -> None:
        if kind == "v":
            return super()._write(kind, layer, pos, x)
        G, codes_buf, recent = self.key_group, getattr(self, f"k{layer}"), getattr(self, f"k{layer}_recent")
        t = x.shape[2]
        if t == 1:   # decoding (compiled): no data-dependent Python, the group is re-made from its rows so far
            offset = pos % G
            recent.index_copy_(2, offset, x)
            codes, *params = quantize_kv(recent, self.kv_bits, G, -2, (self._rows <= offset).unsqueeze(-1))
            codes_buf.index_copy_(2, pos - offset + self._rows, codes)
            for buf, p in zip(self._key_params(layer), params):
                buf.index_copy_(2, pos // G, p)
            return
        start = int(pos[0])
        if start % G:   # a run that begins inside a group: position by position
            for i in range(t):
                self._write("k", layer, pos[i:i + 1], x[:, :, i:i + 1])
            return
        groups = -(-t // G)
        padded = F.pad(x, (0, 0, 0, groups * G - t))
        valid = (torch.arange(groups * G, device=x.device) < t).unsqueeze(-1)
        codes, *params = quantize_kv(padded, self.kv_bits, G, -2, valid)
        codes_buf[:, :, start:start + groups * G] = codes
        for buf, p in zip(self._key_params(layer), params):
            buf[:, :, start // G:start // G + groups] = p
        recent.copy_(padded[:, :, (groups - 1) * G:])

    def _read(self, kind: str, layer: int, n, bufs: dict | None = None) -> torch.Tensor:
        if kind == "v":
            return super()._read(kind, layer, n, bufs)
        get = (lambda name: bufs[name]) if bufs is not None else (lambda name: getattr(self, name))
        G = self.key_group
        done = (n - 1) // G * G          # positions in completed groups; the rest are in the recent group
        params = [b[:, :, :done // G] for b in self._key_params(layer, get)]
        old = dequantize_kv(get(f"k{layer}")[:, :, :done], params[0], self.kv_bits, G, self.dtype, *params[1:],
                            axis=-2)
        return torch.cat((old, get(f"k{layer}_recent")[:, :, :n - done]), dim=2)

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """What decoding the same positions one by one computes: query t attends to the keys of completed
        groups quantized (with their final per-channel scales) and to those of its own group exact."""
        G, t = self.key_group, k.shape[2]
        groups = -(-t // G)
        padded = F.pad(k, (0, 0, 0, groups * G - t))
        valid = (torch.arange(groups * G, device=k.device) < t).unsqueeze(-1)
        codes, scales, *mins = quantize_kv(padded, self.kv_bits, G, -2, valid)
        k_old = dequantize_kv(codes, scales, self.kv_bits, G, k.dtype, *mins, axis=-2)[:, :, :t]
        v = self.roundtrip(v)
        rep = q.shape[1] // k.shape[1]
        k, k_old, v = (x.repeat_interleave(rep, dim=1) for x in (k, k_old, v))
        group = torch.arange(t, device=q.device) // G
        out = []
        for a in range(0, q.shape[2], 512):    # query chunks bound the [chunk, t] score matrices
            qc, rows = q[:, :, a:a + 512], torch.arange(a, min(a + 512, t), device=q.device)
            same = group[rows].unsqueeze(-1) == group.unsqueeze(0)
            scores = torch.where(same, qc @ k.transpose(-1, -2), qc @ k_old.transpose(-1, -2)).float() * scale
            scores = scores.masked_fill(rows.unsqueeze(-1) < torch.arange(t, device=q.device), float("-inf"))
            out.append((scores.softmax(-1).to(v.dtype)) @ v)
        return torch.cat(out, dim=2)


class HostKVCache(nn.Module):
    """A KV cache (any layout above, `layout`) kept in host memory, pinned when computing on a GPU; each layer's
    visible part is brought to the compute device when attention reads it, and the next layer's copy is started
    meanwhile.

    At decode step n, reading layer L uses the copy of positions [0, n−1) of its per-position buffers prefetched
    while layer L−1 ran, plus the one position layer L has just written; buffers with one entry per group of
    positions and the exact newest key group (ChannelKeyKVCache) are small and copied whole when read. The copy
    of layer L+1 then starts (on a side CUDA stream, from pinned memory, one head at a time so that every piece
    is contiguous). On a CPU the host and the compute device are the same memory: the code path is the same and
    the copies are plain copies, which the tests use to check it.
    """

    def __init__(self, layout: StaticKVCache, compute_device: torch.device | str = "cpu"):
        super().__init__()
        self.layout = layout.cpu()
        self.compute_device = torch.device(compute_device)
        self._cuda = self.compute_device.type == "cuda"
        if self._cuda:
            for name, b in list(self.layout._buffers.items()):
                self.layout._buffers[name] = b.pin_memory()
            self._stream = torch.cuda.Stream(self.compute_device)
        self.layers, self.max_len, self.dtype = layout.layers, layout.max_len, layout.dtype
        self._prefetched: dict[int, tuple[int, dict, object]] = {}
        self.copied_bytes = 0

    def _to_device(self, part: torch.Tensor) -> torch.Tensor:
        self.copied_bytes += part.numel() * part.element_size()
        if not self._cuda:
            return part.clone()
        # a non-contiguous pinned slice would be staged through pageable memory (a synchronous copy): copy the
        # heads one by one instead, each a contiguous run of positions
        out = torch.empty(part.shape, dtype=part.dtype, device=self.compute_device)
        for h in range(part.shape[1]):
            out[:, h].copy_(part[:, h], non_blocking=True)
        return out

    def _copy(self, layer: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Positions [start, stop) of the layer's per-position buffers."""
        return {name: self._to_device(self.layout._buffers[name][:, :, start:stop])
                for name, unit in self.layout.layer_buffers(layer).items() if unit == 1}

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
        self.layout.update(layer, pos.cpu(), k.cpu(), v.cpu())

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout.roundtrip(x)

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return self.layout.prefill_attention(q, k, v, scale)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

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
        for name, unit in self.layout.layer_buffers(layer).items():
            if unit != 1:   # per group of positions, or read whole: small, copied as they are now
                buf = self.layout._buffers[name]
                full[name] = self._to_device(buf[:, :, :-(-n // unit)] if unit else buf)
        nxt = (layer + 1) % self.layers
        # the next layer has written positions [0, n−1) so far at this step (all n when it is the next step's 0)
        self._prefetch(nxt, n if nxt == 0 else n - 1)
        return self.layout._read("k", layer, n, full), self.layout._read("v", layer, n, full)
