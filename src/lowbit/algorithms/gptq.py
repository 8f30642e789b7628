"""GPTQ (Frantar et al., 2022): quantize a Linear's columns one at a time, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error.

For a layer with calibration inputs X ([tokens, K]) the objective ‖WX − ŴX‖² has Hessian H = 2 XᵀX / n.
Following the paper: dampen H's diagonal by `damp` times its mean, take the upper Cholesky factor of H⁻¹, and
quantize in blocks of `block_size` columns, applying the block's accumulated error to the later columns lazily
(once per block). Dead inputs (zero diagonal: a channel that is always 0) get H_ii = 1 and zero weights, as in
the reference. With `act_order`, columns go in order of decreasing H_ii; groups are then "static" — each
group's scale and zero point come from the original weights of its contiguous columns — so the stored layout
is the same as without act-order.

The grid is the format's (formats.base.Grid), so one loop serves integer groups and GGUF blocks alike: when
the loop reaches the first column of a group / block, the format fits its stored parameters (for a k-quant:
the f16 super-scales and the quantized sub-block scales and mins) to the current, error-updated weights of
those columns, weighting the columns by H's diagonal for formats that search; every column of the group is
then rounded on that fixed grid, and the codes are packed with exactly those parameters, so the result is a
valid tensor of the format whose dequantization equals the values GPTQ used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GPTQ
from ..errors import LowbitError
from ..formats import QuantizedTensor, WeightFormat, round_to_grid


GRAM_TILE = 384   # columns per tile of Σ xᵀx (see Hessian)
# rows (tokens) per product in Hessian.add_all: one product of 4 windows of 512 tokens instead of four is 20% faster
# for 1536 inputs on 2 cores of an AMD EPYC (fewer, larger calls and float64 additions), and larger ones gain nothing
GRAM_ROWS = 2048


class Hessian:
    """Running H = 2/n Σ xᵀx over the calibration inputs of one Linear.

    Each sample's xᵀx is a float32 product (a float64 one costs 2-4x as much on CPUs and moves H by ~1e-7
    relative: tests/test_gptq.py measures it), summed into a float64 Σ xᵀx so that many samples lose nothing;
    H is Σ scaled once, when asked for. xᵀx is symmetric, so it is multiplied by tiles of about GRAM_TILE
    columns and only the tiles on and above the diagonal are computed (BLAS's syrk does the same; PyTorch does
    not expose it): 3 of 4 tiles for 576 inputs, 10 of 16 for 1536, 36 of 64 for 4096; the lower tiles are
    mirrored when H is asked for, so H is exactly symmetric."""

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0
        t = -(-in_features // GRAM_TILE)
        edges = [round(i * in_features / t) for i in range(t + 1)]
        self.tiles = [slice(a, b) for a, b in zip(edges, edges[1:])]

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        for i, a in enumerate(self.tiles):
            for b in self.tiles[i:]:
                xtx = x[:, a].T @ x[:, b]
                # NaN or Inf anywhere in x (or a square overflowing float32) shows on the diagonal, Σ x_k², which
                # is all that needs checking: K values instead of K²
                if a is b and not torch.isfinite(xtx.diagonal()).all():
                    raise LowbitError("calibration activations contain NaN or Inf (or overflow float32)")
                self.sum[a, b].add_(xtx)   # promoted to float64 as it is added
        self.n += x.shape[0]

    def add_all(self, xs) -> None:
        """add() for every tensor of xs, about GRAM_ROWS rows per product."""
        batch: list[torch.Tensor] = []
        rows = 0
        for x in xs:
            batch.append(x.reshape(-1, x.shape[-1]))
            rows += batch[-1].shape[0]
            if rows >= GRAM_ROWS:
                self.add(torch.cat(batch) if len(batch) > 1 else batch[0])
                batch, rows = [], 0
        if batch:
            self.add(torch.cat(batch) if len(batch) > 1 else batch[0])

    @property
    def H(self) -> torch.Tensor:
        S = self.sum.clone()
        for i, a in enumerate(self.tiles):
            for b in self.tiles[i + 1:]:
                S[b, a] = S[a, b].T
        return S.mul_(2.0 / max(self.n, 1))


@dataclass
class Factor:
    """What GPTQ needs of one Hessian, computed once for every Linear that shares it: the column order, the
    dead inputs and the upper Cholesky factor U of the damped, permuted H⁻¹ (float32, as the loop runs)."""

    perm: torch.Tensor
    dead: torch.Tensor
    Hinv: torch.Tensor
    diag: torch.Tensor       # H's diagonal in the original column order (float32), for weighted grids


def factor_hessian(H: torch.Tensor, damp: float = GPTQ.damp, act_order: bool = GPTQ.act_order) -> Factor:
    """Dead inputs (zero diagonal) get H_ii = 1; with act_order columns go by decreasing H_ii; then H is
    damped by `damp` times its mean diagonal and U with H⁻¹ = UᵀU is found from a single Cholesky
    factorization: with J the order-reversing permutation and J H J = L Lᵀ, H = (J L J)(J L J)ᵀ, so
    U = (J L J)⁻¹ = J L⁻¹ J, upper triangular with a positive diagonal (the paper's chol(inv(H)) equals it
    to float64 rounding and costs ~20x as much through LAPACK's potri)."""
    H = H.to(torch.float64).clone()
    K = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    diag = torch.diag(H).float()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info:
        raise LowbitError(f"Hessian not positive definite even with damping {damp}; raise --damp")
    U = torch.linalg.solve_triangular(L, torch.eye(K, dtype=H.dtype), upper=False).flip(0, 1)
    return Factor(perm, dead, U.float(), diag)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: WeightFormat, *, block_size: int = GPTQ.block_size,
                  damp: float = GPTQ.damp, act_order: bool = GPTQ.act_order,
                  weighted_grid: bool = GPTQ.weighted_grid) -> QuantizedTensor:
    """Quantize W ([N, K]) given the Hessian H ([K, K]) of its inputs into `spec` (any format with a fixed
    grid: IntSpec, GGUFSpec). weighted_grid: fit each group's grid weighting its columns by diag(H) (the
    formats' importance-weighted search); otherwise by the format's own unweighted rule."""
    return gptq_quantize_updated(W, factor_hessian(H, damp, act_order), spec, block_size=block_size,
                                 act_order=act_order, weighted_grid=weighted_grid)[0]


