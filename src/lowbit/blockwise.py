"""Each quantization method run over one decoder block, driven by the architecture table.

A driver receives the block, the block's calibration inputs and its plan (Linear name inside the block ->
scheme); it returns a `Quantized` (weight, and for W8A8 schemes how activations are quantized) for each planned
Linear and leaves that Linear's weight set to the dequantized values, so that what runs next (other groups of
this block, and the next block's inputs, computed from these float weights for weight-only schemes) sees the
quantized weights; schemes that quantize activations are swapped to QuantLinear modules at once, so that the
next block's inputs carry their activation rounding (lowbit.quantize does the swapping). Methods that calibrate capture the inputs of each group of Linears through the group's `inspect`
module (see models.arch).

AWQ and SmoothQuant fold their per-channel scales into each group's producer where models.arch (or discovery)
names one; a group listed in `arch.fallbacks` (no exact fold exists) is scaled inside its Linears instead: the
weights multiplied by s, the inputs divided by s in the Linear itself (nn.qlinear.scale_inputs), and that scale
travels into the QuantLinear (`input_scale`).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from dataclasses import dataclass, field, replace

from .algorithms import (Hessian, apply_clip, factor_hessian, fake_quantize, gptq_quantize_updated, quantize_rtn,
                         search_alpha, search_clip, search_scale, smoothing_factors, top_fraction_dims)
from .algorithms.learned import check_learnable, learner_for, make_optimizer
from .config import W8_SPEC, config_for
from .formats import IntSpec, QuantizedTensor
from .formats.act import ActSpec, fake_quantize_act
from .heap import release_freed_memory
from .eval.system import bf16_matrix_unit, half_matrix_unit
from .models.arch import Arch
from .models.calibration import (BlockInputs, InputSummary, capture_calls, first_input, first_output, run_block,
                                 summarize_inputs)
from .models.calls import cast_floats
from .models.discovery import fold_scale
from .models.paused import OutOfOrder, PausedForwards
from .products import products, resolve_products
from .nn.qlinear import INPUT_SCALE, input_scale_of, scale_inputs

Plan = dict  # name inside the block -> its configuration (lowbit.config)
CLIP_TOKENS = 512   # tokens AWQ's clip search scores each candidate bound on (spread over the calibration set)


@dataclass
class Quantized:
    """qt: the packed weight; act / act_state: how activations are quantized (W8A8 schemes). source: the float
    weight the codes were rounded from (after any scaling folded into it; GPTQ: its error-updated weight),
    where quantization-aware training starts its trainable weights (lowbit.train)."""
    qt: QuantizedTensor
    act: ActSpec | None = None
    act_state: dict = field(default_factory=dict)
    source: torch.Tensor | None = None


def linear_groups(arch: Arch, plan: Plan):
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


def _set(block: nn.Module, name: str, qt: QuantizedTensor, act: ActSpec | None = None,
         act_state: dict | None = None, source: torch.Tensor | None = None) -> Quantized:
    """Write the dequantized weights into the block's Linear; the float weights they replace (or `source`)
    travel on in the Quantized."""
    lin = block.get_submodule(name)
    source = lin.weight.detach() if source is None else source
    lin.weight.data = qt.dequantize(lin.weight.dtype)
    s = input_scale_of(lin)   # a group scaled inside its Linears (see scale_group)
    return Quantized(qt, act, {**(act_state or {}), **({} if s is None else {INPUT_SCALE: s.clone()})}, source)


def _inputs(block: nn.Module, inspect: str, calls) -> list[torch.Tensor]:
    mod = block.get_submodule(inspect)
    return [first_input(mod, args, kw) for args, kw in calls]


def rtn_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch,
              importance: dict | None = None) -> dict[str, Quantized]:
    """importance: name -> input-channel importance for the Linears quantized with it (RTN(importance=True))."""
    imp = importance or {}
    return {n: _set(block, n, s.spec.quantize(block.get_submodule(n).weight.detach(), imp.get(n)))
            for n, s in plan.items()}


def group_products(block: nn.Module, plan: Plan, groups: list) -> list[str]:
    """Each group's calibration products (lowbit.products: "float32" or "bfloat16"), from the configuration of
    its first planned Linear and the device of the block's weights."""
    device = block.get_submodule(groups[0][2][0]).weight.device
    return [resolve_products(plan[names[0]].matmul, device) for _p, _l, names, _i in groups]


