"""Launching triton-w4a16: `w4a16_matmul` (y = x · Ŵᵀ + bias with the resident weight of `repack`) and the
`TritonW4A16Kernel` that lowbit's layers run through.

Triton is optional: without it this module still imports and the kernel reports itself unsupported. The
kernels are decorated when this module is imported, and Triton decides then whether they are compiled or
interpreted: to run them on CPU, set TRITON_INTERPRET=1 before lowbit is imported (the tests do).
"""

from __future__ import annotations

import functools
import os

import torch

from ...formats import IntSpec
from ..base import Kernel
from .config import DOT_MODES, Mode, default_config
from .layout import CHUNK, group_ok, repack, unpack

try:
    import triton
except ImportError:  # lowbit still imports; the kernel reports itself unsupported
    triton = None
if triton is not None:
    from .gemm import dot_chunk_kernel, dot_per_nibble_kernel
    from .gemv import gemv_f16x2_kernel, gemv_f32_kernel
    from .tiles import splitk_reduce_kernel


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Inline PTX only where the kernels were compiled: the interpreter runs its emulation instead.
COMPILED = triton is not None and not interpreting()


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _f16x2_ok(x: torch.Tensor, group: int) -> bool:
    return x.dtype == torch.float16 and group % 64 == 0


_COUNTERS: dict = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 tile counters for LAST, one buffer per device and stream; every launch leaves them 0."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


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
    f16x2 = _f16x2_ok(x, group) and scales.dtype == torch.float16
    if config is None:
        sms = _num_sms(x.device.index or 0) if x.device.type == "cuda" else 4
        config = default_config(m, n, k, sms, f16x2=f16x2)
    cfg = dict(config)
    split = int(cfg.pop("SPLIT_K", 1))
    chunks = k // CHUNK
    per_split = -(-chunks // max(1, min(split, chunks)))
    split = -(-chunks // per_split)
    if cfg["BLOCK_M"] == 1:
        mode = Mode.GEMV_F16X2 if cfg.get("MODE", Mode.GEMV_F32) == Mode.GEMV_F16X2 and f16x2 else Mode.GEMV_F32
    else:
        mode = cfg.get("MODE", Mode.DOT_UNPACKED)
        if mode not in DOT_MODES:
            raise ValueError(f"MODE {int(mode)} needs BLOCK_M = 1")
    atomic = split > 1 and bool(cfg.get("ATOMIC", False))
    last = split > 1 and not atomic and bool(cfg.get("LAST", False))
    if split == 1:
        partial = y
    elif atomic:
        partial = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    counters = tile_counters(x.device, tiles) if last else partial
    args = (x2, qweight, scales, zeros if zeros is not None else scales, bias if has_bias else scales, y, partial,
            counters, m, n, k, group, x2.stride(0), y.stride(0), per_split)
    common = dict(BLOCK_N=cfg["BLOCK_N"], GROUP_NIBS=min(group, CHUNK) // 16, SYMMETRIC=zeros is None,
                  HAS_BIAS=has_bias, SPLIT_OUT=split > 1, ATOMIC=atomic, LAST=last,
                  num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    dot_f32 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    grid = (tiles, split)
    if mode == Mode.GEMV_F32:
        gemv_f32_kernel[grid](*args, PREFETCH=bool(cfg.get("PREFETCH", False)), **common)
    elif mode == Mode.GEMV_F16X2:
        gemv_f16x2_kernel[grid](*args, EVEN_N=n % cfg["BLOCK_N"] == 0, G128=group == CHUNK, USE_ASM=COMPILED,
                                **common)
    elif mode == Mode.DOT_PER_NIBBLE:
        dot_per_nibble_kernel[grid](*args, BLOCK_M=cfg["BLOCK_M"], DOT_F32=dot_f32,
                                    DQ16=bool(cfg.get("DQ16", False)) and f16x2, G128=group == CHUNK,
                                    USE_ASM=COMPILED, **common)
    else:
        dot_chunk_kernel[grid](*args, BLOCK_M=cfg["BLOCK_M"], DOT_F32=dot_f32,
                               TRANSPOSED=mode == Mode.DOT_TRANSPOSED, **common)
    if split > 1 and not last:
        block = 1024
        splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            partial, bias if has_bias else partial, y, m, n, y.stride(0), 1 if atomic else split,
            HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
    return y.reshape(*x.shape[:-1], n)


class TritonW4A16Kernel(Kernel):
    """4-bit integer weights (K divisible by 128, group size 16, 32, 64 or a multiple of 128, per channel
    included) times 16-bit activations. Runs on CUDA devices; on CPU only under Triton's interpreter, and then
    only when asked for by name."""
    name = "triton-w4a16"
    auto_devices = ("cuda",)  # automatic selection never picks it elsewhere (the interpreter is for tests)

    def unsupported(self, spec, shape, device, act=None):
        n, k = shape
        if triton is None:
            return "triton is not installed"
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            return "runs on CUDA GPUs (on CPU only under TRITON_INTERPRET=1)"
        if act is not None:
            return "weight-only: no activation quantization"
        if not isinstance(spec, IntSpec) or spec.bits != 4:
            return "needs 4-bit integer weights"
        if spec.two_level:
            return "needs float16 group scales (not two-level)"
        if k % CHUNK:
            return f"needs in_features divisible by {CHUNK} (got {k})"
        if spec.group_size != -1 and k % spec.group_size:
            return f"group size {spec.group_size} does not divide in_features={k}"
        if not group_ok(spec.group_size_for(k)):
            return f"needs group size 16, 32, 64 or a multiple of {CHUNK} (got {spec.group_size})"
        return None

    def prepare(self, qt):
        return repack(qt)

    def restore(self, packed, spec, shape):
        return unpack(packed, spec, shape)

    def linear(self, x, packed, spec, shape, bias, act=None):
        return w4a16_matmul(x, packed, spec.group_size, bias)
