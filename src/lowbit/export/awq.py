"""AWQ checkpoints (`quant_method: awq`, `version: gemm`, AutoAWQ's GEMM layout, which vLLM, SGLang and
transformers read), written and read. 4-bit codes in groups, with zero points.

Tensors of a quantized Linear NAME with N outputs, K inputs, G groups:
    NAME.qweight   int32 [K, N / 8]   row k holds the 8·j..8·j+7-th outputs' codes of input k in word j, nibble i
                                      (bits 4i..4i+3) holding output 8·j + ORDER[i], ORDER = 0, 2, 4, 6, 1, 3, 5, 7
    NAME.qzeros    int32 [G, N / 8]   the zero points (unsigned, not offset), packed the same way
    NAME.scales    float16 [G, N]
    w[n, k] = (q[k, n] − z[g, n]) · s[g, n],  g = k // group_size.
A symmetric lowbit format is written with its implicit zero point 8. Every quantized module must share one
group size (the format has one); unquantized Linears are listed in `modules_to_not_convert`.
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats import IntSpec, QuantizedTensor
from .hf_dir import (cannot_hold, off_marlin, float_tensors, pack_int32, quantized_modules, tp_warnings, unpack_int32,
                     unsigned_codes, write_model_dir)

NAME = "AWQ"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)     # ORDER's inverse permutation
TENSOR_KEYS = ("qweight", "qzeros", "scales")


def _pack_cols(x: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] codes in [0, 16) -> int32 [R, C / 8] in AWQ's interleaved nibble order."""
    r, c = x.shape
    return pack_int32(x.reshape(r, c // 8, 8)[:, :, list(ORDER)].reshape(r, c), 4)


def _unpack_cols(w: torch.Tensor, c: int) -> torch.Tensor:
    r = w.shape[0]
    return unpack_int32(w, 4, c).reshape(r, c // 8, 8)[:, :, list(REVERSE)].reshape(r, c)


def check_module(name: str, m) -> IntSpec:
    spec = m.spec
    if not isinstance(spec, IntSpec) or m.act is not None or spec.bits != 4:
        what = spec.name + ("" if m.act is None else f" with {m.act.dtype} activations")
        raise cannot_hold(NAME, name, what, "AWQ holds 4-bit integer weights only: use gptq or compressed-tensors "
                                            "(pack-quantized) for other bit widths, compressed-tensors for W8A8/FP8")
    if spec.group_size == -1:
        raise cannot_hold(NAME, name, spec, "AWQ needs a group size (32, 64, 128): use gptq or compressed-tensors "
                                            "for per-channel scales")
    if m.out_features % 8:
        raise cannot_hold(NAME, name, spec, f"out_features={m.out_features} is not a multiple of 8")
    return spec


def encode(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    codes, zeros = unsigned_codes(qt)
    return {"qweight": _pack_cols(codes.T.contiguous()), "qzeros": _pack_cols(zeros.T.contiguous()),
            "scales": qt.scales.T.contiguous().to(torch.float16)}


def fast_kernel(name, m, k, n) -> str | None:
    """vLLM's awq_marlin: groups of 32/64/128, a shard with in_features % 128 == 0 and out_features % 64 == 0."""
    return off_marlin(4, m.spec.group_size, k, n, groups_ok=(32, 64, 128), engine="vLLM's AWQ Marlin kernel")


def export(model, tokenizer, out, *, overwrite: bool = False, tp: int | None = None) -> tuple:
    """Write `model` (quantized by lowbit) as an AWQ GEMM directory; returns (path, warnings)."""
    from ..models.arch import arch_for
    blocks = arch_for(model.config).blocks
    qmods = quantized_modules(model, NAME)
    if not qmods:
        raise LowbitError("the model has no quantized modules to export")
    specs = {}
    for name, m in qmods.items():
        if not name.startswith(blocks + "."):
            raise cannot_hold(NAME, name, m.spec, "AWQ quantizes the decoder blocks' Linears only: keep it unquantized")
        specs[name] = check_module(name, m)
    groups = {s.group_size for s in specs.values()}
    if len(groups) > 1:
        raise LowbitError(f"AWQ has one group size per checkpoint, the recipe uses {sorted(groups)}: use gptq or "
                          "compressed-tensors for mixed group sizes")
    warns = tp_warnings(model, tp, group_of=lambda m: m.spec.group_size, pack_cols=8, fast_kernel=fast_kernel)
    tensors = float_tensors(model)
    for name, m in qmods.items():
        tensors.update({f"{name}.{k}": v for k, v in encode(m.quantized_tensor()).items()})
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach()
    skip = [n for n, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and n.startswith(blocks + ".") and n not in specs]
    cfg = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": groups.pop(), "zero_point": True,
           "modules_to_not_convert": skip or None}
    return write_model_dir(out, model, tokenizer, tensors, cfg, overwrite=overwrite), warns


# reading ---------------------------------------------------------------------------------------------------
def decode(name: str, t: dict[str, torch.Tensor], qcfg: dict, shape: tuple[int, int]) -> QuantizedTensor:
    """A module's AWQ GEMM tensors (names relative to it) -> a lowbit QuantizedTensor, bit-exact."""
    n, k = shape
    if qcfg.get("bits", 4) != 4 or str(qcfg.get("version", "gemm")).lower() != "gemm":
        raise LowbitError(f"{name}: AWQ {qcfg.get('bits')}-bit version {qcfg.get('version')!r} is not supported "
                          "(4-bit GEMM)")
    group = qcfg.get("group_size", 128)
    codes = _unpack_cols(t["qweight"], n).T.contiguous()      # [N, K]
    zeros = _unpack_cols(t["qzeros"], n).T.contiguous()       # [N, G]
    symmetric = bool((zeros == 8).all())
    spec = IntSpec(4, -1 if group in (-1, k) else group, symmetric)
    return QuantizedTensor.from_codes(codes, t["scales"].T.to(torch.float16).contiguous(),
                                      None if symmetric else zeros.to(torch.uint8), spec).validate(name)