def gptq_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, Quantized]:
    """True-sequential by default: each group's Hessian comes from inputs produced by the groups of this
    block already quantized (attention projections before the MLP)."""
    return {n: q for n, (_u, q) in gptq_round(block, inputs, plan, arch).items()}


def gptq_round(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, tuple[torch.Tensor, Quantized]]:
    """gptq_block's work, also returning each Linear's error-updated weights (what GPTQ rounded to nearest)."""
    groups = list(linear_groups(arch, plan))
    sequential = all(s.true_sequential for s in plan.values())
    precision = group_products(block, plan, groups)   # each group's inputs (the forwards up to it) and Hessian
    with products(precision[0]):
        upfront = None if sequential else capture_calls(block, inputs, [g[3] for g in groups])
    with contextlib.ExitStack() as stack:
        # true-sequential: one forward per sample, paused before each group (models.paused); passes over the
        # block from its start (capture_calls) where the block does not call its groups in order
        paused = stack.enter_context(PausedForwards(block, inputs, [(g[3], g[2]) for g in groups])) if sequential else None
        out = _gptq_groups(block, inputs, plan, groups, paused, upfront, precision)
        if inputs.keep_outputs:   # the next block's inputs, in the precision of this block's last inputs
            with products(precision[-1]):
                if paused is not None and paused.turn == len(groups):
                    with contextlib.suppress(OutOfOrder):
                        inputs.outputs = paused.outputs()
                if inputs.outputs is None:
                    with torch.no_grad():
                        inputs.outputs = run_block(block, inputs).hidden
    return out


def _gptq_groups(block, inputs, plan, groups, paused, upfront, precision) -> dict[str, tuple[torch.Tensor, Quantized]]:
    out = {}
    for k, (_producer, _linears, names, inspect) in enumerate(groups):
        with products(precision[k]):
            calls = None
            if paused is not None and not paused.abort:
                with contextlib.suppress(OutOfOrder):
                    calls = paused.calls(k)
            if calls is None:
                calls = upfront[inspect] if upfront is not None else capture_calls(block, inputs, [inspect])[inspect]
            H = Hessian(block.get_submodule(names[0]).in_features)
            H.add_all(_inputs(block, inspect, calls))
        with products("float32", linears=False):   # GPTQ's own arithmetic
            out.update(_gptq_group(block, plan, names, H))
    return out


def _gptq_group(block, plan, names, H) -> dict[str, tuple[torch.Tensor, Quantized]]:
    """One group's Linears from its Hessian: each setting factored once, Linears stacked per setting."""
    out = {}
    factors = {}   # one factorization per setting serves every Linear reading this input
    stacks = {}    # Linears with the same setting and format run as one matrix (see below)
    for n in names:
        c = plan[n]
        key = (c.damp, c.act_order)
        if key not in factors:
            factors[key] = factor_hessian(H.H, c.damp, c.act_order)
        stacks.setdefault((key, c.spec, c.block_size, c.weighted_grid), []).append(n)
    for (key, spec, block_size, weighted_grid), members in stacks.items():
        # GPTQ treats the rows of W independently given H, so q/k/v (gate/up) stacked into one matrix give
        # each its own result, in one column loop instead of one per Linear (the loop is Python per column)
        W = torch.cat([block.get_submodule(n).weight.detach() for n in members])
        qt, u = gptq_quantize_updated(W, factors[key], spec, block_size=block_size, act_order=key[1],
                                      weighted_grid=weighted_grid)
        start = 0
        for n in members:
            rows = torch.arange(start, start + block.get_submodule(n).out_features)
            start += rows.numel()
            out[n] = (u[rows], _set(block, n, qt.rows(rows), source=u[rows]))
    return out


