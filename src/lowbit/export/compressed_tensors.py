"""compressed-tensors checkpoints (what vLLM, SGLang and transformers read), written and read.

Which lowbit scheme becomes which compressed-tensors format:
    integer weights, no activation quantization   pack-quantized    (2..8 bits, per group or channel, sym or asym)
    int8 weights per channel + int8 activations   int-quantized     (W8A8 / SmoothQuant; smoothing is already
                                                                     folded into the weights and the norms)
    FP8 e4m3 weights per channel [+ FP8 acts]     float-quantized
LLM.int8()'s outlier decomposition, FP8 e5m2 and GGUF block formats have no compressed-tensors scheme.

Tensors of a quantized Linear NAME (compressed-tensors' specification, package version 0.20):
    pack-quantized
        NAME.weight_packed       int32 [N, ceil(K·b / 32)]  each row one little-endian bit stream of the codes
                                                            offset to unsigned (q + 2^(b−1)), codes straddling
                                                            words (export.hf_dir.pack_int32)
        NAME.weight_scale        [N, G] (per channel: [N, 1])
        NAME.weight_zero_point   asymmetric only: int32 [ceil(N·b / 32), G], the signed zero points offset and
                                 packed the same way along the output axis (dim 0)
        NAME.weight_shape        int64 [2] = (N, K)
    int-quantized / float-quantized
        NAME.weight              int8 or float8_e4m3fn [N, K]
        NAME.weight_scale        [N, 1]
        NAME.input_scale         float32 [1], static per-tensor activation scale only
Dequantization is (q − z) · s computed in the scale's dtype. Scales are written as float32: lowbit's float16
scales copied exactly, so the loader's products are exact and its weights equal lowbit's bit for bit (engines
cast them to the serving dtype; float16 serving keeps them exact).

Module selection: one config group per distinct scheme. A checkpoint with a single scheme targets "Linear" and
lists every unquantized Linear in `ignore`; a mixed one lists exact module names as each group's targets.

Loading with transformers 5.24 (compressed-tensors 0.20.1), as checked on CPU: its dequantize path
(`run_compressed=False`) decodes every dense module with the first config group's scheme, right for a
single-scheme directory and wrong for a mixed one; its compressed path (`run_compressed=True`, then decompress)
matches per module but rejects packed asymmetric zero points (its meta initialisation does not pack them). So a
mixed recipe loads there when its groups are symmetric; with asymmetric groups it decodes exactly through
compressed-tensors' own matching and compressors (and in vLLM, which matches per module).
"""

from __future__ import annotations

import re
import warnings

import torch

from ..errors import LowbitError
from ..formats import FloatSpec, IntSpec, QuantizedTensor
from ..formats.act import ActSpec
from .hf_dir import (cannot_hold, float_tensors, off_marlin, pack_int32, quantized_modules, tp_warnings, unpack_int32,
                     unsigned_codes, write_model_dir)

NAME = "compressed-tensors"
SCALE_DTYPE = torch.float32


def _weight_args(spec) -> dict:
    if isinstance(spec, IntSpec):
        grouped = spec.group_size != -1
        return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "dynamic": False,
                "group_size": spec.group_size if grouped else None, "strategy": "group" if grouped else "channel"}
    return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "group_size": None,
            "strategy": "channel"}


def _act_args(act: ActSpec, kind: str) -> dict:
    return {"num_bits": 8, "type": kind, "symmetric": True, "group_size": None,
            "strategy": "tensor" if act.static else "token", "dynamic": not act.static}


def scheme_for(name: str, m) -> tuple[str, dict]:
    """(compressed-tensors format, scheme) of a QuantLinear, or the error naming what would work."""
    spec, act = m.spec, m.act
    if act is not None and act.dtype == "int8-mixed":
        raise cannot_hold(NAME, name, "LLM.int8() outlier decomposition",
                          "no compressed-tensors scheme keeps outlier dimensions in high precision: "
                          "use w8a8-smooth or w8a8-naive (int-quantized)")
    if isinstance(spec, IntSpec):
        if act is None:
            return "pack-quantized", {"weights": _weight_args(spec), "input_activations": None}
        if act.dtype == "int8" and spec.bits == 8 and spec.group_size == -1:
            return "int-quantized", {"weights": _weight_args(spec), "input_activations": _act_args(act, "int")}
    if isinstance(spec, FloatSpec):
        if spec.fmt != "e4m3":
            raise cannot_hold(NAME, name, spec, "compressed-tensors stores FP8 as e4m3: use fp8 (e4m3)")
        if act is None or act.dtype == "fp8-e4m3":
            return "float-quantized", {"weights": _weight_args(spec),
                                       "input_activations": None if act is None else _act_args(act, "float")}
    raise cannot_hold(NAME, name, f"{spec.name}{'' if act is None else ' with ' + act.dtype + ' activations'}",
                      "compressed-tensors holds integer weights (pack-quantized), int8 W8A8 (int-quantized) "
                      "and FP8 e4m3 (float-quantized)")


