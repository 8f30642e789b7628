"""A Hugging Face model directory for other engines: what every exporter (compressed-tensors, GPTQ, AWQ) shares.

    config.json                          the model's config with the target format's `quantization_config`
    generation_config.json               when the model has one
    tokenizer files                      as the tokenizer saves them
    model-0000i-of-0000n.safetensors     the tensors, in shards of at most `max_shard_bytes`
    model.safetensors.index.json         {"metadata": {"total_size": bytes}, "weight_map": {name: shard}}

Also here: the int32 bit stream that all three formats pack codes into, the tensor-parallel checks, and the one
error a format gives for a scheme it cannot hold. The directory appears only when complete (io.atomic).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats.packing import pack_bits, unpack_bits
from ..io.atomic import atomic_dir
from ..io.safetensors import INDEX, write_safetensors
from ..models.hf import hf_config_dict, unique_state_dict
from ..nn import QuantLinear
from ..nn.qlinear import input_scale_of

MAX_SHARD_BYTES = 2 * 1024**3
ROW_PARALLEL = ("o_proj", "down_proj")   # split along in_features under tensor parallelism; the rest along rows


def quantized_modules(model: torch.nn.Module, fmt: str = "this format") -> dict[str, QuantLinear]:
    """The model's QuantLinears, refused when one divides its input by a per-channel scale (see nn.qlinear) or
    has two-level scales: no exported format has a place for either."""
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    check_no_input_scales(qmods, fmt)
    for name, m in qmods.items():   # none of the formats stores quantized group scales
        if getattr(m.spec, "two_level", False):
            raise cannot_hold(fmt, name, m.spec, f"{fmt} stores one float scale per group: quantize with one-level "
                                                 "scales")
    return qmods


def check_no_input_scales(modules: dict, fmt: str) -> None:
    scaled = [n for n, m in modules.items() if input_scale_of(m) is not None]
    if scaled:
        raise LowbitError(f"{fmt} cannot hold {scaled[0]} ({len(scaled)} Linears): it divides its input by a "
                          "per-channel scale (AWQ/SmoothQuant where no exact fold into a producer exists), which "
                          "the format has no place for; save a lowbit checkpoint, or quantize with gptq or rtn")


def off_marlin(bits: int, group_size: int, k: int, n: int, *, bits_ok=(4, 8), groups_ok=(-1, 32, 64, 128),
               engine: str = "vLLM's Marlin kernels") -> str | None:
    """Why a [n, k] shard of a `bits`-bit, `group_size` weight falls off vLLM's Marlin-family kernels (None if it
    does not): they take `bits_ok` widths and `groups_ok` groups, and a shard whose in_features is a multiple of
    128 and out_features of 64."""
    if bits not in bits_ok:
        return f"{bits}-bit: off {engine} ({', '.join(map(str, bits_ok))} bits)"
    if group_size not in groups_ok:
        return f"group size {group_size}: off {engine} ({', '.join('per channel' if g == -1 else str(g) for g in groups_ok)})"
    if k % 128 or n % 64:
        return f"shard [{n}, {k}] is not a multiple of [64, 128]: off {engine} (a slower fallback)"
    return None


def float_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that is not a quantized weight (embeddings, norms, biases, unquantized Linears), tied
    aliases once (HF loaders re-tie them from the config)."""
    tensors, _ = unique_state_dict(model)
    return tensors


def cannot_hold(fmt: str, module: str, spec, what_works: str) -> LowbitError:
    return LowbitError(f"{fmt} cannot hold {module} ({spec.name if hasattr(spec, 'name') else spec}); {what_works}")


# the int32 bit stream --------------------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] (each < 2^bits) -> int32 [R, ceil(C·bits / 32)]: each row one little-endian bit
    stream, code j at bits [j·bits, (j+1)·bits) counted from the least significant bit of word 0, codes
    straddling words where 32 is not a multiple of bits. This is compressed-tensors' dense packing and, read
    along in_features, GPTQ's (whose 3-bit layout is the same stream)."""
    if sys.byteorder != "little":
        raise LowbitError("packing int32 words needs a little-endian machine")
    r, c = codes.shape
    pad = -c % 32
    u8 = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)).to(torch.uint8)
    words = pack_bits(u8, bits).reshape(-1).view(torch.int32).reshape(r, -1)   # flat: any stride of a size-1 dim
    return words[:, :math.ceil(c * bits / 32)].contiguous()


def unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of `pack_int32`: int32 [R, W] -> int32 codes [R, count]."""
    if sys.byteorder != "little":
        raise LowbitError("unpacking int32 words needs a little-endian machine")
    if words.dtype != torch.int32:
        raise LowbitError(f"packed weights must be int32, found {words.dtype}")
    r, w = words.shape
    if w * 32 < count * bits:
        raise LowbitError(f"packed tensor of {w} words per row is too short for {count} {bits}-bit codes")
    pad = -w % bits   # whole groups of 32 codes
    u8 = torch.nn.functional.pad(words, (0, pad)).reshape(-1).view(torch.uint8).reshape(r, -1)
    return unpack_bits(u8, bits)[:, :count].to(torch.int32)


def unsigned_codes(qt) -> tuple[torch.Tensor, torch.Tensor]:
    """An integer QuantizedTensor's codes and zero points shifted to the unsigned range [0, 2^bits) that the
    GPTQ/AWQ/compressed-tensors streams store: int32 [N, K] and int32 [N, G] (the implicit zero of a symmetric
    format made explicit). Only stored codes and zeros are used, never how the scale was chosen."""
    spec = qt.spec
    shift = 128 if spec.bits == 8 else 0   # lowbit's 8-bit codes are signed
    codes = qt.codes().to(torch.int32) + shift
    n, k = qt.shape
    g = spec.num_groups(k)
    zeros = (torch.full((n, g), spec.implicit_zero, dtype=torch.int32) if qt.zeros is None
             else qt.zeros.to(torch.int32)) + shift
    return codes, zeros


# the directory -----------------------------------------------------------------------------------------------
def write_model_dir(out: str | Path, model: torch.nn.Module, tokenizer, tensors: dict[str, torch.Tensor],
                    quantization_config: dict, *, overwrite: bool = False, config_changes: dict | None = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write tensors (already in the target layout), config.json with `quantization_config`, the generation
    config and the tokenizer as one directory that appears only when complete."""
    config = hf_config_dict(model)
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if floats:   # the dtype of what stays unquantized (lowbit's quantize casts it to 16 bits)
        config["dtype"] = config["torch_dtype"] = str(max(set(floats), key=floats.count)).removeprefix("torch.")
    config.update(config_changes or {})
    config["quantization_config"] = quantization_config
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nb
    with atomic_dir(out, overwrite) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, tmp / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            (tmp / "generation_config.json").write_text(gen.to_json_string())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out)


# tensor parallelism -----------------------------------------------------------------------------------------
def tp_warnings(model: torch.nn.Module, tp: int | None, *, group_of, pack_rows: int = 1, pack_cols: int = 1,
                fast_kernel=None) -> list[str]:
    """What will not shard across `tp` GPUs (vLLM/SGLang split q/k/v/gate/up along out_features and o/down along
    in_features; a split must hold whole quantization groups and whole packed words), and, with
    `fast_kernel(name, qlinear, k_per_gpu, n_per_gpu) -> reason | None`, which layers fall off the fast kernels."""
    if tp is None:
        return []
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise LowbitError(f"--tp must be a positive integer, got {tp!r}")
    warns = []
    cfg = model.config
    for attr in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(cfg, attr, None)
        if heads and heads % tp and not (attr == "num_key_value_heads" and tp % heads == 0):
            warns.append(f"{attr}={heads} does not split across tp={tp}")
    for name, m in quantized_modules(model).items():
        n, k = m.out_features, m.in_features
        row_parallel = name.rsplit(".", 1)[-1] in ROW_PARALLEL
        kk, nn_ = (k // tp, n) if row_parallel else (k, n // tp)
        if (k if row_parallel else n) % tp:
            warns.append(f"{name}: {'in' if row_parallel else 'out'}_features={k if row_parallel else n} "
                         f"does not split across tp={tp}")
            continue
        g = group_of(m)
        if row_parallel and g not in (-1, None) and kk % g:
            warns.append(f"{name}: in_features/tp={kk} is not a whole number of groups of {g}")
        if kk % pack_rows or nn_ % pack_cols:
            warns.append(f"{name}: its shard [{nn_}, {kk}] splits a packed word")
        if fast_kernel is not None:
            why = fast_kernel(name, m, kk, nn_)
            if why:
                warns.append(f"{name}: {why}")
    # one line per kind of layer, not per block: "model.layers.*.mlp.up_proj: ... (30 layers)"
    counts: dict[str, int] = {}
    for w in warns:
        key = re.sub(r"\.(\d+)\.", ".*.", w, count=1)
        counts[key] = counts.get(key, 0) + 1
    return [k if c == 1 else f"{k} ({c} layers)" for k, c in counts.items()]