def _fold_into_producer(block: nn.Module, producer: str, s: torch.Tensor, arch: Arch) -> None:
    """Divide the producer's output channels by s: a norm's weight (as (1 + w) where the arch says so), or a
    Linear's output rows (and bias)."""
    fold_scale(block.get_submodule(producer), s, offset=producer in arch.fold_offset)


def _producer_width(block: nn.Module, producer: str | None) -> int | None:
    if producer is None:
        return None
    p = block.get_submodule(producer)
    return p.weight.shape[0]


def scalable(block: nn.Module, arch: Arch, producer: str | None, linears, names, K: int) -> bool:
    """Whether a calibrating method may scale this group: all its Linears planned, and either a producer of
    matching width to fold into or a fallback group (scaled inside its Linears)."""
    if list(names) != list(linears):
        return False
    return _producer_width(block, producer) == K or producer is None and tuple(linears) in arch.fallbacks


def scale_group(block: nn.Module, producer: str | None, lins: list[nn.Module], s: torch.Tensor, arch: Arch) -> None:
    """Multiply the group's weights by s per input channel and divide its input by s: in the producer where
    there is one, else inside each Linear. The block computes the same function."""
    for lin in lins:
        lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)
    if producer is None:
        for lin in lins:
            scale_inputs(lin, s)
    else:
        _fold_into_producer(block, producer, s, arch)


def search_dtype(name: str, weight: torch.Tensor, products: str = "float32") -> torch.dtype:
    """AWQ's scale-search precision: "auto" is the model's own where it is not float32, else float16 where a
    matrix unit multiplies it natively (CUDA, CPUs with AMX-FP16: there 1.4x faster overall than float32 with
    the same result on the default model, BENCHMARKS.md), else bfloat16 where the search's products (`products`,
    resolved) are bfloat16 on a CPU with AMX-BF16 (its Linears round their inputs to bfloat16 there already; the
    module in bfloat16 puts its attention on the matrix unit too: 13% faster AWQ, KLD within 1% over two
    calibration draws, BENCHMARKS.md), else float32 (where half-precision matmuls are emulated or would round
    what the float32 search does not)."""
    if name != "auto":
        return getattr(torch, name)
    if weight.dtype != torch.float32:
        return weight.dtype
    cpu = weight.device.type == "cpu"
    if weight.device.type == "cuda" or cpu and half_matrix_unit():
        return torch.float16
    return torch.bfloat16 if cpu and products == "bfloat16" and bf16_matrix_unit() else torch.float32


def search_module(mod: nn.Module, inspect: str, names: list[str], lins: list[nn.Module], calls: list,
                  dtype: torch.dtype):
    """What AWQ's scale search runs: the inspected module, the group's Linears in it and the sampled calls, in
    the search's precision. In the block's own dtype they are the block's own (the candidates are written into
    its Linears, and the caller restores them); otherwise a copy in dtype. llm-awq and AutoAWQ search in the
    model's half precision; on CPUs with half-precision matrix units that is several times faster than float32."""
    def inside(n):   # n's name inside the inspected module, None where it is not in it
        if not inspect or n == inspect:
            return n if not inspect else ""
        return n[len(inspect) + 1:] if n.startswith(inspect + ".") else None
    inner = [inside(n) for n in names]
    if dtype == lins[0].weight.dtype or None in inner:
        return mod, lins, calls
    half = copy.deepcopy(mod).to(dtype)
    return half, [half.get_submodule(n) for n in inner], cast_floats(calls, dtype)