def encode(m, fmt: str) -> dict[str, torch.Tensor]:
    """A QuantLinear's tensors in compressed-tensors' layout (names relative to the module)."""
    qt = m.quantized_tensor()
    n, k = qt.shape
    if fmt == "pack-quantized":
        codes, zeros = unsigned_codes(qt)
        out = {"weight_packed": pack_int32(codes, qt.spec.bits), "weight_scale": qt.scales.to(SCALE_DTYPE),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        if not qt.spec.symmetric:
            out["weight_zero_point"] = pack_int32(zeros.T.contiguous(), qt.spec.bits).T.contiguous()
        return out
    out = {"weight": qt.qweight, "weight_scale": qt.scales.to(SCALE_DTYPE).reshape(n, -1)}
    if fmt == "int-quantized" and qt.zeros is not None:
        out["weight_zero_point"] = qt.zeros
    act_scale = m.act_state().get("act_scale")
    if act_scale is not None:
        out["input_scale"] = act_scale.float().reshape(1)
    return out


def quantization_config(model, schemes: dict[str, tuple[str, dict]]) -> dict:
    groups: dict[str, dict] = {}
    for name, (fmt, scheme) in schemes.items():
        key = repr((fmt, scheme))
        groups.setdefault(key, {"format": fmt, **scheme, "output_activations": None, "targets": []})["targets"].append(name)
    linears = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    ignore = [n for n in linears if n not in schemes]
    config_groups = {f"group_{i}": g for i, g in enumerate(groups.values())}
    if len(config_groups) == 1:   # the common case, as other tools write it: every Linear but the ignored ones
        config_groups["group_0"]["targets"] = ["Linear"]
    formats = {g["format"] for g in config_groups.values()}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
            "kv_cache_scheme": None}


def fast_kernel(name, m, k, n) -> str | None:
    """vLLM's compressed-tensors kernels: W4A16/W8A16 (Marlin, Machete) take 4 and 8 bits, groups of 32/64/128
    or per channel, and a GPU's shard with in_features % 128 == 0 and out_features % 64 == 0."""
    spec = m.spec
    if isinstance(spec, IntSpec) and m.act is None:
        return off_marlin(spec.bits, spec.group_size, k, n)
    return None


def export(model, tokenizer, out, *, overwrite: bool = False, tp: int | None = None) -> tuple:
    """Write `model` (quantized by lowbit) as a compressed-tensors directory; returns (path, warnings)."""
    qmods = quantized_modules(model, "compressed-tensors")
    schemes = {name: scheme_for(name, m) for name, m in qmods.items()}
    warns = tp_warnings(model, tp, group_of=lambda m: getattr(m.spec, "group_size", -1), fast_kernel=fast_kernel)
    tensors = float_tensors(model)
    for name, m in qmods.items():
        tensors.update({f"{name}.{k}": v for k, v in encode(m, schemes[name][0]).items()})
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach()
    changes = {"tie_word_embeddings": False} if any(n.endswith("lm_head") for n in qmods) else None
    path = write_model_dir(out, model, tokenizer, tensors, quantization_config(model, schemes), overwrite=overwrite,
                           config_changes=changes)
    return path, warns


