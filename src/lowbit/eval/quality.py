"""Perplexity, KL divergence and top-1 agreement of next-token distributions.

Windows are non-overlapping; every position but the last of each window predicts the next token. KL divergence
is KL(P_base ‖ P_model) per predicted position, averaged, in nats (the direction llama.cpp reports).
Several models are evaluated in lockstep: the base runs once per window however many models are compared, and each
compared model runs too. When the base itself is one of them, its row is computed from that same pass (its
perplexity measured, its KL divergence 0 and agreement 100% by computation, not assumed).
Every pass runs its float32 products exactly (lowbit.products: IEEE float32, by the library `float32_gemm` names
for this CPU), whatever precision a caller set for calibration.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..argmax import last_dim_argmax
from .base_cache import BaseCache


class Scratch:
    """Float32 buffers reused from window to window. The per-window tensors are large (511 x 49,152 floats,
    100 MB, for the default model): allocated afresh, each arrives as new pages the OS must zero and map, which
    cost about as much as the arithmetic. Reused, the same operations give the same numbers, the metrics in
    about half the time (about 0.07 s of a window's 1.2 s on 2 cores; BENCHMARKS.md)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: torch.Size) -> torch.Tensor:
        b = self.buffers.get(name)
        if b is None or b.shape != shape:
            b = self.buffers[name] = torch.empty(shape, dtype=torch.float32)
        return b

    def log_probs(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next token at every position but the last, in float32 (the logits cast
        first, as F.log_softmax(logits.float()))."""
        x = logits[:, :-1]
        return torch.log_softmax(x, -1, dtype=torch.float32, out=self(name, x.shape))


@torch.no_grad()
def evaluate_quality(models: dict[str, torch.nn.Module], windows: torch.Tensor, base: torch.nn.Module | None = None,
                     progress: bool = True, base_cache: bool | BaseCache = True) -> dict[str, dict]:
    """For each named model: ppl, and (when a base is given) kld and top1 against it. base_cache: the base's
    pass may come from what an earlier run kept (eval.base_cache: the same logits, bit for bit); a BaseCache
    of these windows to read what became of it afterwards."""
    from ..products import products   # here: lowbit.products reads the CPU's features from this package
    with products("float32"):
        return _evaluate(models, windows, base, progress, base_cache)


def _evaluate(models, windows, base, progress, base_cache) -> dict[str, dict]:
    sums = {name: {"nll": 0.0, "kld": 0.0, "top1": 0} for name in models}
    count = 0
    cache = base_cache if isinstance(base_cache, BaseCache) else (
        BaseCache(base, windows) if base is not None and base_cache else None)
    scratch = Scratch()
    for i, ids in enumerate(tqdm(windows, desc="evaluate", unit="window", disable=not progress)):
        ids = ids.unsqueeze(0)
        target = ids[:, 1:]
        base_lp = None
        if base is not None:
            base_lp = scratch.log_probs("base", cache.logits(i, ids) if cache is not None
                                        else base(ids, use_cache=False).logits)
            base_p = torch.exp(base_lp, out=scratch("p", base_lp.shape))   # once per window, however many models
            base_top = last_dim_argmax(base_lp)        # argmax's first largest, a third of max(dim)'s time
        for name, model in models.items():
            # the base as one of the compared models: its pass is the one just run (the same computation)
            lp = base_lp if model is base else scratch.log_probs("model", model(ids, use_cache=False).logits)
            s = sums[name]
            s["nll"] -= lp.gather(-1, target.unsqueeze(-1)).sum().item()
            if base_lp is not None:
                terms = torch.sub(base_lp, lp, out=scratch("terms", lp.shape)).mul_(base_p)   # p·(log p − log q)
                s["kld"] += terms.sum().item()
                s["top1"] += (base_top == last_dim_argmax(lp)).sum().item()
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
