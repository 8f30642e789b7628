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

import torch

from ..config import GPTQ
from ..errors import LowbitError
from ..formats import QuantizedTensor, WeightFormat


class Hessian:
    """Running H = 2/n Σ xᵀx over the calibration inputs of one Linear."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if not torch.isfinite(x).all():
            raise LowbitError("calibration activations contain NaN or Inf")
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: WeightFormat, *, block_size: int = GPTQ.block_size,
                  damp: float = GPTQ.damp, act_order: bool = GPTQ.act_order,
                  weighted_grid: bool = GPTQ.weighted_grid) -> QuantizedTensor:
    """Quantize W ([N, K]) given the Hessian H ([K, K]) of its inputs into `spec` (any format with a fixed
    grid: IntSpec, GGUFSpec). weighted_grid: fit each group's grid weighting its columns by diag(H) (the
    formats' importance-weighted search); otherwise by the format's own unweighted rule."""
    return gptq_quantize_updated(W, H, spec, block_size=block_size, damp=damp, act_order=act_order,
                                 weighted_grid=weighted_grid)[0]


def gptq_quantize_updated(W: torch.Tensor, H: torch.Tensor, spec: WeightFormat, *, block_size: int = GPTQ.block_size,
                          damp: float = GPTQ.damp, act_order: bool = GPTQ.act_order,
                          weighted_grid: bool = GPTQ.weighted_grid) -> tuple[QuantizedTensor, torch.Tensor]:
    """gptq_quantize's result and the error-updated weights ([N, K] float32): each column as it was when it was
    rounded, so that the result is the grid's rounding of these (the start of learned rounding)."""
    N, K = W.shape
    W = W.detach().to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    spec.check_shape((N, K))
    g = spec.grid_width(K)
    G = K // g
    diag = torch.diag(H).float()

    def fit(cols: torch.Tensor, j: int):
        return spec.fit_grid(cols.float(), diag[j * g:(j + 1) * g] if weighted_grid else None)

    grids = [None] * G
    if act_order:  # static groups: parameters from the original weights, group-contiguous
        for j in range(G):
            grids[j] = fit(W[:, j * g:(j + 1) * g], j)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    invperm = torch.argsort(perm)

    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise LowbitError(f"Hessian not positive definite even with damping {damp}; raise --damp") from None

    Q = torch.zeros(N, K, dtype=torch.int32)
    U = torch.zeros(N, K, dtype=torch.float64)
    U = torch.zeros(N, K, dtype=torch.float32)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i].item()  # column index in the original order
            j = col // g
            if not act_order and col % g == 0:  # a new group: parameters from the error-updated weights
                grids[j] = fit(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g], j)
            w = W1[:, i]
            U[:, i1 + i] = w
            q, dq = grids[j].round(w, col % g)
            dq = dq.to(torch.float64)
            Q[:, i1 + i] = q
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return spec.from_grids(Q[:, invperm], grids), U[:, invperm].float()
