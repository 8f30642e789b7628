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
from ..formats import QuantizedTensor, WeightFormat


class Hessian:
    """Running H = 2/n Σ xᵀx over the calibration inputs of one Linear.

    Each sample's xᵀx is a float32 product (a float64 one costs 2-4x as much on CPUs and moves H by ~1e-7
    relative: tests/test_gptq.py measures it), summed into a float64 Σ xᵀx so that many samples lose nothing;
    H is Σ scaled once, when asked for."""

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        xtx = x.T @ x
        # NaN or Inf anywhere in x (or a square overflowing float32) shows on the diagonal, Σ x_k², which is
        # all that needs checking: K values instead of K²
        if not torch.isfinite(xtx.diagonal()).all():
            raise LowbitError("calibration activations contain NaN or Inf (or overflow float32)")
        self.sum.add_(xtx)   # promoted to float64 as it is added
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.n, 1))


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
        for j in range(G):
            grids[j] = fit(W[:, j * g:(j + 1) * g], j)
    W = W[:, perm]
    invperm = torch.argsort(perm)
    cols = perm.tolist()   # column index in the original order, for each position

    Q = torch.zeros(N, K, dtype=torch.int32)
    U = torch.zeros(N, K, dtype=torch.float32)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            j = col // g
            if not act_order and col % g == 0:  # a new group: parameters from the error-updated weights
                here = W1[:, i:i + g]
                grids[j] = fit(here if here.shape[1] == g else torch.cat([here, W[:, i2:i2 + g - here.shape[1]]], 1), j)
            w = W1[:, i]
            U[:, i1 + i] = w
            q, dq = grids[j].round(w, col % g)
            Q[:, i1 + i] = q
            err = (w - dq.float()) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    return spec.from_grids(Q[:, invperm], grids), U[:, invperm]
