"""Perplexity, KL divergence and top-1 agreement of next-token distributions.

Windows are non-overlapping; every position but the last of each window predicts the next token. KL divergence
is KL(P_base ‖ P_model) per predicted position, averaged, in nats (the direction llama.cpp reports).
Several models are evaluated in lockstep: the base runs once per window however many models are compared, and each
compared model runs too. When the base itself is one of them, its row is computed from that same pass (its
perplexity measured, its KL divergence 0 and agreement 100% by computation, not assumed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .base_cache import BaseCache


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token at every position but the last, in float32."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def evaluate_quality(models: dict[str, torch.nn.Module], windows: torch.Tensor, base: torch.nn.Module | None = None,
                     progress: bool = True, base_cache: bool | BaseCache = True) -> dict[str, dict]:
    """For each named model: ppl, and (when a base is given) kld and top1 against it. base_cache: the base's
    pass may come from what an earlier run kept (eval.base_cache: the same logits, bit for bit); a BaseCache
    of these windows to read what became of it afterwards."""
    sums = {name: {"nll": 0.0, "kld": 0.0, "top1": 0} for name in models}
    count = 0
    cache = base_cache if isinstance(base_cache, BaseCache) else (
        BaseCache(base, windows) if base is not None and base_cache else None)
    for i, ids in enumerate(tqdm(windows, desc="evaluate", unit="window", disable=not progress)):
        ids = ids.unsqueeze(0)
        target = ids[:, 1:]
        base_lp = None
        if base is not None:
            base_lp = _log_probs(cache.logits(i, ids) if cache is not None else base(ids, use_cache=False).logits)
            base_p = base_lp.exp()                     # once per window, however many models
            base_top = base_lp.max(dim=-1).indices     # the first largest, as argmax, in half the time
        for name, model in models.items():
            # the base as one of the compared models: its pass is the one just run (the same computation)
            lp = base_lp if model is base else _log_probs(model(ids, use_cache=False).logits)
            s = sums[name]
            s["nll"] -= lp.gather(-1, target.unsqueeze(-1)).sum().item()
            if base_lp is not None:
                s["kld"] += (base_p * (base_lp - lp)).sum().item()
                s["top1"] += (base_top == lp.max(dim=-1).indices).sum().item()
        count += target.numel()
    if cache is not None:
        cache.close()
    out = {}
    for name, s in sums.items():
        out[name] = {"ppl": math.exp(s["nll"] / count), "tokens": count}
        if base is not None:
            out[name]["kld"] = s["kld"] / count
            out[name]["top1"] = s["top1"] / count
    return out
