"""GPTQ checkpoints (`quant_method: gptq`, `checkpoint_format: gptq`, the v1 layout of AutoGPTQ/GPTQModel, which
vLLM, SGLang and transformers read), written and read.

Tensors of a quantized Linear NAME with N outputs, K inputs, b bits, G groups (b in 2, 3, 4, 8):
    NAME.qweight   int32 [K·b / 32, N]   each column one little-endian bit stream of that output's unsigned codes
                                         along K (code k at bits [k·b, (k+1)·b) of the column's words; at 3 bits
                                         codes straddle words) -- export.hf_dir.pack_int32, transposed
    NAME.qzeros    int32 [G, N·b / 32]   the zero points minus one (v1), packed the same way along N
    NAME.scales    float16 [G, N]
    NAME.g_idx     int32 [K]             the group of each input column: k // group_size (lowbit's groups are
                                         contiguous, also with act-order, whose groups are static), all 0 per channel
    w[n, k] = (q[k, n] − (qzeros[g, n] + 1)) · scales[g, n],  g = g_idx[k].
Codes are unsigned (lowbit's signed 8-bit codes and zeros are shifted by 128); a symmetric format's zero point is
2^(b−1). v1 cannot hold a zero point of 0 (stored as −1, loaders add 1 without wrapping): such a module is an error.

Mixed recipes: the most common scheme goes in the top-level fields and every other module gets a `dynamic`
override keyed "+:^NAME$" (its bits, group_size, sym); unquantized Linears of the decoder blocks get "-:^NAME$".
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from ..errors import LowbitError
from ..formats import IntSpec, QuantizedTensor
from .hf_dir import (cannot_hold, float_tensors, off_marlin, pack_int32, quantized_modules, tp_warnings, unpack_int32,
                     unsigned_codes, write_model_dir)

NAME = "GPTQ"
BITS = (2, 3, 4, 8)
TENSOR_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def check_module(name: str, m) -> IntSpec:
    spec = m.spec
    if not isinstance(spec, IntSpec) or m.act is not None:
        raise cannot_hold(NAME, name, f"{spec.name}{'' if m.act is None else ' with ' + m.act.dtype + ' activations'}",
                          "GPTQ holds weight-only integer formats: use compressed-tensors for W8A8 and FP8")
    if spec.bits not in BITS:
        raise cannot_hold(NAME, name, spec, f"GPTQ holds {', '.join(map(str, BITS))} bits: use compressed-tensors "
                                            f"(pack-quantized) for {spec.bits} bits")
    n, k = m.out_features, m.in_features
    if (k * spec.bits) % 32 or (n * spec.bits) % 32:
        raise cannot_hold(NAME, name, spec, f"its shape [{n}, {k}] does not fill whole int32 words at {spec.bits} "
                                            "bits: use compressed-tensors")
    return spec


def encode(qt: QuantizedTensor, name: str = "weight") -> dict[str, torch.Tensor]:
    spec = qt.spec
    n, k = qt.shape
    codes, zeros = unsigned_codes(qt)
    if bool((zeros == 0).any()):
        raise cannot_hold(NAME, name, spec, "a zero point of 0 has no GPTQ v1 encoding: use compressed-tensors, "
                                            "or a symmetric format")
    return {"qweight": pack_int32(codes, spec.bits).T.contiguous(),
            "qzeros": pack_int32((zeros - 1).T.contiguous(), spec.bits),
            "scales": qt.scales.T.contiguous().to(torch.float16),
            "g_idx": (torch.arange(k) // spec.group_size_for(k)).to(torch.int32)}


def _fields(spec: IntSpec) -> dict:
    return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.symmetric}


def quantization_config(model, specs: dict[str, IntSpec], blocks: str) -> dict:
    base = Counter(specs.values()).most_common(1)[0][0]
    dynamic = {f"+:^{re.escape(n)}$": _fields(s) for n, s in specs.items() if s != base}
    block_linears = [n for n, mod in model.named_modules()
                     if isinstance(mod, torch.nn.Linear) and n.startswith(blocks + ".")]
    dynamic.update({f"-:^{re.escape(n)}$": {} for n in block_linears if n not in specs})
    cfg = {"quant_method": "gptq", "checkpoint_format": "gptq", **_fields(base), "desc_act": False,
           "static_groups": False, "true_sequential": True, "lm_head": any(n.endswith("lm_head") for n in specs),
           "pack_dtype": "int32", "damp_percent": 0.01}
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def fast_kernel(name, m, k, n) -> str | None:
    """vLLM's gptq_marlin: 4 or 8 bits, groups of 32/64/128 or per channel, a shard with in_features % 128 == 0
    and out_features % 64 == 0 (else the exllama kernel, 4/8 bits, or the slower triton/torch paths)."""
    return off_marlin(m.spec.bits, m.spec.group_size, k, n)


def export(model, tokenizer, out, *, overwrite: bool = False, tp: int | None = None) -> tuple:
    """Write `model` (quantized by lowbit) as a GPTQ v1 directory; returns (path, warnings)."""
    from ..models.arch import arch_for
    blocks = arch_for(model.config).blocks
    qmods = quantized_modules(model, NAME)
    if not qmods:
        raise LowbitError("the model has no quantized modules to export")
    specs = {}
    for name, m in qmods.items():
        if not (name.startswith(blocks + ".") or name.endswith("lm_head")):
            raise cannot_hold(NAME, name, m.spec, "GPTQ quantizes the decoder blocks' Linears and the lm_head only")
        specs[name] = check_module(name, m)
    warns = tp_warnings(model, tp, group_of=lambda m: m.spec.group_size, pack_rows=32, pack_cols=32,
                        fast_kernel=fast_kernel)
    tensors = float_tensors(model)
    for name, m in qmods.items():
        tensors.update({f"{name}.{k}": v for k, v in encode(m.quantized_tensor(), name).items()})
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach()
    changes = {"tie_word_embeddings": False} if any(n.endswith("lm_head") for n in qmods) else None
    path = write_model_dir(out, model, tokenizer, tensors, quantization_config(model, specs, blocks),
                           overwrite=overwrite, config_changes=changes)
    return path, warns


# reading ---------------------------------------------------------------------------------------------------
def spec_of_module(qcfg: dict, name: str) -> dict | None:
    """bits/group_size/sym for a module after `dynamic` overrides (first matching key wins, as GPTQModel reads
    them); None when a "-:" rule excludes it."""
    fields = {"bits": qcfg.get("bits"), "group_size": qcfg.get("group_size", -1), "sym": qcfg.get("sym", True)}
    for key, override in (qcfg.get("dynamic") or {}).items():
        sign, pattern = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
        if re.match(pattern, name):
            if sign == "-":
                return None
            return {**fields, **{k: v for k, v in (override or {}).items() if k in fields}}
    return fields


def decode(name: str, t: dict[str, torch.Tensor], fields: dict, shape: tuple[int, int],
           v1: bool = True) -> QuantizedTensor:
    """A module's GPTQ tensors (names relative to it) -> a lowbit QuantizedTensor, bit-exact."""
    n, k = shape
    bits, group_size = fields["bits"], fields["group_size"]
    if bits not in BITS:
        raise LowbitError(f"{name}: GPTQ bits={bits} is not supported ({', '.join(map(str, BITS))})")
    spec_g = -1 if group_size in (-1, None, k) else group_size
    gidx = t.get("g_idx")
    if gidx is not None and not torch.equal(gidx.long(), torch.arange(k) // (k if spec_g == -1 else spec_g)):
        raise LowbitError(f"{name}: act-order groups (g_idx) that are not contiguous; lowbit holds contiguous "
                          "groups only (quantize with static groups)")
    codes = unpack_int32(t["qweight"].T.contiguous(), bits, k)                    # [N, K] unsigned
    zeros = unpack_int32(t["qzeros"], bits, n).T.contiguous() + (1 if v1 else 0)  # [N, G] unsigned
    shift = 128 if bits == 8 else 0
    implicit = 1 << (bits - 1)
    symmetric = bool(fields.get("sym", True)) and bool((zeros == implicit).all())
    spec = IntSpec(bits, spec_g, symmetric)
    scales = t["scales"].T.to(torch.float16).contiguous()
    z = None if symmetric else (zeros - shift).to(spec.code_dtype)
    return QuantizedTensor.from_codes(codes - shift, scales, z, spec).validate(name)
