"""Measuring a model: quality against its base, size, speed, memory; the report of a run."""

from __future__ import annotations

import time

from ..data import load_text, token_windows
from .quality import evaluate_quality
from .size import weight_stats
from .speed import decode_speed, generate, prefill_speed
from .system import environment, peak_rss_bytes, rss_bytes


def evaluate(model, tokenizer, base=None, *, text: str | None = None, ctx: int = 512, max_windows: int | None = None,
             speed: bool = True, progress: bool = True, engine: str = "compiled") -> dict:
    """Evaluate one model on held-out text. Keys: ppl, kld, top1 (None without a base), bytes,
    bits_per_weight, seconds, and more detail (sizes, speeds, memory, environment)."""
    start = time.perf_counter()
    windows = token_windows(tokenizer, load_text(text, "evaluation"), ctx, max_windows)
    q = evaluate_quality({"model": model}, windows, base=base, progress=progress)["model"]
    result = {
        "ppl": q["ppl"],
        "kld": q.get("kld"),
        "top1": q.get("top1"),
        **weight_stats(model),
        "eval_tokens": q["tokens"],
        "ctx": ctx,
        "windows": int(windows.shape[0]),
        "text": text or "pydoc",
    }
    if speed:
        result["decode_tokens_per_s"] = decode_speed(model, tokenizer, engine=engine)
        result["prefill_tokens_per_s"] = prefill_speed(model, windows[0], engine=engine)
        result["speed_engine"] = engine
    result["rss_bytes"] = rss_bytes()
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["environment"] = environment()
    result["seconds"] = time.perf_counter() - start
    return result


__all__ = ["evaluate", "evaluate_quality", "weight_stats", "generate", "decode_speed", "prefill_speed",
           "environment", "rss_bytes", "peak_rss_bytes"]
