"""GGUF block formats (llama.cpp's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

Each row of an [N, K] weight is cut into blocks of 32 weights (256 for the k-quants, "super-blocks" of 16 or 8
sub-blocks) and every block is stored as a fixed-size struct that carries its own scales. A QuantizedTensor in
one of these formats stores only
    qweight  uint8 [N, K / block_size · type_size]: each row the exact bytes of its blocks, in GGUF order,
so a tensor's bytes go into a .gguf file unchanged (no `scales` or `zeros` tensors).

Block structs (little-endian; "f16" is an IEEE half; weight i is the i-th weight of the block; codes are unsigned)
    Q8_0  34 B / 32   d f16 | qs int8[32]                              w = qs[i]·d
    Q4_0  18 B / 32   d f16 | qs[16]                                   w = d·(q − 8)
    Q4_1  20 B / 32   d f16 | m f16 | qs[16]                           w = d·q + m
    Q5_0  22 B / 32   d f16 | qh[4] | qs[16]                           w = d·(q − 16)
    Q5_1  24 B / 32   d f16 | m f16 | qh[4] | qs[16]                   w = d·q + m
        4-bit parts: weight i < 16 is the low nibble of qs[i], weight i + 16 its high nibble; the fifth bit of
        weight i is bit i of qh read as one little-endian uint32.
    Q2_K  84 B / 256  scales[16] | qs[64] | d f16 | dmin f16           w = (d·sc)·q − dmin·mn
        scales[j] of sub-block j (16 weights): sc in the low nibble, mn in the high one. qs: weight
        128·h + 32·s + l (h < 2, s < 4, l < 32) is bits 2s..2s+1 of qs[32·h + l].
    Q3_K  110 B / 256 hmask[32] | qs[64] | scales[12] | d f16          w = (d·(sc − 32))·(q − 4)
        q = low 2 bits (qs, laid out as in Q2_K) + 4 · bit i // 32 of hmask[i % 32]. The 16 six-bit sc: the low
        4 bits of sc[j] are the low (j < 8) or high (j ≥ 8) nibble of scales[j % 8]; its top 2 bits are bits
        2·(j // 4).. of scales[8 + j % 4].
    Q4_K  144 B / 256 d f16 | dmin f16 | scales[12] | qs[128]          w = (d·sc)·q − dmin·mn
    Q5_K  176 B / 256 d f16 | dmin f16 | scales[12] | qh[32] | qs[128] w = (d·sc)·q − dmin·mn
        8 sub-blocks of 32 with six-bit sc and mn: for j < 4, sc = scales[j] & 63 and mn = scales[j + 4] & 63;
        for j ≥ 4, sc = (scales[j + 4] & 15) | (scales[j − 4] >> 6) << 4 and mn = (scales[j + 4] >> 4) |
        (scales[j] >> 6) << 4. qs: weight 64·c + l (c < 4, l < 32) is the low nibble of qs[32·c + l], weight
        64·c + 32 + l its high nibble. Q5_K's fifth bit of weight i is bit i // 32 of qh[i % 32].
    Q6_K  210 B / 256 ql[128] | qh[64] | scales int8[16] | d f16       w = (d·sc)·(q − 32)
        per half h (128 weights, ql[64·h:], qh[32·h:]): weight 64·t + l (t < 2, l < 64) has its low 4 bits in
        nibble t of ql[l]; weight 32·s + l (s < 4, l < 32) has its top 2 bits in bits 2s..2s+1 of qh[l]. Sub-block
        j (16 weights) uses scales[j].
Dequantization is computed in float32 in the order written above, which is gguf-py's (gguf.quants) and
llama.cpp's, so it is bit-identical to both.

Quantization (round to nearest, no importance weights):
    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: llama.cpp's reference (quantize_row_*_ref), byte-identical to gguf.quants.
    k-quants: llama.cpp's quantize_row_q{2..6}_K_ref re-implemented over all blocks at once. Per sub-block, a
    scale (and min) is searched: Q2_K, Q4_K, Q5_K fit an affine grid by weighted least squares over a sweep of
    trial scales (make_qkx2_quants: weights |x| for Q2_K with absolute error, av + |x| for Q4_K/Q5_K with squared
    error; a trial that beats the best so far also moves the min the following trials start from); Q3_K refines
    the codes one at a time (make_q3_quants) and Q6_K sweeps 18 trial scales (make_qx_quants), both weighted by
    x². The sub-block scales (and mins) are then themselves quantized against one f16 super-scale (6 bits for
    Q3_K/Q4_K/Q5_K, 4 bits for Q2_K, int8 for Q6_K) and every weight is rounded again against its final scale.
    Every float operation follows the C code's order in float32 (sums left to right, no fused multiply-add,
    correctly rounded sqrt, llama.cpp's nearest_int emulated bit for bit, signed zeros kept), so the bytes are
    llama.cpp's: against its quantize_row_q{2..6}_K_ref compiled from ggml's ggml-quants.c as x86-64 builds
    compile it (the file is in ggml-base, built without -march, so no FMA), every block was identical (all of
    about 8,600 super-blocks per type: Gaussian, heavy-tailed, sparse and scaled rows and two down_proj weights
    of the default model); the tests keep digests of those bytes. A build that contracts a·b + c into FMA
    (aarch64, or x86-64 with -march=native and GNU C) rounds the sums differently, and there up to 92% of
    blocks differ (Q3_K about 1%, Q5_K most), by a code or a sub-block scale step where trials nearly tie.

Quantization with importance (`quantize(w, importance)`, importance [K] per input channel, e.g. an imatrix's
mean x²): llama.cpp's quantize_row_*_impl searches, written again over all blocks at once. Each weight's search
weight is importance · sqrt(sigma2 + x²) (sigma2: mean x² of the row for the 32-weight types, 2·mean x² of the
super-block for Q3_K/Q4_K/Q5_K, mean x² for Q2_K; Q6_K uses the importance alone); Q4_0/Q5_0 take
make_qx_quants' scale, Q4_1/Q5_1 and the affine k-quants make_qkx3_quants (37 trial scales, squared error),
Q3_K make_qx_quants for codes and for sub-block scales, and Q2_K/Q4_K/Q5_K quantize their sub-block scales and
mins with make_qp_quants weighted by each sub-block's total weight. Q8_0 has no search (importance is ignored,
as in llama.cpp). These follow the C code's algorithm but not its float summation order, so they are not
byte-compared with llama.cpp. A channel of importance 0 is floored at 1e-9 of the mean (formats.base.
check_importance) so that an all-silent block still gets a scale.

Speed: the inner searches, make_qx, make_qkx2, make_qp and make_q3, run as lowbit's native ops where its
library is built (`native_search`; kernels/csrc/gguf_search.cpp performs the same float32 operations in the same
order, so the bytes are identical, 20-100x faster). The tensor code here is their reference and the fallback.

Fixed grids (`fit_grid` / `from_grids`, see formats.base.Grid): the fields the quantizer above chooses for one
block of columns, exposed as w = step·(q − zero) − offset per sub-block (step = d·sc, offset = dmin·mn for the
affine types; zero 8 / 16 / 4 / 32 for Q4_0 / Q5_0 / Q3_K / Q6_K), so that GPTQ can round column by column on
them and pack its codes with exactly those fields.

Row lengths that are not a multiple of the block: see `fallback_type` (what llama.cpp stores instead).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import LowbitError
from ..finite import all_finite
from .base import Grid, IntegerView, WeightFormat, check_importance, register_format
from .tensor import QuantizedTensor

QK = 32       # block of the 32-weight types
QK_K = 256    # super-block of the k-quants
GROUP_MAX_EPS = 1e-15   # llama.cpp: a sub-block whose largest |w| is below this counts as all zero
_KQUANT_CHUNK = 1024    # super-blocks searched together (bounds the temporaries to a few MB)


# --------------------------------------------------------------------------------------------------------------
# bit-level helpers (all on int32 tensors; bytes are converted at the edges)

def _unpack(b: torch.Tensor, width: int) -> torch.Tensor:
    """Bytes [..., n] -> fields [..., n, 8 // width], field k = bits k·width.. of each byte (LSB first)."""
    shifts = torch.arange(0, 8, width, device=b.device, dtype=torch.int32)
    return (b.unsqueeze(-1) >> shifts) & ((1 << width) - 1)


def _pack(q: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `_unpack`: fields [..., n, 8 // width] -> bytes [..., n] (int32)."""
    shifts = torch.arange(0, 8, width, device=q.device, dtype=torch.int32)
    return (q << shifts).sum(-1, dtype=torch.int32)


def _half(b: torch.Tensor) -> torch.Tensor:
    """Two bytes [..., 2] (int32 or uint8) -> the float16 they hold [...]."""
    return b.to(torch.uint8).contiguous().view(torch.float16)[..., 0]


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """A float16 tensor [...] -> its bytes [..., 2] (int32)."""
    return v.to(torch.float16).contiguous().unsqueeze(-1).view(torch.uint8).to(torch.int32)


def _high_bits(b: torch.Tensor) -> torch.Tensor:
    """hmask / qh bytes [M, 32] -> one bit per weight [M, 256]: weight i is bit i // 32 of byte i % 32."""
    return _unpack(b, 1).transpose(-1, -2).reshape(b.shape[0], -1)


def _high_bytes(bit: torch.Tensor) -> torch.Tensor:
    return _pack(bit.reshape(bit.shape[0], 8, 32).transpose(-1, -2), 1)


def _crumbs(b: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K qs [M, 64] -> 2-bit codes [M, 256] (weight 128h + 32s + l in bits 2s of byte 32h + l)."""
    return _unpack(b.reshape(-1, 2, 32), 2).transpose(-1, -2).reshape(b.shape[0], -1)


def _crumb_bytes(q: torch.Tensor) -> torch.Tensor:
    return _pack(q.reshape(-1, 2, 4, 32).transpose(-1, -2), 2).reshape(q.shape[0], -1)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] -> [..., 2n]: the n low nibbles, then the n high nibbles."""
    return torch.cat([b & 15, b >> 4], dim=-1)


def _nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    n = q.shape[-1] // 2
    return q[..., :n] | (q[..., n:] << 4)


def _scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes [M, 12] -> six-bit (sc, mn), each [M, 8]."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, mn


def _scale_bytes_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    a = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    b = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([a, b, c], dim=1)


def _scales_q3(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes [M, 12] -> sixteen six-bit scales [M, 16] (stored value, i.e. scale + 32)."""
    low = _nibbles(s[:, :8])
    high = _unpack(s[:, 8:12], 2).transpose(-1, -2).reshape(s.shape[0], 16)
    return low | (high << 4)


def _scale_bytes_q3(sc: torch.Tensor) -> torch.Tensor:
    low = _nibble_bytes(sc & 15)
    high = _pack((sc >> 4).reshape(-1, 4, 4).transpose(-1, -2), 2)
    return torch.cat([low, high], dim=1)


# --------------------------------------------------------------------------------------------------------------
# llama.cpp's float32 arithmetic, reproduced operation for operation

def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant shaped like `like` (tensor-tensor arithmetic, never a scalar fast path)."""
    return torch.full_like(like, v, dtype=torch.float32)


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: add 1.5·2^23 in float32 and read the mantissa. Rounds half to even, and gives
    llama.cpp's integer even outside the range it asserts (the result is clamped by every caller)."""
    return ((f + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def _ordered_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis from 0, left to right, in float32: the C loops' order (a tree reduction rounds
    differently, and the searches compare sums that differ in the last bit)."""
    acc = torch.zeros_like(t[..., 0])
    for i in range(t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per row, the first one on ties (llama.cpp scans with a strict >)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def _max_from_zero(t: torch.Tensor) -> torch.Tensor:
    """max(0, largest value per row) as llama.cpp's `m = 0; if (v > m) m = v` scan gives it (+0, never -0)."""
    m = t.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _wrap_int8(v: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to int8_t (two's complement wrap)."""
    return ((v + 128) & 0xFF) - 128


def native_searches(x: torch.Tensor) -> bool:
    """Whether lowbit's native searches (kernels/csrc/gguf_search.cpp) serve tensors like x: float32 on the
    CPU, where the library is built."""
    from ..kernels import native
    return native.serves(x)


def native_search(x: torch.Tensor) -> bool:
    """Whether the searches below run as lowbit's native ops for rows x (`native_searches`, rows of up to 64
    values). Those perform the same float32 operations in the same order as the tensor code here, so the
    results are bit-identical (tests/test_gguf_search.py); the tensor code is the reference and the fallback
    (LOWBIT_NATIVE=0 selects it)."""
    return x.dim() == 2 and 1 <= x.shape[1] <= 64 and native_searches(x)


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants for rows x [S, n] with weights w: (scale [S], min [S] (positive: w ≈ scale·L − min),
    codes L [S, n] in [0, nmax]). Trial iscale = (nmax + rmin + rdelta·is) / (max − min) for is = 0..nstep,
    each fitted by weighted least squares; a trial that lowers the error replaces scale, min and codes, and the
    trials after it are taken relative to that new min, as in llama.cpp."""
    if native_search(x):
        return torch.ops.lowbit.gguf_make_qkx2(x, w.float(), nmax, rmin, rdelta, nstep, use_mad)
    # the first smallest and largest value, as llama.cpp's strict-comparison scans find them: a row of zeros of
    # both signs keeps the sign of its first one, which an all-zero block's stored min carries
    lo = x.gather(1, x.argmin(dim=1, keepdim=True)).squeeze(1)
    hi = x.gather(1, x.argmax(dim=1, keepdim=True)).squeeze(1)
    sum_w, sum_x = w[:, 0], w[:, 0] * x[:, 0]
    for i in range(1, x.shape[1]):
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo      # nothing to fit: codes 0, scale 0
    flat_min = -lo

    def fit(iscale, lo):
        return _nearest_int(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)

    def error(scale, lo, codes):
        diff = (scale[:, None] * codes.float() + lo[:, None]) - x
        diff = diff.abs() if use_mad else diff * diff
        return _ordered_sum(w * diff)

    iscale = _f32(nmax, hi) / (hi - lo)
    scale = _f32(1.0, iscale) / iscale
    codes = fit(iscale, lo)
    best = error(scale, lo, codes)
    f32 = torch.float32
    for step in range(nstep + 1):
        numer = (torch.tensor(rmin, dtype=f32) + torch.tensor(rdelta, dtype=f32) * step) + nmax
        iscale = numer.to(x.device) / (hi - lo)
        trial = fit(iscale, lo)
        lf = trial.float()
        wl = w * lf
        sum_l, sum_l2, sum_xl = _ordered_sum(torch.stack([wl, wl * lf, wl * x]))
        det = sum_w * sum_l2 - sum_l * sum_l
        t_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        t_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clip = t_min > 0     # the fit wants a positive min: pin it to 0 and refit the scale alone
        t_scale = torch.where(clip, sum_xl / sum_l2, t_scale)
        t_min = torch.where(clip, torch.zeros_like(t_min), t_min)
        err = error(t_scale, t_min, trial)
        better = (det > 0) & (err < best)
        codes = torch.where(better[:, None], trial, codes)
        best = torch.where(better, err, best)
        scale = torch.where(better, t_scale, scale)
        lo = torch.where(better, t_min, lo)
    zero = torch.zeros_like(scale)
    return (torch.where(flat, zero, scale), torch.where(flat, flat_min, -lo),
            torch.where(flat[:, None], torch.zeros_like(codes), codes))


def _make_qx(x: torch.Tensor, nmax: int, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with weights w (default x², as Q6_K): (scale [S], codes [S, n] in [0, 2·nmax)) with
    w ≈ scale·(L − nmax). The first fit maps the largest |x| to −nmax; 18 trial scales −(nmax ± 0.1·k)/max,
    k = 1..9, replace it in turn when their least-squares fit explains more of x."""
    w = x * x if w is None else w
    if native_search(x):
        return torch.ops.lowbit.gguf_make_qx(x, w.float(), nmax)
    big = _signed_absmax(x)
    zero_rows = big.abs() < _f32(GROUP_MAX_EPS, big)

    def fit(iscale):   # iscale [S, T] -> codes [S, T, n] (signed) and their least-squares sums [S, T]
        lv = _nearest_int(iscale[..., None] * x[:, None, :]).clamp(-nmax, nmax - 1)
        lf = lv.float()
        sumlx, suml2 = _ordered_sum(torch.stack([(w * x)[:, None, :] * lf, (w[:, None, :] * lf) * lf]))
        return lv, sumlx, suml2

    lv, sumlx, suml2 = fit((_f32(-nmax, big) / big)[:, None])
    codes, sumlx, suml2 = lv[:, 0], sumlx[:, 0], suml2[:, 0]
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    steps = torch.tensor([s for s in range(-9, 10) if s], dtype=torch.float32)
    numer = (nmax + torch.tensor(0.1, dtype=torch.float32) * steps).to(x.device)
    lv, t_lx, t_l2 = fit(-numer[None, :] / big[:, None])
    for t in range(steps.numel()):   # sequential: each acceptance raises the bar for the next trial
        better = (t_l2[:, t] > 0) & (t_lx[:, t] * t_lx[:, t] > best * t_l2[:, t])
        codes = torch.where(better[:, None], lv[:, t], codes)
        scale = torch.where(better, t_lx[:, t] / t_l2[:, t], scale)
        best = torch.where(better, scale * t_lx[:, t], best)
    return (torch.where(zero_rows, torch.zeros_like(scale), scale),
            torch.where(zero_rows[:, None], torch.zeros_like(codes), codes + nmax))


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants with refinement (Q3_K): (scale [S], codes [S, n] in [0, 2·nmax)). Starting from the
    absmax fit, up to 5 passes try each code at its own least-squares optimum given the others and keep it when
    the weighted fit (weights x²) improves; codes update one at a time, so later ones see earlier changes."""
    if native_search(x):
        return torch.ops.lowbit.gguf_make_q3(x, nmax)
    big = _signed_absmax(x)
    zero_rows = big.abs() < _f32(GROUP_MAX_EPS, big)
    w = x * x
    wx = w * x
    codes = _nearest_int((_f32(-nmax, big) / big)[:, None] * x).clamp(-nmax, nmax - 1)
    lf = codes.float()
    sumlx, suml2 = _ordered_sum(torch.stack([wx * lf, (w * lf) * lf]))
    # a pass that changes nothing leaves the sums as they were, so running all 5 equals stopping early
    for _ in range(5):
        for i in range(x.shape[1]):
            li = codes[:, i].float()
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - (w[:, i] * li) * li
            new = _nearest_int((x[:, i] * sl2) / slx).clamp(-nmax, nmax - 1)
            nf = new.float()
            slx_new = slx + wx[:, i] * nf
            sl2_new = sl2 + (w[:, i] * nf) * nf
            take = ((slx > 0) & (new != codes[:, i]) & (sl2_new > 0)
                    & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new))
            codes[:, i] = torch.where(take, new, codes[:, i])
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return (torch.where(zero_rows, torch.zeros_like(scale), scale),
            torch.where(zero_rows[:, None], torch.zeros_like(codes), codes + nmax))


def _make_qp(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: non-negative values x [S, n] (sub-block scales or mins) onto codes [0, nmax] times one
    scale, weighted by w [S, n] (the sub-blocks' total importance): (scale [S], codes [S, n]). The scale
    1/iscale with iscale = (nmax + 0.1·k)/max, k = -4..4, of least weighted error is kept, then up to 5 passes
    move single codes to their least-squares optimum while that improves the fit."""
    if native_search(x):
        return torch.ops.lowbit.gguf_make_qp(x, w.float(), nmax)
    big = _max_from_zero(x)
    zero_rows = big < _f32(GROUP_MAX_EPS, big)
    big = torch.where(zero_rows, torch.ones_like(big), big)

    def codes_for(iscale):
        return _nearest_int(iscale[:, None] * x).clamp(0, nmax)

    def mse(iscale, codes):   # Σ (w·diff)·diff left to right, as the C loop sums it
        diff = x - (1 / iscale)[:, None] * codes.float()
        return _ordered_sum((w * diff) * diff)

    iscale = _f32(nmax, big) / big
    best = mse(iscale, codes_for(iscale))
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (torch.tensor(0.1, dtype=torch.float32) * k + nmax) / big
        err = mse(trial, codes_for(trial))
        iscale = torch.where(err < best, trial, iscale)
        best = torch.minimum(err, best)
    codes = codes_for(iscale)
    lf = codes.float()
    sumlx, suml2 = _ordered_sum(torch.stack([w * x * lf, w * lf * lf]))
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], codes[:, i].float()
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = _nearest_int(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(0, nmax)
            nf = new.float()
            slx_new, sl2_new = slx + wi * xi * nf, sl2 + wi * nf * nf
            take = ok & (new != codes[:, i]) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            codes[:, i] = torch.where(take, new, codes[:, i])
            sumlx, suml2 = torch.where(take, slx_new, sumlx), torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    return (torch.where(zero_rows, torch.zeros_like(scale), scale),
            torch.where(zero_rows[:, None], torch.zeros_like(codes), codes))


def _importance_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """llama.cpp's per-weight search weights under an importance matrix: qw · sqrt(sigma2 + x²)."""
    return qw * torch.sqrt(sigma2[:, None] + x * x)


def _requantize(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None,
                lo: int, hi: int, offset: int) -> torch.Tensor:
    """The final rounding against each sub-block's stored scale: codes = clamp(round((x + dm) / d), lo, hi) +
    offset, sub-blocks with d = 0 keep the codes of the search. x, codes [S, n]; d, dm [S]."""
    num = x if dm is None else x + dm[:, None]
    new = _nearest_int(num / d[:, None]).clamp(lo, hi) + offset
    return torch.where((d != 0)[:, None], new, codes)


# --------------------------------------------------------------------------------------------------------------
# the block types

class BlockType:
    """One GGUF type: its struct (`decode` bytes -> fields, `encode` back), how fields give weights
    (`dequantize`) and llama.cpp's reference quantizer (`quantize`). Fields are per block ([M, ...], M blocks):
    f16 scales as float16 tensors, codes and sub-block scales as int32."""

    name: str
    block_size: int
    type_size: int
    code_range: tuple[int, int]
    sub: int                       # weights per sub-block (one affine grid: see `affine`)
    half_fields: tuple[str, ...] = ("d",)

    def decode(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, qw: torch.Tensor | None = None,
                 row_sigma2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Blocks x [M, block_size] -> fields. qw: importance of each weight [M, block_size] (None: the
        reference quantizer); row_sigma2: mean x² of each block's whole row [M] (the 32-weight types' searches
        use it)."""
        raise NotImplementedError

    def affine(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        """The grid of each sub-block as dequantization computes it: (step [M, S] float32, zero (an integer),
        offset [M, S] float32, weights per sub-block): w = step·(q − zero) − offset."""
        raise NotImplementedError

    @property
    def field_ranges(self) -> dict[str, tuple[int, int]]:
        """Integer fields -> their inclusive range."""
        return {"q": self.code_range}

    # integer fields that GGUFSpec.integer_rest keeps less this bias, the number dequantization subtracts from them
    # (Q3_K's scale codes, used as code − 32): the kept field times d is then the sub-block's scale, which native
    # kernels read as it is kept instead of a float32 copy (kernels.native_int4, two-level scales)
    rest_bias: dict[str, int] = {}


class _Simple(BlockType):
    """The 32-weight types: an f16 scale d (and f16 min m when asymmetric), 4, 5 or 8-bit codes."""

    block_size, bits, asym = QK, 4, False
    sub = QK

    @property
    def type_size(self):
        return 2 + 2 * self.asym + (QK if self.bits == 8 else QK // 2 + 4 * (self.bits == 5))

    @property
    def code_range(self):
        return (-128, 127) if self.bits == 8 else (0, (1 << self.bits) - 1)

    @property
    def half_fields(self):
        return ("d", "m") if self.asym else ("d",)

    def decode(self, blocks):
        b = blocks.to(torch.int32)
        f = {"d": _half(b[:, 0:2])}
        at = 2
        if self.asym:
            f["m"], at = _half(b[:, 2:4]), 4
        if self.bits == 8:
            f["q"] = _wrap_int8(b[:, at:])
            return f
        q = _nibbles(b[:, at + 4 * (self.bits == 5):])
        if self.bits == 5:
            q = q | (_unpack(b[:, at:at + 4], 1).reshape(-1, QK) << 4)
        f["q"] = q
        return f

    def encode(self, f):
        parts = [_half_bytes(f[k]) for k in self.half_fields]
        q = f["q"]
        if self.bits == 8:
            parts.append(q & 0xFF)
        else:
            if self.bits == 5:
                parts.append(_pack((q >> 4).reshape(-1, 4, 8), 1))
            parts.append(_nibble_bytes(q & 15))
        return torch.cat(parts, dim=1)

    def dequantize(self, f):
        d, q = f["d"].float()[:, None], f["q"]
        if self.asym:
            return d * q.float() + f["m"].float()[:, None]
        if self.bits == 8:
            return q.float() * d
        return d * (q - (1 << (self.bits - 1))).float()

    def affine(self, f):
        d = f["d"].float()[:, None]
        if self.asym:
            return d, 0, -f["m"].float()[:, None], QK
        return d, 0 if self.bits == 8 else 1 << (self.bits - 1), torch.zeros_like(d), QK

    def quantize(self, x, qw=None, row_sigma2=None):
        if qw is not None and self.bits != 8:   # llama.cpp's quantize_row_q{4,5}_{0,1}_impl (Q8_0 has none)
            wt = _importance_weights(x, qw, row_sigma2)
            if self.asym:
                d, mins, q = _make_qkx2(x, wt, (1 << self.bits) - 1, -0.9, 0.05, 36, False)
                return {"d": d.to(torch.float16), "m": (-mins).to(torch.float16), "q": q}
            d, q = _make_qx(x, 1 << (self.bits - 1), wt)
            return {"d": d.to(torch.float16), "q": q}
        if self.bits == 8:     # roundf (half away from zero), written exactly as gguf-py does
            d = x.abs().amax(dim=1) / _f32(127, x[:, 0])
            v = x * torch.where(d == 0, torch.zeros_like(d), _f32(1.0, d) / d)[:, None]
            a = v.abs()
            fl = a.floor()
            q = torch.sign(v) * (fl + (2 * (a - fl)).floor())
            return {"d": d.to(torch.float16), "q": q.to(torch.int32)}
        top = (1 << self.bits) - 1
        if self.asym:
            lo, hi = x.amin(dim=1), x.amax(dim=1)
            d = (hi - lo) / _f32(top, lo)
            shifted, bias = x - lo[:, None], 0.5
        else:
            d = _signed_absmax(x) / _f32(-(1 << (self.bits - 1)), x[:, 0])
            shifted, bias = x, (1 << (self.bits - 1)) + 0.5
        inv = torch.where(d == 0, torch.zeros_like(d), _f32(1.0, d) / d)
        q = torch.trunc(shifted * inv[:, None] + bias).clamp(0, top).to(torch.int32)
        f = {"d": d.to(torch.float16), "q": q}
        if self.asym:
            f["m"] = lo.to(torch.float16)
        return f


class Q8_0(_Simple):
    name, bits = "Q8_0", 8


class Q4_0(_Simple):
    name, bits = "Q4_0", 4


class Q4_1(_Simple):
    name, bits, asym = "Q4_1", 4, True


class Q5_0(_Simple):
    name, bits = "Q5_0", 5


class Q5_1(_Simple):
    name, bits, asym = "Q5_1", 5, True


class _Affine256(BlockType):
    """Q2_K, Q4_K, Q5_K: w = (d·sc)·q − dmin·mn with unsigned sub-block scales sc and mins mn."""

    block_size = QK_K
    half_fields = ("d", "dmin")
    sub: int            # weights per sub-block
    scale_max: int      # largest sub-block scale / min code (15 or 63)
    search: tuple       # make_qkx2_quants's (rmin, rdelta, nstep, use_mad)

    @property
    def field_ranges(self):
        return {"q": self.code_range, "scales": (0, self.scale_max), "mins": (0, self.scale_max)}

    def dequantize(self, f):
        n = QK_K // self.sub
        dl = (f["d"].float()[:, None] * f["scales"].float())[:, :, None]
        ml = (f["dmin"].float()[:, None] * f["mins"].float())[:, :, None]
        return (dl * f["q"].float().reshape(-1, n, self.sub) - ml).reshape(-1, QK_K)

    def weights(self, xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    sigma_factor = 2.0   # llama.cpp's sigma2 = factor · Σx² / 256 of the super-block, under importance

    def affine(self, f):
        return (f["d"].float()[:, None] * f["scales"].float(), 0,
                f["dmin"].float()[:, None] * f["mins"].float(), self.sub)

    def quantize(self, x, qw=None, row_sigma2=None):
        m, n = x.shape[0], QK_K // self.sub
        xs = x.reshape(m * n, self.sub)
        if qw is None:
            scale, mins, codes = _make_qkx2(xs, self.weights(xs), self.code_range[1], *self.search)
            scale, mins = scale.reshape(m, n), mins.reshape(m, n)
            max_scale, max_min = _max_from_zero(scale), _max_from_zero(mins)
            sc, mn, d, dmin = self.quantize_scales(scale, mins, max_scale, max_min)
        else:   # quantize_row_q{2,4,5}_K_impl: weighted sub-block fits, then weighted scale codes (make_qp)
            sigma2 = (self.sigma_factor * (x * x).sum(1) / QK_K).repeat_interleave(n)
            wt = _importance_weights(xs, qw.reshape(m * n, self.sub), sigma2)
            scale, mins, codes = _make_qkx2(xs, wt, self.code_range[1], -0.9, 0.05, 36, False)
            sw = wt.sum(1).reshape(m, n)
            d, sc = _make_qp(scale.reshape(m, n), self.scale_max, sw)
            dmin, mn = _make_qp(mins.reshape(m, n), self.scale_max, sw)
        d, dmin = d.to(torch.float16), dmin.to(torch.float16)
        dl = (d.float()[:, None] * sc.float()).reshape(-1)
        ml = (dmin.float()[:, None] * mn.float()).reshape(-1)
        q = _requantize(xs, codes, dl, ml, 0, self.code_range[1], 0)
        return {"d": d, "dmin": dmin, "scales": sc, "mins": mn, "q": q.reshape(m, QK_K)}

    def quantize_scales(self, scale, mins, max_scale, max_min):
        """Sub-block scales and mins -> (sc, mn, d, dmin) as the reference stores them."""
        top = self.scale_max
        inv_s = torch.where(max_scale > 0, _f32(top, max_scale) / max_scale, torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, _f32(top, max_min) / max_min, torch.zeros_like(max_min))
        # the codes pass through a uint8 (wrapping) and are capped at 63, as in llama.cpp
        sc = (_nearest_int(inv_s[:, None] * scale) & 0xFF).clamp(max=top)
        mn = (_nearest_int(inv_m[:, None] * mins) & 0xFF).clamp(max=top)
        return sc, mn, max_scale / _f32(top, max_scale), max_min / _f32(top, max_min)


class Q2_K(_Affine256):
    name, type_size, code_range = "Q2_K", 84, (0, 3)
    sub, scale_max, search, sigma_factor = 16, 15, (-0.5, 0.1, 15, True), 1.0

    def weights(self, xs):
        return xs.abs()

    def quantize_scales(self, scale, mins, max_scale, max_min):
        # 4-bit scale and min share a byte: the scale code is stored whole (wrapping) and the min code ORed in
        # shifted by 4, so an out-of-range code spills exactly as llama.cpp's byte arithmetic does
        has_s, has_m = max_scale > 0, max_min > 0
        ls = _nearest_int((_f32(15, max_scale) / max_scale)[:, None] * scale)
        lm = _nearest_int((_f32(15, max_min) / max_min)[:, None] * mins)
        ls = torch.where(has_s[:, None], ls & 0xFF, torch.zeros_like(ls))
        lm = torch.where(has_m[:, None], (lm << 4) & 0xFF, torch.zeros_like(lm))
        byte = ls | lm
        zero = torch.zeros_like(max_scale)
        return (byte & 15, byte >> 4, torch.where(has_s, max_scale / _f32(15, max_scale), zero),
                torch.where(has_m, max_min / _f32(15, max_min), zero))

    def decode(self, blocks):
        b = blocks.to(torch.int32)
        return {"d": _half(b[:, 80:82]), "dmin": _half(b[:, 82:84]), "scales": b[:, :16] & 15,
                "mins": b[:, :16] >> 4, "q": _crumbs(b[:, 16:80])}

    def encode(self, f):
        return torch.cat([f["scales"] | (f["mins"] << 4), _crumb_bytes(f["q"]), _half_bytes(f["d"]),
                          _half_bytes(f["dmin"])], dim=1)


class _K4(_Affine256):
    """Q4_K and Q5_K: 8 sub-blocks of 32, six-bit scales and mins, weights av + |x| (av = rms of the sub-block)."""

    sub, scale_max = 32, 63

    def weights(self, xs):
        # sqrtf, correctly rounded: torch's float32 sqrt may be off by an ulp on CPU, the float64 one rounded
        # to float32 is exact
        av = torch.sqrt((_ordered_sum(xs * xs) / _f32(32, xs[:, 0])).double()).float()
        return av[:, None] + xs.abs()

    def decode(self, blocks):
        b = blocks.to(torch.int32)
        sc, mn = _scales_k4(b[:, 4:16])
        q = _nibbles(b[:, -128:].reshape(-1, 4, 32)).reshape(-1, QK_K)
        if self.code_range[1] == 31:
            q = q | (_high_bits(b[:, 16:48]) << 4)
        return {"d": _half(b[:, 0:2]), "dmin": _half(b[:, 2:4]), "scales": sc, "mins": mn, "q": q}

    def encode(self, f):
        q = f["q"]
        parts = [_half_bytes(f["d"]), _half_bytes(f["dmin"]), _scale_bytes_k4(f["scales"], f["mins"])]
        if self.code_range[1] == 31:
            parts.append(_high_bytes(q >> 4))
        parts.append(_nibble_bytes((q & 15).reshape(-1, 4, 64)).reshape(-1, 128))
        return torch.cat(parts, dim=1)


class Q4_K(_K4):
    name, type_size, code_range, search = "Q4_K", 144, (0, 15), (-1.0, 0.1, 20, False)


class Q5_K(_K4):
    name, type_size, code_range, search = "Q5_K", 176, (0, 31), (-0.5, 0.1, 15, False)


class Q3_K(BlockType):
    name, block_size, type_size, code_range = "Q3_K", QK_K, 110, (0, 7)
    sub = 16
    rest_bias = {"scales": 32}

    @property
    def field_ranges(self):
        return {"q": self.code_range, "scales": (0, 63)}

    def decode(self, blocks):
        b = blocks.to(torch.int32)
        q = _crumbs(b[:, 32:96]) | (_high_bits(b[:, :32]) << 2)
        return {"d": _half(b[:, 108:110]), "scales": _scales_q3(b[:, 96:108]), "q": q}

    def encode(self, f):
        q = f["q"]
        return torch.cat([_high_bytes(q >> 2), _crumb_bytes(q & 3), _scale_bytes_q3(f["scales"]),
                          _half_bytes(f["d"])], dim=1)

    def dequantize(self, f):
        dl = (f["d"].float()[:, None] * (f["scales"] - 32).float())[:, :, None]
        return (dl * (f["q"] - 4).float().reshape(-1, 16, 16)).reshape(-1, QK_K)

    def affine(self, f):
        step = f["d"].float()[:, None] * (f["scales"] - 32).float()
        return step, 4, torch.zeros_like(step), 16

    def quantize(self, x, qw=None, row_sigma2=None):
        m = x.shape[0]
        xs = x.reshape(m * 16, 16)
        if qw is not None:   # quantize_row_q3_K_impl: weighted make_qx for the codes and for the scales
            sigma2 = (2 * (x * x).sum(1) / QK_K).repeat_interleave(16)
            wt = _importance_weights(xs, qw.reshape(m * 16, 16), sigma2)
            scale, codes = _make_qx(xs, 4, wt)
            dblock, sc = _make_qx(scale.reshape(m, 16), 32, wt.sum(1).reshape(m, 16))
            d = dblock.to(torch.float16)
            dl = (d.float()[:, None] * (sc - 32).float()).reshape(-1)
            q = _requantize(xs, codes, dl, None, -4, 3, 4)
            return {"d": d, "scales": sc, "q": q.reshape(m, QK_K)}
        scale, codes = _make_q3(xs, 4)
        scale = scale.reshape(m, 16)
        big = _signed_absmax(scale)
        has = big != 0
        iscale = _f32(-32, big) / big
        sc = _wrap_int8(_nearest_int(iscale[:, None] * scale)).clamp(-32, 31) + 32
        sc = torch.where(has[:, None], sc, torch.zeros_like(sc))
        d = torch.where(has, _f32(1.0, iscale) / iscale, torch.zeros_like(iscale)).to(torch.float16)
        dl = (d.float()[:, None] * (sc - 32).float()).reshape(-1)
        q = _requantize(xs, codes, dl, None, -4, 3, 4)
        return {"d": d, "scales": sc, "q": q.reshape(m, QK_K)}


class Q6_K(BlockType):
    name, block_size, type_size, code_range = "Q6_K", QK_K, 210, (0, 63)
    sub = 16

    @property
    def field_ranges(self):
        return {"q": self.code_range, "scales": (-128, 127)}

    def decode(self, blocks):
        b = blocks.to(torch.int32)
        low = _nibbles(b[:, :128].reshape(-1, 2, 64))
        high = _unpack(b[:, 128:192].reshape(-1, 2, 32), 2).transpose(-1, -2).reshape(-1, 2, 128)
        return {"d": _half(b[:, 208:210]), "scales": _wrap_int8(b[:, 192:208]),
                "q": (low | (high << 4)).reshape(-1, QK_K)}

    def encode(self, f):
        q = f["q"].reshape(-1, 2, 128)
        ql = _nibble_bytes(q & 15).reshape(-1, 128)
        qh = _pack((q >> 4).reshape(-1, 2, 4, 32).transpose(-1, -2), 2).reshape(-1, 64)
        return torch.cat([ql, qh, f["scales"] & 0xFF, _half_bytes(f["d"])], dim=1)

    def dequantize(self, f):
        dl = (f["d"].float()[:, None] * f["scales"].float())[:, :, None]
        return (dl * (f["q"] - 32).float().reshape(-1, 16, 16)).reshape(-1, QK_K)

    def affine(self, f):
        step = f["d"].float()[:, None] * f["scales"].float()
        return step, 32, torch.zeros_like(step), 16

    def quantize(self, x, qw=None, row_sigma2=None):
        m = x.shape[0]
        xs = x.reshape(m * 16, 16)
        # quantize_row_q6_K_impl weights the sub-block search by the importance alone (no sigma2 term)
        scale, codes = _make_qx(xs, 32, None if qw is None else qw.reshape(m * 16, 16))
        scale = scale.reshape(m, 16)
        big = _signed_absmax(scale)
        empty = big.abs() < _f32(GROUP_MAX_EPS, big)   # the whole super-block is stored as zero bytes
        iscale = _f32(-128, big) / big
        d = (_f32(1.0, iscale) / iscale).to(torch.float16)
        sc = _wrap_int8(_nearest_int(iscale[:, None] * scale).clamp(max=127))
        dl = (d.float()[:, None] * sc.float()).reshape(-1)
        q = _requantize(xs, codes, dl, None, -32, 31, 32).reshape(m, QK_K)
        return {"d": torch.where(empty, torch.zeros_like(d), d),
                "scales": torch.where(empty[:, None], torch.zeros_like(sc), sc),
                "q": torch.where(empty[:, None], torch.zeros_like(q), q)}


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(),
                                                         Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K())}
GGUF_TYPES = tuple(BLOCK_TYPES)

# llama.cpp's quantizer (llama-quant.cpp, tensor_type_fallback) for rows that are not a multiple of 256
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@contextlib.contextmanager
def _search_threads(x: torch.Tensor):
    """The threads the k-quant searches of blocks x run on. As tensor code they are thousands of small tensor ops
    in sequence: handing each to a thread pool costs more than it saves (and far more when other processes hold
    the cores), so they run on one thread. The native searches split their rows across all of them."""
    if native_searches(x):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _block_type(type: str) -> BlockType:
    if type not in BLOCK_TYPES:
        raise LowbitError(f"unknown GGUF type {type!r}; valid: {', '.join(GGUF_TYPES)}")
    return BLOCK_TYPES[type]


def fallback_type(type: str, in_features: int) -> str:
    """The type llama.cpp stores a `type` tensor in, given its row length. A row that is a multiple of the
    type's block keeps the type. Otherwise llama.cpp's quantizer (llama-quant.cpp, tensor_type_fallback) takes a
    32-weight type of at least the same precision: Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0;
    and "F16" (the tensor stays float16) when the row is not a multiple of 32 either. The 32-weight types have
    no fallback there (llama.cpp stops with an error); here that is a LowbitError. Older llama.cpp releases sent
    Q2_K and Q3_K to IQ4_NL, which lowbit does not implement."""
    bt = _block_type(type)
    if in_features % bt.block_size == 0:
        return type
    if type not in _FALLBACK:
        raise LowbitError(f"{type} needs rows that are a multiple of {bt.block_size}, got {in_features}; "
                          "llama.cpp has no fallback for it")
    fb = _FALLBACK[type]
    return fb if in_features % BLOCK_TYPES[fb].block_size == 0 else "F16"


@register_format
@dataclass(frozen=True)
class GGUFSpec(WeightFormat):
    """A GGUF block type as a weight format: `qweight` holds each row's GGUF block bytes."""

    type: str

    kind = "gguf"

    def __post_init__(self):
        _block_type(self.type)

    @property
    def block(self) -> BlockType:
        return BLOCK_TYPES[self.type]

    @property
    def block_size(self) -> int:
        return self.block.block_size

    @property
    def type_size(self) -> int:
        return self.block.type_size

    @property
    def name(self) -> str:
        return f"gguf_{self.type.lower()}"

    def describe(self) -> str:
        b = self.block
        return (f"GGUF {self.type}: blocks of {b.block_size} weights in {b.type_size} bytes "
                f"({8 * b.type_size / b.block_size:g} bits per weight), scales inside the blocks")

    def check_shape(self, shape: tuple[int, int], name: str = "weight") -> None:
        n, k = shape
        if k <= 0 or k % self.block_size:
            fits = [t for t, b in BLOCK_TYPES.items() if k > 0 and k % b.block_size == 0]
            hint = ""
            if k > 0:
                try:
                    hint = f"; llama.cpp would store it as {fallback_type(self.type, k)}"
                except LowbitError:
                    pass
            raise LowbitError(f"{name}: in_features={k} is not a multiple of {self.type}'s block of "
                              f"{self.block_size}; types that fit: {', '.join(fits) or 'none'}{hint}")

    def layout(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, k = shape
        return {"qweight": ((n, k // self.block_size * self.type_size), torch.uint8)}

    # blocks <-> fields ------------------------------------------------------------------------------------
    def unpack_fields(self, qweight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored bytes [N, bytes per row] -> the blocks' fields, each [N, blocks per row, ...]: "d" (and
        "m" or "dmin") as float16, "scales"/"mins" (sub-block codes, k-quants) and "q" (weight codes, in the
        block's weight order) as int32; see the module docstring for what each means."""
        n = qweight.shape[0]
        f = self.block.decode(qweight.reshape(-1, self.type_size))
        return {k: v.reshape(n, -1, *v.shape[1:]) for k, v in f.items()}

    def pack_fields(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of `unpack_fields` (codes are checked against their ranges)."""
        bt = self.block
        needed = set(bt.half_fields) | set(bt.field_ranges)
        if set(fields) != needed:
            raise LowbitError(f"{self.type} blocks have fields {sorted(needed)}, got {sorted(fields)}")
        n = fields["q"].shape[0]
        flat = {}
        for key, v in fields.items():
            v = v.reshape(-1, *v.shape[2:])
            if key in bt.half_fields:
                flat[key] = v.to(torch.float16)
                continue
            lo, hi = bt.field_ranges[key]
            if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
                raise LowbitError(f"{self.type} field '{key}' must lie in [{lo}, {hi}]")
            flat[key] = v.to(torch.int32)
        return bt.encode(flat).to(torch.uint8).reshape(n, -1)

    # the format protocol ----------------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None,
                 name: str = "weight") -> QuantizedTensor:
        """llama.cpp's reference quantizer for this type (see the module docstring); with `importance`
        (float [K], e.g. an imatrix's mean x² per input channel) its importance-weighted quantizer."""
        n, k = w.shape
        self.check_shape((n, k), name)
        x = w.detach().float()
        if not all_finite(x):
            raise LowbitError(f"{name} contains NaN or Inf")
        bt = self.block
        blocks = x.reshape(-1, bt.block_size)
        qw = sigma2 = None
        if importance is not None:
            qw = check_importance(importance, k, name).reshape(-1, bt.block_size).repeat(n, 1)
            sigma2 = ((x * x).sum(1) / k).repeat_interleave(k // bt.block_size)
        kquant = bt.block_size == QK_K
        step = _KQUANT_CHUNK if kquant else max(1, blocks.shape[0])
        out = []
        with _search_threads(blocks) if kquant else contextlib.nullcontext():
            for s in range(0, blocks.shape[0], step):
                part = slice(s, s + step)
                f = bt.quantize(blocks[part], None if qw is None else qw[part],
                                None if sigma2 is None else sigma2[part])
                if not all(torch.isfinite(f[h].float()).all() for h in bt.half_fields):
                    raise LowbitError(f"{name}: weights too large for {self.type}'s float16 block scales")
                out.append(bt.encode(f).to(torch.uint8))
        return QuantizedTensor(self, (n, k), torch.cat(out).reshape(n, -1).contiguous())

    # fixed grids (formats.base.Grid): one GGUF block of columns at a time -------------------------------
    def grid_width(self, in_features: int) -> int:
        return self.block_size

    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        """The block fields this type's quantizer gives w ([N, block_size], one block per row; with
        importance, the weighted quantizer, its row statistic taken over this block), as a Grid."""
        bt = self.block
        x = w.detach().float()
        qw = sigma2 = None
        if importance is not None:
            qw = check_importance(importance, bt.block_size).expand(x.shape[0], -1)
            sigma2 = (x * x).mean(1)
        with _search_threads(x) if bt.block_size == QK_K else contextlib.nullcontext():
            f = bt.quantize(x, qw, sigma2)
        if not all(torch.isfinite(f[h].float()).all() for h in bt.half_fields):
            raise LowbitError(f"weights too large for {self.type}'s float16 block scales")
        step, zero, offset, sub = bt.affine(f)
        params = {key: v for key, v in f.items() if key != "q"}
        return Grid(step.repeat_interleave(sub, 1), torch.full((bt.block_size,), float(zero)),
                    offset.repeat_interleave(sub, 1), *bt.code_range, params)

    def from_grids(self, codes: torch.Tensor, grids: list[Grid]) -> QuantizedTensor:
        n, k = codes.shape
        fields = {key: torch.stack([g.params[key] for g in grids], dim=1) for key in grids[0].params}
        fields["q"] = codes.reshape(n, k // self.block_size, self.block_size)
        return QuantizedTensor(self, (n, k), self.pack_fields(fields).contiguous())

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        raise LowbitError(f"{self.type} blocks carry their own scales: build them with pack_fields, not from "
                          "codes alone")

    def unpack(self, qweight: torch.Tensor) -> torch.Tensor:
        """Weight codes [N, K] as int32 (unsigned, as stored; Q8_0 signed)."""
        return self.unpack_fields(qweight)["q"].reshape(qweight.shape[0], -1)

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        f = self.block.decode(qt.qweight.reshape(-1, self.type_size))
        return self.block.dequantize(f).reshape(qt.shape).to(dtype)

    # integer codes on affine groups (formats.base.IntegerView): one group per sub-block ------------------
    def integer_groups(self, in_features: int) -> tuple[int, int, int]:
        return (self.block.sub, *self.block.code_range)

    def integer_view(self, qt: QuantizedTensor) -> IntegerView:
        n = qt.shape[0]
        f = self.block.decode(qt.qweight.reshape(-1, self.type_size))
        step, zero, offset, _sub = self.block.affine(f)   # w = step·(q − zero) − offset per sub-block
        return IntegerView(f["q"].reshape(n, -1).to(torch.int32), step.reshape(n, -1).contiguous(),
                           (step * zero + offset).reshape(n, -1).contiguous())

    def integer_rest(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The blocks' fields but the codes: float16 scales as they are, sub-block codes in a byte (less the
        block type's rest_bias)."""
        ranges, bias, rest = self.block.field_ranges, self.block.rest_bias, {}
        for key, t in self.unpack_fields(qt.qweight).items():
            if key in ranges and key != "q":
                b = bias.get(key, 0)
                lo, hi = ranges[key][0] - b, ranges[key][1] - b
                small = torch.uint8 if 0 <= lo and hi <= 255 else torch.int8 if -128 <= lo and hi <= 127 else t.dtype
                t = (t - b).to(small)
            if key != "q":
                rest[f"field_{key}"] = t
        return rest

    def from_integer_codes(self, codes: torch.Tensor, rest: dict[str, torch.Tensor],
                           shape: tuple[int, int]) -> QuantizedTensor:
        n, k = shape
        bias = self.block.rest_bias
        fields = {key[len("field_"):]: t for key, t in rest.items()}
        fields.update({key: fields[key].to(torch.int32) + b for key, b in bias.items() if key in fields})
        fields["q"] = codes.to(torch.int32).reshape(n, k // self.block_size, self.block_size)
        return QuantizedTensor(self, shape, self.pack_fields(fields).contiguous())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "type": self.type}

    @classmethod
    def from_dict(cls, d: dict) -> "GGUFSpec":
        return cls(str(d["type"]))
