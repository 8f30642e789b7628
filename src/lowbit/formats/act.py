"""How a Linear's input (activation) is quantized at run time, for W8A8 schemes.

    dtype        int8        symmetric 8-bit integers, x ≈ q · s with q in [-127, 127]
                 fp8-e4m3    8-bit floats, x ≈ f · s (s maps the range's max to 448)
                 int8-mixed  LLM.int8(): input dimensions holding outliers stay in 16/32-bit, the rest are int8
    granularity  token       one scale per row of x (per token), computed on the fly (dynamic)
                 tensor      one scale for the whole input, fixed from calibration (static)
    threshold    int8-mixed: an input dimension is an outlier when some |x| in it exceeds this (dynamic);
                 a checkpoint may instead carry a fixed outlier set chosen from calibration.

Tensors a W8A8 QuantLinear stores besides its weight (checkpoint names NAME.act_scale, NAME.outlier_idx):
    act_scale    float32 [1]     static per-tensor scale (granularity = tensor)
    outlier_idx  int64 [n]       fixed outlier input dimensions (int8-mixed with a calibrated set)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import LowbitError
from .fp8 import FloatSpec, cast_fp8

ACT_DTYPES = ("int8", "fp8-e4m3", "fp8-e5m2", "int8-mixed")


@dataclass(frozen=True)
class ActSpec:
    dtype: str = "int8"
    granularity: str = "token"
    threshold: float = 6.0

    def __post_init__(self):
        if self.dtype not in ACT_DTYPES:
            raise LowbitError(f"unknown activation type '{self.dtype}'; choose from {', '.join(ACT_DTYPES)}")
        if self.granularity not in ("token", "tensor"):
            raise LowbitError(f"activation granularity must be token or tensor, got '{self.granularity}'")
        if not self.threshold > 0:
            raise LowbitError(f"outlier threshold must be positive, got {self.threshold}")

    @property
    def static(self) -> bool:
        return self.granularity == "tensor"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ActSpec | None":
        return None if not d else cls(d["dtype"], d.get("granularity", "token"), float(d.get("threshold", cls.threshold)))


def int8_scale(x: torch.Tensor, act: ActSpec, static_scale: torch.Tensor | None) -> torch.Tensor:
    """Scale of x ([M, K]): [M, 1] per token, or the static [1]."""
    if act.static:
        if static_scale is None:
            raise LowbitError("a static activation scale is missing (calibrate, or use per-token scales)")
        return static_scale.float()
    return x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / 127.0


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)


def fake_quantize_act(x: torch.Tensor, act: ActSpec, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x rounded as the W8A8 kernel rounds it (int8 / fp8 types), returned in float32."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if act.dtype == "int8":
        s = int8_scale(x2, act, static_scale)
        out = quantize_int8(x2, s).float() * s
    elif act.dtype.startswith("fp8"):
        spec = FloatSpec(act.dtype.split("-")[1])
        s = static_scale.float() if act.static else x2.abs().amax(1, keepdim=True).clamp(min=1e-12) / spec.fmax
        out = cast_fp8(x2, spec, s).float() * s
    else:
        raise LowbitError(f"fake_quantize_act does not handle {act.dtype}")
    return out.reshape(x.shape)
