"""Running a model block by block on calibration samples.

The inputs of the first decoder block (hidden states and the keyword arguments the model passes to every
block: position embeddings, masks) are captured once by stopping the forward pass at that block. After that
each block runs on its own: calibrate it, quantize it, run it (now quantized) to make the next block's
inputs. Only one block's weights are needed at a time, and each block sees the inputs produced by the
already-quantized blocks before it, as GPTQ's sequential procedure prescribes.

Models whose layers differ in what the model passes them (`config.layer_types`: Gemma 3's sliding-window
layers get a banded mask and local rotary tables, its global layers a causal mask and global ones) have the
keyword arguments captured once per layer type, at the first block of each type, and each block runs with its
own type's. The blocks before that are skipped during the capture (their output is not needed).
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..heap import release_freed_memory
from ..kernels import native
from ..products import state as products_state
from .arch import arch_for
from .calls import first_input, first_output  # noqa: F401  (re-exported: drivers import them from here)


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]     # one [1, T, H] tensor per calibration sample
    kwargs: list[dict]             # the keyword arguments the model gave the block for that sample
    by_type: dict[str, list[dict]] | None = None   # the same per layer type, where the model has several
    # set by the caller when the driver may decide the next block's inputs: it then puts them in `outputs` and
    # iterate_blocks takes them instead of running the block again. GPTQ's paused forwards compute the
    # quantized block's outputs on the way; AWQ's capture pass the unquantized block's, which is what AWQ
    # passes on (as llm-awq and AutoAWQ do)
    keep_outputs: bool = False
    outputs: list[torch.Tensor] | None = None


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, samples: torch.Tensor) -> BlockInputs:
    """Inputs of the first decoder block for each sample (LongTensor [n, T])."""
    blocks = model.get_submodule(arch_for(model).blocks)
    types = layer_types(model)
    firsts = {0: None} if types is None else {types.index(t): t for t in dict.fromkeys(types)}
    last = max(firsts)
    caught = BlockInputs([], [], None if types is None else {t: [] for t in firsts.values()})

    def hook(i, args, kwargs):
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if i == 0:
            hidden = args[0] if args else kwargs["hidden_states"]
            caught.hidden.append(hidden.detach())
            caught.kwargs.append(kw)
        if types is not None:
            caught.by_type[firsts[i]].append(kw)
        if i == last:
            raise _Stop

    handles = [blocks[i].register_forward_pre_hook(lambda m, a, k, i=i: hook(i, a, k), with_kwargs=True)
               for i in firsts]
    skipped = list(blocks)[:last]
    for b in skipped:   # only their kwargs are wanted: pass the hidden states through unchanged
        b.forward = _passthrough
    try:
        for ids in samples:
            try:
                model(ids.unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for b in skipped:
            del b.forward
    return caught


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


def layer_types(model: nn.Module) -> list[str] | None:
    """config.layer_types where the model's layers are of more than one type, else None."""
    types = getattr(model.config, "layer_types", None)
    return list(types) if types and len(set(types)) > 1 else None


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs for every sample: the next block's inputs."""
    out = []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        y = block(h, **kw)
        out.append(first_output(y))
    return BlockInputs(out, inputs.kwargs)


