import math

import pytest
import torch

import lowbit
from lowbit.eval import evaluate_quality

from conftest import quantized


def test_perplexity_matches_transformers_loss(base, eval_ids):
    r = evaluate_quality({"m": base}, eval_ids, base=None, progress=False)["m"]
    with torch.no_grad():
        losses = [base(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in eval_ids]
    assert r["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert r["tokens"] == eval_ids.numel() - eval_ids.shape[0]


def test_base_against_itself_has_zero_kld(base, eval_ids):
    r = evaluate_quality({"m": base}, eval_ids[:1], base=base, progress=False)["m"]
    assert r["kld"] == 0 and r["top1"] == 1


def test_int8_close_to_base_and_int4_in_between(base, eval_ids):
    import copy
    q8 = quantized(copy.deepcopy(base), 8, -1, True)
    q4 = quantized(copy.deepcopy(base), 4, 64, False)
    r = evaluate_quality({"fp32": base, "int8": q8, "int4": q4}, eval_ids, base=base, progress=False)
    assert r["int8"]["kld"] < 0.02 and r["int8"]["top1"] > 0.93
    assert abs(r["int8"]["ppl"] / r["fp32"]["ppl"] - 1) < 0.02
    assert r["int8"]["kld"] < r["int4"]["kld"] < 1.0
    assert r["int4"]["top1"] < r["int8"]["top1"]


def test_evaluate_reports_the_documented_keys(fresh, tokenizer, base):
    q = quantized(fresh, 4, 64, True)
    r = lowbit.evaluate(q, tokenizer, base, ctx=64, max_windows=2, speed=True, progress=False, engine="eager")
    for key in ("ppl", "kld", "top1", "bytes", "bits_per_weight", "seconds"):
        assert r[key] is not None
    assert 6 < r["bits_per_weight"] < 7  # 4.25-bit blocks plus the 16-bit embedding/lm_head
    assert r["decode_tokens_per_s"] > 0


def test_generate_returns_text(fresh, tokenizer):
    q = quantized(fresh, 8, -1, True)
    r = lowbit.generate(q, tokenizer, "The capital of France is", max_new_tokens=8, engine="eager")
    assert r["new_tokens"] >= 1 and isinstance(r["text"], str)
    ref = lowbit.generate(q, tokenizer, "The capital of France is", max_new_tokens=8, engine="hf")
    assert ref["engine"] == "hf" and ref["tokens"] == r["tokens"] and ref["text"] == r["text"]
