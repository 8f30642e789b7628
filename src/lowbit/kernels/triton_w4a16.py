"""triton-w4a16 — a Triton GEMM/GEMV for 4-bit integer weights and 16-bit activations on CUDA GPUs.

y[M, N] = x[M, K] · Ŵ[N, K]ᵀ (+ bias), with Ŵ = (q − z) · s dequantized tile by tile in registers (the full
dequantized weight is never written anywhere) and products accumulated in float32. Activations may be
float16, bfloat16 or float32 (the output has the activation dtype).

Resident layout (built by `repack`, inverted exactly by `unpack`). K is cut into chunks of 128 input columns;
chunk c covers columns [128·c, 128·c + 128) and is stored as 16 rows of 32-bit words:
    qweight  int32 [K / 8, N]  K-major: row 16·c + r, column n is one word holding the 4-bit codes of
                               W[n, 128·c + 16·i + r] for i = 0..7, code i in bits [4·i, 4·i + 4) (nibble 0
                               lowest). Adjacent words along a row belong to adjacent output features, so a
                               program that loads a [16, BLOCK_N] tile reads BLOCK_N·4 contiguous bytes per row
                               (16-byte vectors, 4 output features per thread), and nibble i of that tile is the
                               [16, BLOCK_N] block of input columns 128·c + 16·i .. 128·c + 16·i + 15 — contiguous
                               in x, so no shuffle is needed before the tensor-core dot.
    scales   float16 [G, N]    the storage scales transposed (row g = group g), G = K / group_size.
    zeros    float16 [G, N]    asymmetric only: the storage zero points z (integers 0..15, exact in float16),
                               transposed. Symmetric weights use the implicit z = 8 and store no zeros.
A code becomes a float without an integer-to-float conversion: (word & (15 << 4·j)) | 0x4B000000 read as a
float32 is 2²³ + q·16^j, so one subtraction of 2²³ + z·16^j yields (q − z)·16^j exactly and the factor 16^j
goes into the scale (or, in the GEMV, into x). Nibbles 0..4 are read in place (j = i), nibbles 5..7 from the
word shifted right by 12 (j = i − 3), so each word costs a single shift.

Work split: a program owns BLOCK_M rows × BLOCK_N output features and a contiguous run of K chunks. With
SPLIT_K > 1 (small M, so that enough programs fill the GPU) the programs' float32 partial sums go either to a
[SPLIT_K, M, N] buffer or (ATOMIC) are added atomically into one zeroed [M, N] buffer, and a second small kernel
sums / converts them (with the bias) into y; with SPLIT_K = 1 the bias is added and y written by the main
kernel. Variants (MODE): 0, for M = 1, a GEMV (elementwise products in registers, one reduction at the end);
1, one tensor-core dot per nibble, x[:, 16·i : 16·i + 16] × Ŵ-block i; 2, the chunk unpacked into one
[128, BLOCK_N] tile and one dot; 3, as 2 but computing yᵀ = Ŵ·xᵀ, so that the weight tile is the MMA's
register operand. `default_config` picks block sizes and the variant from M, N, K.

Requirements (see `TritonW4A16Kernel.unsupported`): 4-bit integer weights, K divisible by 128, group size
16, 32, 64, 128 or a multiple of 128 (per channel included) dividing K. Runs on CUDA devices; on CPU only under
Triton's interpreter (environment variable TRITON_INTERPRET=1), which is how the tests exercise it, and then
only when the kernel is asked for by name.
"""

from __future__ import annotations

import functools
import os

import torch

from ..formats import QuantizedTensor
from .base import Kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the kernel reports itself unsupported
    triton = None
    tl = None

CHUNK = 128  # input columns per packed chunk (16 rows of int32 words)
_ROWS = CHUNK // 8


# ------------------------------------------------------------------------------------------------ layout ----
def _group_ok(group: int) -> bool:
    return group in (16, 32, 64) or group % CHUNK == 0


