"""Bytes a model stores and keeps resident, and bits per weight (scales and zero points included)."""

from __future__ import annotations

import torch

from ..nn import QuantEmbedding, QuantLinear


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_stats(model: torch.nn.Module) -> dict:
    """stored bytes (as saved), resident bytes (as held in memory), weight counts and bits per weight.

    `quantized_fp32_ratio`: bytes of the quantized Linears over what the same Linears take in float32.
    """
    stored = resident = params = qbytes = qresident = qparams = 0
    seen = set()
    tables = [m.quantized_tensor() for m in model.modules() if isinstance(m, QuantEmbedding)]
    for mod in model.modules():
        if isinstance(mod, QuantEmbedding):
            n = mod.num_embeddings * mod.embedding_dim
            b = mod.spec.nbytes((mod.num_embeddings, mod.embedding_dim))
            params, qparams, stored, qbytes = params + n, qparams + n, stored + b, qbytes + b
            resident += mod.resident_bytes
            qresident += mod.resident_bytes
            continue
        if isinstance(mod, QuantLinear):
            n = mod.out_features * mod.in_features
            b = mod.spec.nbytes((mod.out_features, mod.in_features))
            bias = _nbytes(mod.bias) if mod.bias is not None else 0
            held = mod.resident_bytes
            if tables and any(mod.quantized_tensor().same_as(t) for t in tables):
                n = b = 0   # a tied head: the embedding's table, stored and counted once
                if any(buf.data_ptr() == t.qweight.data_ptr() for buf in mod.buffers() for t in tables):
                    held = bias   # and held once when the kernel runs the very same tensors
            params += n
            qparams += n
            stored += b + bias
            qbytes += b
            resident += held
            qresident += held - bias
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
