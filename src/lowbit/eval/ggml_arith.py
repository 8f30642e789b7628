"""llama.cpp's CPU arithmetic, reproduced in PyTorch: evaluate a model the way llama.cpp runs its GGUF file.

The weights of a GGUF file are exact in both runtimes (lowbit's GGUF formats dequantize bit for bit as ggml
does), but llama.cpp's CPU backend (ggml-cpu, flash attention off, llama-cpp-python's default) rounds three
things lowbit's reference path keeps in float32:

  activations   before each matmul, the input rows are converted to the weight type's `vec_dot_type` and the
                dot products run on those codes (type_traits_cpu in ggml-cpu.c). VEC_DOT_TYPE lists it:
                  Q8_0  Q4_0, Q5_0, Q8_0 weights: per 32 inputs, d = amax / 127 stored as f16, codes
                        round-half-even(x · 127 / amax), x̂ = code · f16(d) (quantize_row_q8_0, AVX2).
                  Q8_1  Q4_1, Q5_1: the codes and f16 d of Q8_0; ggml also keeps s = f16(d · Σ codes) for the
                        weights' min term, which here is f16(d) · Σ codes (a relative 2⁻¹¹ on that term only).
                  Q8_K  the k-quants: per 256 inputs, iscale = 127 / amax, codes round-half-even(x · iscale),
                        d = 1 / iscale in float32 (quantize_row_q8_K_ref and the AVX2 repacked form, which
                        agree), x̂ = code · d.
                  F16   F16 weights: inputs rounded to f16; F32 weights: inputs as they are.
                The dot of those codes with the weight's codes, Σ blocks (d_w·d_x)·Σ q_w·q_x, equals ŵ·x̂
                up to float32 summation order, so a float matmul of the dequantized weight with x̂ reproduces it.
  KV cache      K and V are stored as f16 (llama.cpp's default cache type); the score matmul K·Q runs on f16
                (Q is converted to K's type, f16), softmax in float32, and the probabilities are converted to
                f16 for the matmul with V (the vec_dot_type of an f16 V). Accumulation is float32 throughout.
  float weights a 2-D float tensor is written as F16 (lowbit.export.gguf) unless F32 is asked for, so its
                values are f16 in the file.

`ggml_arithmetic(model)` applies all three to a lowbit model (QuantLinear in GGUF formats, float Linears,
QuantEmbedding) for the duration of a `with` block and restores it afterwards. Not reproduced: rotary angles,
RMSNorm and SiLU are computed by ggml with its own float32 formulas (differences of an ulp or so), and the
order of float32 sums differs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from ..formats import GGUFSpec
from ..nn import QuantLinear

# ggml-cpu's type_traits_cpu[type].vec_dot_type for the weight types lowbit writes
VEC_DOT_TYPE = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q4_1": "Q8_1",
                "Q5_1": "Q8_1", "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K"}
ATTENTION = "lowbit_ggml_f16_kv"


def quantize_activations(x: torch.Tensor, vec_dot_type: str) -> torch.Tensor:
    """x [..., K] as ggml converts it for a matmul with weights whose vec_dot_type this is (see the module
    docstring), returned as float32 values (x̂)."""
    x = x.float()
    if vec_dot_type == "F32":
        return x
    if vec_dot_type == "F16":
        return x.half().float()
    block = 256 if vec_dot_type == "Q8_K" else 32
    if vec_dot_type not in ("Q8_0", "Q8_1", "Q8_K"):
        raise LowbitError(f"unknown vec_dot type {vec_dot_type!r}; known: F32, F16, Q8_0, Q8_1, Q8_K")
    if x.shape[-1] % block:
        raise LowbitError(f"{vec_dot_type} activations need rows that are a multiple of {block}, got {x.shape[-1]}")
    xb = x.reshape(*x.shape[:-1], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    nonzero = amax > 0
    # true float32 divisions (torch turns `scalar / tensor` into a multiplication by a reciprocal, which
    # rounds differently from C's 127.f / amax)
    iscale = torch.where(nonzero, torch.full_like(amax, 127.0) / torch.where(nonzero, amax, 1.0), 0.0)
    codes = torch.round(xb * iscale)          # round half to even, as _mm256_round_ps and nearest_int do
    if vec_dot_type == "Q8_K":
        d = torch.where(nonzero, torch.ones_like(amax) / torch.where(nonzero, iscale, 1.0), 0.0)
    else:
        d = (amax / 127.0).half().float()
    return (codes * d).reshape(x.shape)


def weight_type(module: nn.Module, float_type: str = "F16") -> str | None:
    """The GGUF type a module's weight has in the file (None for modules without a matmul weight)."""
    if isinstance(module, QuantLinear):
        if not isinstance(module.spec, GGUFSpec):
            raise LowbitError(f"a layer is stored as {module.spec.name}, which GGUF has no type for: llama.cpp "
                              "cannot run this model")
        return module.spec.type
    return float_type if isinstance(module, nn.Linear) else None


def f16_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with llama.cpp's rounding (module docstring): f16 Q, K, V and probabilities, float32
    scores, softmax and sums. Same signature and result layout as transformers' eager attention."""
    groups = query.shape[1] // key.shape[1]
    k = key.half().float().repeat_interleave(groups, dim=1)
    v = value.half().float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.half().float(), k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]]
    p = F.softmax(scores, dim=-1, dtype=torch.float32).half().float()
    out = torch.matmul(p, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), p


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(ATTENTION, f16_kv_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)   # an additive float mask, as eager attention takes


@contextlib.contextmanager
def ggml_arithmetic(model: nn.Module, float_type: str = "F16", kv_type: str = "F16"):
    """Within the block, `model` computes as llama.cpp's CPU backend computes its GGUF file (module docstring):
    `float_type` is the type its 2-D float tensors have in the file (F16, or F32), `kv_type` llama.cpp's KV
    cache type (F16, or F32 for an F32 cache, which leaves attention in float32). Raises LowbitError for a
    layer GGUF cannot store, or a model not in float32. Everything is restored on exit."""
    if float_type not in ("F16", "F32") or kv_type not in ("F16", "F32"):
        raise LowbitError(f"float_type and kv_type must be F16 or F32, got {float_type!r}, {kv_type!r}")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        raise LowbitError("llama.cpp computes in float32: convert the model with .float() first")
    hooks, saved = [], []
    cfg = getattr(model, "config", None)
    old_attn = getattr(cfg, "_attn_implementation", None)
    try:
        for m in model.modules():
            t = weight_type(m, float_type)
            if t is None:
                continue
            vdt = VEC_DOT_TYPE[t]
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs, vdt=vdt: ((quantize_activations(args[0], vdt).to(args[0].dtype),
                                                     *args[1:]), kwargs), with_kwargs=True))
        for m in model.modules():   # float matrices are f16 in the file (a tied embedding is the lm_head's)
            if float_type == "F16" and isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.is_floating_point():
                saved.append((m.weight, m.weight.data))
                m.weight.data = m.weight.data.half().to(m.weight.dtype)
        if kv_type == "F16" and cfg is not None:
            _register_attention()
            cfg._attn_implementation = ATTENTION
        yield model
    finally:
        for h in hooks:
            h.remove()
        for p, data in reversed(saved):   # a parameter met twice gets its first (original) data back last
            p.data = data
        if cfg is not None and old_attn is not None:
            cfg._attn_implementation = old_attn


__all__ = ["VEC_DOT_TYPE", "quantize_activations", "weight_type", "f16_kv_attention", "ggml_arithmetic"]