def awq_scale_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> list[InputSummary]:
    """AWQ's first phase: search each group's channel scales and fold them in (the block's function is
    unchanged). A group is scaled when all its Linears are planned for AWQ and its producer's width matches.
    Returns each group's input summary (its statistics and token sample already divided by the scales) for the
    clip search. One pass over the calibration set keeps only what the searches read (summarize_inputs), not
    every group's inputs. Where the caller asks (inputs.keep_outputs), that pass runs to the block's end and its
    outputs, the unquantized block's, become the next block's inputs: llm-awq and AutoAWQ pass those on, and on
    the default model this is both better (KLD 0.199 against 0.211) and 22% faster than running the quantized
    block again (BENCHMARKS.md). The search's forwards run in the configuration's search_dtype (search_dtype:
    float16 where the CPU multiplies it natively, bfloat16 where its products are bfloat16 on AMX)."""
    groups = list(linear_groups(arch, plan))
    keep = max(plan[names[0]].search_samples for _p, _l, names, _i in groups)
    widths = {inspect: block.get_submodule(names[0]).in_features for _p, _l, names, inspect in groups}
    outputs = [] if inputs.keep_outputs else None
    precision = group_products(block, plan, groups)   # the capture pass and each group's search forwards
    with products(precision[0]):
        summaries = summarize_inputs(block, inputs, widths, keep, CLIP_TOKENS, outputs)
    if outputs is not None:
        inputs.outputs = outputs
    release_freed_memory(collect=False)   # the pass's last temporaries, before the searches allocate theirs
    out = []
    for k, (producer, linears, names, inspect) in enumerate(groups):
        cfg = plan[names[0]]
        mod = block.get_submodule(inspect)
        lins = [block.get_submodule(n) for n in names]
        S = summaries[inspect]
        if S.tokens and scalable(block, arch, producer, linears, names, lins[0].in_features):
            originals = [lin.weight.data.clone() for lin in lins]
            with products(precision[k]):
                s = _search_group_scale(mod, inspect, names, lins, S, cfg, originals, precision[k])
            for lin, w in zip(lins, originals):
                lin.weight.data = w
            scale_group(block, producer, lins, s, arch)
            S = replace(S, abs_mean=S.abs_mean / s, sq_mean=S.sq_mean / s.pow(2), sample=S.sample / s)
        out.append(replace(S, calls=[]))
        release_freed_memory(collect=False)
    return out


def _search_group_scale(mod, inspect, names, lins, S, cfg, originals, precision: str) -> torch.Tensor:
    """AWQ's scale search for one group: candidates scored by the inspected module's output error on the
    sampled calls, in the configuration's search_dtype. Leaves candidate weights in the Linears (the caller
    restores `originals`)."""
    calls = S.calls[: cfg.search_samples]
    dtype = search_dtype(cfg.search_dtype, lins[0].weight, precision)
    smod, slins, sample = search_module(mod, inspect, names, lins, calls, dtype)
    with torch.no_grad():
        ref = [first_output(smod(*a, **kw)).float() for a, kw in sample]
        if smod is not mod and not all(r.isfinite().all() for r in ref):   # beyond float16's range
            smod, slins, sample = mod, lins, calls
            ref = [first_output(smod(*a, **kw)).float() for a, kw in sample]

    def output_error(candidates):
        for lin, c in zip(slins, candidates):
            lin.weight.data = c.to(lin.weight.dtype)
        with torch.no_grad():
            err = sum((first_output(smod(*a, **kw)).float() - r).pow(2).sum().item()
                      for (a, kw), r in zip(sample, ref))
        return err / sum(r.numel() for r in ref)

    _alpha, s, _errors = search_scale(S.abs_mean, originals, cfg.spec, output_error, cfg.n_grid)
    return s


def awq_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, Quantized]:
    """Scales for every group first (while every weight is still float), then clip search and
    round-to-nearest Linear by Linear, as the reference does. Inputs are captured once, before any change."""
    return {n: _set(block, n, qt) for n, (_w, qt) in awq_round(block, inputs, plan, arch).items()}


