"""Fusing Linears that read the same input (q/k/v, gate/up) into one matmul, for fewer kernel calls per token."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantizedTensor
from .qlinear import INPUT_SCALE, QuantLinear, input_scale_of


def _bias_cat(mods: list[nn.Module]) -> torch.Tensor | None:
    biases = [m.bias for m in mods]
    some = next((b for b in biases if b is not None), None)
    if some is None:
        return None
    return torch.cat([b.detach() if b is not None else some.new_zeros(m.out_features) for b, m in zip(biases, mods)])


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module whose output is torch.cat([m(x) for m in mods], -1), computed as a single matmul, or None
    when the modules cannot share one (different formats, kernels, per-layer activation state, or input
    scales that differ).

    Every output column is still the dot product of x with the same row of the same stored weight, so the
    result equals the separate calls as long as the kernel treats output columns independently; tests check
    this for every kernel the engine uses.
    """
    if all(type(m) is nn.Linear for m in mods):
        if len({(m.in_features, m.weight.dtype, m.weight.device) for m in mods}) != 1:
            return None
        out = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=False,
                        device=mods[0].weight.device, dtype=mods[0].weight.dtype)
        out.weight = nn.Parameter(torch.cat([m.weight.detach() for m in mods]), requires_grad=False)
        b = _bias_cat(mods)
        if b is not None:
            out.bias = nn.Parameter(b, requires_grad=False)
        return out
    if all(isinstance(m, QuantLinear) for m in mods):
        first = mods[0]
        s = input_scale_of(first)
        if any(m.spec != first.spec or m.kernel.name != first.kernel.name or m.act is not None
               or set(m.act_state()) - {INPUT_SCALE} or m.in_features != first.in_features
               or (input_scale_of(m) is None) != (s is None) or s is not None and not torch.equal(input_scale_of(m), s)
               for m in mods):
            return None
        qt = QuantizedTensor.concat_rows([m.quantized_tensor() for m in mods])
        return QuantLinear(qt, _bias_cat(mods), kernel=first.kernel.name,
                           act_state=None if s is None else {INPUT_SCALE: s})
    return None
