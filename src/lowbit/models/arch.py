"""The one table of model-family specifics. Algorithms look things up here; they never branch on a family.

Names are relative to a decoder block unless said otherwise. `feeds` lists, in forward order, the groups of
Linears that read the same input, each as (producer, linears, inspect):
    producer  the operation that makes that input: a norm (its weight scales channels) or a Linear (its output
              rows do); calibration methods fold per-channel scales into it (AWQ, SmoothQuant)
    linears   the Linears reading that input; quantized together in true-sequential order (GPTQ)
    inspect   the smallest module whose output shows the group's error (AWQ's loss); its first argument is the
              group's input
`no_clip` names Linears whose weights AWQ does not clip (query/key errors are amplified by the softmax).
`decoder` names the parts of a pre-norm decoder block that the fast generation engine (lowbit.engine) calls
directly; `qk_norm` is set where queries and keys are RMS-normalized per head before the rotary embedding.
`ENGINE_DECODERS` gives the engine's names for families whose quantization layout is discovered (Gemma 3).

The table is an override: any other transformers decoder-only causal LM gets its Arch from the model's own
structure (models.discovery), with `discovered` set and `feeds` found per block on calibration inputs.
`fold_offset` names producers whose weight acts as (1 + w) (Gemma's RMSNorm); `fallbacks` the groups (their
Linears) with no exact fold, which AWQ and SmoothQuant scale inside the quantized Linears instead.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace

from torch import nn

from .discovery import check_config, discover_arch, meta_model


@dataclass(frozen=True)
class DecoderNames:
    """Where the engine finds each part of a block and how it calls them:
    h += attn_out_norm(o(attn(rope(q, k), v))); h += mlp_out_norm(down(act(gate) * up)), each branch reading
    its pre-norm (input_norm, post_norm). The output norms are Gemma's sandwich norms (None: identity);
    norm_offset: every RMSNorm of the model multiplies by (1 + w); layer_types: config.layer_types says which
    layers attend only to the last config.sliding_window positions ("sliding_attention") and which rotary
    table each layer uses (the model's rotary module takes the layer type); moe: a block whose module of this
    name has no `gate` / `up` Linears is a mixture-of-experts layer: its `moe_router` child, called on
    [tokens, hidden], returns (logits, weights [tokens, k], expert indices [tokens, k]) as transformers'
    top-k routers do, and its `moe_experts` child takes (hidden, indices, weights). A prompt runs the layer
    whole; a decoded token runs the router and, where the experts are an ExpertList (models.moe, as lowbit
    quantizes them), ExpertList.dense, which compiles into the decode step's graph."""

    input_norm: str = "input_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    post_norm: str = "post_attention_layernorm"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    norm_offset: bool = False
    layer_types: bool = False
    moe: str | None = None
    moe_router: str = "gate"
    moe_experts: str = "experts"


@dataclass(frozen=True)
class Arch:
    blocks: str                      # path of the ModuleList of decoder blocks, from the model root
    embed: str                       # token embedding, from the model root
    final_norm: str                  # from the model root
    lm_head: str                     # from the model root
    feeds: tuple[tuple[str, tuple[str, ...], str], ...]  # (producer, linears it feeds, inspect), inside a block
    no_clip: tuple[str, ...] = ()
    decoder: DecoderNames = DecoderNames()
    rotary: str = "model.rotary_emb"  # the module that returns (cos, sin) for given positions, from the root
    discovered: bool = False         # found by models.discovery, not from the table
    fold_offset: tuple[str, ...] = ()
    fallbacks: tuple[tuple[str, ...], ...] = ()


_LLAMA = Arch(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    feeds=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

# model_type (from config.json) -> layout. Mistral and Qwen2/3 blocks are named like Llama's.
ARCHES: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": replace(_LLAMA, decoder=DecoderNames(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")),
}


# model_type -> engine names, for families quantized through discovery that the engine also covers
ENGINE_DECODERS: dict[str, DecoderNames] = {
    "gemma3_text": DecoderNames(post_norm="pre_feedforward_layernorm", q_norm="self_attn.q_norm",
                                k_norm="self_attn.k_norm", attn_out_norm="post_attention_layernorm",
                                mlp_out_norm="post_feedforward_layernorm", norm_offset=True, layer_types=True),
    "qwen3_moe": DecoderNames(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", moe="mlp"),
}


def arch_for(config) -> Arch:
    """The layout of a model (nn.Module), or of a config (dict or transformers config): the table's entry for
    its family, else discovered from its structure (see models.discovery); unsupported models get one error."""
    model = config if isinstance(config, nn.Module) else None
    config = model.config if model is not None else config
    model_type = getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)
    if model_type in ARCHES:
        return ARCHES[model_type]
    check_config(config)
    if model is not None:
        return _with_engine(Arch(**discover_arch(model)), model_type)
    return _with_engine(_from_config(json.dumps(config if isinstance(config, dict) else config.to_dict(),
                                                sort_keys=True, default=str)), model_type)


def _with_engine(arch: Arch, model_type) -> Arch:
    return replace(arch, decoder=ENGINE_DECODERS[model_type]) if model_type in ENGINE_DECODERS else arch


@functools.lru_cache(maxsize=16)
def _from_config(text: str) -> Arch:
    return Arch(**discover_arch(meta_model(json.loads(text))))


def has_engine(config) -> bool:
    """Whether the fast engine (lowbit.engine) knows this family; others generate with transformers."""
    model_type = getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)
    # logit soft-capping (Gemma 2) is not implemented by the engine
    capped = any(getattr(config, k, None) if not isinstance(config, dict) else config.get(k)
                 for k in ("attn_logit_softcapping", "final_logit_softcapping"))
    return model_type in ARCHES or model_type in ENGINE_DECODERS and not capped