def awq_round(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, tuple[torch.Tensor, QuantizedTensor]]:
    """AWQ's two phases without writing the result back: per Linear, its scaled float weight and its
    clipped round-to-nearest quantization (the scales are folded into the producers)."""
    summaries = awq_scale_block(block, inputs, plan, arch)
    with products("float32", linears=False):   # the clip search and the rounding: AWQ's own arithmetic
        return _awq_clip_and_round(block, plan, arch, summaries)


def _awq_clip_and_round(block, plan, arch, summaries) -> dict[str, tuple[torch.Tensor, QuantizedTensor]]:
    out = {}
    for (_p, _l, names, _i), S in zip(linear_groups(arch, plan), summaries):
        for n in names:
            W = block.get_submodule(n).weight.detach().float()
            cfg = plan[n]
            clip = cfg.clip and n not in arch.no_clip and S.tokens > 0
            if not isinstance(cfg.spec, IntSpec):   # GGUF types: their own search, weighted by mean x²
                out[n] = (W, cfg.spec.quantize(W, S.sq_mean if clip else None))
                continue
            bounds = search_clip(W, S.sample, cfg.spec, cfg.n_grid, n_tokens=CLIP_TOKENS) if clip else None
            clipped = W if bounds is None else apply_clip(W, bounds, cfg.spec)
            out[n] = (W, quantize_rtn(clipped, cfg.spec))
    return out


def _group_inputs(block, calls, inspect, K) -> torch.Tensor:
    return torch.cat([x.reshape(-1, K) for x in _inputs(block, inspect, calls[inspect])]).float()


def smooth_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> list[tuple[list, torch.Tensor, ActSpec]]:
    """SmoothQuant's first phase for "w8a8-smooth" groups: factors per group (α searched on the group's output
    error under W8A8 rounding unless given), folded into the producer and the weights — the block's function
    is unchanged. Returns, per group, its planned names, its inputs ([tokens, K], divided by the factors
    where smoothed) and its activation spec."""
    groups = list(linear_groups(arch, plan))
    calls = capture_calls(block, inputs, [g[3] for g in groups])
    result = []
    for producer, linears, names, inspect in groups:
        sch = plan[names[0]]
        lins = [block.get_submodule(n) for n in names]
        K = lins[0].in_features
        X = _group_inputs(block, calls, inspect, K)
        act = ActSpec("int8", sch.act_granularity)
        smooth = all(plan[n].method == "w8a8-smooth" for n in names)
        if smooth and scalable(block, arch, producer, linears, names, K):
            x_absmax = X.abs().amax(dim=0)
            w_absmax = torch.stack([lin.weight.detach().float().abs().amax(dim=0) for lin in lins]).amax(dim=0)
            if sch.alpha is None:
                s = _search_smoothing(block, lins, calls[inspect], inspect, X, x_absmax, w_absmax, act,
                                      sch.search_samples)
            else:
                s = smoothing_factors(x_absmax, w_absmax, sch.alpha)
            scale_group(block, producer, lins, s, arch)
            X = X / s
        result.append((names, X, act))
    return result


def w8a8_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, Quantized]:
    """W8A8 with int8 activations. "w8a8-naive": a static per-tensor activation scale from calibration, no
    smoothing. "w8a8-smooth": SmoothQuant (see smooth_block), then per-token dynamic (default) or per-tensor
    static activation scales, the static scale from the smoothed calibration inputs."""
    out = {}
    for names, X, act in smooth_block(block, inputs, plan, arch):
        state = {"act_scale": (X.abs().max() / 127.0).reshape(1).float()} if act.static else {}
        for n in names:
            out[n] = _set(block, n, quantize_rtn(block.get_submodule(n).weight.detach(), W8_SPEC), act,
                          {k: v.clone() for k, v in state.items()})
    return out


