"""FP8 weight formats: w ≈ f · s, with f an 8-bit float and one float32 scale per output row.

    e4m3 (torch.float8_e4m3fn): 4 exponent bits, 3 mantissa bits, largest value 448, no infinities.
    e5m2 (torch.float8_e5m2):   5 exponent bits, 2 mantissa bits, largest value 57344.
The scale maps each row's largest |w| to the format's largest value: s = absmax / fmax.

Stored tensors of a QuantizedTensor in these formats:
    qweight  float8_e4m3fn or float8_e5m2 [N, K], row-major
    scales   float32 [N, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .base import WeightFormat, register_format
from .tensor import QuantizedTensor

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@register_format
@dataclass(frozen=True)
class FloatSpec(WeightFormat):
    """An FP8 weight format with one float32 scale per output row."""

    fmt: str = "e4m3"

    kind = "float"

    def __post_init__(self):
        if self.fmt not in FP8_DTYPES:
            raise LowbitError(f"unknown FP8 format {self.fmt!r}; choose from {', '.join(FP8_DTYPES)}")

    @property
    def dtype(self) -> torch.dtype:
        return FP8_DTYPES[self.fmt]

    @property
    def fmax(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def name(self) -> str:
        return f"fp8_{self.fmt}"

    def describe(self) -> str:
        return f"FP8 {self.fmt} values, float32 scale per output channel"

    def layout(self, shape: tuple[int, int]) -> dict:
        n, k = shape
        return {"qweight": ((n, k), self.dtype), "scales": ((n, 1), torch.float32)}

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Per-channel absmax scales; FP8 has no scale search, so `importance` does not change the result."""
        return quantize_fp8(w, self)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(self.dtype)

    def unpack(self, qweight: torch.Tensor) -> torch.Tensor:
        return qweight

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (qt.qweight.float() * qt.scales).to(dtype)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "fmt": self.fmt}

    @classmethod
    def from_dict(cls, d: dict) -> "FloatSpec":
        return cls(d["fmt"])


def quantize_fp8(w: torch.Tensor, spec: FloatSpec) -> QuantizedTensor:
    w = w.float()
    scales = (w.abs().amax(dim=1, keepdim=True) / spec.fmax).clamp(min=1e-12)
    q = (w / scales).clamp(-spec.fmax, spec.fmax).to(spec.dtype)
    return QuantizedTensor(spec, tuple(w.shape), q.contiguous(), scales.contiguous(), None)


def cast_fp8(x: torch.Tensor, spec: FloatSpec, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to the FP8 grid (saturating), as an FP8 tensor."""
    return (x.float() / scale).clamp(-spec.fmax, spec.fmax).to(spec.dtype)
