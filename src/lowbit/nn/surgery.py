"""Module surgery: reading and replacing a model's tensors and submodules by qualified name.

Everything in lowbit that reaches into `_parameters` / `_buffers` or swaps a submodule goes through here:
quantized Linears replacing float ones, streamed blocks whose tensors come and go around each call, models
built on the meta device and filled afterwards. A tensor's name is its `state_dict(keep_vars=True)` name
relative to the module given ("mlp.down_proj.weight"), non-persistent buffers included. Which slot a tensor
goes into follows what the module already has there: a parameter stays a parameter (frozen: these models
are for inference), anything else is a buffer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(mod_name) if mod_name else module), leaf


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at `name` ("model.layers.3.mlp.up_proj") by `module`."""
    parent, child = _owner(model, name)
    setattr(parent, child, module)


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` and its submodules, persistent or not, by qualified name (a
    tensor held in two places is listed under both names)."""
    out = {}
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out[prefix + name] = p
        for name, b in mod._buffers.items():
            if b is not None:
                out[prefix + name] = b
    return out


def set_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Install each tensor under its name: as a new frozen Parameter where the module has a parameter, else
    as a buffer."""
    for name, t in tensors.items():
        mod, leaf = _owner(module, name)
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t


def placeholder_like(t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """An empty tensor of t's dtype (on t's device, or `device`): what a tensor that is not resident holds."""
    return torch.empty(0, dtype=t.dtype, device=t.device if device is None else device)


def placeholders(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: placeholder_like(v) for k, v in tensors.items()}


def tie_tensor(model: nn.Module, alias: str, target: str) -> None:
    """Make the tensor slot `alias` hold the very tensor at `target` (tied weights)."""
    parent, leaf = _owner(model, alias)
    tparent, tleaf = _owner(model, target)
    setattr(parent, leaf, getattr(tparent, tleaf))


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Parameters and (registered) buffers still on the meta device, i.e. never given values."""
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]


def rebuild_meta_buffers(model: nn.Module, config) -> None:
    """Modules whose buffers are computed at construction, not stored (rotary tables), rebuilt on the CPU: a
    model built on the meta device has them on meta, and no checkpoint holds them."""
    for name, mod in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in mod._buffers.values()) and not any(
                p is not None for p in mod._parameters.values()):
            try:
                fresh = type(mod)(config=config)
            except TypeError:
                continue
            set_submodule(model, name, fresh)
        elif any(b is not None and b.is_meta for b in mod._buffers.values()) and hasattr(model, "_init_weights"):
            _init_buffers(model, mod)


def _init_buffers(model: nn.Module, mod: nn.Module) -> None:
    """Computed buffers of a module that also has parameters (Gemma's embedding scale): transformers' own
    initialization run on a copy whose parameters stay on meta, so that only the buffers get values."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in mod.parameters(recurse=False)}
    tmp = copy.deepcopy(mod, memo)
    for k, b in tmp._buffers.items():
        if b is not None and b.is_meta:
            tmp._buffers[k] = torch.empty_like(b, device="cpu")
    model._init_weights(tmp)
    for k, b in mod._buffers.items():
        if b is not None and b.is_meta:
            mod._buffers[k] = tmp._buffers[k]


class TensorSlots:
    """Where each of a module's tensors is held (its Parameter object, or its module's buffer dict), looked up
    once: a streamed block's tensors are swapped in and out twice per block per token, and resolving names
    and wrapping new Parameters each time cost more than a small block's compute. Parameters keep their
    identity; only their `.data` changes. `empty` holds a placeholder for every tensor (see `fill`)."""

    def __init__(self, module: nn.Module):
        self.params, self.buffers = {}, {}
        tensors = module_tensors(module)
        for name in tensors:
            mod, leaf = _owner(module, name)
            if leaf in mod._parameters:
                self.params[name] = mod._parameters[leaf]
            else:
                self.buffers[name] = (mod._buffers, leaf)
        self.empty = placeholders(tensors)

    def fill(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install the given tensors (`self.empty` releases them all)."""
        for name, t in tensors.items():
            p = self.params.get(name)
            if p is not None:
                p.data = t
            else:
                holder, leaf = self.buffers[name]
                holder[leaf] = t
