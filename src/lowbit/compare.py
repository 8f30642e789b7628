"""`lowbit compare`: several methods on the same calibration data, evaluated on the same held-out text.

Each method's checkpoint is saved under OUT/<label>/, so every number in the report can be reproduced with a
separate `lowbit eval OUT/<label>` (same text, context and window count): the evaluation here runs the same
computation, with the base model's distribution computed once per window and shared.
"""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .algorithms import METHODS
from .data import calibration_samples, load_text, token_windows
from .errors import LowbitError
from .eval import decode_speed, environment, evaluate_quality, weight_stats
from .eval.memory import PeakRSS
from .eval.report import write_report
from .export.checkpoint import save_checkpoint
from .models import arch_for, load_model
from .models.sources import DEFAULT_MODEL
from .quantize import quantize
from .recipes import Recipe, Scheme


def label_of(scheme: Scheme) -> str:
    g = "pc" if scheme.spec.group_size == -1 else f"g{scheme.spec.group_size}"
    return f"{scheme.method}-w{scheme.spec.bits}{g}{'' if scheme.spec.symmetric else '-asym'}"


def compare(source: str, schemes: list[Scheme], out: str | Path, *, calib_text: str | None = None,
            calib_samples: int = 64, calib_seqlen: int = 512, seed: int = 0, text: str | None = None,
            ctx: int = 512, max_windows: int | None = None, speed: bool = True, progress: bool = True,
            overwrite: bool = False) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LowbitError(f"output {out} already exists (pass --overwrite to replace it)")
    labels = [label_of(s) for s in schemes]
    if len(set(labels)) != len(labels):
        raise LowbitError("the same method and format are listed twice")
    t_start = time.perf_counter()
    loaded = load_model(source)
    base, tok = loaded.model, loaded.tokenizer
    blocks = arch_for(base.config).blocks
    recipes = {lab: Recipe.default(s, blocks) for lab, s in zip(labels, schemes)}
    for r in recipes.values():
        r.plan(base)  # shapes checked before any work
    windows = token_windows(tok, load_text(text, "evaluation"), ctx, max_windows)
    calib = None
    if any(METHODS[s.method] for s in schemes):
        calib = calibration_samples(tok, load_text(calib_text, "calibration"), calib_samples, calib_seqlen, seed)

    models, rows = {}, {}
    base_name = _base_label(source)
    for lab, scheme in tqdm(list(zip(labels, schemes)), desc="methods", unit="method", disable=not progress):
        model = copy.deepcopy(base)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            quantize(model, recipes[lab], calibration=calib if METHODS[scheme.method] else None, progress=progress)
            seconds = time.perf_counter() - t0
        save_checkpoint(model, tok, out / lab, base=base_name, overwrite=True,
                        extra={"settings": {"compare": True, "calib_samples": calib_samples,
                                            "calib_seqlen": calib_seqlen, "seed": seed}})
        models[lab] = model
        rows[lab] = {"label": lab, **scheme.to_dict(), "calibration_seconds": seconds,
                     "calibration_peak_mib": mem.added_bytes / 2**20}
    quality = evaluate_quality({"base": base, **models}, windows, base=base, progress=progress)
    table = []
    for lab, model in [("base", base), *models.items()]:
        row = rows.get(lab, {"label": f"base ({str(base.dtype).removeprefix('torch.')})", "is_base": True})
        size = weight_stats(model)
        row.update({k: quality[lab][k] for k in ("ppl", "kld", "top1")})
        row.update({k: size[k] for k in ("bytes", "bits_per_weight", "quantized_bits_per_weight")})
        row["checkpoint"] = None if lab == "base" else str(out / lab)
        row["decode_tokens_per_s"] = decode_speed(model, tok) if speed else None
        table.append(row)
    meta = {
        "model": str(source), "text": text or "pydoc (held-out half)", "ctx": ctx, "windows": int(windows.shape[0]),
        "eval_tokens": quality["base"]["tokens"],
        "calibration": None if calib is None else f"{calib_samples} x {calib_seqlen} tokens, seed {seed}, "
                                                  f"{calib_text or 'pydoc (first half)'}",
        "seconds": round(time.perf_counter() - t_start, 1), **environment(),
    }
    write_report(out, table, meta)
    return {"rows": table, "meta": meta}


def _base_label(source: str) -> str:
    return DEFAULT_MODEL if str(source) == DEFAULT_MODEL else str(Path(source).resolve())


def scheme_grid(methods: list[str], bits: list[int], group_sizes: list[int], symmetric: bool,
                options: dict[str, dict], kernel: str = "auto") -> list[Scheme]:
    from .formats import IntSpec
    return [Scheme(m, IntSpec(b, g, symmetric), kernel, options.get(m, {}))
            for b, g, m in itertools.product(bits, group_sizes, methods)]