def _search_smoothing(block, lins, calls, inspect, X, x_absmax, w_absmax, act, n_samples) -> torch.Tensor:
    """SmoothQuant's α on the grid, by the inspected module's output error with W8A8 rounding emulated."""
    mod = block.get_submodule(inspect)
    sample = calls[:n_samples]
    with torch.no_grad():
        ref = [first_output(mod(*a, **kw)).float() for a, kw in sample]
    originals = [lin.weight.data.clone() for lin in lins]

    def output_error(s: torch.Tensor) -> float:
        static = (X / s).abs().max().reshape(1) / 127.0 if act.static else None
        hook = lambda m, args: (fake_quantize_act(args[0] / s, act, static).to(args[0].dtype),) + tuple(args[1:])
        handles = [lin.register_forward_pre_hook(hook) for lin in lins]
        for lin, w in zip(lins, originals):
            lin.weight.data = fake_quantize(w.float() * s, W8_SPEC).to(w.dtype)
        try:
            with torch.no_grad():
                err = sum((first_output(mod(*a, **kw)).float() - r).pow(2).sum().item()
                          for (a, kw), r in zip(sample, ref))
        finally:
            for h in handles:
                h.remove()
            for lin, w in zip(lins, originals):
                lin.weight.data = w
        return err / sum(r.numel() for r in ref)

    _alpha, s, _errors = search_alpha(x_absmax, w_absmax, output_error)
    return s


def llm_int8_block(block: nn.Module, inputs: BlockInputs | None, plan: Plan, arch: Arch) -> dict[str, Quantized]:
    """int8 weights per channel; outlier dimensions decided at run time by the threshold, or fixed from
    calibration as the top `outlier_fraction` of input dimensions by max |x|."""
    out = {}
    fractions = {n: s.outlier_fraction for n, s in plan.items()}
    calls = None
    if any(f is not None for f in fractions.values()):
        calls = capture_calls(block, inputs, [g[3] for g in linear_groups(arch, plan)])
    for _producer, _linears, names, inspect in linear_groups(arch, plan):
        K = block.get_submodule(names[0]).in_features
        x_absmax = _group_inputs(block, calls, inspect, K).abs().amax(dim=0) if calls is not None else None
        for n in names:
            act = ActSpec("int8-mixed", "token", plan[n].threshold)
            state = {}
            if fractions[n] is not None:
                state["outlier_idx"] = top_fraction_dims(x_absmax, float(fractions[n]))
            out[n] = _set(block, n, quantize_rtn(block.get_submodule(n).weight.detach(), W8_SPEC), act, state)
    return out


def fp8_block(block: nn.Module, inputs: BlockInputs | None, plan: Plan, arch: Arch) -> dict[str, Quantized]:
    """FP8 weights per channel; with option act = "fp8", FP8 activations with per-token dynamic scales."""
    out = {}
    for n, s in plan.items():
        act = ActSpec(f"fp8-{s.fmt}", "token") if s.act == "fp8" else None
        out[n] = _set(block, n, s.spec.quantize(block.get_submodule(n).weight.detach()), act)
    return out


LEARNED_CHECK_WINDOWS = 8   # calibration windows on which the trained result must beat its start, or is dropped


def learned_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, Quantized]:
    """Learned rounding (lowbit.algorithms.learned) for all planned Linears of the block at once: start from
    the `init` method's result, then train rounding offsets and range factors to minimise the block's output
    error against the float block on the calibration inputs. The result is dropped for the start if it is no
    better on LEARNED_CHECK_WINDOWS windows. Linears with different settings train in turn."""
    out = {}
    by_settings: dict[tuple, Plan] = {}
    for n, c in plan.items():
        check_learnable(c.spec)
        by_settings.setdefault(tuple(sorted(c.options().items())), {})[n] = c
    for sub in by_settings.values():
        out.update(_learn(block, inputs, sub, arch))
    return out


