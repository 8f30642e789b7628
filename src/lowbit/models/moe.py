"""Mixture-of-experts layers as lowbit quantizes them: one nn.Linear per expert projection.

transformers stores the experts of most MoE families (Qwen2/3-MoE, Mixtral, OLMoE, PhiMoE, ...) as two stacked
parameters of one module: `gate_up_proj` [E, 2·I, H] (gate rows first, then up rows) and `down_proj` [E, H, I],
called as down(act(gate(x)) * up(x)) on the tokens routed to each expert, the result weighted by the router.
`unstack_experts` replaces such a module by `ExpertList`, a ModuleList of `ExpertMLP` (gate_proj, up_proj,
down_proj Linears of the same weights) with the same call signature and function, so that every expert's
Linears are named (`mlp.experts.3.down_proj`), planned by recipes (`*.experts.*`), calibrated with their own
Hessians and saved like any other Linear. The router is not touched: it stays in high precision.

Experts that calibration text rarely reaches can be calibrated on every token (`route_all_experts`): each
expert then runs on all tokens, and the layer's output still uses only the routed ones, so the next block's
inputs are unchanged. `ExpertList.routed` counts the tokens the router sent to each expert.

`ExpertList.dense` is the same layer with static shapes, for a compiled decode step (lowbit.engine): every
expert runs on every token and is weighted by a dense [tokens, experts] matrix of routing weights, zero where
not routed; for one token it is bit-equal to the routed loop.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return lin


class ExpertList(nn.ModuleList):
    """Drop-in for a stacked experts module: forward(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.route_all = False
        self.routed = torch.zeros(len(experts), dtype=torch.long)   # tokens sent to each expert, since reset

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            tok, pos = torch.where(top_k_index == e)        # [N, k] -> (token, slot) pairs routed to e
            self.routed[e] += tok.numel()
            if self.route_all:
                y = expert(hidden)[tok]                     # every token calibrates e; only routed ones count
            elif tok.numel():
                y = expert(hidden[tok])
            else:
                continue
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def dense(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """forward's result with no data-dependent shape: each expert's output times its routing weight (zero
        where not routed), added in expert order. For one token this is bit-equal to forward: the routed experts
        are added in the same order, and adding an exact zero changes nothing. It costs every expert's matmuls
        instead of the top k: the price of a decode step compiled into one graph (measured in BENCHMARKS.md)."""
        weights = torch.zeros(hidden.shape[0], len(self), dtype=top_k_weights.dtype, device=hidden.device)
        weights = weights.scatter(1, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            out = out + (expert(hidden) * weights[:, e, None]).to(out.dtype)
        return out


def _stacked(module: nn.Module) -> bool:
    """transformers' stacked layout: exactly gate_up_proj [E, 2I, H] and down_proj [E, H, I], and act_fn."""
    params = dict(module.named_parameters(recurse=False))
    if (set(params) != {"gate_up_proj", "down_proj"} or not hasattr(module, "act_fn")
            or any(c is not module.act_fn for c in module.children())):
        return False
    gu, d = params["gate_up_proj"], params["down_proj"]
    return (gu.dim() == 3 and d.dim() == 3 and gu.shape[0] == d.shape[0] and gu.shape[1] == 2 * d.shape[2]
            and gu.shape[2] == d.shape[1])


def unstack_experts(model: nn.Module) -> list[str]:
    """Replace every stacked experts module by an ExpertList, in place; returns their names. Idempotent."""
    names = [n for n, m in model.named_modules() if _stacked(m)]
    for name in names:
        old = model.get_submodule(name)
        inter = old.down_proj.shape[2]
        experts = [ExpertMLP(old.gate_up_proj[e, :inter], old.gate_up_proj[e, inter:], old.down_proj[e], old.act_fn)
                   for e in range(old.gate_up_proj.shape[0])]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ExpertList(experts))
    return names


# How checkpoints on disk name one expert's Linears, where transformers stacks them in memory: per expert
# "experts.E.gate_proj/up_proj/down_proj" (Qwen-MoE, ExpertMLP's own names) or "experts.E.w1/w3/w2" (Mixtral).
_FILE_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PER_EXPERT = re.compile(r"(.*\.experts\.\d+\.)(\w+)(\.weight)$")


def per_expert_name(name: str) -> str | None:
    """A tensor name that stores one expert's Linear, as ExpertList names it; None for any other tensor."""
    m = _PER_EXPERT.match(name)
    if m is None or m.group(2) not in {*_FILE_NAMES, *_FILE_NAMES.values()}:
        return None
    return m.group(1) + _FILE_NAMES.get(m.group(2), m.group(2)) + m.group(3)


def router_names(model: nn.Module, blocks: str) -> list[str]:
    """Linears of the blocks that weigh experts: one output per expert (the router) or a single output (a
    shared expert's gate). They stay in high precision unless a recipe rule names them."""
    cfg = model.config
    n_experts = {getattr(cfg, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")} - {None}
    if not n_experts:
        return []
    return [n for n, m in model.get_submodule(blocks).named_modules()
            if isinstance(m, nn.Linear) and (m.out_features in n_experts or m.out_features == 1)]


def expert_lists(model: nn.Module) -> dict[str, ExpertList]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertList)}


@contextlib.contextmanager
def route_all_experts(model: nn.Module, enabled: bool = True):
    """While inside, every expert of every ExpertList runs on all tokens (outputs unchanged)."""
    lists = expert_lists(model).values() if enabled else []
    for m in lists:
        m.route_all = True
    try:
        yield
    finally:
        for m in lists:
            m.route_all = False


def reset_counts(model: nn.Module) -> None:
    for m in expert_lists(model).values():
        m.routed.zero_()


def routed_counts(model: nn.Module) -> dict[str, list[int]]:
    return {n: m.routed.tolist() for n, m in expert_lists(model).items()}
