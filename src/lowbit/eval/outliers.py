"""Activation outlier analysis: which input dimensions of which Linears carry large values, how often,
whether they recur, and what they cost a per-tensor int8 quantizer.

For every group of Linears sharing an input (models.arch feeds: attention input, o_proj input, MLP input,
down_proj input) over calibration text: the largest |x|, the dimensions where some |x| exceeds the threshold
and the fraction of tokens in which any does, the top dimensions by max |x|, and the relative int8 rounding
error of the ordinary values (|x| ≤ threshold) under one per-tensor scale, with the outliers in the tensor
(what W8A8 with a static scale does) and without them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..io.atomic import atomic_write_text, save_figure
from ..models.arch import arch_for
from ..formats.act import ActSpec

GROUP_NAMES = {0: "attn_in", 1: "o_in", 2: "mlp_in", 3: "down_in"}


class _Stats:
    def __init__(self, k: int, threshold: float):
        self.threshold = threshold
        self.absmax = torch.zeros(k)
        self.over = torch.zeros(k)       # tokens with |x| > threshold, per dimension
        self.tokens = 0
        self.tokens_any_over = 0
        self.err_with = self.err_without = self.norm = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        a = x.abs()
        big = a > self.threshold
        self.absmax = torch.maximum(self.absmax, a.amax(0))
        self.over += big.sum(0)
        self.tokens += x.shape[0]
        self.tokens_any_over += int(big.any(1).sum())
        normal = ~big
        for scale, attr in ((a.max() / 127, "err_with"), (a[normal].max() / 127 if normal.any() else a.max() / 127, "err_without")):
            q = torch.round(x / scale).clamp(-127, 127) * scale
            setattr(self, attr, getattr(self, attr) + float(((q - x)[normal] ** 2).sum()))
        self.norm += float((x[normal] ** 2).sum())


@torch.no_grad()
def analyze_outliers(model, samples: torch.Tensor, threshold: float = ActSpec.threshold, top: int = 8) -> dict:
    arch = arch_for(model)
    blocks = model.get_submodule(arch.blocks)
    stats, handles = {}, []
    for i, block in enumerate(blocks):
        for g, (_producer, linears, _inspect) in enumerate(arch.feeds):
            lin = block.get_submodule(linears[0])
            key = f"{i}.{GROUP_NAMES.get(g, linears[0])}"
            stats[key] = _Stats(lin.in_features, threshold)
            handles.append(lin.register_forward_pre_hook(lambda m, args, s=stats[key]: s.add(args[0])))
    try:
        for ids in samples:
            model(ids.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    layers = {}
    for key, s in stats.items():
        over_dims = torch.nonzero(s.over > 0).squeeze(1)
        order = torch.argsort(s.absmax, descending=True)[:top]
        layers[key] = {
            "max_abs": float(s.absmax.max()),
            "dims_over_threshold": int(over_dims.numel()),
            "dims_total": int(s.absmax.numel()),
            "tokens_with_outlier": s.tokens_any_over / s.tokens,
            "outlier_dims": {int(d): {"max_abs": float(s.absmax[d]), "token_fraction": float(s.over[d] / s.tokens)}
                             for d in over_dims[torch.argsort(s.absmax[over_dims], descending=True)][:top]},
            "top_dims": [int(d) for d in order],
            "top_abs": [float(s.absmax[d]) for d in order],
            "int8_rel_error_normal_values": (s.err_with / s.norm) ** 0.5 if s.norm else None,
            "int8_rel_error_normal_values_without_outliers": (s.err_without / s.norm) ** 0.5 if s.norm else None,
        }
    # recurrence across layers: how many groups of each kind have a dimension among their top ones
    recurring = {}
    for kind in set(k.split(".", 1)[1] for k in layers):
        group = [v for k, v in layers.items() if k.endswith("." + kind)]
        counts = Counter(d for v in group for d in v["top_dims"])
        recurring[kind] = [{"dim": d, "layers": c, "of": len(group)} for d, c in counts.most_common(top) if c > 1]
    over = [v for v in layers.values() if v["dims_over_threshold"]]
    return {
        "threshold": threshold,
        "tokens": int(samples.numel()),
        "max_abs": max(v["max_abs"] for v in layers.values()),
        "groups_with_outliers": len(over),
        "groups": len(layers),
        "recurring_top_dims": recurring,
        "layers": layers,
    }


def plot_outliers(result: dict, path: Path, top: int = 32) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    kinds = sorted(set(k.split(".", 1)[1] for k in result["layers"]), key=lambda k: list(GROUP_NAMES.values()).index(k)
                   if k in GROUP_NAMES.values() else 99)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        keys = sorted((k for k in result["layers"] if k.endswith("." + kind)), key=lambda k: int(k.split(".")[0]))
        rows = [result["layers"][k] for k in keys]
        score = Counter()
        for r in rows:
            for d, a in zip(r["top_dims"], r["top_abs"]):
                score[d] = max(score[d], a)
        dims = [d for d, _ in score.most_common(top)]
        grid = np.zeros((len(rows), len(dims)))
        for i, r in enumerate(rows):
            lookup = dict(zip(r["top_dims"], r["top_abs"]))
            grid[i] = [lookup.get(d, np.nan) for d in dims]
        im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest",
                       norm=LogNorm(vmin=max(0.1, float(np.nanmin(grid))), vmax=float(np.nanmax(grid))))
        ax.set_title(f"{kind}: max |x| of the top dims (log color)\n(blank: not among that layer's top {len(rows[0]['top_dims'])})")
        ax.set_xlabel("input dimension")
        ax.set_ylabel("block")
        ax.set_xticks(range(len(dims)))
        ax.set_xticklabels(dims, rotation=90, fontsize=6)
        ax.set_yticks(range(0, len(rows), 5))
        ax.set_yticklabels([keys[i].split(".")[0] for i in range(0, len(rows), 5)])
        fig.colorbar(im, ax=ax, shrink=0.7)
    fig.suptitle(f"Activation outliers (threshold {result['threshold']}, {result['tokens']} tokens): "
                 f"largest |x| = {result['max_abs']:.1f}")
    save_figure(fig, path)


def write_outliers(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "outliers.json", json.dumps(result, indent=2))
    plot_outliers(result, out / "outliers.png")
