"""Architecture discovery: where a transformers decoder-only causal LM keeps its parts, and which Linears share
an input, found from the model itself rather than from a table of families.

`discover_arch(model)` finds the decoder blocks (the ModuleList of identical modules holding most parameters),
the token embedding and lm_head (`get_input_embeddings` / `get_output_embeddings`), the final norm and the
rotary embedding (norm- and rotary-like children of the blocks' parent). `check_config(config)` refuses, with
one line saying what was looked for, what lowbit cannot quantize: remote code, encoder-decoder models, models
transformers has no causal-LM class for, and models whose blocks hold no Linear.

`discover_feeds(block, hidden, kwargs)` runs one block on a real input with hooks on every submodule and groups
the Linears called with the very same input tensor. For each group it looks for the producer of that tensor (the
module whose output it is, else a Linear of the same parent module run earlier whose output width matches) and keeps it only where
folding a per-channel scale into it is exact: checked numerically, by folding random scales into a float32
copy of the block and comparing the block's outputs. A norm's weight is tried as a plain multiplier (w / s)
and as Gemma's (1 + w) ((1 + w) / s - 1); a Linear producer has its output rows divided. Groups without an
exact fold (none tried was exact, or no module made the input: a residual stream, a post-norm's output, a
split group) keep producer None and are listed in `fallbacks`: calibration methods scale them inside the
quantized Linears instead (x / s before the matmul, nn.qlinear.scale_inputs).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..errors import LowbitError
from .calls import cast_floats, first_input, first_output

# query/key projections: AWQ does not clip them (their errors are amplified by the softmax)
_QK = re.compile(r"(^|\.)(q_proj|k_proj|qkv_proj|query|key|query_key_value|wqkv|Wqkv|c_attn)$")
FOLD_TOLERANCE = 1e-4      # max |Δ output| / max |output| of a float32 block for a fold to count as exact


def _model_type(config) -> str | None:
    return getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)


def _unsupported(model_type, why: str) -> LowbitError:
    return LowbitError(f"unsupported architecture '{model_type}': {why}")


def check_config(config) -> None:
    """Refuse configs lowbit cannot quantize (see module docstring); the config is a dict or a transformers config."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    mt = _model_type(config)
    if mt not in CONFIG_MAPPING:
        extra = " (it needs remote code, which lowbit never runs)" if get("auto_map") else ""
        raise _unsupported(mt, f"transformers has no model type of that name{extra}")
    encoder_decoder = get("is_encoder_decoder")
    if encoder_decoder is None:     # not written in config.json: the family's default says
        encoder_decoder = getattr(CONFIG_MAPPING[mt](), "is_encoder_decoder", False)
    if encoder_decoder:
        raise _unsupported(mt, "an encoder-decoder model; lowbit looks for a decoder-only causal LM")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise _unsupported(mt, "transformers has no causal-LM class for it (vision-only, encoder or other "
                               "non-generative model); lowbit looks for a decoder-only causal LM")


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def find_blocks(model: nn.Module) -> str | None:
    """The ModuleList of same-class modules with the most parameters (outermost on a tie)."""
    best, best_n = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            n = _params(m)
            if n > best_n:
                best, best_n = name, n
    return best


