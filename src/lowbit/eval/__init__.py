"""Measuring a model: quality against its base, size, speed, memory; the report of a run."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..data import load_text, token_windows
from .base_cache import BaseCache
from .quality import evaluate_quality
from .size import weight_stats
from .speed import check_vocabulary, decode_speed, engine_kind, generate, prefill_speed
from .system import environment, peak_rss_bytes, rss_bytes


def evaluate(model, tokenizer=None, base="recorded", *, text: str | None = None, ctx: int = 512,
             max_windows: int | None = None, speed: bool = True, progress: bool = True,
             engine: str = "auto", arithmetic: str = "torch") -> dict:
    """Evaluate one model on held-out text. Keys: ppl, kld, top1 (None without a base), base, bytes,
    bits_per_weight, seconds, base_pass (eval.base_cache: "reused", "kept" or "off"), and more detail (sizes,
    speeds, memory, environment).

    model: a torch model (with `tokenizer`), a `Loaded`, or a source ("default", a directory, a GGUF file,
    a lowbit checkpoint). base: a float torch model, a source, "recorded" (the base a lowbit checkpoint
    records, if any) or None (no base: perplexity only). arithmetic "llama.cpp": quality is measured in float32
    with llama.cpp's rounding (eval.ggml_arith), what llama.cpp itself measures on the model's GGUF file.
    """
    import os

    from ..errors import LowbitError
    from ..models import Loaded, load_model
    from ..models.sources import is_lowbit_checkpoint, resolve_source

    start = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if isinstance(model, Loaded):
        model, tokenizer = model.model, tokenizer or model.tokenizer
    if tokenizer is None:
        raise LowbitError("evaluate needs the model's tokenizer (pass tokenizer=, or a Loaded or a model source)")
    if base == "recorded":
        base = (getattr(model, "lowbit", None) or {}).get("base")
    base_name = base if isinstance(base, str) and base != "none" else None
    if base_name is not None:
        if is_lowbit_checkpoint(resolve_source(base_name)):
            raise LowbitError(f"the base model must be a float model, {base_name} is a quantized checkpoint")
        base = load_model(base_name).model
    elif isinstance(base, str):   # "none"
        base = None
    windows = token_windows(tokenizer, load_text(text, "evaluation"), ctx, max_windows)
    check_vocabulary(model, windows)
    if arithmetic not in ("torch", "llama.cpp"):
        raise LowbitError(f"arithmetic must be torch or llama.cpp, got {arithmetic!r}")
    cache = BaseCache(base, windows) if base is not None else False

    def quality() -> dict:
        return evaluate_quality({"model": model}, windows, base=base, progress=progress, base_cache=cache)["model"]
    if arithmetic == "llama.cpp":   # in float32 (a 16-bit model goes back to its dtype after: exact)
        from .ggml_arith import ggml_arithmetic
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        # nn.Module's own casts: transformers refuses .float()/.to(dtype) on a model it loaded from a quantized
        # GGUF file, although what it holds are plain float tensors
        with ggml_arithmetic(nn.Module.float(model)):
            q = quality()
        nn.Module.to(model, dtype)
    else:
        q = quality()
    result = {
        "ppl": q["ppl"],
        "kld": q.get("kld"),
        "top1": q.get("top1"),
        **weight_stats(model),
        "eval_tokens": q["tokens"],
        "ctx": ctx,
        "windows": int(windows.shape[0]),
        "text": text or "pydoc",
        "base": base_name if base_name is not None else (None if base is None else "given"),
        "arithmetic": arithmetic,
        "base_pass": cache.state if cache else None,   # eval.base_cache: reused, kept or off
    }
    if speed:
        result["decode_tokens_per_s"] = decode_speed(model, tokenizer, engine=engine)
        result["prefill_tokens_per_s"] = prefill_speed(model, windows[0], engine=engine)
        result["speed_engine"] = engine_kind(model, engine)   # "auto" resolved; a fallback said
    result["rss_bytes"] = rss_bytes()
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["environment"] = environment()
    result["seconds"] = time.perf_counter() - start
    return result


__all__ = ["evaluate", "evaluate_quality", "weight_stats", "generate", "decode_speed", "prefill_speed",
           "environment", "rss_bytes", "peak_rss_bytes"]
