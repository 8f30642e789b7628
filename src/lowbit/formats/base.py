"""What a weight format is, and the registry of formats.

A format says how an [N, K] weight matrix (torch.nn.Linear layout: [out_features, in_features]) is stored: which
tensors, of which shapes and dtypes (`layout`), how many bytes that is (`nbytes`), how codes are packed into
those tensors and back (`pack` / `unpack`), how to get float weights back (`dequantize`), and the plain
round-to-nearest way to put a float matrix into it (`quantize`). Calibrating methods (GPTQ, AWQ, ...) choose
the codes differently but produce the same stored tensors.

Each format class registers itself under a `kind` (the key its `to_dict()` records), so a checkpoint's
metadata maps back to the format with `spec_from_dict`; nothing outside this package branches on a kind.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..errors import LowbitError

FORMATS: dict[str, type["WeightFormat"]] = {}


def register_format(cls):
    """Class decorator: make a format known to `spec_from_dict` under its `kind`."""
    if cls.kind in FORMATS:
        raise ValueError(f"format kind '{cls.kind}' registered twice")
    FORMATS[cls.kind] = cls
    return cls


def spec_from_dict(d: dict) -> "WeightFormat":
    """A format from its `to_dict()` form (records without "kind" are integer formats, as written before
    formats had kinds)."""
    kind = d.get("kind", "int")
    if kind not in FORMATS:
        raise LowbitError(f"unknown weight format kind '{kind}'; known: {', '.join(FORMATS)}")
    return FORMATS[kind].from_dict(d)


class WeightFormat:
    """The protocol every weight format implements (frozen dataclasses in practice, so formats compare and
    hash by value)."""

    kind: ClassVar[str]

    @property
    def name(self) -> str:
        """Short identifier, e.g. int4_g64_sym."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for people: what is stored per weight and per group."""
        raise NotImplementedError

    def check_shape(self, shape: tuple[int, int], name: str = "weight") -> None:
        """Raise LowbitError (naming `name`) if an [N, K] matrix cannot be stored in this format."""

    def layout(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Stored tensor name -> (shape, dtype) for an [N, K] matrix."""
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, int]) -> int:
        return sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in self.layout(shape).values())

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return 8 * self.nbytes(shape) / math.prod(shape)

    def quantize(self, w: torch.Tensor) -> "QuantizedTensor":
        """Round-to-nearest into this format."""
        raise NotImplementedError

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, K] as the format defines them -> the stored `qweight`."""
        raise NotImplementedError

    def unpack(self, qweight: torch.Tensor) -> torch.Tensor:
        """The stored `qweight` -> codes [N, K] (the inverse of `pack`)."""
        raise NotImplementedError

    def dequantize(self, qt: "QuantizedTensor", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict) -> "WeightFormat":
        raise NotImplementedError
