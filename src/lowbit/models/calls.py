"""A module call's first input and first output, however transformers passes and returns them, and its
arguments cast to another precision."""

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


def cast_floats(obj, dtype: torch.dtype):
    """obj with every floating-point tensor in it (through tuples, lists and dicts) cast to dtype."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj
