"""How float32 matrix products are computed on the CPU while a method calibrates (or a size-budget plan or an
imatrix is measured) and while a model is evaluated: exactly (IEEE float32), or, for calibration, by oneDNN from
inputs rounded to bfloat16, each product exact and summed in float32, the result float32.

Why the second exists: on CPUs with AMX-BF16 tiles oneDNN multiplies the rounded inputs there, several times the
float32 rate. Rounding the inputs to bfloat16 (2^-9 relative) is of the order of what the methods' reference
implementations calibrate with (models held in float16, 2^-11), and on the default model it moved GPTQ's quality
by less than reordering float32's own sums does (BENCHMARKS.md). What a method computes from those inputs
(GPTQ's factorization and error updates, AWQ's clip search and rounding) stays exact: `products("float32")`
around it. Where the CPU has no bfloat16 dot products "auto" stays exact: there the rounding would buy no speed.
On CPUs with AVX512-BF16 dot products but no AMX (AMD Zen 4 and 5) oneDNN serves the "bf16" math mode with its
float32 kernel (ONEDNN_VERBOSE: brg_matmul:avx512_core, f32): the products there come out exact (8e-7 relative
against float64, where rounded inputs give 2.5e-3; measured on a Zen 5 EPYC), and what "auto" gains over
"float32" on them (400-460 against 180-205 GFLOP/s) is oneDNN against MKL for every matmul of the pass, not
only the Linears. A bfloat16 kernel of our own for those CPUs (vdpbf16ps) made AWQ 24% faster there but its
quality worse (KLD 0.221 against 0.197, BENCHMARKS.md): not used.

Which library computes the exact products (`float32_gemm`): ATen sends a float32 matmul to MKL, and MKL uses its
AVX-512 code only on Intel CPUs; on other CPUs with AVX-512 oneDNN's float32 GEMM (JIT-generated for the CPU it
finds) ran 1.4-2.3x faster on the shapes of the default model (2 cores of an AMD EPYC with AVX-512: 130-380
against 70-170 GFLOP/s; a whole forward 1.6x, BENCHMARKS.md). There `products("float32")` sends the Linears' float32 products to
oneDNN. Both are IEEE float32 products summed in float32; only the order of the sums differs, as it does between
two CPUs or two thread counts (evaluation's numbers move in their sixth digit or later, BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import MATMUL_CHOICES
from .errors import LowbitError
from .eval.system import bf16_dot_unit, cpu_vendor

GEMM_CHOICES = ("aten", "onednn")


@functools.lru_cache(maxsize=1)
def float32_gemm() -> str:
    """Which library computes exact float32 Linears on this CPU: "onednn" on an x86 CPU with AVX-512 that is not
    Intel's (where MKL, ATen's choice, does not run its AVX-512 code), else "aten". LOWBIT_FLOAT32_GEMM=aten or
    onednn decides instead (to compare them)."""
    chosen = os.environ.get("LOWBIT_FLOAT32_GEMM", "")
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if chosen:
        if chosen not in GEMM_CHOICES:
            raise LowbitError(f"LOWBIT_FLOAT32_GEMM must be one of {', '.join(GEMM_CHOICES)}, got {chosen!r}")
        if chosen == "onednn" and not onednn:
            raise LowbitError("LOWBIT_FLOAT32_GEMM=onednn: this build of torch has no oneDNN linear")
        return chosen
    if not onednn:
        return "aten"
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"   # ATen's probe: AVX-512 F, BW, VL and DQ
    return "onednn" if avx512 and cpu_vendor() not in ("GenuineIntel", "unknown") else "aten"


class OneDNNLinear(TorchFunctionMode):
    """F.linear of float32 CPU tensors computed by oneDNN's float32 GEMM (mkldnn._linear_pointwise: IEEE float32
    products summed in float32, the weight read as it is), with or without gradients (`_linear`). Only plain
    tensors and parameters (not a tensor subclass with arithmetic of its own), and only while float32 matmuls are
    exact (under products("bfloat16") ATen's own oneDNN path runs); everything else goes on as it was called."""

    depth = 0    # how many of these are entered (the products state that ReuseFinishedParts compares)

    def __enter__(self):
        OneDNNLinear.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        OneDNNLinear.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            given = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}   # by position or by name
            x, w, b = given["input"], given["weight"], given.get("bias")
            if _routable(x, w, b):
                if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
                    return _Linear.apply(x, w, b)
                return _linear(x, w, b)
        return func(*args, **kwargs)


def _routable(x, w, b) -> bool:
    tensors = (x, w) if b is None else (x, w, b)
    return (all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"
                for t in tensors)
            and x.dim() >= 2 and w.dim() == 2
            and torch.backends.mkldnn.matmul.fp32_precision in ("ieee", "none"))


def _linear(x, w, b):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _Linear(torch.autograd.Function):
    """`_linear` where gradients are wanted (oneDNN's op has no derivative): the forward as without them, bit for
    bit; the gradients by ATen, as F.linear's own (x̄ = ȳ·W, W̄ = ȳᵀ·x, b̄ = Σ ȳ)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        return _linear(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        rows = gy.reshape(-1, gy.shape[-1])
        gx = gy @ w if ctx.needs_input_grad[0] else None
        gw = rows.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = rows.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def resolve_products(name: str, device: torch.device) -> str:
    """"auto": bfloat16 on a CPU with bfloat16 dot products, else float32 (on a GPU too: the switch is
    oneDNN's, and a GPU's calibration was not measured with it)."""
    if name not in MATMUL_CHOICES:
        raise LowbitError(f"matmul must be one of {', '.join(MATMUL_CHOICES)}, got {name!r}")
    if name == "auto":
        return "bfloat16" if device.type == "cpu" and bf16_dot_unit() else "float32"
    if name == "bfloat16" and device.type != "cpu":
        raise LowbitError(f"matmul 'bfloat16' is a CPU setting (oneDNN); on {device.type} use 'float32' or 'auto'")
    return name


def model_products(name: str, model: torch.nn.Module):
    """`products` with `name` ("auto" included) resolved for the device of the model's weights: the context
    for a pass of the whole model (a plan's statistics, an imatrix)."""
    return products(resolve_products(name, next(model.parameters()).device))


def state() -> tuple:
    """What decides how a float32 Linear is computed right now (compare two to know whether a result can be
    reused): the float32 matmul precision, and whether exact Linears go to oneDNN."""
    return torch.backends.mkldnn.matmul.fp32_precision, OneDNNLinear.depth > 0


@contextlib.contextmanager
def products(name: str, linears: bool = True):
    """Within: float32 matmuls on the CPU as `name` says ("float32" or "bfloat16", resolved), exact Linears by
    `float32_gemm()`'s library; restored on exit. linears=False: for a method's own arithmetic, which calls no
    Linear (the function mode that routes them costs about a microsecond on every tensor operation)."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16" if name == "bfloat16" else "ieee"
    route = linears and name == "float32" and float32_gemm() == "onednn"
    try:
        with OneDNNLinear() if route else contextlib.nullcontext():
            yield
    finally:
        matmul.fp32_precision = before
