"""Running a model block by block on calibration samples.

The inputs of the first decoder block (hidden states and the keyword arguments the model passes to every
block: position embeddings, masks) are captured once by stopping the forward pass at that block. After that
each block runs on its own: calibrate it, quantize it, run it (now quantized) to make the next block's
inputs. Only one block's weights are needed at a time, and each block sees the inputs produced by the
already-quantized blocks before it, as GPTQ's sequential procedure prescribes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .arch import arch_for
from .calls import first_input, first_output  # noqa: F401  (re-exported: drivers import them from here)


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]     # one [1, T, H] tensor per calibration sample
    kwargs: list[dict]             # the keyword arguments the model gave the block for that sample


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, samples: torch.Tensor) -> BlockInputs:
    """Inputs of the first decoder block for each sample (LongTensor [n, T])."""
    block0 = model.get_submodule(arch_for(model).blocks)[0]
    caught = BlockInputs([], [])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.hidden.append(hidden.detach())
        caught.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(ids.unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return caught


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs for every sample: the next block's inputs."""
    out = []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        y = block(h, **kw)
        out.append(y[0] if isinstance(y, tuple) else y)
    return BlockInputs(out, inputs.kwargs)


def iterate_blocks(model: nn.Module, samples: torch.Tensor) -> Iterator[tuple[int, nn.Module, BlockInputs]]:
    """Yield (index, block, its inputs); whatever the caller does to the block before asking for the next
    one (quantizing it) is reflected in the inputs of the next."""
    blocks = model.get_submodule(arch_for(model).blocks)
    inputs = capture_block_inputs(model, samples)
    for i, block in enumerate(blocks):
        yield i, block, inputs
        inputs = run_block(block, inputs)


@torch.no_grad()
def capture_calls(block: nn.Module, inputs: BlockInputs, names: list[str]) -> dict[str, list[tuple[tuple, dict]]]:
    """Run the block on every sample and record, for each named submodule, the (args, kwargs) it was called
    with. Once every named module has been reached, the rest of the block is skipped."""
    calls: dict[str, list] = {n: [] for n in names}
    seen: set[str] = set()
    handles = []

    def make_hook(name):
        def hook(module, args, kwargs):
            calls[name].append((args, dict(kwargs)))
            seen.add(name)
            if len(seen) == len(names):
                raise _Stop
        return hook

    for n in names:
        handles.append(block.get_submodule(n).register_forward_pre_hook(make_hook(n), with_kwargs=True))
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            seen.clear()
            try:
                block(h, **kw)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return calls
