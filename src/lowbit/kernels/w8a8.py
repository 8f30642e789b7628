"""Kernels that quantize activations too (W8A8), and FP8 weights.

w8a8-int8 — int8 weights (symmetric, per output channel) times int8 activations (per-token dynamic or
    per-tensor static scales), accumulated exactly in int32 by `torch._int_mm`, then scaled:
    y = (q_x · q_Wᵀ) ⊙ s_x ⊙ s_Wᵀ.
    resident: qweight int8 [N, K] (storage tensor), scales float16 [N, 1] (storage), wscale float32 [1, N],
              act_scale float32 [1] (static granularity only).

llm-int8 — LLM.int8(): the input dimensions that hold outliers (some |x| > threshold in this call, or a fixed
    set chosen from calibration) are multiplied in float32 with the dequantized int8 weight columns; all other
    dimensions go through int8 × int8 with per-row activation and per-column weight scales. `hp_counts`
    (int64 [3]: rows seen, outlier dimensions summed over calls × rows, dimensions × rows) records how much ran
    in high precision.
    resident: as w8a8-int8, plus outlier_idx int64 [n] (fixed set only) and hp_counts.

fp8 — FP8 weights (per-channel float32 scales). Weight-only: dequantize to the activation dtype and multiply
    (CPU has no FP8 matmul). With FP8 activations (per-token dynamic scales): on CUDA devices of compute
    capability 8.9 or newer, `torch._scaled_mm`; elsewhere an exact emulation (both operands rounded to FP8,
    products accumulated in float32).
    resident: qweight float8 [N, K], scales float32 [N, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import FloatSpec, IntSpec, QuantizedTensor, cast_fp8
from ..formats.act import int8_scale, quantize_int8
from .base import Kernel


def _int8_weight(spec, shape) -> bool:
    return isinstance(spec, IntSpec) and spec.bits == 8 and spec.symmetric and spec.num_groups(shape[1]) == 1


def _int8_matmul(x: torch.Tensor, scale: torch.Tensor, packed: dict, bias) -> torch.Tensor:
    """x ([M, K] float) rounded to int8 with `scale`, times the int8 weight in int32, rescaled; float32 [M, N]."""
    y = torch._int_mm(quantize_int8(x, scale), packed["qweight"].t()).float() * scale * packed["wscale"]
    return y if bias is None else y + bias.float()


class Int8ActKernel(Kernel):
    name = "w8a8-int8"
    act_dtype, act_needed = "int8", "int8 activations"  # the activation format this kernel takes

    def unsupported(self, spec, shape, device, act=None):
        if act is None or act.dtype != self.act_dtype:
            return f"needs {self.act_needed}"
        if not _int8_weight(spec, shape):
            return "needs symmetric 8-bit per-channel weights"
        return None

    def prepare(self, qt):
        return {"qweight": qt.qweight, "scales": qt.scales, "wscale": qt.scales.float().t().contiguous()}

    def restore(self, packed, spec, shape):
        return QuantizedTensor(spec, shape, packed["qweight"], packed["scales"], None)

    def linear(self, x, packed, spec, shape, bias, act=None):
        x2 = x.reshape(-1, shape[1]).float()
        y = _int8_matmul(x2, int8_scale(x2, act, packed.get("act_scale")), packed, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], shape[0])


class LlmInt8Kernel(Int8ActKernel):
    name = "llm-int8"
    act_dtype, act_needed = "int8-mixed", "LLM.int8() mixed activations"

    def prepare(self, qt):
        return {**super().prepare(qt), "hp_counts": torch.zeros(3, dtype=torch.int64)}

    def linear(self, x, packed, spec, shape, bias, act=None):
        x2 = x.reshape(-1, shape[1]).float()
        fixed = packed.get("outlier_idx")
        cols = fixed if fixed is not None else (x2.abs() > act.threshold).any(dim=0).nonzero().squeeze(1)
        regular = x2
        if cols.numel():
            regular = x2.clone()
            regular[:, cols] = 0
        s = regular.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        y = _int8_matmul(regular, s, packed, bias)
        if cols.numel():
            w_cols = packed["qweight"][:, cols].float() * packed["wscale"].t()
            y = y + x2[:, cols] @ w_cols.t()
        packed["hp_counts"] += torch.tensor([x2.shape[0], cols.numel() * x2.shape[0], shape[1] * x2.shape[0]])
        return y.to(x.dtype).reshape(*x.shape[:-1], shape[0])


def scaled_mm_ok(device: torch.device) -> bool:
    """Whether torch._scaled_mm (FP8 x FP8 on tensor cores) runs on this device: CUDA, compute capability 8.9+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


class Fp8Kernel(Kernel):
    name = "fp8"

    def unsupported(self, spec, shape, device, act=None):
        if not isinstance(spec, FloatSpec):
            return "needs FP8 weights"
        if act is not None and (not act.dtype.startswith("fp8") or act.static):
            return "needs no activation quantization or per-token FP8 activations"
        return None

    def prepare(self, qt):
        return {"qweight": qt.qweight, "scales": qt.scales}

    def restore(self, packed, spec, shape):
        return QuantizedTensor(spec, shape, packed["qweight"], packed["scales"], None)

    def linear(self, x, packed, spec, shape, bias, act=None):
        w8, ws = packed["qweight"], packed["scales"]
        if act is None:
            w = (w8.to(x.dtype) * ws.to(x.dtype)) if x.dtype != torch.float32 else w8.float() * ws
            return F.linear(x, w, bias)
        aspec = FloatSpec(act.dtype.split("-")[1])
        x2 = x.reshape(-1, shape[1]).float()
        xs = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / aspec.fmax
        x8 = cast_fp8(x2, aspec, xs)
        if scaled_mm_ok(x.device) and aspec.fmt == "e4m3" and spec.fmt == "e4m3":
            y = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.t().contiguous(), out_dtype=torch.bfloat16).float()
        else:
            y = (x8.float() @ w8.float().t()) * xs * ws.t()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], shape[0])
