"""SmoothQuant (Xiao et al., 2023): move the difficulty of quantizing activations into the weights.

Per input channel j of a group of Linears: s_j = max|X_j|^α / max|W_j|^(1−α), with max|W_j| taken over every
Linear of the group. Dividing the producer's output (the preceding norm or Linear) by s and multiplying the
weights' columns by s leaves the function unchanged and flattens the activation outliers. α is searched on a
grid against the error of the group's output under W8A8 rounding (`output_error(s)`), not fixed.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import LowbitError

ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    if not 0 <= alpha <= 1:
        raise LowbitError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.float().clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def search_alpha(x_absmax: torch.Tensor, w_absmax: torch.Tensor, output_error: Callable[[torch.Tensor], float],
                 grid: tuple[float, ...] = ALPHA_GRID) -> tuple[float, torch.Tensor, list[float]]:
    errors = [output_error(smoothing_factors(x_absmax, w_absmax, a)) for a in grid]
    best = min(range(len(grid)), key=errors.__getitem__)
    return grid[best], smoothing_factors(x_absmax, w_absmax, grid[best]), errors
