"""How float32 matrix products are computed on the CPU while a method calibrates (or a size-budget plan or an
imatrix is measured): exactly (IEEE float32), or by oneDNN from inputs rounded to bfloat16, each product exact
and summed in float32, the result float32.

Why the second exists: on CPUs that multiply bfloat16 natively (AVX512-BF16 dot products, AMX-BF16 tiles) it
is about 2.2x the float32 rate on a calibration pass's shapes (2 cores of an AMD EPYC with AVX512-BF16: 400-460
against 180-205 GFLOP/s). Rounding the inputs to bfloat16 (2^-9 relative) is of the order of what the methods'
reference implementations calibrate with (models held in float16, 2^-11), and on the default model it moved
GPTQ's quality by less than reordering float32's own sums does (BENCHMARKS.md). What a method computes from
those inputs (GPTQ's factorization and error updates, AWQ's clip search and rounding) stays exact:
`products("float32")` around it. Where the CPU has no bfloat16 dot products "auto" stays exact: there the
rounding would buy no speed.
"""

from __future__ import annotations

import contextlib

import torch

from .config import MATMUL_CHOICES
from .errors import LowbitError
from .eval.system import bf16_dot_unit


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


@contextlib.contextmanager
def products(name: str):
    """Within: float32 matmuls on the CPU as `name` says ("float32" or "bfloat16", resolved); restored on exit."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16" if name == "bfloat16" else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before
