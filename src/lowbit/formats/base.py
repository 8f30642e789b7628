"""What a weight format is, and the registry of formats.

A format says how an [N, K] weight matrix (torch.nn.Linear layout: [out_features, in_features]) is stored: which
tensors, of which shapes and dtypes (`layout`), how many bytes that is (`nbytes`), how codes are packed into
those tensors and back (`pack` / `unpack`), how to get float weights back (`dequantize`), and the plain
round-to-nearest way to put a float matrix into it (`quantize`). Calibrating methods (GPTQ, AWQ, ...) choose
the codes differently but produce the same stored tensors.

Each format class registers itself under a `kind` (the key its `to_dict()` records), so a checkpoint's
metadata maps back to the format with `spec_from_dict`; nothing outside this package branches on a kind.

Formats with a fixed per-row grid (integer and GGUF formats) also expose it to methods that round column by
column (GPTQ): `grid_width` columns share one set of stored parameters; `fit_grid` fits those parameters to a
slice of columns and returns a `Grid` (what each column may take, in the format's own float32 arithmetic);
`from_grids` packs codes chosen on those grids with exactly those parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


def check_importance(importance, in_features: int, name: str = "weight") -> torch.Tensor:
    """Importance of the input channels as float32 [in_features], checked: finite and non-negative. A tiny
    floor (1e-9 of the mean) keeps a block whose channels never fire from collapsing every weighted fit."""
    imp = torch.as_tensor(importance).detach().float().reshape(-1)
    if imp.numel() != in_features:
        raise LowbitError(f"{name}: importance has {imp.numel()} values, the weight has {in_features} inputs")
    if not torch.isfinite(imp).all() or bool((imp < 0).any()):
        raise LowbitError(f"{name}: importance must be finite and non-negative")
    return imp.clamp(min=float(imp.mean()) * 1e-9 + 1e-30)


@dataclass
class Grid:
    """The fixed quantization grid of `width` consecutive columns of an [N, K] weight: column c of row r can
    take the values step[r, c]·(q − zero[c]) − offset[r, c] for integer codes q in [lo, hi], evaluated in
    float32 in that order (so the values are bit-identical to the format's dequantization). `params` holds the
    format's stored parameters of these columns, in whatever form its `from_grids` reads."""

    step: torch.Tensor      # float32 [N, width]
    zero: torch.Tensor      # float32 [width] (or [N, width])
    offset: torch.Tensor    # float32 [N, width]
    lo: int
    hi: int
    params: dict

    def round(self, w: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest grid point of column c for the values w [N]: (codes int32 [N], their values float32 [N])."""
        return round_to_grid(w, self.step[:, c], self.zero[..., c], self.offset[:, c], self.lo, self.hi)

    def columns(self, c0: int, c1: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(step, zero, offset) of columns c0..c1-1, each float32 [rows, c1 - c0] (zero broadcast over rows)."""
        return (self.step[:, c0:c1], self.zero[..., c0:c1].expand(rows, c1 - c0), self.offset[:, c0:c1])


def round_to_grid(w: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor, lo: int,
                  hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest point of the grid step·(q − zero) − offset, q in [lo, hi], for each value of w (all float32,
    same shape): (codes int32, their values float32). The code is found in float64 (so that (w + offset) /
    step is exact enough to pick the nearest point), the value in float32 in the order above, as the formats
    dequantize. A zero step (an all-zero sub-block) leaves one value, −offset."""
    s, z = step.double(), zero.double()
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round((w.double() + offset.double()) / safe + z).clamp(lo, hi)
    q = torch.where(s == 0, z.expand_as(q).clamp(lo, hi), q)
    return q.to(torch.int32), step * (q.float() - zero) - offset


@dataclass
class IntegerView:
    """A stored tensor as integer codes on per-group affine grids, the form native kernels multiply:
    w[n, k] = scale[n, g]·codes[n, k] − offset[n, g] for the group g = k // width (float32; equal to the
    format's dequantization up to float32 rounding: (q − z)·s and q·s − z·s round differently)."""

    codes: torch.Tensor     # int32 [N, K]
    scale: torch.Tensor     # float32 [N, K // width]
    offset: torch.Tensor    # float32 [N, K // width]


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

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> "QuantizedTensor":
        """Round-to-nearest into this format. importance: optional float [K] weights of the input channels
        (e.g. mean x² from calibration); formats that search their scales minimise the error weighted by it,
        formats without a search ignore it."""
        raise NotImplementedError

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """quantize(w).dequantize() in float32: the values the model will compute with. Formats may skip the
        packing in between (searches call this many times per weight); the values must be the same."""
        return self.quantize(w).dequantize(torch.float32)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, K] as the format defines them -> the stored `qweight`."""
        raise NotImplementedError

    def unpack(self, qweight: torch.Tensor) -> torch.Tensor:
        """The stored `qweight` -> codes [N, K] (the inverse of `pack`)."""
        raise NotImplementedError

    def dequantize(self, qt: "QuantizedTensor", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    # fixed grids, for column-by-column methods (see the module docstring) -----------------------------
    def grid_width(self, in_features: int) -> int:
        """Columns that share one set of stored parameters (a group, a GGUF block)."""
        raise NotImplementedError(f"{self.name} has no fixed grid for column-by-column rounding")

    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        """The stored parameters this format's quantizer chooses for w ([N, grid_width]; importance: [width]
        weights of the columns), as a Grid."""
        raise NotImplementedError(f"{self.name} has no fixed grid for column-by-column rounding")

    def fit_grids(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> list[Grid]:
        """fit_grid for every `grid_width` columns of w ([N, K]; importance: [K]), in order: the same grids,
        which a format may fit all at once."""
        g = self.grid_width(w.shape[1])
        return [self.fit_grid(w[:, j:j + g], None if importance is None else importance[j:j + g])
                for j in range(0, w.shape[1], g)]

    def from_grids(self, codes: torch.Tensor, grids: list[Grid]) -> "QuantizedTensor":
        """Codes [N, K] chosen on `grids` (one per `grid_width` columns, in order) -> the stored tensor."""
        raise NotImplementedError(f"{self.name} has no fixed grid for column-by-column rounding")

    # integer codes on affine groups, for native kernels ------------------------------------------------
    def integer_groups(self, in_features: int) -> tuple[int, int, int] | None:
        """(columns per group, lowest code, highest code) when this format's values are integer codes on
        per-group affine grids (`integer_view`), else None."""
        return None

    def integer_view(self, qt: "QuantizedTensor") -> IntegerView:
        raise NotImplementedError(f"{self.name} is not integer codes on affine groups")

    def integer_rest(self, qt: "QuantizedTensor") -> dict[str, torch.Tensor]:
        """What `from_integer_codes` needs besides the codes to give back qt's stored tensors exactly (a kernel
        that keeps only the codes keeps these too; small, named so they do not clash with a kernel's tensors)."""
        raise NotImplementedError(f"{self.name} is not integer codes on affine groups")

    def from_integer_codes(self, codes: torch.Tensor, rest: dict[str, torch.Tensor],
                           shape: tuple[int, int]) -> "QuantizedTensor":
        """The stored tensor from its codes (integer_view's) and `integer_rest`: bit for bit the original."""
        raise NotImplementedError(f"{self.name} is not integer codes on affine groups")

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict) -> "WeightFormat":
        raise NotImplementedError
