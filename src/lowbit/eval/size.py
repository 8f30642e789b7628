"""Bytes a model stores and keeps resident, and bits per weight (scales and zero points included)."""

from __future__ import annotations

import torch

from ..nn import QuantLinear


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_stats(model: torch.nn.Module) -> dict:
    """stored bytes (as saved), resident bytes (as held in memory), weight counts and bits per weight.

    `quantized_fp32_ratio`: bytes of the quantized Linears over what the same Linears take in float32.
    """
    stored = resident = params = qbytes = qresident = qparams = 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            n = mod.out_features * mod.in_features
            b = mod.spec.nbytes((mod.out_features, mod.in_features))
            bias = _nbytes(mod.bias) if mod.bias is not None else 0
            params += n
            qparams += n
            stored += b + bias
            qbytes += b
            resident += mod.resident_bytes
            qresident += mod.resident_bytes - bias
            continue
        for p in list(mod.parameters(recurse=False)):
            key = p.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            params += p.numel()
            stored += _nbytes(p)
            resident += _nbytes(p)
    return {
        "bytes": stored,
        "resident_bytes": resident,
        "weights": params,
        "bits_per_weight": 8 * stored / params,
        "quantized_weights": qparams,
        "quantized_bytes": qbytes,
        "quantized_resident_bytes": qresident,
        "quantized_bits_per_weight": (8 * qbytes / qparams) if qparams else None,
        "quantized_fp32_ratio": (qresident / (4 * qparams)) if qparams else None,
    }