# reading ---------------------------------------------------------------------------------------------------
def _matches(target: str, name: str, module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


def scheme_of_module(qcfg: dict, name: str, module) -> tuple[str, dict] | None:
    """The (format, scheme) compressed-tensors assigns to a module, or None when it is not quantized."""
    if any(_matches(t, name, module) for t in qcfg.get("ignore") or []):
        return None
    for group in (qcfg.get("config_groups") or {}).values():
        if any(_matches(t, name, module) for t in group.get("targets") or []):
            return group.get("format") or qcfg.get("format"), group
    return None


def _scales(scale: torch.Tensor, n: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    s = scale.reshape(n, -1) if scale.numel() != 1 else scale.reshape(1, 1).expand(n, 1)
    out = s.to(dtype).contiguous()
    if not torch.equal(out.float(), s.float()):
        warnings.warn(f"{name}: scales rounded to {dtype} (lowbit stores them in that dtype)", stacklevel=2)
    return out


def decode(name: str, t: dict[str, torch.Tensor], fmt: str, scheme: dict,
           shape: tuple[int, int]) -> tuple[QuantizedTensor, ActSpec | None, dict]:
    """A module's compressed-tensors tensors (names relative to it) -> (QuantizedTensor, activation spec,
    activation state), kept packed in lowbit's layout."""
    w, a = scheme.get("weights") or {}, scheme.get("input_activations")
    n, k = shape
    bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
    if strategy not in ("group", "channel", "tensor"):
        raise LowbitError(f"{name}: compressed-tensors strategy {strategy!r} is not supported (group, channel, tensor)")
    if kind == "float":
        if fmt != "float-quantized" or bits != 8 or strategy == "group" or "weight" not in t:
            raise LowbitError(f"{name}: unsupported float scheme {fmt} {bits}-bit {strategy}")
        spec = FloatSpec("e4m3")
        qt = QuantizedTensor(spec, shape, t["weight"].to(spec.dtype), _scales(t["weight_scale"], n, torch.float32, name))
    elif kind == "int":
        spec = IntSpec(bits, w.get("group_size") if strategy == "group" else -1, bool(w.get("symmetric", True)))
        g = spec.num_groups(k)
        shift = 1 << (bits - 1)
        if fmt == "pack-quantized":
            codes = unpack_int32(t["weight_packed"], bits, k)            # unsigned: q + 2^(b-1)
            zp = t.get("weight_zero_point")
            zeros = None if zp is None else unpack_int32(zp.T.contiguous(), bits, n).T   # unsigned too
        elif fmt in ("int-quantized", "naive-quantized"):
            codes = t["weight"].to(torch.int32) + shift
            zeros = t.get("weight_zero_point")
            zeros = None if zeros is None else zeros.to(torch.int32).reshape(n, -1) + shift
        else:
            raise LowbitError(f"{name}: compressed-tensors format {fmt!r} is not supported "
                              "(pack-quantized, int-quantized, naive-quantized, float-quantized)")
        if zeros is not None and zeros.shape[1] == 1 and g != 1:
            zeros = zeros.expand(n, g)
        back = 128 if bits == 8 else 0    # lowbit: signed codes at 8 bits, unsigned below
        codes = codes - back
        if spec.symmetric:
            zeros = None
        else:
            zeros = (zeros.reshape(n, g) - back).to(spec.code_dtype)
        gi = t.get("weight_g_idx")
        if gi is not None and not torch.equal(gi.long(), torch.arange(k) // spec.group_size_for(k)):
            raise LowbitError(f"{name}: activation-order groups (weight_g_idx) that are not contiguous; lowbit "
                              "holds contiguous groups only (GPTQ act-order with static groups)")
        scales = _scales(t["weight_scale"], n, torch.float16, name)
        if scales.shape[1] == 1 and g != 1:
            scales = scales.expand(n, g).contiguous()
        qt = QuantizedTensor.from_codes(codes, scales, zeros, spec)
    else:
        raise LowbitError(f"{name}: compressed-tensors weight type {kind!r} is not supported")
    act, state = None, {}
    if a:
        dtype = {"int": "int8", "float": "fp8-e4m3"}.get(a.get("type"))
        if a.get("num_bits") != 8 or dtype is None or not a.get("symmetric", True) or \
                a.get("strategy") not in ("token", "tensor"):
            raise LowbitError(f"{name}: activation scheme {a} is not supported (8-bit symmetric, token or tensor)")
        act = ActSpec(dtype, a["strategy"])
        if act.static:
            if "input_scale" not in t:
                raise LowbitError(f"{name}: static activation scheme without an input_scale")
            state["act_scale"] = t["input_scale"].float().reshape(1)
    return qt.validate(name), act, state


TENSOR_KEYS = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
               "input_scale", "input_zero_point")
