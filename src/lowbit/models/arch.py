"""The one table of model-family specifics. Algorithms look things up here; they never branch on a family.

Names are relative to a decoder block unless said otherwise. `feeds` lists, in forward order, each operation
that produces the input of a group of Linears (used by calibration-based methods to fold scales and to
quantize in true-sequential order).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError


@dataclass(frozen=True)
class Arch:
    blocks: str                      # path of the ModuleList of decoder blocks, from the model root
    embed: str                       # token embedding, from the model root
    final_norm: str                  # from the model root
    lm_head: str                     # from the model root
    feeds: tuple[tuple[str, tuple[str, ...]], ...]  # (producer, linears it feeds), inside a block


_LLAMA = Arch(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    feeds=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

# model_type (from config.json) -> layout. Mistral and Qwen2/3 blocks are named like Llama's.
ARCHES: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}


def arch_for(config) -> Arch:
    model_type = getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)
    if model_type not in ARCHES:
        raise LowbitError(f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHES))}")
    return ARCHES[model_type]
