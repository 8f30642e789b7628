"""`lowbit compare` / `lowbit.compare`: several methods on the same calibration data, evaluated on the same held-out text.

Each method's checkpoint is saved under OUT/<label>/, so every number in the report can be reproduced with a
separate `lowbit eval OUT/<label>` (same text, context and window count): the evaluation here runs the same
computation, with the base model's distribution computed once per window and shared.
"""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import QuantConfig, config_for, fixes_format
from .data import CALIB_SAMPLES, CALIB_SEQLEN, calibration_ids, load_text, token_windows
from .errors import LowbitError
from .eval import decode_speed, environment, evaluate_quality, prefill_speed, weight_stats
from .eval.memory import PeakRSS
from .eval.report import write_report
from .export.checkpoint import save_checkpoint
from .io.atomic import check_output
from .models import arch_for, load_model
from .models.sources import source_name
from .nn import QuantLinear
from .quantize import quantize
from .recipes import Recipe


def label_of(scheme: QuantConfig, extra: dict | None = None) -> str:
    """rtn-w4g64-asym, gptq-w3pc, llm-int8, fp8-act=fp8, ...: the method, its format unless the method fixes
    it, and any options given explicitly in the method list."""
    if fixes_format(scheme.method):
        label = scheme.method
    else:
        g = "pc" if scheme.spec.group_size == -1 else f"g{scheme.spec.group_size}"
        label = f"{scheme.method}-w{scheme.spec.bits}{g}{'' if scheme.spec.symmetric else '-asym'}"
    return label + "".join(f"-{k}={v}" for k, v in (extra or {}).items())


def compare(source: str, schemes: list[QuantConfig] | dict[str, QuantConfig], out: str | Path, *,
            calib_text: str | None = None, calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN,
            seed: int = 0, text: str | None = None, ctx: int = 512, max_windows: int | None = None,
            speed: bool = True, progress: bool = True, overwrite: bool = False, engine: str = "auto") -> dict:
    """Quantize `source` once per configuration (a list, labelled by `label_of`, or label -> configuration) on
    the same calibration windows and evaluate all of them on the same held-out windows; writes OUT/report.md,
    report.json, tradeoff.png and one checkpoint per label. Returns {"rows": [...], "meta": {...}}."""
    out = Path(out)
    check_output(out, overwrite or out.is_dir() and not any(out.iterdir()))   # an empty directory may be used
    given = list(schemes.values()) if isinstance(schemes, dict) else list(schemes)
    if not given or not all(isinstance(s, QuantConfig) for s in given):
        raise LowbitError("compare needs one or more quantization configurations (e.g. [lowbit.RTN(), lowbit.GPTQ()])")
    if not isinstance(schemes, dict):
        labels = [label_of(s) for s in schemes]
        if len(set(labels)) != len(labels):
            raise LowbitError("the same method and format are listed twice")
        schemes = dict(zip(labels, schemes))
    labels, schemes = list(schemes), list(schemes.values())
    t_start = time.perf_counter()
    loaded = load_model(source)
    base, tok = loaded.model, loaded.tokenizer
    blocks = arch_for(base).blocks
    recipes = {lab: Recipe.default(s, blocks) for lab, s in zip(labels, schemes)}
    for r in recipes.values():
        r.plan(base)  # shapes checked before any work
    windows = token_windows(tok, load_text(text, "evaluation"), ctx, max_windows)
    calib = None
    if any(s.needs_calibration for s in schemes):
        calib = calibration_ids(calib_text, tok, calib_samples, calib_seqlen, seed)

    models, rows = {}, {}
    base_name = source_name(source)
    for lab, scheme in tqdm(list(zip(labels, schemes)), desc="methods", unit="method", disable=not progress):
        model = copy.deepcopy(base)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            quantize(model, recipes[lab], calibration=calib if scheme.needs_calibration else None, progress=progress)
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
        row["decode_tokens_per_s"] = decode_speed(model, tok, engine=engine) if speed else None
        row["prefill_tokens_per_s"] = prefill_speed(model, windows[0], engine=engine) if speed else None
        hp = [m.high_precision_fraction() for m in model.modules() if isinstance(m, QuantLinear)]
        hp = [h for h in hp if h is not None]
        if hp:  # LLM.int8(): share of input dimensions, and of multiply-adds, that ran in high precision
            row["high_precision_fraction"] = sum(h["dims_high"] for h in hp) / sum(h["dims"] for h in hp)
            row["high_precision_mac_fraction"] = sum(h["macs_high"] for h in hp) / sum(h["macs"] for h in hp)
        table.append(row)
    meta = {
        "model": str(source), "text": text or "pydoc (held-out half)", "ctx": ctx, "windows": int(windows.shape[0]),
        "eval_tokens": quality["base"]["tokens"],
        "calibration": None if calib is None else f"{calib_samples} x {calib_seqlen} tokens, seed {seed}, "
                                                  f"{calib_text or 'pydoc (first half)'}",
        "speed_engine": engine if speed else None,
        "seconds": round(time.perf_counter() - t_start, 1), **environment(),
    }
    write_report(out, table, meta)
    return {"rows": table, "meta": meta}


def parse_method(entry: str) -> tuple[str, dict]:
    """"NAME" or "NAME:key=value,key=value" (values parsed as numbers or booleans where they are)."""
    name, _, rest = entry.partition(":")
    options = {}
    for item in filter(None, rest.split(";") if ";" in rest else rest.split("+")):
        key, eq, value = item.partition("=")
        if not eq:
            raise LowbitError(f"method option '{item}' in '{entry}' needs key=value")
        options[key.strip()] = _parse_value(value.strip())
    return name.strip(), options


def _parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def scheme_grid(methods: list[str], bits: list[int], group_sizes: list[int], symmetric: bool,
                options: dict[str, dict], kernel: str = "auto") -> dict[str, QuantConfig]:
    """Label -> configuration, one per method entry and format; methods that fix their format appear once."""
    from .formats import IntSpec
    out = {}
    for b, g, entry in itertools.product(bits, group_sizes, methods):
        name, extra = parse_method(entry)
        scheme = config_for(name, IntSpec(b, g, symmetric), kernel, {**options.get(name, {}), **extra})
        out.setdefault(label_of(scheme, extra), scheme)
    return out