class ReuseFinishedParts:
    """While one block runs pass after pass over the same calibration samples (GPTQ captures each group's inputs
    after the groups before it are quantized, then the block's outputs become the next block's inputs), a part
    of the block (a direct child holding Linears, e.g. the attention) whose weights and inputs are the same as
    in an earlier pass that ran it to the end gives back that pass's output instead of running again.

    Exact by construction: "the same" is checked, not assumed. The inputs are compared value by value
    (tensors with torch.equal, other arguments with ==, objects by identity), so is the float32 matmul precision
    in force (lowbit.products), and each parameter must still be the same storage, unmodified, or a new one
    equal in value (weights are rewritten as new tensors after quantizing). Outputs are stored once, detached,
    and handed out as clones.
    On GPTQ's default passes this runs the attention of a llama block twice instead of four times.

    Use as a context manager around everything done with the block; entries are keyed by the sample (the block's
    first argument, the same tensor object in every pass). What is kept (a copy of each part's inputs and
    output per sample: 150 MB for the default model at 64 x 512 tokens, about 1 GB per block for a 7B model)
    stops growing at max_bytes; samples beyond it are simply recomputed.
    """

    def __init__(self, block: nn.Module, max_bytes: int = 512 << 20):
        self.block = block
        # the sample being run, per call stack: models.paused runs the samples' forwards interleaved, each in
        # a greenlet of its own (a context variable is per greenlet and per thread)
        self.sample = contextvars.ContextVar("sample", default=None)
        self.entries: dict = {}
        self.max_bytes, self.bytes = max_bytes, 0
        self.parts = [(n, m) for n, m in block.named_children() if any(isinstance(x, nn.Linear) for x in m.modules())]
        self.handle = None

    def __enter__(self):
        self.handle = self.block.register_forward_pre_hook(self._enter_block, with_kwargs=True)
        for name, part in self.parts:
            part.forward = self._reusing(name, part, part.forward)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        for _name, part in self.parts:
            del part.forward    # back to the class's forward
        self.entries.clear()
        self.bytes = 0
        return False

    def _enter_block(self, module, args, kwargs):
        self.sample.set(id(args[0]) if args else None)

    def _reusing(self, name: str, part: nn.Module, forward):
        @functools.wraps(forward)    # its signature stays readable (first_input looks up the first argument)
        def run(*args, **kwargs):
            sample = self.sample.get()
            key = (name, sample)
            entry = self.entries.get(key)
            # the same inputs, weights and float32 product precision (lowbit.products)
            state = (args, kwargs, products_state())
            if entry is not None and _same(entry[0], state) and _same_params(entry[1], part):
                return _clone(entry[2])
            out = forward(*args, **kwargs)   # a part stopped midway (capture_calls) raises and records nothing
            size = _nbytes((args, kwargs, out))
            if sample is not None and (entry is not None or self.bytes + size <= self.max_bytes):
                params = [(p, p.detach(), p._version) for p in part.parameters()]
                self.bytes += 0 if entry is not None else size
                self.entries[key] = (_clone(state), params, _clone(out))
            return out
        return run


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    return a is b


def _same_params(recorded, part: nn.Module) -> bool:
    current = list(part.parameters())
    if len(current) != len(recorded):
        return False
    for p, (was, alias, version) in zip(current, recorded):
        if p is not was:
            return False
        if p.data_ptr() == alias.data_ptr():
            if p._version != version:     # modified in place (the alias shares the change)
                return False
        elif not (p.shape == alias.shape and p.dtype == alias.dtype and torch.equal(p, alias)):
            return False                  # rewritten with other values
    return True


def iterate_blocks(model: nn.Module, samples: torch.Tensor) -> Iterator[tuple[int, nn.Module, BlockInputs]]:
    """Yield (index, block, its inputs); whatever the caller does to the block before asking for the next
    one (quantizing it) is reflected in the inputs of the next."""
    blocks = model.get_submodule(arch_for(model).blocks)
    inputs = capture_block_inputs(model, samples)
    types, by_type = layer_types(model), inputs.by_type
    for i, block in enumerate(blocks):
        if by_type is not None:
            inputs = BlockInputs(inputs.hidden, by_type[types[i]], by_type)
        yield i, block, inputs
        inputs = BlockInputs(inputs.outputs, inputs.kwargs) if inputs.outputs is not None else run_block(block, inputs)


@torch.no_grad()
def capture_calls(block: nn.Module, inputs: BlockInputs, names: list[str]) -> dict[str, list[tuple[tuple, dict]]]:
    """Run the block on every sample and record, for each named submodule, the (args, kwargs) it was called
    with. Once every named module has been reached, the rest of the block is skipped."""
    calls: dict[str, list] = {n: [] for n in names}
    _run_with_hooks(block, inputs, names, lambda name, module, args, kwargs: calls[name].append((args, dict(kwargs))))
    return calls


TRIM_EVERY = 16   # samples between heap trims in a pass that keeps outputs (see _run_with_hooks)


