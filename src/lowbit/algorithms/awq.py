"""AWQ (Lin et al., MLSys 2024): protect the weights that meet large activations by scaling input channels
before quantization, then clip each group's range.

Scale search: for a group of Linears sharing an input X, s = mean|X|^α per input channel (normalised so that
max(s)·min(s) = 1); the candidate weights are Q(W·diag(s))·diag(s)⁻¹, and α is chosen on a grid of `n_grid`
points in [0, 1) to minimise the squared error of the output of a module that contains the group. The chosen
1/s is then folded into whatever produced X, so the unquantized model computes the same function.

Clip search: per output row and group, the largest |w| allowed is shrunk by factors 1 − i/n_grid
(i < max_shrink·n_grid), keeping the factor that minimises the Linear's output error on sampled tokens.

Any registered format can be the grid of the scale search (it only quantizes and dequantizes). The clip search
is for integer groups; for GGUF block types the driver uses the format's own importance-weighted search
instead (weights: mean x² of the scaled inputs), which searches scales and mins per sub-block.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import AWQ
from ..formats import IntSpec, WeightFormat
from .rtn import fake_quantize


def channel_scales(x_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_absmean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(x_absmean: torch.Tensor, weights: list[torch.Tensor], spec: WeightFormat,
                 output_error: Callable[[list[torch.Tensor]], float], n_grid: int = AWQ.n_grid) -> tuple[float, torch.Tensor, list[float]]:
    """Best α, its scales s ([K]) and the error of every α tried. `output_error` gets the candidate
    (fake-quantized, unscaled) weights and returns the inspected module's output error."""
    errors = []
    best = (float("inf"), 0.0, torch.ones_like(x_absmean))
    # formats of per-row groups quantize each row on its own, so the group's weights go through as one matrix
    rows = [w.shape[0] for w in weights] if spec.integer_groups(x_absmean.numel()) is not None else None
    stacked = torch.cat([w.float() for w in weights]) if rows else None
    for i in range(n_grid):
        alpha = i / n_grid
        s = channel_scales(x_absmean, alpha)
        if rows:
            candidates = list((fake_quantize(stacked * s, spec) / s).split(rows))
        else:
            candidates = [fake_quantize(w.float() * s, spec) / s for w in weights]
        err = output_error(candidates)
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2], errors


@torch.no_grad()
def search_clip(W: torch.Tensor, X: torch.Tensor, spec: IntSpec, n_grid: int = AWQ.n_grid, max_shrink: float = 0.5,
                n_tokens: int = 512, rows_per_batch: int = 256) -> torch.Tensor:
    """Per (row, group) clipping bound, float32 [N, G], for W ([N, K]) given inputs X ([tokens, K]).

    A candidate's error is the mean over tokens of (x_g · (q_g − w_g))² per row and group g, as the reference
    computes it from the outputs; here as Δ C_g Δᵀ with C_g = the group's mean xᵀx ([g, g], once), which is the
    same sum in another order and reads g numbers per weight instead of one per token (8x fewer at 512 tokens
    and groups of 64)."""
    N, K = W.shape
    g = spec.group_size_for(K)
    G = K // g
    X = X.reshape(-1, K).float()
    X = X[:: max(1, X.shape[0] // n_tokens)][:n_tokens].reshape(-1, G, g)  # [T, G, g]
    C = torch.einsum("tgk,tgl->gkl", X, X) / max(X.shape[0], 1)           # [G, g, g]
    bounds = []
    for r0 in range(0, N, rows_per_batch):
        w = W[r0: r0 + rows_per_batch].float().reshape(-1, G, g)          # [n, G, g]
        org_max = w.abs().amax(dim=-1)                                     # [n, G]
        best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(w, max_val.unsqueeze(-1)), -max_val.unsqueeze(-1))
            d = fake_quantize(clipped.reshape(-1, K), spec).reshape(-1, G, g) - w
            err = (torch.einsum("ngk,gkl->ngl", d, C) * d).sum(dim=-1)  # [n, G]
            better = err < best_err
            best_err[better], best_max[better] = err[better], max_val[better]
        bounds.append(best_max)
    return torch.cat(bounds)


def apply_clip(W: torch.Tensor, bounds: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    N, K = W.shape
    g = spec.group_size_for(K)
    b = bounds.repeat_interleave(g, dim=1).to(W.dtype)
    return torch.maximum(torch.minimum(W, b), -b)