def repack(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """lowbit's 4-bit storage tensors -> this kernel's resident tensors (see the module docstring)."""
    n, k = qt.shape
    if qt.spec.kind != "int" or qt.spec.bits != 4 or k % CHUNK:
        raise ValueError(f"triton-w4a16 needs 4-bit integer weights with K divisible by {CHUNK}")
    codes = _nibbles_of_bytes(qt.qweight)                          # uint8 [N, K]
    c = codes.reshape(n, k // CHUNK, 8, _ROWS).permute(1, 3, 0, 2)  # [chunk, r, n, i]
    words = torch.zeros(k // CHUNK, _ROWS, n, dtype=torch.int64, device=codes.device)
    for i in range(8):
        words |= c[..., i].to(torch.int64) << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words)
    out = {"qweight": words.reshape(k // 8, n).to(torch.int32).contiguous(),
           "scales": qt.scales.t().contiguous()}
    if qt.zeros is not None:
        out["zeros"] = qt.zeros.t().to(torch.float16).contiguous()
    return out


def unpack(packed: dict[str, torch.Tensor], spec, shape: tuple[int, int]) -> QuantizedTensor:
    """The exact inverse of `repack`."""
    n, k = shape
    words = packed["qweight"].to(torch.int64) & 0xFFFFFFFF          # [K/8, N]
    nib = torch.stack([(words >> (4 * i)) & 15 for i in range(8)])  # [i, K/8, N]
    codes = nib.reshape(8, k // CHUNK, _ROWS, n).permute(3, 1, 0, 2).reshape(n, k).to(torch.uint8)
    zeros = packed.get("zeros")
    zeros = None if zeros is None else zeros.t().to(torch.uint8).contiguous()
    return QuantizedTensor.from_codes(codes, packed["scales"].t().contiguous(), zeros, spec)


def _nibbles_of_bytes(q: torch.Tensor) -> torch.Tensor:
    return torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)


# ------------------------------------------------------------------------------------------------ kernels ---
def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The kernels call only Triton builtins, no functions of triton.language.standard (tl.sum, tl.zeros, tl.cdiv):
# those are decorated when triton is imported, so under an interpreter switched on after that import they could
# not be called from an interpreted kernel. (The final GEMV sum hands standard's combine function to tl.reduce,
# which the interpreter recognises instead of calling it.)
def _w4a16_body(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr,
                M, N, K, group_size, stride_xm, stride_ym, chunks_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_NIBS: tl.constexpr,
                SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr,
                MODE: tl.constexpr, PREFETCH: tl.constexpr, ATOMIC: tl.constexpr, DOT_F32: tl.constexpr):
    # MODE 0: GEMV (BLOCK_M = 1; elementwise products, one reduction at the end)
    # MODE 1: one tl.dot per nibble, x[:, 16 i : 16 i + 16] × W[16 i : 16 i + 16, :]
    # MODE 2: the chunk's 8 nibbles unpacked into one [128, BLOCK_N] tile, one tl.dot
    # MODE 3: as 2, computing yᵀ = W xᵀ (the weight tile is the MMA's M side, the activations its N side)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_n = pid // num_m  # programs sharing a weight tile are neighbours (L2 reuse when M spans several blocks)
    pid_m = pid % num_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, 16)
    offs_k = tl.arange(0, 128)
    offs_i = tl.arange(0, 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M

    n_chunks = K // 128
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, n_chunks)

    w_ptrs = w_ptr + (c0 * 16 + offs_r)[:, None] * N + offs_n[None, :]
    if MODE == 0:
        acc = tl.full([16, BLOCK_N], 0.0, tl.float32)
        x_ptrs = x_ptr + pid_m * stride_xm + c0 * 128 + offs_r
    elif MODE == 1:
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (c0 * 128 + offs_r)[None, :]
    elif MODE == 2:
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (c0 * 128 + offs_k)[None, :]
    else:
        acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (c0 * 128 + offs_k)[:, None]

    if PREFETCH:  # load the next chunk of codes while this one is used (dot modes are pipelined by Triton)
        p_next = tl.load(w_ptrs, mask=n_mask[None, :] & (offs_r[:, None] < (c1 - c0) * 16), other=0)
    for c in range(c0, c1):
        if PREFETCH:
            p = p_next.to(tl.uint32, bitcast=True)
            p_next = tl.load(w_ptrs + 16 * N, mask=n_mask[None, :] & (offs_r[:, None] < (c1 - c - 1) * 16), other=0)
        else:
            p = tl.load(w_ptrs, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
        # Nibble i is read in place, without shifting it down: (word & (15 << 4 j)) | 0x4B000000 read as a float32
        # is 2^23 + q·16^j. Nibbles 0..4 come from the word itself (j = i), nibbles 5..7 from word >> 12 (j = i − 3),
        # so that q·16^j stays below 2^23; the factor 16^j is taken out again through the scale (or x).
        p_hi = p >> 12
        if MODE >= 2:
            # all 8 nibbles at once: [8, 16, BLOCK_N], row 16 i + r of the chunk is nibble i of word row r
            if GROUP_NIBS == 8:  # the chunk lies in one group
                g = (c * 128) // group_size
                s3 = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, None, :]
                if SYMMETRIC:
                    z3 = 8.0
                else:
                    z3 = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, None, :]
            else:
                gi = ((c * 128 + 16 * offs_i) // group_size)[:, None] * N + offs_n[None, :]
                s3 = tl.load(s_ptr + gi, mask=n_mask[None, :], other=0.0).to(tl.float32)[:, None, :]
                if SYMMETRIC:
                    z3 = 8.0
                else:
                    z3 = tl.load(z_ptr + gi, mask=n_mask[None, :], other=0.0).to(tl.float32)[:, None, :]
            j = tl.where(offs_i < 5, offs_i, offs_i - 3)
            pow16 = tl.exp2((4 * j).to(tl.float32))[:, None, None]
            word = tl.where((offs_i < 5)[:, None, None], p[None, :, :], p_hi[None, :, :])
            bits = (word & (15 << (4 * j)).to(tl.uint32)[:, None, None]) | 0x4B000000
            q3 = bits.to(tl.float32, bitcast=True) - (z3 * pow16 + 8388608.0)  # (q − z)·16^j, exact
            w = tl.reshape((q3 * (s3 / pow16)).to(x_ptr.dtype.element_ty), [128, BLOCK_N])
            if MODE == 2:
                xk = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
                if DOT_F32:  # Triton's interpreter multiplies bfloat16 tiles as raw bits: give it float32
                    acc = tl.dot(xk.to(tl.float32), w.to(tl.float32), acc)
                else:
                    acc = tl.dot(xk, w, acc)
            else:
                xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
                if DOT_F32:
                    acc = tl.dot(tl.trans(w).to(tl.float32), xt.to(tl.float32), acc)
                else:
                    acc = tl.dot(tl.trans(w), xt, acc)
        else:
            for i in tl.static_range(8):
                if i % GROUP_NIBS == 0:
                    g = (c * 128 + 16 * i) // group_size
                    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    if SYMMETRIC:
                        z = tl.full([BLOCK_N], 8.0, tl.float32)
                    else:
                        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    if MODE == 0:
                        part = tl.full([16, BLOCK_N], 0.0, tl.float32)
                if i < 5:
                    word = p
                else:
                    word = p_hi
                shift = 4 * (i - 3 * (i // 5))  # 4 j
                bits = (word & (15 << shift)) | 0x4B000000
                q = bits.to(tl.float32, bitcast=True) - (z * (1 << shift) + 8388608.0)[None, :]  # (q − z)·16^j, exact
                if MODE == 0:
                    xi = tl.load(x_ptrs + 16 * i).to(tl.float32) * (1.0 / (1 << shift))
                    part += xi[:, None] * q
                    if i % GROUP_NIBS == GROUP_NIBS - 1:
                        acc += part * s[None, :]
                else:
                    w = (q * (s * (1.0 / (1 << shift)))[None, :]).to(x_ptr.dtype.element_ty)
                    xi = tl.load(x_ptrs + 16 * i, mask=m_mask[:, None], other=0.0)
                    if DOT_F32:
                        acc = tl.dot(xi.to(tl.float32), w.to(tl.float32), acc)
                    else:
                        acc = tl.dot(xi, w, acc)
        w_ptrs += 16 * N
        x_ptrs += 128

    if MODE == 0:
        out = tl.reduce(acc, 0, tl.standard._sum_combine)[None, :]
        offs_m = pid_m + tl.arange(0, 1)
        m_mask = offs_m < M
    elif MODE == 3:
        out = tl.trans(acc)
    else:
        out = acc
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_OUT:
        if ATOMIC:  # one zeroed float32 [M, N] buffer that stays in L2
            tl.atomic_add(p_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask, sem="relaxed")
        else:  # a [SPLIT_K, M, N] buffer
            tl.store(p_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


def _splitk_reduce_body(p_ptr, b_ptr, y_ptr, M, N, stride_ym, split_k,
                        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for s in range(split_k):
        acc += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _jitted(name: str, interpret: bool):
    """The kernels are decorated on first use, not at import: Triton decides between compiling and
    interpreting when a function is decorated, so this picks up TRITON_INTERPRET as set at call time."""
    return triton.jit({"main": _w4a16_body, "reduce": _splitk_reduce_body}[name])


def _kernel(name: str):
    return _jitted(name, _interpreting())


# -------------------------------------------------------------------------------------------- launching ----
@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_config(m: int, n: int, k: int, num_sms: int = 132) -> dict:
    """Block sizes for an [m, k] × [k, n] product, from measurements on an H100 (benchmarks/gpu_w4a16.py):
    the GEMV variant at m = 1, one tensor-core dot per nibble up to m = 16, one dot per chunk above; split-K
    until there are `per_sm` programs per multiprocessor, keeping at least a few chunks per split.

    Keys: BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages; MODE (1–3, see the kernel; BLOCK_M = 1 means the
    GEMV variant); PREFETCH (GEMV: load the next chunk ahead); ATOMIC (split-K partial sums added atomically
    into one float32 [M, N] buffer instead of written to a [SPLIT_K, M, N] one)."""
    chunks = k // CHUNK
    if m == 1:
        cfg, per_sm = dict(BLOCK_M=1, BLOCK_N=64, num_warps=4, num_stages=1, PREFETCH=True), 16
    elif m <= 16:
        cfg, per_sm = dict(BLOCK_M=16, BLOCK_N=64, MODE=1, num_warps=4, num_stages=4), 4
    elif m <= 64:
        cfg, per_sm = dict(BLOCK_M=64, BLOCK_N=128, MODE=2, num_warps=4, num_stages=3, ATOMIC=True), 8
    else:
        cfg, per_sm = dict(BLOCK_M=128, BLOCK_N=64, MODE=3, num_warps=4, num_stages=3), 2
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    min_chunks = 8 if chunks >= 64 else 4
    split = max(1, min(-(-per_sm * num_sms // tiles), chunks // min_chunks))
    cfg["SPLIT_K"] = -(-chunks // -(-chunks // split))  # same number of chunks per split (but the last)
    return cfg


def w4a16_matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], group_size: int,
                 bias: torch.Tensor | None = None, config: dict | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float16 / bfloat16 / float32) times the repacked weight; returns [..., N] in x's dtype.

    `group_size` is the storage group size (-1 = per channel); `config` overrides the block sizes (keys as
    returned by `default_config`); `out`, if given, is a contiguous [M, N] tensor of x's dtype (M = the rows
    of x) that receives the result."""
    qweight, scales, zeros = packed["qweight"], packed["scales"], packed.get("zeros")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    group = k if group_size == -1 else group_size
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {m}x{n} {x.dtype} tensor on {x.device}")
        y = out
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    if config is None:
        sms = _num_sms(x.device.index or 0) if x.device.type == "cuda" else 4
        config = default_config(m, n, k, sms)
    cfg = dict(config)
    split = int(cfg.pop("SPLIT_K", 1))
    chunks = k // CHUNK
    per_split = -(-chunks // max(1, min(split, chunks)))
    split = -(-chunks // per_split)
    mode = 0 if cfg["BLOCK_M"] == 1 else int(cfg.get("MODE", 2))
    atomic = split > 1 and bool(cfg.get("ATOMIC", False))
    if split == 1:
        partial = y
    elif atomic:
        partial = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    _kernel("main")[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if has_bias else scales, y, partial,
        m, n, k, group, x2.stride(0), y.stride(0), per_split,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUP_NIBS=min(group, CHUNK) // 16,
        SYMMETRIC=zeros is None, HAS_BIAS=has_bias, SPLIT_OUT=split > 1, MODE=mode,
        PREFETCH=bool(cfg.get("PREFETCH", False)), ATOMIC=atomic,
        DOT_F32=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    if split > 1:
        block = 1024
        _kernel("reduce")[(triton.cdiv(m * n, block),)](
            partial, bias if has_bias else partial, y, m, n, y.stride(0), 1 if atomic else split,
            HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------- kernel -----
class TritonW4A16Kernel(Kernel):
    name = "triton-w4a16"
    auto_devices = ("cuda",)  # automatic selection never picks it elsewhere (the interpreter is for tests)

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        if triton is None:
            return "triton is not installed"
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            return "runs on CUDA GPUs (on CPU only under TRITON_INTERPRET=1)"
        if act is not None:
            return "weight-only: no activation quantization"
        if spec.kind != "int" or spec.bits != 4:
            return "needs 4-bit integer weights"
        if k % CHUNK:
            return f"needs in_features divisible by {CHUNK} (got {k})"
        if spec.group_size != -1 and k % spec.group_size:
            return f"group size {spec.group_size} does not divide in_features={k}"
        if not _group_ok(spec.group_size_for(k)):
            return f"needs group size 16, 32, 64 or a multiple of {CHUNK} (got {spec.group_size})"
        return None

    def prepare(self, qt):
        return repack(qt)

    def restore(self, packed, spec, shape):
        return unpack(packed, spec, shape)

    def linear(self, x, packed, spec, shape, bias, act=None):
        return w4a16_matmul(x, packed, spec.group_size, bias)
