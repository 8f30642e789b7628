"""LLM.int8() (Dettmers et al., 2022): which input dimensions are outliers.

At run time the kernel marks a dimension as an outlier when any |x| in it exceeds a threshold (6.0 in the
paper). As an alternative for models whose activations never reach the threshold, a fixed set can be chosen
from calibration: the given fraction of dimensions with the largest max |x|.
"""

from __future__ import annotations

import math

import torch

from ..errors import LowbitError


def top_fraction_dims(x_absmax: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (int64, sorted) of the ceil(fraction · K) dimensions with the largest max |x|."""
    if not 0 < fraction < 1:
        raise LowbitError(f"outlier fraction must be in (0, 1), got {fraction}")
    k = max(1, math.ceil(fraction * x_absmax.numel()))
    return torch.sort(torch.topk(x_absmax.float(), k).indices).values
