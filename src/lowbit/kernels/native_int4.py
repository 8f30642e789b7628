"""lowbit's native kernels (csrc/cpu_gemm.cpp): NativeKernel, what they share, and native-int4, for any format
whose values are codes of 0 to 15 on per-group affine grids (formats.base.IntegerView): integer weights of 2 to
4 bits (per channel or groups, symmetric or with zero points, two-level scales) and the GGUF types Q4_0, Q4_1
and Q4_K; groups of 32 columns or a multiple of 64, in_features a multiple of 64.

    resident: wpack   uint8 [N, K // 2] — each row in chunks of 64 columns: byte j of chunk c holds the code of
                      column 64c + j in its low nibble and of column 64c + 32 + j in its high nibble (one 32-byte
                      load gives two vectors of 32 consecutive columns; see the C++ source); the rows stored in
                      blocks of four (to_row_blocks: bytes 0-63 of each of the four rows, then bytes 64-127 of
                      each, ...; a last step of 32 bytes likewise; a last block of N % 4 rows), so that the decode
                      loop, which reads four rows at once, streams one run of memory instead of four,
              kscales [N, G] — the group scales s (two-level integer scales decoded once, here),
              offsets [N, G] — so that w = q · s − offset (integer formats: z · s; GGUF: Q4_0 8·d,
                      Q4_1 −m, Q4_K dmin·m); scales float16 or bfloat16 where exact in it, offsets then
                      float32 [1] = c where every offset is c · s (symmetric formats), else uint8 zero
                      points z where every offset is z · s (asymmetric ones), else 16-bit where exact, else
                      both float32 (resident_scales); where kscales or offsets equal a tensor the format keeps
                      for `restore` (GGUF's d, an integer format's scales or zeros), that tensor is not kept
                      twice: `kscales_is_KEY` / `offsets_is_KEY` (int64, its shape) says which gives it back
                      (`offsets_is_minus_KEY`: minus the offsets, Q4_1's m),
              kscales_super, offsets_super [N, S] — GGUF's k-quants (sub-block scale d·sc, offsets dmin·m or
                      c·d·sc), and lowbit's two-level integer scales: kscales are then the sub-block codes sc
                      (int8 or uint8 [N, G]) and kscales_super the super-blocks' float16 d, offsets the codes m
                      (uint8) with offsets_super dmin, or zero points (uint8), or c (float32 [1]); the kernels
                      form d·sc as they widen a run's scales, exactly
                      (two_level_scales; all four are the format's own fields, kept once),
              for `restore`, exact: an integer format's scales / zeros (its codes come back from wpack); a GGUF
                      type's block fields other than the codes (field_d, field_scales, ...: float16 scales,
                      sub-block codes in a byte), packed again with the codes into the same bytes.

Few rows of activations (decode) run the native kernel, no weight ever dequantized to memory: where the CPU
has AVX-512 VNNI or AVX2 (`native.q8_level`), activations rounded to int8 in blocks of 64 columns and integer dot
products (as llama.cpp decodes; `lowbit::int4_gemm_q8`, documented in csrc/cpu_gemm_q8.inc and, for AVX2,
cpu_gemm_q8_avx2.inc), elsewhere activations rounded to bfloat16 with float32 products and sums
(`lowbit::int4_gemm`). Many rows (prefill) dequantize the weight a tile
of rows at a time into a small per-thread buffer and run ATen's dense matmul on it, in `native.dense_dtype()`
(bfloat16 where the CPU has native bfloat16 arithmetic, float32 elsewhere); where the CPU has AMX-BF16
(`native.amx()`), 32 rows at a time straight into AMX tiles, multiplied there (csrc/cpu_gemm_amx.inc).
"""

from __future__ import annotations

import math

import torch

from ..formats import QuantizedTensor
from . import native
from .base import DENSE_FROM_ROWS, Kernel


