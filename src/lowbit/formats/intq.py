"""Integer weight formats: w ≈ (q − z) · s, with one scale s (and zero point z) per output row and input group.

A weight matrix W has the torch.nn.Linear layout [N, K] = [out_features, in_features]. Its K columns are cut
into G = K / group_size contiguous groups (group_size = -1 means one group of all K columns: per output
channel). Each (row, group) has a float16 scale and, for asymmetric formats, an integer zero point.

Code ranges
    bits = 8: signed codes q in [-128, 127]; symmetric: z = 0 and s = absmax / 127 (codes in [-127, 127]).
    bits = b < 8 (2 to 7): unsigned codes q in [0, 2^b − 1]; symmetric: z = 2^(b−1) (implicit) and
    s = absmax / (2^(b−1) − 0.5), e.g. 4-bit s = absmax / 7.5: every one of the 16 codes is used (the most
    negative weight of a group reaches code 0, the most positive rounds to 15.5 and is clamped to 15), as in
    compressed-tensors. Until lowbit 0.1.0 the step was absmax / (2^(b−1) − 1) (codes 1..15); both store and
    dequantize the same way, so older checkpoints load unchanged. Measured on the default model's real layers
    (see tests/test_importance.py), the full-code step lowers both the plain and the Hessian-weighted error of
    RTN and GPTQ. 8-bit keeps absmax / 127 (codes −127..127), the range int8 kernels and exporters assume.
    asymmetric (either): s = (max − min) / (qmax − qmin), z = qmin − round(min / s), with the range widened
    to include 0 so that z is a representable code (as the GPTQ reference does).

Two-level scales (scale_bits = c, 4 to 8; group_size must not be -1): the group scales of a row are themselves
quantized, as llama.cpp's k-quants do, so that small groups do not cost a float16 each. The row's columns are
cut into super-blocks of `super_block` columns (a multiple of group_size dividing K; -1: the whole row), each
with one float16 super-scale d; group j of a super-block has scale s_j = d · sc_j with an unsigned c-bit code
sc_j in [1, 2^c − 1], computed in float32. d = max_j s_j' / (2^c − 1) over the float scales s_j' the one-level
format would choose (min/max, or the importance-weighted search), and each sc_j is the floor or the ceiling of
s_j' / d, whichever gives the group the smaller (importance-weighted) squared error after its weights are
rounded again on the final scale (asymmetric: with its zero point recomputed from the range's low end).

Stored tensors of a QuantizedTensor (the checkpoint holds exactly these):
    qweight  bits = 8: int8  [N, K]           one code per byte, row-major.
             bits = b < 8: uint8 [N, K·b / 8]  each row a little-endian bit stream of its codes (formats.packing;
                                               4-bit: column 2j in the low nibble of byte j, 2j+1 in the high one).
    scales   float16 [N, G]
             two-level: uint8 [N, ⌈G·c / 8⌉ + 2·S] (S = K / super_block super-blocks per row): per row, the G
             codes sc as one little-endian c-bit stream (sc_j in bits [j·c, (j+1)·c), zero bits up to the byte
             boundary), then the S float16 super-scales d as little-endian bytes.
    zeros    asymmetric only: int8 [N, G] (bits = 8) or uint8 [N, G] (bits < 8), one zero point per byte.
So a two-level format costs b + 8·(⌈G·c / 8⌉ + 2·S) / K bits per weight (+ 8 / group_size asymmetric): 4-bit
groups of 32 with 6-bit sub-scales and super-blocks of 256 cost 4 + 6/32 + 16/256 = 4.25, what 4-bit groups of
64 with float16 scales cost.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from ..errors import LowbitError
from .base import Grid, IntegerView, WeightFormat, check_importance, register_format
from .packing import pack_bits, unpack_bits
from .tensor import QuantizedTensor

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
SCALE_BITS = (4, 5, 6, 7, 8)   # sub-scale widths of two-level scales
SCALE_DTYPE = torch.float16
_FP16_MAX = 65504.0


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LowbitError(f"{what} must be an integer, got {value!r}")
    return value


@register_format
@dataclass(frozen=True)
class IntSpec(WeightFormat):
    """An integer weight format: bit width, group size (-1 = per output channel) and symmetry; with scale_bits,
    two-level scales (sub-scale codes of that width under one float16 scale per `super_block` columns)."""

    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    scale_bits: int | None = None
    super_block: int = 256

    kind = "int"

    def __post_init__(self):
        _check_int(self.bits, "bits")
        _check_int(self.group_size, "group size")
        if self.bits not in SUPPORTED_BITS:
            raise LowbitError(f"unsupported bit width {self.bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and self.group_size <= 0:
            raise LowbitError(f"group size must be positive or -1 (per channel), got {self.group_size}")
        if not isinstance(self.symmetric, bool):
            raise LowbitError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.scale_bits is not None:
            _check_int(self.scale_bits, "scale bits")
            _check_int(self.super_block, "super-block")
            if self.scale_bits not in SCALE_BITS:
                raise LowbitError(f"unsupported scale bits {self.scale_bits}; supported: "
                                  f"{', '.join(map(str, SCALE_BITS))}")
            if self.group_size == -1:
                raise LowbitError("two-level scales need groups (a group size, not -1 = per channel)")
            if self.super_block != -1 and (self.super_block <= 0 or self.super_block % self.group_size):
                raise LowbitError(f"super-block must be a positive multiple of the group size {self.group_size} "
                                  f"or -1 (the whole row), got {self.super_block}")

    @property
    def two_level(self) -> bool:
        return self.scale_bits is not None

    # code range -------------------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -128 if self.bits == 8 else 0

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else (1 << self.bits) - 1

    @property
    def implicit_zero(self) -> int:
        """Zero point of the symmetric format."""
        return 0 if self.bits == 8 else 1 << (self.bits - 1)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    # geometry ---------------------------------------------------------------------------------------------
    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group_size_for(in_features)

    def check_shape(self, shape: tuple[int, int], name: str = "weight") -> None:
        n, k = shape
        if self.group_size != -1 and k % self.group_size:
            ok = [g for g in (32, 64, 128, 256) if k % g == 0] + [-1]
            raise LowbitError(
                f"group size {self.group_size} does not divide in_features={k} of {name}; "
                f"group sizes that work: {', '.join(map(str, ok))} (-1 = per channel)"
            )
        if (k * self.bits) % 8:
            raise LowbitError(f"{self.bits}-bit packing needs in_features·{self.bits} divisible by 8, {name} has {k}")
        if self.two_level and self.super_block != -1 and k % self.super_block:
            ok = [b for b in range(self.group_size, k + 1, self.group_size) if k % b == 0 and b >= 128]
            raise LowbitError(f"super-block {self.super_block} does not divide in_features={k} of {name}; "
                              f"super-blocks that work: {', '.join(map(str, ok[:6]))} (-1 = the whole row)")

    def super_block_for(self, in_features: int) -> int:
        return in_features if self.super_block == -1 else self.super_block

    @property
    def name(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        two = "" if not self.two_level else f"_s{self.scale_bits}" + (
            "" if self.super_block == 256 else "r" if self.super_block == -1 else f"x{self.super_block}")
        return f"int{self.bits}_{g}_{'sym' if self.symmetric else 'asym'}{two}"

    def describe(self) -> str:
        per = "per output channel" if self.group_size == -1 else f"per {self.group_size} columns"
        zero = "implicit zero point" if self.symmetric else "8-bit zero point"
        if self.two_level:
            sb = "row" if self.super_block == -1 else f"{self.super_block} columns"
            return (f"{self.bits}-bit integer codes, {self.scale_bits}-bit scale and {zero} {per}, "
                    f"float16 super-scale per {sb}")
        return f"{self.bits}-bit integer codes, float16 scale and {zero} {per}"

    def layout(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, k = shape
        g = self.num_groups(k)
        out = {
            "qweight": ((n, k), torch.int8) if self.bits == 8 else ((n, k * self.bits // 8), torch.uint8),
            "scales": ((n, g), SCALE_DTYPE),
        }
        if self.two_level:
            out["scales"] = ((n, -(-g * self.scale_bits // 8) + 2 * (k // self.super_block_for(k))), torch.uint8)
        if not self.symmetric:
            out["zeros"] = ((n, g), self.code_dtype)
        return out

    # the format protocol ----------------------------------------------------------------------------------
    @property
    def sym_divisor(self) -> float:
        """absmax / sym_divisor is the symmetric step (see the module docstring)."""
        return 127.0 if self.bits == 8 else (1 << (self.bits - 1)) - 0.5

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Min/max scales; with `importance` ([K]), per group the clipped range (see `search_qparams`) of
        least importance-weighted squared error."""
        imp = None if importance is None else check_importance(importance, w.shape[1])
        if self.two_level:
            stored, zeros, scales = two_level_qparams(w, self, imp)
            return QuantizedTensor.from_codes(quantize_codes(w, scales, zeros, self), stored, zeros, self)
        scales, zeros = choose_qparams(w, self) if imp is None else search_qparams(w, self, imp)
        return QuantizedTensor.from_codes(quantize_codes(w, scales, zeros, self), scales, zeros, self)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.two_level:
            return super().fake_quantize(w)
        # the codes of quantize, dequantized as dequantize does, without packing and unpacking them
        scales, zeros = choose_qparams(w, self)
        return dequantize_codes(quantize_codes(w, scales, zeros, self), scales, zeros, self)

    @property
    def one_level(self) -> "IntSpec":
        """The same format with float16 group scales."""
        return IntSpec(self.bits, self.group_size, self.symmetric)

    def group_scales(self, scales: torch.Tensor, in_features: int) -> torch.Tensor:
        """The stored `scales` tensor -> the scale of every group, float32 [N, G]."""
        if not self.two_level:
            return scales.float()
        g, sb = self.num_groups(in_features), self.super_block_for(in_features)
        nb = -(-g * self.scale_bits // 8)
        d = scales[:, nb:].contiguous().view(SCALE_DTYPE).float()          # [N, S]
        sc = unpack_scale_codes(scales[:, :nb], g, self.scale_bits)
        return d.repeat_interleave(sb // self.group_size, dim=1) * sc

    # integer codes on affine groups (formats.base.IntegerView) ---------------------------------------------
    def integer_groups(self, in_features: int) -> tuple[int, int, int]:
        return self.group_size_for(in_features), self.qmin, self.qmax

    def integer_view(self, qt: QuantizedTensor) -> IntegerView:
        s = self.group_scales(qt.scales, qt.shape[1]).float()
        return IntegerView(qt.codes().to(torch.int32), s.contiguous(), (_zero_float(qt.zeros, self, s) * s).contiguous())

    def integer_rest(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The stored scales (and zero points); two-level ones as their sub-scale codes, a byte each, and their
        float16 super-scales, which native kernels read as they are (kernels.native_int4.two_level_scales;
        `from_integer_codes` packs the codes again), unless the stored bit stream's padding is not zero (it then
        would not come back bit for bit: kept as stored)."""
        zeros = {} if qt.zeros is None else {"zeros": qt.zeros}
        if not self.two_level:
            return {"scales": qt.scales, **zeros}
        g = self.num_groups(qt.shape[1])
        nb = -(-g * self.scale_bits // 8)
        codes = unpack_scale_codes(qt.scales[:, :nb], g, self.scale_bits).to(torch.uint8)
        if not torch.equal(pack_scale_codes(codes, self.scale_bits), qt.scales[:, :nb]):
            return {"scales": qt.scales, **zeros}
        return {"scale_codes": codes, "scale_super": qt.scales[:, nb:].contiguous().view(SCALE_DTYPE), **zeros}

    def from_integer_codes(self, codes: torch.Tensor, rest: dict[str, torch.Tensor],
                           shape: tuple[int, int]) -> QuantizedTensor:
        scales = rest.get("scales")
        if scales is None:   # two-level, as integer_rest gave them
            d = rest["scale_super"].contiguous().view(torch.uint8)
            scales = torch.cat([pack_scale_codes(rest["scale_codes"], self.scale_bits), d], dim=1)
        return QuantizedTensor.from_codes(codes.to(self.code_dtype), scales, rest.get("zeros"), self)

    # fixed grids (formats.base.Grid): one group of columns at a time ------------------------------------
    def grid_width(self, in_features: int) -> int:
        return self.super_block_for(in_features) if self.two_level else self.group_size_for(in_features)

    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        if self.two_level:   # one super-block: its group scales and super-scale, repeated over the columns
            imp = None if importance is None else check_importance(importance, w.shape[1])
            spec = IntSpec(self.bits, self.group_size, self.symmetric, self.scale_bits, -1)
            stored, z, s = two_level_qparams(w, spec, imp)
            g = self.group_size
            zf = _zero_float(z, self, s).repeat_interleave(g, dim=1)
            return Grid(s.repeat_interleave(g, dim=1), zf, torch.zeros_like(zf), self.qmin, self.qmax,
                        {"stored": stored, "zeros": z, "groups": w.shape[1] // g})
        per_row = IntSpec(self.bits, -1, self.symmetric)
        if importance is None:
            s, z = choose_qparams(w, per_row)
        else:
            s, z = search_qparams(w, per_row, check_importance(importance, w.shape[1]))
        zf = _zero_float(z, self, s.float()).expand(-1, w.shape[1])
        step = s.float().expand(-1, w.shape[1])
        return Grid(step, zf, torch.zeros_like(step), self.qmin, self.qmax, {"scales": s, "zeros": z})

    def fit_grids(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> list[Grid]:
        if self.two_level:
            return super().fit_grids(w, importance)
        # every group at once: the same operations per group as fit_grid on each slice (tests/test_gptq.py),
        # importance's floor (check_importance) taken per group as there
        n, k = w.shape
        g = self.grid_width(k)
        spec = IntSpec(self.bits, g, self.symmetric)
        if importance is None:
            s, z = choose_qparams(w, spec)
        else:
            check_importance(importance, k)
            raw = torch.as_tensor(importance).detach().float().reshape(-1, g)
            floor = (raw.mean(1, keepdim=True).double() * 1e-9 + 1e-30).float()
            s, z = search_qparams(w, spec, torch.maximum(raw, floor).reshape(-1))
        grids = []
        for j in range(k // g):
            sj, zj = s[:, j:j + 1], None if z is None else z[:, j:j + 1]
            step = sj.float().expand(-1, g)
            grids.append(Grid(step, _zero_float(zj, self, sj.float()).expand(-1, g), torch.zeros_like(step),
                              self.qmin, self.qmax, {"scales": sj, "zeros": zj}))
        return grids

    def from_grids(self, codes: torch.Tensor, grids: list[Grid]) -> QuantizedTensor:
        if self.two_level:   # each grid's stored scales hold one super-block: its codes, then its d
            parts = []
            for gr in grids:
                nb = -(-gr.params["groups"] * self.scale_bits // 8)
                parts.append((unpack_scale_codes(gr.params["stored"][:, :nb], gr.params["groups"], self.scale_bits),
                              gr.params["stored"][:, nb:]))
            sc = torch.cat([p[0] for p in parts], dim=1).to(torch.uint8)
            stored = torch.cat([pack_scale_codes(sc, self.scale_bits)] + [p[1] for p in parts], dim=1)
            zeros = None if self.symmetric else torch.cat([g.params["zeros"] for g in grids], dim=1)
            return QuantizedTensor.from_codes(codes, stored, zeros, self)
        scales = torch.cat([g.params["scales"] for g in grids], dim=1)
        zeros = None if self.symmetric else torch.cat([g.params["zeros"] for g in grids], dim=1)
        return QuantizedTensor.from_codes(codes, scales, zeros, self)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int8) if self.bits == 8 else pack_bits(codes.to(torch.uint8), self.bits)

    def unpack(self, qweight: torch.Tensor) -> torch.Tensor:
        return (qweight if self.bits == 8 else unpack_bits(qweight, self.bits)).to(torch.int32)

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(qt.codes(), self.group_scales(qt.scales, qt.shape[1]), qt.zeros, self, dtype)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, **asdict(self)}
        if not self.two_level:   # one-level records stay as they were written before two-level scales
            del d["scale_bits"], d["super_block"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "IntSpec":
        sb = d.get("scale_bits")
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), symmetric=bool(d["symmetric"]),
                   scale_bits=None if sb is None else int(sb), super_block=int(d.get("super_block", 256)))


def _grouped(w: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, spec.num_groups(k), spec.group_size_for(k))


def choose_qparams(w: torch.Tensor, spec: IntSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scales (float16 [N, G]) and zero points ([N, G] in the code dtype, or None if symmetric)."""
    wg = _grouped(w.float(), spec)
    if spec.symmetric:
        return _finish(wg.abs().amax(dim=-1) / spec.sym_divisor, None, spec)
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    return _finish((hi - lo) / (spec.qmax - spec.qmin), lo, spec)


CLIP_RATIOS = tuple(1 - i / 40 for i in range(21))   # ranges tried by the weighted search: 100% down to 50%


def search_qparams(w: torch.Tensor, spec: IntSpec, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group, the min/max range shrunk by each of CLIP_RATIOS (symmetric: absmax·r; asymmetric: both ends
    times r) whose rounding has the least Σ importance·(w − ŵ)² ([K] importance of the input channels). The
    unshrunk range is the first candidate and wins ties, so the result is never worse than `choose_qparams`
    under that measure."""
    wg = _grouped(w.float(), spec)
    candidates = []
    for r in CLIP_RATIOS:
        if spec.symmetric:
            candidates.append(_finish(wg.abs().amax(dim=-1) * r / spec.sym_divisor, None, spec))
        else:
            lo = wg.amin(dim=-1).clamp(max=0) * r
            candidates.append(_finish((wg.amax(dim=-1).clamp(min=0) * r - lo) / (spec.qmax - spec.qmin), lo, spec))
    steps = torch.stack([s.float() for s, _z in candidates])
    zeros = torch.stack([_zero_float(z, spec, s.float()) for s, z in candidates])
    errors = grid_errors(wg, importance.float().reshape(wg.shape[1:]), steps, zeros, spec.qmin, spec.qmax)
    best, (best_s, best_z) = errors[0], candidates[0]
    for err, (s, z) in zip(errors[1:], candidates[1:]):
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = None if z is None else torch.where(better, z, best_z)
    return best_s, best_z


def grid_errors(wg: torch.Tensor, imp: torch.Tensor, steps: torch.Tensor, zeros: torch.Tensor, qmin: int,
                qmax: int) -> torch.Tensor:
    """Σ_j imp_j · (ŵ_j − w_j)² per group for each candidate grid: wg [N, G, g] weights, imp [G, g], steps and
    zeros [R, N, G] (ŵ = (clamp(round(w / s + z), qmin, qmax) − z) · s) -> [R, N, G]. lowbit's native op
    (kernels/csrc/grid_errors.cpp) where it serves and sums as this ATen does (sum_width): the same float32
    operations in the same order, bit-identical, reading each group once for all candidates; this tensor code
    is the reference and the fallback."""
    width = sum_width(wg.shape[-1]) if _native_serves(wg) else None
    if width is not None:
        return torch.ops.lowbit.grid_errors(wg, imp, steps, zeros, float(qmin), float(qmax), width)
    return _tensor_grid_errors(wg, imp, steps, zeros, qmin, qmax)


def _tensor_grid_errors(wg, imp, steps, zeros, qmin, qmax) -> torch.Tensor:
    return torch.stack([(imp * ((torch.round(wg / sf + zf).clamp(qmin, qmax) - zf) * sf - wg).pow(2)).sum(-1)
                        for sf, zf in zip(steps.unsqueeze(-1), zeros.unsqueeze(-1))])


def _native_serves(x: torch.Tensor) -> bool:
    from ..kernels import native
    return native.serves(x)


@functools.lru_cache(maxsize=None)
def sum_width(g: int) -> int | None:
    """The vector width for which the native grid_errors sums groups of g values exactly as this ATen's
    `.sum(-1)` does (8 on x86 builds, 4 on 128-bit ones), found on random groups spanning many magnitudes, or
    None (the tensor code runs)."""
    gen = torch.Generator().manual_seed(g)
    wg = torch.randn(5, 3, g, generator=gen) * torch.exp(2 * torch.randn(5, 3, g, generator=gen))
    imp = torch.rand(3, g, generator=gen)
    steps = torch.rand(2, 5, 3, generator=gen) + 0.05
    zeros = torch.randint(0, 16, (2, 5, 3), generator=gen).float()
    want = _tensor_grid_errors(wg, imp, steps, zeros, 0, 15)
    for width in (8, 16, 4):
        if torch.equal(torch.ops.lowbit.grid_errors(wg, imp, steps, zeros, 0.0, 15.0, width), want):
            return width
    return None


def pack_scale_codes(sc: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, G] of `bits` bits -> uint8 [N, ⌈G·bits / 8⌉]: one little-endian bit stream per row,
    zero-padded to the byte (the two-level layout in the module docstring)."""
    n, g = sc.shape
    stream = ((sc.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(n, g * bits)
    stream = torch.nn.functional.pad(stream, (0, -(g * bits) % 8))
    return pack_bits(stream, 1)


def unpack_scale_codes(packed: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """The inverse of `pack_scale_codes`: float32 codes [N, groups]."""
    stream = unpack_bits(packed.contiguous(), 1)[:, : groups * bits].reshape(packed.shape[0], groups, bits)
    return (stream.float() * (2.0 ** torch.arange(bits))).sum(-1)


def two_level_qparams(w: torch.Tensor, spec: IntSpec, importance: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Two-level scales for w [N, K] (module docstring): (stored scales uint8, zero points or None, the group
    scales they decode to, float32 [N, G])."""
    one = spec.one_level
    s1, z1 = choose_qparams(w, one) if importance is None else search_qparams(w, one, importance)
    wg = _grouped(w.float(), spec)
    n, G, g = wg.shape
    nonzero = wg.abs().amax(-1) > 0
    target = torch.where(nonzero, s1.float(), 0.0)     # an all-zero group must not set its super-block's d
    lo = None if z1 is None else (spec.qmin - z1.float()) * s1.float()    # the range's low end, as chosen
    per = spec.super_block_for(w.shape[1]) // spec.group_size
    top = (1 << spec.scale_bits) - 1
    dmax = target.reshape(n, G // per, per).amax(-1) / top
    # an all-zero super-block takes d = 1 (its codes dequantize to 0 whatever d is); tiny ones the least f16
    d = torch.where(dmax > 0, dmax.clamp(min=2**-24), 1.0).to(SCALE_DTYPE)
    df = d.float().repeat_interleave(per, dim=1)
    imp = torch.ones_like(wg) if importance is None else _grouped(importance.float().expand(n, -1), spec)
    low = torch.floor(target / df).clamp(1, top)
    best = best_sc = best_z = None
    for sc in (low, (low + 1).clamp(max=top)):
        s = sc * df
        z = None if lo is None else torch.round(spec.qmin - lo / s).clamp(spec.qmin, spec.qmax).to(spec.code_dtype)
        zf = _zero_float(z, spec, s).unsqueeze(-1)
        err = (imp * ((torch.round(wg / s.unsqueeze(-1) + zf).clamp(spec.qmin, spec.qmax) - zf)
                      * s.unsqueeze(-1) - wg).pow(2)).sum(-1)
        if best is None:
            best, best_sc, best_z = err, sc, z
            continue
        better = err < best
        best, best_sc = torch.where(better, err, best), torch.where(better, sc, best_sc)
        best_z = None if z is None else torch.where(better, z, best_z)
    stored = torch.cat([pack_scale_codes(best_sc.to(torch.uint8), spec.scale_bits), d.view(torch.uint8)], dim=1)
    return stored, best_z, best_sc * df


def _finish(scale: torch.Tensor, lo: torch.Tensor | None, spec: IntSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float scales [N, G] (and the range's low end, asymmetric) -> stored float16 scales and zero points."""
    zero = None
    if torch.any(scale > _FP16_MAX):
        raise LowbitError("weights too large for float16 scales (|w| > 4e5)")
    # an all-zero group gets scale 1: its codes are all z and it dequantizes to exact zeros
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=2**-24).to(SCALE_DTYPE)
    if lo is not None:
        zero = torch.round(spec.qmin - lo / scale.float()).clamp(spec.qmin, spec.qmax).to(spec.code_dtype)
    return scale, zero


def _zero_float(zeros: torch.Tensor | None, spec: IntSpec, like: torch.Tensor) -> torch.Tensor:
    if zeros is None:
        return torch.full_like(like, float(spec.implicit_zero))
    return zeros.float()


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: IntSpec) -> torch.Tensor:
    """Round-to-nearest codes for w under given scales/zeros: int32 [N, K] in [qmin, qmax]."""
    n, k = w.shape
    s = scales.float().unsqueeze(-1)
    z = _zero_float(zeros, spec, scales.float()).unsqueeze(-1)
    q = torch.round(_grouped(w.float(), spec) / s + z).clamp(spec.qmin, spec.qmax)
    return q.reshape(n, k).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: IntSpec,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q − z) · s computed in float32, returned as `dtype` [N, K]."""
    n, k = codes.shape
    s = scales.float().unsqueeze(-1)
    z = _zero_float(zeros, spec, scales.float()).unsqueeze(-1)
    w = (_grouped(codes.float(), spec) - z) * s
    return w.reshape(n, k).to(dtype)