def _learn(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch) -> dict[str, Quantized]:
    cfg = next(iter(plan.values()))
    windows = list(zip(inputs.hidden, inputs.kwargs))
    with torch.no_grad():
        targets = [first_output(block(h, **kw)).float() for h, kw in windows]
    init_plan = {n: config_for(cfg.init, c.spec) for n, c in plan.items()}
    if cfg.init == "awq":
        start = awq_round(block, inputs, init_plan, arch)
    elif cfg.init == "gptq":
        start = {n: (u, q.qt) for n, (u, q) in gptq_round(block, inputs, init_plan, arch).items()}
    else:
        start = {n: (block.get_submodule(n).weight.detach().float(), c.spec.quantize(block.get_submodule(n).weight.detach()))
                 for n, c in plan.items()}
    return {n: _set(block, n, qt, source=start[n][0])
            for n, qt in train_rounding(block, windows, targets, start, cfg).items()}


def train_rounding(block: nn.Module, windows: list[tuple], targets: list[torch.Tensor],
                   start: dict[str, tuple[torch.Tensor, QuantizedTensor]], cfg) -> dict[str, QuantizedTensor]:
    """Learned rounding of the Linears in `start` (name -> (start weights, start quantization)) so that the
    block's outputs on `windows` ((hidden, kwargs) pairs) approach `targets`; settings from `cfg` (Learned)."""
    learners = {n: learner_for(w, qt, cfg.learn_range) for n, (w, qt) in start.items()}
    lr = cfg.lr or 1.0 / cfg.iters
    opt, sched = make_optimizer(list(learners.values()), cfg.optimizer, lr, lr * cfg.range_lr_factor, cfg.iters)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))

    def weights():
        return {f"{n}.weight": m.weight().to(block.get_submodule(n).weight.dtype) for n, m in learners.items()}

    def start_weights():
        return {f"{n}.weight": qt.dequantize(torch.float32).to(block.get_submodule(n).weight.dtype)
                for n, (_, qt) in start.items()}

    def loss_of(k: int, w: dict) -> torch.Tensor:
        h, kw = windows[k]
        return (first_output(torch.func.functional_call(block, w, (h,), kw)).float() - targets[k]).pow(2).mean()

    check = order[: LEARNED_CHECK_WINDOWS].tolist()
    with torch.no_grad():
        start_error = sum(loss_of(k, start_weights()).item() for k in check)
    try:
        with torch.enable_grad():
            for step in range(cfg.iters):
                opt.zero_grad()
                w = weights()
                for j in range(cfg.batch):
                    loss = loss_of(order[(step * cfg.batch + j) % len(windows)].item(), w) / cfg.batch
                    loss.backward(retain_graph=j + 1 < cfg.batch)
                opt.step()
                sched.step()
                for m in learners.values():
                    m.project()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        if check and sum(loss_of(k, weights()).item() for k in check) >= start_error:   # training made it worse: keep the start
            return {n: qt for n, (_, qt) in start.items()}
    return {n: m.quantized() for n, m in learners.items()}


# run in this order inside a block: methods that fold scales into producers come first
DRIVERS = {"awq": awq_block, "learned": learned_block, "w8a8-smooth": w8a8_block, "w8a8-naive": w8a8_block, "gptq": gptq_block,
           "llm-int8": llm_int8_block, "fp8": fp8_block, "fp8-e5m2": fp8_block, "rtn": rtn_block}


def quantize_block(block: nn.Module, inputs: BlockInputs, plan: Plan, arch: Arch,
                   importance: dict | None = None) -> dict[str, Quantized]:
    """All planned Linears of one block, method by method in DRIVERS order. importance: name inside the
    block -> input-channel importance, for the RTN schemes that use it."""
    out = {}
    for method, driver in DRIVERS.items():
        sub = {n: s for n, s in plan.items() if s.method == method}
        if sub:
            extra = {"importance": importance} if driver is rtn_block and importance else {}
            out.update(driver(block, inputs, sub, arch, **extra))
    return out
