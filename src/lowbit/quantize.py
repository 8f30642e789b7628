"""The quantization flow: plan from a recipe, then quantize block by block and swap in QuantLinear modules.

Methods that need calibration data get it through `models.calibration.iterate_blocks`, so each block is
calibrated on the outputs of the already-quantized blocks before it; AWQ alone in a block passes on that block's
unquantized outputs instead, as the reference implementations do (blockwise.awq_scale_block).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .blockwise import Quantized, quantize_block
from .config import RTN, QuantConfig
from .data import CALIB_SAMPLES, CALIB_SEQLEN, calibration_ids
from .errors import LowbitError
from .finite import all_finite
from .heap import release_freed_memory
from .models import Loaded, load_model
from .models.arch import arch_for
from .models.calibration import ReuseFinishedParts, iterate_blocks
from .models.discovery import discover_feeds
from .models.importance import collect_importance, load_importance
from .models.paused import available as paused_available
from .models.moe import (expert_lists, reset_counts, route_all_experts, routed_counts, router_names,
                         unstack_experts)
from .nn import QuantEmbedding, QuantLinear, set_submodule
from .recipes import Recipe


def quantize(model, config: QuantConfig | Recipe | None = None, *, calibration=None, tokenizer=None,
             calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN, seed: int = 0,
             dtype: torch.dtype = torch.bfloat16, progress: bool = True,
             materialize: Callable[[int, nn.Module], None] | None = None,
             release: Callable[[int, nn.Module], None] | None = None, all_experts: bool = False,
             imatrix=None, float_weights: dict | None = None):
    """Quantize a model: `lowbit.quantize(model, lowbit.GPTQ(bits=4, group_size=64), tokenizer=tok)`.

    model: a torch model (quantized in place and returned), or a source — "default", a Hugging Face
    directory, a GGUF file — or a `Loaded` (then the `Loaded` is returned, its tokenizer used).
    config: one configuration for every Linear of the decoder blocks (lowbit.config; default RTN INT4 g64
    symmetric), or a Recipe (per-module rules).
    calibration: only read when a planned method calibrates. Token ids (LongTensor [n, T]), a text source
    (None = the default text's calibration half, a file, "hf:..."), a list of strings or a dataset; text is cut
    into `calib_samples` windows of `calib_seqlen` tokens chosen with `seed` (see lowbit.data.calibration_ids).
    dtype: the 16-bit dtype for what stays unquantized (embedding, norms, kept Linears) and for activations.
    materialize / release: called with (index, block) before a block is quantized and once nothing needs it
    any more (after it produced the next block's calibration inputs); used to quantize models whose blocks
    live on disk (lowbit.offload.quantize_streamed).
    all_experts: mixture-of-experts models: calibrate every expert on every calibration token (the layer's
    output still follows the router); tokens routed to each expert are recorded either way.
    imatrix: input-channel importance for schemes that use it (RTN(importance=True)): an imatrix file
    (lowbit.models.importance) or an `Importance`; None: measured on the calibration text with the float model.
    A GGUF type that does not fit a Linear's rows is replaced by llama.cpp's fallback type; the replacements
    are recorded in `model.lowbit["gguf_fallbacks"]`.
    float_weights: a dict to fill with name -> the float32 weight each quantized Linear of the blocks was rounded
    from (after scales folded into it; GPTQ: its error-updated weight): where lowbit.train starts training.
    Records what was done in `model.lowbit` (saved with the checkpoint).
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if isinstance(model, Loaded):
        quantize(model.model, config, calibration=calibration, tokenizer=tokenizer or model.tokenizer,
                 calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, dtype=dtype, progress=progress,
                 materialize=materialize, release=release, all_experts=all_experts, imatrix=imatrix,
                 float_weights=float_weights)
        return model
    if not isinstance(model, nn.Module):
        raise LowbitError(f"quantize takes a torch model, a Loaded or a model source, got {type(model).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LowbitError(f"dtype must be a torch floating-point dtype, got {dtype!r}")
    arch = arch_for(model)
    if materialize is None:   # streamed blocks are read in the layout their files have (offload.lazy)
        unstack_experts(model)
    unstacked = list(expert_lists(model))
    recipe = recipe_for(config, arch.blocks)
    fallbacks: dict = {}
    plan = recipe.plan(model, fallbacks)
    for name in (f"{arch.blocks}.{rel}" for rel in router_names(model, arch.blocks)):
        if name in plan and next(r for r in recipe.rules if r.matches(name)).pattern == f"{arch.blocks}.*":
            del plan[name]       # routers stay in high precision unless a rule of the user's names them
    for name in plan:
        _check_finite(model, name)
    if any(s.needs_calibration for s in plan.values()):
        calibration = calibration_ids(calibration, tokenizer, calib_samples, calib_seqlen, seed)
    else:
        calibration = None
    importance = None
    # each planned module -> the Linear whose inputs weight it (an embedding's rows: the tied lm_head's)
    wanted = {n: arch.lm_head if n == arch.embed else n for n, s in plan.items() if s.options().get("importance")}
    if wanted:
        if isinstance(imatrix, (str, os.PathLike)):
            imatrix = load_importance(imatrix)
        if imatrix is None:
            if materialize is not None:
                raise LowbitError("importance needs an imatrix file when blocks stream from disk")
            imatrix = collect_importance(model, calibration, sorted(set(wanted.values())))
        importance = {n: imatrix.get(src) for n, src in wanted.items()}
        missing = [n for n, v in importance.items() if v is None]
        if missing:
            raise LowbitError(f"the imatrix has no importance for {missing[0]} ({len(missing)} Linears missing)")

    start = time.perf_counter()
    _untie_if_split(model, arch, plan)
    blocks = model.get_submodule(arch.blocks)
    bar = tqdm(total=len(blocks), desc="quantize", unit="block", disable=not progress)
    if calibration is None or not any(s.needs_block_inputs for s in plan.values()):
        # round-to-nearest (importance included) reads no block inputs: the blocks need no calibration pass
        steps = ((i, block, None) for i, block in enumerate(blocks))
    else:
        steps = iterate_blocks(model, calibration)
    done, feeds, pending, planned = None, {}, [], set()
    reset_counts(model)
    with contextlib.ExitStack() as reuse:
        for i, block, inputs in steps:  # the previous block's outputs, this block's inputs, are computed by now
            reuse.close()          # the previous block is done with (its outputs are computed)
            _swap_all(model, pending)
            pending = []
            if done is not None and release is not None:
                release(*done)
            prefix = f"{arch.blocks}.{i}."
            block_plan = {n[len(prefix):]: s for n, s in plan.items() if n.startswith(prefix)}
            if materialize is not None:
                materialize(i, block)
                for rel in block_plan:
                    _check_finite(model, prefix + rel)
            planned.update(block_plan)
            block_arch = arch
            if arch.discovered and inputs is not None and block_plan:   # same Linears, same groups: discovered once
                sig = tuple(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
                if sig not in feeds:
                    f, offsets, unfolded = discover_feeds(block, inputs.hidden[0], inputs.kwargs[0])
                    feeds[sig] = replace(arch, feeds=f, fold_offset=offsets, fallbacks=unfolded)
                block_arch = feeds[sig]
            if inputs is not None:
                # GPTQ alone in a dense block leaves it as its paused forwards (models.paused) end: their outputs
                # are the next block's inputs; AWQ alone passes on the unquantized block's outputs, from its
                # capture pass (a router's counts come from a separate pass)
                methods = {c.method for c in block_plan.values()}
                inputs.keep_outputs = not expert_lists(block) and methods in ({"gptq"}, {"awq"})
            if (inputs is not None and any(getattr(c, "true_sequential", False) for c in block_plan.values())
                    and not (inputs.keep_outputs and paused_available())):
                reuse.enter_context(ReuseFinishedParts(block))   # passes over this block repeat its parts
            with route_all_experts(model, all_experts):
                block_imp = None if importance is None else {
                    n[len(prefix):]: v for n, v in importance.items() if n.startswith(prefix)}
                for rel, q in quantize_block(block, inputs, block_plan, block_arch, block_imp).items():
                    if float_weights is not None and q.source is not None:
                        float_weights[prefix + rel] = q.source.detach().float().clone()
                    if inputs is not None and q.act is None and inputs.outputs is None:
                        # weight-only: the next block's inputs come from this block's dequantized weights in
                        # float32 (exactly the quantized model; the packed CPU kernels would round the activations
                        # to bfloat16 and are 2x slower than a dense matmul on 512-token windows), then it is swapped.
                        # Where the method has computed them already (AWQ, paused GPTQ), it is swapped at once.
                        block.get_submodule(rel).weight.data = q.qt.dequantize(block.get_submodule(rel).weight.dtype)
                        pending.append((prefix + rel, q, block_plan[rel].kernel))
                    else:   # activation quantization must shape the next block's inputs, or they are known
                        _swap(model, prefix + rel, q, block_plan[rel].kernel)
            reset_counts(block)    # what is counted next is the block's one pass over the calibration set
            release_freed_memory(collect=False)   # the block's temporaries, before the next block's pass
            done = (i, block)
            bar.update()
    _swap_all(model, pending)
    if done is not None and release is not None:
        release(*done)
    bar.close()
    outside = {n: s for n, s in plan.items() if not n.startswith(arch.blocks + ".")}
    shared = model.get_submodule(arch.lm_head).weight is model.get_submodule(arch.embed).weight
    for name in sorted(outside, key=lambda n: n != arch.embed):   # the embedding first: a tied head reuses it
        # e.g. the lm_head or the embedding: round-to-nearest, no calibrating driver reaches them
        scheme = outside[name]
        if name == arch.lm_head and shared and isinstance(model.get_submodule(arch.embed), QuantEmbedding):
            qt = model.get_submodule(arch.embed).quantized_tensor()   # still tied: one tensor, same format
        else:
            imp = None if importance is None else importance.get(name)
            qt = scheme.spec.quantize(model.get_submodule(name).weight.detach(), imp)
        if name == arch.embed:
            embed = model.get_submodule(name)
            set_submodule(model, name, QuantEmbedding(qt, embed.padding_idx, embed.weight.dtype))
        else:
            _swap(model, name, Quantized(qt), scheme.kernel)

    cast_unquantized(model, dtype)
    model.lowbit = {
        "lowbit_version": __version__,
        "dtype": str(dtype).removeprefix("torch."),
        "modules": {name: scheme.to_dict() for name, scheme in plan.items()},
        "recipe": recipe.to_list(),
        "quantize_seconds": round(time.perf_counter() - start, 3),
        "calibration_samples": None if calibration is None else list(calibration.shape),
    }
    if unstacked:
        model.lowbit["unstacked_experts"] = unstacked
        if calibration is not None:
            model.lowbit["expert_tokens"] = {"routed": routed_counts(model), "all_experts": all_experts}
    if feeds:   # groups of planned Linears with no exact fold: AWQ / SmoothQuant scale them inside the Linears
        model.lowbit["fold_fallbacks"] = sorted(list(g) for g in {g for a in feeds.values() for g in a.fallbacks
                                                                  if planned.intersection(g)})
    if fallbacks:
        model.lowbit["gguf_fallbacks"] = fallbacks
    return model


def recipe_for(config: QuantConfig | Recipe | None, blocks: str = "model.layers") -> Recipe:
    """A Recipe as given, or the default recipe (every Linear of the blocks) for one configuration."""
    if isinstance(config, Recipe):
        return config
    if config is not None and not isinstance(config, QuantConfig):
        raise LowbitError("config must be a quantization configuration (e.g. lowbit.GPTQ(bits=4)) or a Recipe, "
                          f"got {type(config).__name__}")
    return Recipe.default(config or RTN(), blocks)


def _check_finite(model: nn.Module, name: str) -> None:
    w = model.get_submodule(name).weight
    if not w.is_meta and not all_finite(w.detach()):   # blocks still on disk are checked when read
        raise LowbitError(f"weight {name}.weight contains NaN or Inf")


def cast_unquantized(module: nn.Module, dtype: torch.dtype) -> None:
    """Parameters outside QuantLinear modules to `dtype` (float buffers such as rotary frequencies stay)."""
    for mod in module.modules():
        if isinstance(mod, QuantLinear) and getattr(mod, "bias", None) is not None:
            mod.bias.data = mod.bias.data.to(dtype)    # the bias is added to activations of that dtype (Qwen2's q/k/v)
        if isinstance(mod, QuantEmbedding):   # its packed table stays; lookups return `dtype`
            mod.dtype = dtype
        if not isinstance(mod, QuantLinear):
            for p in mod.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)


def _swap_all(model: nn.Module, pending: list) -> None:
    for name, q, kernel in pending:
        _swap(model, name, q, kernel)


def _swap(model: nn.Module, name: str, q: Quantized, kernel: str) -> None:
    linear = model.get_submodule(name)
    set_submodule(model, name, QuantLinear(q.qt, linear.bias, kernel=kernel, act=q.act, act_state=q.act_state))


def _untie_if_split(model: nn.Module, arch, plan: dict) -> None:
    """A tied lm_head and embedding stay tied only if both stay float or both get the same weight format (then
    one quantized tensor serves both); otherwise the head gets its own copy of the weight."""
    head, embed = model.get_submodule(arch.lm_head), model.get_submodule(arch.embed)
    h, e = plan.get(arch.lm_head), plan.get(arch.embed)
    same = h is None and e is None or h is not None and e is not None and h.spec == e.spec
    if head.weight is embed.weight and not same:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
