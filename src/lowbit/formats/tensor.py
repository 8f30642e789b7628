"""QuantizedTensor: a weight matrix stored in some registered format (formats.base), as the format's tensors.

Every format stores a `qweight` (codes, packed as the format says); most also store `scales`, and asymmetric
integer formats `zeros`. Which tensors exist, and their shapes and dtypes, is the format's `layout`; the
checkpoint holds exactly these tensors. Every stored tensor is row-major by output row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .base import WeightFormat


@dataclass
class QuantizedTensor:
    spec: WeightFormat
    shape: tuple[int, int]
    qweight: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
                   spec: WeightFormat) -> "QuantizedTensor":
        """Pack codes [N, K] (already in the format's code range) into the stored layout."""
        return cls(spec, tuple(codes.shape), spec.pack(codes).contiguous(),
                   None if scales is None else scales.contiguous(), None if zeros is None else zeros.contiguous())

    def codes(self) -> torch.Tensor:
        """Unpacked codes [N, K] (int32 for integer formats)."""
        return self.spec.unpack(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.spec.dequantize(self, dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: t for k, t in (("qweight", self.qweight), ("scales", self.scales), ("zeros", self.zeros))
                if t is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def expected_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self.spec.layout(self.shape)

    @classmethod
    def concat_rows(cls, parts: list["QuantizedTensor"]) -> "QuantizedTensor":
        """Stack matrices that read the same input along the output axis (e.g. q, k and v into one). Every
        stored tensor is row-major by output row, so this is a concatenation of each along dim 0."""
        first = parts[0]
        if any(p.spec != first.spec or p.shape[1] != first.shape[1] for p in parts):
            raise LowbitError("only matrices of one format and one input width can be stacked")
        cat = {k: torch.cat([p.tensors()[k] for p in parts]) for k in first.tensors()}
        return cls(first.spec, (sum(p.shape[0] for p in parts), first.shape[1]), **cat)

    def rows(self, index: torch.Tensor) -> "QuantizedTensor":
        """The matrix made of the rows `index` (any shape of row ids, flattened, in that order): every stored
        tensor is row-major by output row, so this gathers each along dim 0 without decoding anything."""
        index = index.reshape(-1)
        return QuantizedTensor(self.spec, (index.numel(), self.shape[1]),
                               **{k: t.index_select(0, index) for k, t in self.tensors().items()})

    def same_as(self, other: "QuantizedTensor") -> bool:
        """Whether two quantized tensors store the same matrix, byte for byte (a tied embedding and lm_head
        quantized once, or twice identically, are written once)."""
        a, b = self.tensors(), other.tensors()
        return (self.spec == other.spec and self.shape == other.shape and a.keys() == b.keys()
                and all(a[k].dtype == b[k].dtype and torch.equal(_bytes(a[k]), _bytes(b[k])) for k in a))

    def validate(self, name: str = "weight") -> "QuantizedTensor":
        """Check stored tensors against the format (used when reading a checkpoint)."""
        self.spec.check_shape(self.shape, name)
        have = self.tensors()
        for key, (shape, dtype) in self.expected_layout().items():
            t = have.get(key)
            if t is None:
                raise LowbitError(f"{name}: missing tensor '{key}'")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise LowbitError(f"{name}.{key}: found {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        extra = set(have) - set(self.expected_layout())
        if extra:
            raise LowbitError(f"{name}: unexpected tensors {sorted(extra)} for {self.spec.name}")
        if self.scales is not None and not torch.isfinite(self.scales.float()).all():
            raise LowbitError(f"{name}.scales contains NaN or Inf")
        return self


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)