def _run_with_hooks(block: nn.Module, inputs: BlockInputs, names: list[str], on_call,
                    outputs: list | None = None) -> None:
    """Run the block on every sample with on_call(name, module, args, kwargs) before each named submodule runs;
    once every named module has been reached, the rest of the block is skipped, unless `outputs` is given: then
    the block runs to its end and each sample's output is appended to it, and every TRIM_EVERY samples the
    heap's freed pages go back to the OS: the kept outputs land between the samples' freed temporaries, and
    glibc would keep those pages (AWQ's peak on the default model: 0.43-0.51 GiB without these trims, the
    driver's others in place; 0.37-0.43 with them)."""
    seen: set[str] = set()
    handles = []

    def make_hook(name):
        def hook(module, args, kwargs):
            on_call(name, module, args, kwargs)
            seen.add(name)
            if len(seen) == len(names) and outputs is None:
                raise _Stop
        return hook

    for n in names:
        handles.append(block.get_submodule(n).register_forward_pre_hook(make_hook(n), with_kwargs=True))
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            seen.clear()
            try:
                y = block(h, **kw)
            except _Stop:
                continue
            if outputs is not None:
                outputs.append(first_output(y))
                if len(outputs) % TRIM_EVERY == 0:
                    release_freed_memory(collect=False)
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class InputSummary:
    """What a scale search needs of one module's inputs over the whole calibration set, without keeping them
    all (they are most of AWQ's memory: every group's inputs for every window).

    calls     the first `keep` calls' (args, kwargs): candidates are scored by running the module on these
    abs_mean  [K] float32: mean |x| per input channel over every token
    sq_mean   [K] float32: mean x² per input channel over every token
    sample    [≤ 2·n_tokens, K] float32: every 2^k-th token over all calls in order, with the smallest k that
              leaves at most 2·n_tokens of them (for a token count of n_tokens times a power of two this is a
              superset of every (count // n_tokens)-th token, which the clip search picks)
    tokens    how many tokens were seen
    """

    calls: list
    abs_mean: torch.Tensor
    sq_mean: torch.Tensor
    sample: torch.Tensor
    tokens: int


def column_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ|x| and Σx² over the rows of x [N, K], float64 [K] each (x² rounded to float32 first, as x.pow(2)).
    lowbit's native op where it serves (kernels/csrc/column_moments.cpp: one read of x, 13x the tensor code on
    a 512 x 1536 window; |x| sums bit-identical, x² sums to the last float64 bit), else this tensor code."""
    if native.serves(x):
        return torch.ops.lowbit.column_moments(x)
    return x.abs().sum(0, dtype=torch.float64), x.pow(2).sum(0, dtype=torch.float64)


class _Summarizer:
    def __init__(self, keep: int, n_tokens: int):
        self.keep, self.cap = keep, 2 * n_tokens
        self.calls, self.parts, self.kept = [], [], 0
        self.stride, self.tokens = 1, 0
        self.abs_sum = self.sq_sum = None

    def add(self, args: tuple, kwargs: dict, x: torch.Tensor) -> None:
        if len(self.calls) < self.keep:
            self.calls.append((args, dict(kwargs)))
        x = x.reshape(-1, x.shape[-1]).float()
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.sq_sum = torch.zeros(x.shape[1], dtype=torch.float64)
        abs_sum, sq_sum = column_moments(x)
        self.abs_sum += abs_sum
        self.sq_sum += sq_sum
        first = (-self.tokens) % self.stride            # the first row of x at a global multiple of the stride
        part = x[first::self.stride].clone()
        self.tokens += x.shape[0]
        self.parts.append(part)
        self.kept += part.shape[0]
        while self.kept > self.cap:                     # halve: keep global multiples of twice the stride
            parts, offset = [], 0
            for p in self.parts:
                parts.append(p[offset % 2::2])
                offset += p.shape[0]
            self.parts, self.stride = parts, self.stride * 2
            self.kept = sum(p.shape[0] for p in parts)

    def summary(self, width: int) -> InputSummary:
        n = max(self.tokens, 1)
        zero = torch.zeros(width)
        return InputSummary(self.calls, zero if self.abs_sum is None else (self.abs_sum / n).float(),
                            zero if self.sq_sum is None else (self.sq_sum / n).float(),
                            torch.cat(self.parts) if self.parts else torch.zeros(0, width), self.tokens)


@torch.no_grad()
def summarize_inputs(block: nn.Module, inputs: BlockInputs, widths: dict[str, int], keep: int,
                     n_tokens: int, outputs: list | None = None) -> dict[str, InputSummary]:
    """capture_calls' pass over the calibration set, keeping for each named module (name -> its input width)
    only an InputSummary; with `outputs`, the block runs to its end and its outputs are appended there."""
    acc = {n: _Summarizer(keep, n_tokens) for n in widths}
    _run_with_hooks(block, inputs, list(widths),
                    lambda name, module, args, kwargs: acc[name].add(args, kwargs, first_input(module, args, kwargs)),
                    outputs)
    return {n: a.summary(widths[n]) for n, a in acc.items()}
