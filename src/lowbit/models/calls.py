"""A module call's first input and first output, however transformers passes and returns them."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def first_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The module's first forward argument, however it was passed (positionally or by name)."""
    if args:
        return args[0]
    first = next(iter(inspect.signature(module.forward).parameters))
    return kwargs[first]


def first_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
