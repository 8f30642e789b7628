"""Generation and its speed: prefill and decode tokens per second, greedy, through transformers' generate."""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False) -> dict:
    """Greedy continuation of `prompt`; returns text, token counts, and timings.

    decode_tokens_per_s excludes the prompt's forward pass, which is timed on its own (prefill).
    """
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    total_s = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(new.numel()),
        "prefill_seconds": prefill_s,
        "seconds": total_s,
        "decode_tokens_per_s": (new.numel() - 1) / decode_s if new.numel() > 1 else None,
        "tokens_per_s": new.numel() / total_s,
    }


def _median(xs):
    return sorted(xs)[len(xs) // 2]


@torch.no_grad()
def decode_speed(model, tokenizer, prompt: str = "The history of the Python language", new_tokens: int = 64,
                 repeats: int = 3) -> float:
    """Median decode tokens/s over `repeats` greedy runs that always generate exactly new_tokens
    (the prompt's own forward pass, timed separately, is subtracted)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
        speeds.append((new_tokens - 1) / max(time.perf_counter() - t0 - pre, 1e-9))
    return _median(speeds)


@torch.no_grad()
def prefill_speed(model, window: torch.Tensor, repeats: int = 3) -> float:
    """Median tokens/s of one forward pass over a window (LongTensor [T])."""
    ids = window.unsqueeze(0)
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        speeds.append(ids.shape[1] / (time.perf_counter() - t0))
    return _median(speeds)