def discover_arch(model: nn.Module) -> dict:
    """The fields of the Arch of any transformers decoder-only causal LM (feeds left empty: see discover_feeds)."""
    mt = _model_type(model.config)
    blocks = find_blocks(model)
    if blocks is None:
        raise _unsupported(mt, "no decoder stack found (looked for a ModuleList of identical blocks)")
    if not any(isinstance(m, nn.Linear) for m in model.get_submodule(blocks).modules()):
        raise _unsupported(mt, f"its decoder blocks ({blocks}) hold no torch Linear layer to quantize")
    embed = _name_of(model, model.get_input_embeddings())
    head = _name_of(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    if embed is None or head is None:
        raise _unsupported(mt, "no token embedding or lm_head found (get_input_embeddings / get_output_embeddings)")
    parent_name, _, _ = blocks.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    prefix = f"{parent_name}." if parent_name else ""
    norm = rotary = ""
    for child, m in parent.named_children():
        cls = type(m).__name__.lower()
        if not norm and "norm" in cls and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            norm = prefix + child
        if not rotary and "rotary" in cls:
            rotary = prefix + child
    no_clip = tuple(sorted({n.split(".", 2)[-1] for n, m in model.get_submodule(blocks).named_modules()
                            if isinstance(m, nn.Linear) and _QK.search(n)}))
    return dict(blocks=blocks, embed=embed, final_norm=norm, lm_head=head, feeds=(), no_clip=no_clip,
                rotary=rotary, discovered=True)


def meta_model(config: dict) -> nn.Module:
    """The model a config.json describes, built on the meta device (structure only, no weight allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(config)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    except Exception as e:  # a config transformers cannot build
        raise _unsupported(_model_type(config), f"transformers cannot build it from its config: "
                                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ---- which Linears share an input, and where a scale folds exactly ----------------------------------------

def _key(t) -> tuple | None:
    if not isinstance(t, torch.Tensor):
        return None
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


@torch.no_grad()
def _trace(block: nn.Module, hidden, kwargs):
    """Per Linear its first input key, in call order; per tensor key the innermost module that output it;
    per module its first input key. Tensors are kept alive so that keys stay unique."""
    keep, lin_in, out_of, first_in, handles = [], {}, {}, {}, []
    for name, m in block.named_modules():
        if not name:
            continue

        def pre(mod, args, kw, name=name):
            try:
                x = first_input(mod, args, kw)
            except (KeyError, StopIteration, TypeError, ValueError):
                return
            keep.append(x)
            first_in.setdefault(name, _key(x))
            if isinstance(mod, nn.Linear):
                lin_in.setdefault(name, _key(x))

        def post(mod, args, out, name=name):
            y = first_output(out)
            keep.append(y)
            out_of.setdefault(_key(y), name)     # hooks fire inner-first: the innermost producer wins

        handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post)]
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return lin_in, out_of, first_in


def fold_scale(module: nn.Module, s: torch.Tensor, offset: bool = False) -> None:
    """Divide a producer's output channels by s: a norm's weight (as w, or as (1 + w) when offset), or a
    Linear's output rows; a bias is divided too."""
    w = module.weight
    if w.dim() == 1:
        new = (1 + w.data.float()) / s - 1 if offset else w.data.float() / s
    else:
        new = w.data.float() / s.unsqueeze(1)
    w.data = new.to(w.dtype)
    if getattr(module, "bias", None) is not None:
        module.bias.data = (module.bias.data.float() / s).to(module.bias.dtype)


@torch.no_grad()
def fold_is_exact(block: nn.Module, hidden, kwargs, producer: str, linears, offset: bool = False) -> bool:
    """Fold random scales into the producer and the inverse into the consumers of a float32 copy of the block;
    exact when the block's output does not change beyond float rounding."""
    b = copy.deepcopy(block).float()
    h, kw = cast_floats(hidden, torch.float32), cast_floats(kwargs, torch.float32)
    ref = first_output(b(h, **kw))
    lins = [b.get_submodule(n) for n in linears]
    g = torch.Generator().manual_seed(0)
    s = torch.empty(lins[0].in_features).uniform_(0.5, 2.0, generator=g)
    p = b.get_submodule(producer)
    if (getattr(p, "weight", None) is None or p.weight.shape[0] != s.numel()
            or (p.weight.dim() == 1 and offset and getattr(p, "bias", None) is not None)):
        return False
    fold_scale(p, s, offset)
    for lin in lins:
        lin.weight.data = lin.weight.data * s
    out = first_output(b(h, **kw))
    return bool((out - ref).abs().max() <= FOLD_TOLERANCE * ref.abs().max())


@torch.no_grad()
def discover_feeds(block: nn.Module, hidden: torch.Tensor, kwargs: dict, max_candidates: int = 2):
    """Groups of Linears sharing an input, in forward order, as (producer, linears, inspect) with producer None
    where no exact fold exists; also the producers folded as (1 + w), and the fallback groups' Linears."""
    lin_in, out_of, first_in = _trace(block, hidden, kwargs)
    order = list(lin_in)
    groups: dict[tuple, list[str]] = {}
    for n in order:
        groups.setdefault(lin_in[n], []).append(n)
    feeds, offsets, fallbacks = [], [], []
    for key, names in groups.items():
        parts = _with_inspect(block, names, key, first_in)
        K = block.get_submodule(names[0]).in_features
        producer, offset = None, False
        found = out_of.get(key)
        candidates = [found] if found is not None else []
        parent = names[0].rpartition(".")[0]   # a Linear producer sits beside its consumer (v_proj, up_proj)
        earlier = order[:order.index(names[0])]
        candidates += [n for n in reversed(earlier) if n.rpartition(".")[0] == parent
                       and block.get_submodule(n).out_features == K and n not in candidates][:max_candidates]
        for c in candidates:
            mod = block.get_submodule(c)
            for off in ((False, True) if getattr(mod, "weight", None) is not None and mod.weight.dim() == 1
                        else (False,)):
                if fold_is_exact(block, hidden, kwargs, c, names, off):
                    producer, offset = c, off
                    break
            if producer:
                break
        if offset:
            offsets.append(producer)
        for linears, inspect in parts:   # a group split for lack of a common inspect module keeps no producer
            feeds.append((producer if len(parts) == 1 else None, tuple(linears), inspect))
            if feeds[-1][0] is None:
                fallbacks.append(tuple(linears))
    return tuple(feeds), tuple(offsets), tuple(fallbacks)


def _with_inspect(block: nn.Module, names: list[str], key, first_in) -> list[tuple[list[str], str]]:
    """Each Linear's smallest enclosing module whose first input is the group's input (the Linear itself
    without one); the group is split by that module (parallel attention and MLP reading one norm)."""
    parts: dict[str, list[str]] = {}
    for n in names:
        path = n.split(".")[:-1]
        inspect = n
        while path:
            if first_in.get(".".join(path)) == key:
                inspect = ".".join(path)
                break
            path = path[:-1]
        parts.setdefault(inspect, []).append(n)
    return [(linears, inspect) for inspect, linears in parts.items()]
