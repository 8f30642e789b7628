"""Each quantization method run over one decoder block, driven by the architecture table.

A driver receives the block, the block's calibration inputs and its plan (Linear name inside the block ->
scheme); it returns the QuantizedTensor of each planned Linear and leaves that Linear's weight set to the
dequantized values, so that what runs next (other groups of this block, the next block) sees the quantized
function. Methods that calibrate capture the inputs of each group of Linears through the group's `inspect`
module (see models.arch).
"""

from __future__ import annotations

import torch
from torch import nn

from .algorithms import Hessian, apply_clip, gptq_quantize, quantize_rtn, search_clip, search_scale
from .formats import QuantizedTensor
from .models.arch import Arch
from .models.calibration import BlockInputs, capture_calls, first_input, first_output

Plan = dict  # name inside the block -> Scheme


def _groups(arch: Arch, plan: Plan):
    """(producer, all linears of the group, the planned ones, inspect module) in forward order; planned
    Linears the table does not list form groups of their own."""
    listed = set()
    for producer, linears, inspect in arch.feeds:
        listed.update(linears)
        names = [n for n in linears if n in plan]
        if names:
            yield producer, linears, names, inspect
    for n in plan:
        if n not in listed:
            yield None, (n,), [n], n


def _set(block: nn.Module, name: str, qt: QuantizedTensor) -> QuantizedTensor:
    lin = block.get_submodule(name)
    lin.weight.data = qt.dequantize(lin.weight.dtype)
    return qt


def _inputs(block: nn.Module, inspect: str, calls) -> list[torch.Tensor]:
    mod = block.get_submodule(inspect)
    return [first_input(mod, args, kw) for args, kw in calls]


def rtn_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, QuantizedTensor]:
    return {n: _set(block, n, quantize_rtn(block.get_submodule(n).weight.detach(), s.spec)) for n, s in plan.items()}


def gptq_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, QuantizedTensor]:
    """True-sequential by default: each group's Hessian comes from inputs produced by the groups of this
    block already quantized (attention projections before the MLP)."""
    groups = list(_groups(arch, plan))
    sequential = all(s.options.get("true_sequential", True) for s in plan.values())
    upfront = None if sequential else capture_calls(block, inputs, [g[3] for g in groups])
    out = {}
    for _producer, _linears, names, inspect in groups:
        calls = capture_calls(block, inputs, [inspect])[inspect] if sequential else upfront[inspect]
        H = Hessian(block.get_submodule(names[0]).in_features)
        for x in _inputs(block, inspect, calls):
            H.add(x)
        for n in names:
            o = plan[n].options
            qt = gptq_quantize(block.get_submodule(n).weight.detach(), H.H, plan[n].spec,
                               block_size=int(o.get("block_size", 128)), damp=float(o.get("damp", 0.01)),
                               act_order=bool(o.get("act_order", False)))
            out[n] = _set(block, n, qt)
    return out


def _fold_into_producer(block: nn.Module, producer: str, s: torch.Tensor) -> None:
    """Divide the producer's output channels by s: a norm's weight, or a Linear's output rows (and bias)."""
    p = block.get_submodule(producer)
    if p.weight.dim() == 1:
        p.weight.data = (p.weight.data.float() / s).to(p.weight.dtype)
    else:
        p.weight.data = (p.weight.data.float() / s.unsqueeze(1)).to(p.weight.dtype)
        if getattr(p, "bias", None) is not None:
            p.bias.data = (p.bias.data.float() / s).to(p.bias.dtype)


def _producer_width(block: nn.Module, producer: str | None) -> int | None:
    if producer is None:
        return None
    p = block.get_submodule(producer)
    return p.weight.shape[0]


def awq_scale_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> list[torch.Tensor]:
    """AWQ's first phase: search each group's channel scales and fold them in (the block's function is
    unchanged). A group is scaled when all its Linears are planned for AWQ and its producer's width matches.
    Returns each group's inputs ([tokens, K], already divided by the scales) for the clip search."""
    groups = list(_groups(arch, plan))
    calls = capture_calls(block, inputs, [g[3] for g in groups])
    group_inputs = []
    for producer, linears, names, inspect in groups:
        opts, spec = plan[names[0]].options, plan[names[0]].spec
        mod = block.get_submodule(inspect)
        lins = [block.get_submodule(n) for n in names]
        K = lins[0].in_features
        X = torch.cat([x.reshape(-1, K) for x in _inputs(block, inspect, calls[inspect])]).float()
        if list(names) == list(linears) and _producer_width(block, producer) == K:
            sample = calls[inspect][: int(opts.get("search_samples", 4))]
            with torch.no_grad():
                ref = [first_output(mod(*a, **kw)).float() for a, kw in sample]
            originals = [lin.weight.data.clone() for lin in lins]

            def output_error(candidates):
                for lin, c in zip(lins, candidates):
                    lin.weight.data = c.to(lin.weight.dtype)
                with torch.no_grad():
                    err = sum((first_output(mod(*a, **kw)).float() - r).pow(2).sum().item()
                              for (a, kw), r in zip(sample, ref))
                return err / sum(r.numel() for r in ref)

            _alpha, s, _errors = search_scale(X.abs().mean(0), originals, spec, output_error,
                                              int(opts.get("n_grid", 20)))
            for lin, w in zip(lins, originals):
                lin.weight.data = (w.float() * s).to(w.dtype)
            _fold_into_producer(block, producer, s)
            X = X / s
        group_inputs.append(X)
    return group_inputs


def awq_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, QuantizedTensor]:
    """Scales for every group first (while every weight is still float), then clip search and
    round-to-nearest Linear by Linear, as the reference does. Inputs are captured once, before any change."""
    group_inputs = awq_scale_block(block, inputs, plan, arch)
    out = {}
    for (_p, _l, names, _i), X in zip(_groups(arch, plan), group_inputs):
        for n in names:
            W = block.get_submodule(n).weight.detach().float()
            spec, opts = plan[n].spec, plan[n].options
            if opts.get("clip", True) and n not in arch.no_clip:
                W = apply_clip(W, search_clip(W, X, spec, int(opts.get("n_grid", 20))), spec)
            out[n] = _set(block, n, quantize_rtn(W, spec))
    return out


DRIVERS = {"awq": awq_block, "gptq": gptq_block, "rtn": rtn_block}


def quantize_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, QuantizedTensor]:
    """All planned Linears of one block; AWQ first (it rescales weights before anything is quantized)."""
    out = {}
    for method, driver in DRIVERS.items():
        sub = {n: s for n, s in plan.items() if s.method == method}
        if sub:
            out.update(driver(block, inputs, sub, arch))
    return out