def gptq_quantize_updated(W: torch.Tensor, factor: Factor, spec: WeightFormat, *,
                          block_size: int = GPTQ.block_size, act_order: bool = GPTQ.act_order,
                          weighted_grid: bool = GPTQ.weighted_grid) -> tuple[QuantizedTensor, torch.Tensor]:
    """gptq_quantize's result, from the Hessian's `factor` (factor_hessian, with the same act_order), and the
    error-updated weights ([N, K] float32): each column as it was when it was rounded, so that the result is
    the grid's rounding of these (the start of learned rounding). float32 throughout, as in the paper's code."""
    N, K = W.shape
    spec.check_shape((N, K))
    perm, Hinv, diag = factor.perm, factor.Hinv, factor.diag
    W = W.detach().float().clone()
    W[:, factor.dead] = 0
    g = spec.grid_width(K)
    G = K // g

    def fit(cols: torch.Tensor, j: int):
        return spec.fit_grid(cols, diag[j * g:(j + 1) * g] if weighted_grid else None)

    grids = [None] * G
    if act_order:  # static groups: parameters from the original weights, group-contiguous
        grids = spec.fit_grids(W, diag if weighted_grid else None)
        if len({(gr.lo, gr.hi) for gr in grids}) > 1:
            raise ValueError(f"{spec.name}: grids of one tensor with different code ranges")
        # every column's grid in the loop's (permuted) order, so that a block's columns are one slice
        fixed = [torch.cat([gr.columns(0, g, N)[f] for gr in grids], 1)[:, perm] for f in range(3)]
    W = W[:, perm]
    invperm = torch.argsort(perm)

    Q = torch.zeros(N, K, dtype=torch.int32)
    U = torch.zeros(N, K, dtype=torch.float32)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
        i = 0
        while i < i2 - i1:   # runs of columns on fixed grids: the whole block, or up to the next group's start
            if act_order:
                stop, (lo, hi) = i2 - i1, (grids[0].lo, grids[0].hi)
                step, zero, offset = (f[:, i1:i2] for f in fixed)
            else:   # a new group: parameters from the error-updated weights
                j, c = divmod(i1 + i, g)
                if c == 0:
                    here = W1[:, i:i + g]
                    grids[j] = fit(here if here.shape[1] == g else torch.cat([here, W[:, i2:i2 + g - here.shape[1]]], 1), j)
                stop = min(i2 - i1, i + g - c)
                lo, hi = grids[j].lo, grids[j].hi
                step, zero, offset = grids[j].columns(c, c + stop - i, N)
            round_columns(W1, Hinv1, i, step, zero, offset, lo, hi, Q[:, i1:i2], U[:, i1:i2], Err1)
            i = stop
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    return spec.from_grids(Q[:, invperm], grids), U[:, invperm]


def round_columns(W1: torch.Tensor, Hinv1: torch.Tensor, start: int, step: torch.Tensor, zero: torch.Tensor,
                  offset: torch.Tensor, lo: int, hi: int, Q1: torch.Tensor, U1: torch.Tensor,
                  Err1: torch.Tensor) -> None:
    """GPTQ's inner loop over columns start..start+n-1 of one block (W1: the block's weights [N, B], updated in
    place; Hinv1: its [B, B] part of U; step/zero/offset [N, n]: those columns' grid, formats.base.Grid).
    Each column is rounded to its grid (codes into Q1, the weights as rounded into U1), its error divided by
    U_ii goes into Err1, and the block's later columns absorb it: W1[:, j] −= err·U_ij.

    This is the reference; float32 tensors on the CPU run kernels/csrc/gptq_columns.cpp instead, the same
    operations in the same order (bit-identical, tests/test_gptq.py), a row at a time in cache rather than a
    dozen passes over all rows per column (LOWBIT_NATIVE=0 selects this code)."""
    if _native(W1):
        torch.ops.lowbit.gptq_columns(W1, Hinv1, step.contiguous(), zero.contiguous(), offset.contiguous(),
                                      lo, hi, start, Q1, U1, Err1)
        return
    for k in range(step.shape[1]):
        i = start + k
        w = W1[:, i]
        U1[:, i] = w
        Q1[:, i], dq = round_to_grid(w, step[:, k], zero[:, k], offset[:, k], lo, hi)
        err = (w - dq) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:]   # a product, then a difference (no fused multiply-add)
        Err1[:, i] = err


def _native(x: torch.Tensor) -> bool:
    from ..kernels import native
    return native.serves(x)