def pack_chunks(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (values 0..15, K % 64 == 0) -> wpack uint8 [N, K // 2] in the layout above."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // 64, 2, 32)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()


def unpack_chunks(wpack: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_chunks: uint8 codes [N, K] (of row-major rows: see from_row_blocks)."""
    n, half = wpack.shape
    b = wpack.reshape(n, half // 32, 1, 32)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(n, half * 2)


def to_row_blocks(t: torch.Tensor, step: int = 64) -> torch.Tensor:
    """Rows [N, B] of bytes (B a multiple of 32) -> the same shape, stored in blocks of four rows: for each block,
    bytes 64c .. 64c + 63 of its rows one after the other, step by step, then a last step of 32 bytes of each row
    where B % 64 == 32; a last block of the N % 4 remaining rows alike. The layout the native decode loops read
    (csrc/cpu_gemm.cpp, "Rows in blocks of four"). `step`: steps of that many bytes instead of 64 (B a multiple
    of it; native_int8's packed codes, a step per chunk of 64 columns)."""
    return _row_blocks(t, step, forward=True)


def from_row_blocks(t: torch.Tensor, step: int = 64) -> torch.Tensor:
    """The inverse of to_row_blocks: the rows row-major again."""
    return _row_blocks(t, step, forward=False)


def _row_blocks(t: torch.Tensor, step: int, forward: bool) -> torch.Tensor:
    n, b = t.shape
    full = b // step * step                 # bytes in whole steps; b − full is 0 or (steps of 64) 32
    out = torch.empty_like(t)
    for r0, r1 in ((0, n - n % 4), (n - n % 4, n)):   # whole blocks, then the last N % 4 rows
        per = min(4, r1 - r0)
        if per == 0:
            continue
        nb = (r1 - r0) // per
        if forward:   # row-major [block, row, step, S] -> [block, step, row, S], then [block, row, last step]
            rows = t[r0:r1].reshape(nb, per, b)
            steps = rows[:, :, :full].reshape(nb, per, full // step, step).transpose(1, 2).reshape(nb, per * full)
            out[r0:r1] = torch.cat([steps, rows[:, :, full:].reshape(nb, per * (b - full))], 1).reshape(-1, b)
        else:
            blocks = t[r0:r1].reshape(nb, per * b)
            steps = blocks[:, :per * full].reshape(nb, full // step, per, step).transpose(1, 2).reshape(nb, per, full)
            out[r0:r1] = torch.cat([steps, blocks[:, per * full:].reshape(nb, per, b - full)], 2).reshape(-1, b)
    return out


def packed_width(qmin: int, qmax: int, k: int) -> int:
    """b where a format's codes are within 0 .. 2^b − 1 with b 2, 3, 5, 6 or 7 and K a multiple of 64: native-int8
    then keeps them packed to b bits (its layout, native_int8.pack_codes), else 0 (a byte each). Here because
    native-int4 also asks it: it sends 2-3-bit codes to native-int8 where that packs them."""
    b = int(qmax).bit_length()
    if k % 64 or qmin < 0 or qmax > 127 or b not in (2, 3, 5, 6, 7):
        return 0
    return b


SAME = "_is_"   # kscales_is_KEY / offsets_is_KEY: the format's rest tensor KEY is that one (int64: its shape)
MINUS = "_is_minus_"   # offsets_is_minus_KEY: KEY is minus the offsets (GGUF Q4_1/Q5_1 keep m, the offsets are −m)


def resident_scales(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' scales and offsets as narrow as they stay exact: scales float16, else bfloat16 where every
    value is exact in it; offsets then a float32 [1] holding c where every offset is c times its scale (c zero or
    a power of two: symmetric formats, GGUF's Q4_0/Q5_0 with c = 2^(bits−1), Q8_0 with c = 0), else uint8 zero
    points z where every offset is z times its scale (asymmetric formats), else in the scales' dtype where exact
    (Q4_1/Q5_1: −m); else both float32 as given (two-level and k-quant sub-block scales, a 16-bit scale times a
    code, go through two_level_scales first). The kernels widen 16-bit scales as they read them (csrc/cpu_gemm.cpp,
    Scales16), so the results are the same bit for bit."""
    for dtype in (torch.float16, torch.bfloat16):
        s = scale.to(dtype)
        if not torch.equal(s.float(), scale):
            continue
        c = _power_of_two_multiple(scale, offset)
        if c is not None:
            return s, torch.tensor([c], dtype=torch.float32)
        z = torch.where(scale != 0, offset / torch.where(scale != 0, scale, 1), 0).round()
        if z.min() >= 0 and z.max() <= 255 and torch.equal(z * s.float(), offset):   # zero points
            return s, z.to(torch.uint8)
        o = offset.to(dtype)
        if torch.equal(o.float(), offset):
            return s, o
    return scale, offset


def _power_of_two_multiple(scale: torch.Tensor, offset: torch.Tensor) -> float | None:
    """c where every offset is c times its scale and c is zero or a power of two (c · s is then exact), else None."""
    nonzero = scale.nonzero()
    c = float(offset[tuple(nonzero[0])] / scale[tuple(nonzero[0])]) if len(nonzero) else 0.0
    if (c == 0 or math.frexp(c)[0] in (0.5, -0.5)) and torch.equal(scale * c, offset):
        return c
    return None


def two_level_scales(scale: torch.Tensor, offset: torch.Tensor, rest: dict[str, torch.Tensor]) -> dict | None:
    """The kernels' scales and offsets from a format's own tensors (rest) where every scale is a 16-bit scale per
    super-block times an 8-bit integer code per group (GGUF's k-quants: d · sc; lowbit's two-level integer scales),
    and every offset c times its scale (c zero or a power of two), a uint8 zero point times its scale, or a 16-bit
    scale times a uint8 code (dmin · m): {kscales, kscales_super, offsets, offsets_super} (see the layout above),
    else None. Exact by construction: each product is compared as the kernels form it."""
    n, g = scale.shape

    def factor(target: torch.Tensor, code_types: tuple, dtype=None):
        for d in rest.values():
            per = g // (d.numel() // n) if d.numel() % n == 0 and d.numel() // n else 0
            if d.dtype not in (torch.float16, torch.bfloat16) or per < 2 or g % per or (dtype and d.dtype != dtype):
                continue
            for c in rest.values():
                if (c.dtype in code_types and c.numel() == n * g
                        and torch.equal(_super_times(d.reshape(n, -1), c.reshape(n, g)), target)):
                    return c.reshape(n, g), d.reshape(n, -1)
        return None

    found = factor(scale, (torch.int8, torch.uint8))
    if found is None:
        return None
    out = {"kscales": found[0], "kscales_super": found[1]}
    c = _power_of_two_multiple(scale, offset)
    if c is not None:
        return {**out, "offsets": torch.tensor([c], dtype=torch.float32)}
    for z in rest.values():   # zero points
        if z.dtype == torch.uint8 and z.numel() == n * g and torch.equal(z.reshape(n, g).float() * scale, offset):
            return {**out, "offsets": z.reshape(n, g)}
    found = factor(offset, (torch.uint8,), dtype=found[1].dtype)
    if found is None:
        return None
    return {**out, "offsets": found[0], "offsets_super": found[1]}


def _super_times(d: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """d [N, S] (one per super-block) times codes [N, G], float32 [N, G]: a two-level scale or offset."""
    return d.float().repeat_interleave(codes.shape[1] // d.shape[1], dim=1) * codes.float()


def scales_of(packed: dict) -> torch.Tensor:
    """The group scales [N, G] (float32) of a native kernel's resident tensors, in whichever form they are kept."""
    s = packed["kscales"]
    d = packed.get("kscales_super")
    return s.float() if d is None else _super_times(d, s)


def offsets_of(packed: dict) -> torch.Tensor:
    """The offsets [N, G] of a native kernel's resident tensors, also where they are kept as a multiple of the
    scales, as zero points (see resident_scales) or as codes times super-block scales (two_level_scales)."""
    s, o = packed["kscales"], packed["offsets"]
    d = packed.get("offsets_super")
    if d is not None:
        return _super_times(d, o)
    if o.shape != s.shape or o.dtype == torch.uint8:   # c, or zero points (two-level scales' offsets are one of these)
        return scales_of(packed) * o.float()
    return o


class NativeKernel(Kernel):
    """What lowbit's native kernels share: where they run, their scales and offsets, and the switch
    between the native kernel (few rows) and the dense path (many rows)."""

    q8 = False                       # decode on int8 activations (set in prepare: native.q8())
    dense_dtype = torch.float32      # the dense path's matmul dtype (set in prepare)

    def native_unsupported(self, device, act) -> str | None:
        if device.type != "cpu" or act is not None:
            return "runs weight-only on CPU only"
        reason = native.load()
        if reason:
            return reason
        if native.isa() == 0:
            return "this CPU has no AVX2: the portable path is slower than PyTorch's kernels"
        return None

    def groups_unsupported(self, spec, k: int, lo: int, hi: int, sixteen: bool = False) -> str | None:
        """Why the format's integer view (formats.base.IntegerView) does not fit codes in [lo, hi] on groups
        of a multiple of 32 columns, or of 16 where `sixteen` (None: it fits)."""
        groups = spec.integer_groups(k)
        if groups is None:
            return f"{spec.name} is not integer codes on affine groups"
        g, qmin, qmax = groups
        if qmin < lo or qmax > hi:
            return f"needs codes in [{lo}, {hi}] (got [{qmin}, {qmax}])"
        if g % 32 and not (g == 16 and sixteen):
            return f"needs groups of a multiple of 32 columns (got {g})"
        return None

    OWN = ("wpack", "wq", "kscales", "offsets", "kscales_super", "offsets_super")   # the rest is kept for `restore`

    def scale_tensors(self, qt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The codes (int32 [N, K]), and kscales s and offsets [N, G] in their resident form (two_level_scales,
        else resident_scales) with what the format needs besides the codes to give back its stored tensors
        (formats.base.WeightFormat.integer_rest), none of it kept twice."""
        # decided here, outside any traced code: the CPU does not change while the process runs
        self.dense_dtype = native.dense_dtype()
        self.q8 = native.q8()
        view = qt.spec.integer_view(qt)
        rest = qt.spec.integer_rest(qt)
        own = (two_level_scales(view.scale, view.offset, rest)
               or dict(zip(("kscales", "offsets"), resident_scales(view.scale, view.offset))))
        for name, mine in own.items():   # the format's own scales (GGUF's d), zero points or mins: kept once, here
            found = next(((key, marker, sign) for key, t in rest.items() for marker, sign in ((SAME, 1), (MINUS, -1))
                          if t.dtype == mine.dtype and t.numel() == mine.numel()
                          and (sign == 1 or mine.is_floating_point())
                          and torch.equal(t.reshape(mine.shape), sign * mine)), None)
            if found:
                key, marker, sign = found
                t = rest.pop(key)
                # the format's own bits (−0.0 and 0.0 are equal above; `restore` must give back the stored bytes)
                own[name] = sign * t.reshape(mine.shape)
                rest[name + marker + key] = torch.tensor(t.shape, dtype=torch.int64)
        return view.codes, {**own, **rest}

    def restore_from(self, packed, spec, shape, codes: torch.Tensor) -> QuantizedTensor:
        rest = {}
        for key, t in packed.items():
            for marker, sign in ((MINUS, -1), (SAME, 1)):   # MINUS first: it contains SAME
                mine, found, theirs = key.partition(marker)
                if found and mine in self.OWN:
                    rest[theirs] = sign * packed[mine].reshape(tuple(t.tolist()))
                    break
            else:
                if key not in self.OWN:
                    rest[key] = t
        return spec.from_integer_codes(codes, rest, shape)

    def linear(self, x, packed, spec, shape, bias, act=None):
        n, k = shape
        x2 = x.reshape(-1, k)
        group = k // packed["kscales"].shape[1]
        y = self.rows(x2, packed, group) if x2.shape[0] < DENSE_FROM_ROWS else self.many_rows(x2, packed, group)
        y = y.to(x.dtype).reshape(*x.shape[:-1], n)
        return y if bias is None else y + bias

    @staticmethod
    def supers(packed) -> tuple:
        """The ops' trailing arguments: two-level scales' super-block scales, or None."""
        return packed.get("kscales_super"), packed.get("offsets_super")

    def rows(self, x2, packed, group) -> torch.Tensor:
        raise NotImplementedError

    def many_rows(self, x2, packed, group) -> torch.Tensor:
        raise NotImplementedError


class NativeInt4Kernel(NativeKernel):
    name = "native-int4"

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        reason = self.groups_unsupported(spec, k, 0, 15)
        if reason:
            return reason
        if k % 64:
            return f"needs in_features divisible by 64 (got {k})"
        g, qmin, qmax = spec.integer_groups(k)
        if packed_width(qmin, qmax, k) in (2, 3) and native.available() and native.q8() and native.q8_level() == 2:
            # measured on the default model's shapes: the same speed per call, 25-45% fewer bytes (BENCHMARKS.md);
            # with AVX2 the bit planes cost several instructions per mask and native-int4 was about twice as fast
            return "2-3-bit codes go to native-int8, which keeps them at their width where the CPU has AVX-512 VNNI"
        if g > 32 and g % 64:
            return f"needs groups of 32 or a multiple of 64 (got {g})"
        return self.native_unsupported(device, act)

    def prepare(self, qt):
        codes, tensors = self.scale_tensors(qt)
        return {"wpack": to_row_blocks(pack_chunks(codes)), **tensors}

    def restore(self, packed, spec, shape):
        return self.restore_from(packed, spec, shape, unpack_chunks(from_row_blocks(packed["wpack"])))

    def rows(self, x2, packed, group):
        if self.q8:
            return torch.ops.lowbit.int4_gemm_q8(x2, packed["wpack"], packed["kscales"], packed["offsets"], group,
                                                 *self.supers(packed))
        return torch.ops.lowbit.int4_gemm(x2, packed["wpack"], packed["kscales"], packed["offsets"], group, -1,
                                          *self.supers(packed))

    def many_rows(self, x2, packed, group):
        return torch.ops.lowbit.int4_dense_linear(x2, packed["wpack"], packed["kscales"], packed["offsets"], group,
                                                  self.dense_dtype, *self.supers(packed))

    @staticmethod
    def dense(packed, shape) -> torch.Tensor:
        """The weight dequantized, float32 [N, K]."""
        n, k = shape
        g = packed["kscales"].shape[1]
        q = unpack_chunks(from_row_blocks(packed["wpack"])).reshape(n, g, k // g).float()
        return (q * scales_of(packed)[..., None] - offsets_of(packed)[..., None]).reshape(n, k)
