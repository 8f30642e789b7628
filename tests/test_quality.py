import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.eval import evaluate_quality
from lowbit.products import products

from conftest import quantized, truncated


def reference_quality(base_logits, logits, targets) -> dict:
    """ppl, KL(P_base ‖ P) and top-1 agreement straight from logits (one row per predicted position), with
    torch's own kl_div rather than lowbit's sum."""
    lp = F.log_softmax(logits, -1)
    kld = F.kl_div(lp, F.log_softmax(base_logits, -1), log_target=True, reduction="batchmean")
    return {"ppl": math.exp(-lp.gather(-1, targets.unsqueeze(-1)).mean().item()), "kld": kld.item(),
            "top1": (base_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()}


def with_lm_head(model, weight):
    """A copy of the model whose lm_head is `weight`; a new Parameter unties it from the embedding, which stays."""
    m = copy.deepcopy(model)
    m.lm_head.weight = torch.nn.Parameter(weight)
    assert torch.equal(m.model.embed_tokens.weight, model.model.embed_tokens.weight)
    return m


@pytest.fixture(scope="module")
def window(eval_ids):
    return eval_ids[:1]


@pytest.fixture(scope="module")
def base_pass(base, window):
    """The base's final hidden states and logits at the window's predicting positions, in float64."""
    with torch.no_grad():
        hidden = base.model(window, use_cache=False).last_hidden_state[0, :-1]
        return {"hidden": hidden.double(), "logits": base.lm_head(hidden).double(), "targets": window[0, 1:]}


def test_perplexity_matches_transformers_loss(base, eval_ids):
    r = evaluate_quality({"m": base}, eval_ids, base=None, progress=False)["m"]
    with torch.no_grad():
        losses = [base(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in eval_ids]
    assert r["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert r["tokens"] == eval_ids.numel() - eval_ids.shape[0]


def test_copy_of_base_has_zero_kld(base, window):
    # a distinct object, so nothing can be taken from the base's own pass: its row is computed, and equal
    r = evaluate_quality({"copy": copy.deepcopy(base)}, window, base=base, progress=False)["copy"]
    assert r["kld"] == 0 and r["top1"] == 1


def test_logits_divided_by_t_match_the_tempered_base(base, window, base_pass):
    t = 2.0  # a power of two: dividing the weight is exact, so the model's logits are exactly the base's over t
    tempered = with_lm_head(base, base.lm_head.weight.detach() / t)
    r = evaluate_quality({"tempered": tempered}, window, base=base, progress=False)["tempered"]
    ref = reference_quality(base_pass["logits"], base_pass["logits"] / t, base_pass["targets"])
    assert ref["kld"] > 0.01 and base.lm_head.weight is base.model.embed_tokens.weight
    for key in ("ppl", "kld", "top1"):
        assert r[key] == pytest.approx(ref[key], rel=1e-4), key


def test_one_changed_weight_gives_positive_kld(base, window, base_pass):
    # one weight of the lm_head: token t's logit moves by delta * h_j, h the final hidden state, j its largest
    # dimension, so the changed logits are known without running the changed model
    t, j = 13, int(base_pass["hidden"].abs().mean(0).argmax())
    weight = base.lm_head.weight.detach().clone()
    weight[t, j] += 1.0
    changed = with_lm_head(base, weight)
    r = evaluate_quality({"changed": changed}, window, base=base, progress=False)["changed"]
    logits = base_pass["logits"].clone()
    logits[:, t] += (weight[t, j].double() - base.lm_head.weight[t, j].double()) * base_pass["hidden"][:, j]
    ref = reference_quality(base_pass["logits"], logits, base_pass["targets"])
    assert r["kld"] > 0 and r["top1"] < 1
    for key in ("ppl", "kld", "top1"):
        assert r[key] == pytest.approx(ref[key], rel=1e-4), key


def test_int8_close_to_base_and_int4_in_between(base, eval_ids):
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
    # bit-equal to transformers' only with the reference's arithmetic: by default the attention runs lowbit's
    # kernel, and this prompt's sixth token is a near-tie (two logits one bfloat16 step apart)
    r = lowbit.generate(q, tokenizer, "The capital of France is", max_new_tokens=8, engine="eager",
                        attention="reference", dense="reference")
    assert r["new_tokens"] >= 1 and isinstance(r["text"], str)
    ref = lowbit.generate(q, tokenizer, "The capital of France is", max_new_tokens=8, engine="hf")
    assert ref["engine"] == "hf" and ref["tokens"] == r["tokens"] and ref["text"] == r["text"]


def body_calls(model) -> list:
    """Counts the runs of the model's decoder blocks (what the base cache skips)."""
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_the_base_pass_is_kept_and_gives_the_same_numbers(base, eval_ids, tmp_path, monkeypatch):
    """A second evaluation against the same base on the same windows runs the base's body for window 0 only
    (the check) and reports exactly what a run without the cache reports; the model's forward is left intact."""
    from lowbit.eval.base_cache import cache_dir
    monkeypatch.setenv("LOWBIT_EVAL_CACHE_DIR", str(tmp_path))
    b = truncated(base, 2)
    model = quantized(truncated(base, 2), bits=4, group_size=64)
    want = evaluate_quality({"q": model}, eval_ids, base=b, progress=False, base_cache=False)
    calls = body_calls(b)
    first = evaluate_quality({"q": model}, eval_ids, base=b, progress=False)
    assert len(calls) == len(eval_ids) and len(list(cache_dir().glob("*.safetensors"))) == 1
    calls.clear()
    second = evaluate_quality({"q": model}, eval_ids, base=b, progress=False)
    assert len(calls) == 1
    assert first == want and second == want
    assert "forward" not in vars(b.model)


def test_a_base_cache_that_does_not_match_is_recomputed(base, eval_ids, tmp_path, monkeypatch):
    """A damaged file, or one whose window 0 differs from what this base computes, is not used: every window
    runs in full, the numbers are unchanged and the file is rewritten. LOWBIT_EVAL_CACHE=0 keeps nothing."""
    from safetensors.torch import load_file, save_file

    from lowbit.eval.base_cache import cache_dir
    monkeypatch.setenv("LOWBIT_EVAL_CACHE_DIR", str(tmp_path))
    b = truncated(base, 2)
    model = quantized(truncated(base, 2), bits=4, group_size=64)
    want = evaluate_quality({"q": model}, eval_ids, base=b, progress=False)
    (path,) = cache_dir().glob("*.safetensors")
    good = path.read_bytes()
    states = load_file(str(path))
    states["w0"] = states["w0"] * 1.001
    save_file(states, str(path))
    for content in (None, good[: len(good) // 2], b"not a safetensors file"):
        if content is not None:
            path.write_bytes(content)
        calls = body_calls(b)
        assert evaluate_quality({"q": model}, eval_ids, base=b, progress=False) == want
        assert len(calls) == len(eval_ids) and path.read_bytes() == good
        b.model.layers[0]._forward_pre_hooks.clear()
    monkeypatch.setenv("LOWBIT_EVAL_CACHE", "0")
    path.unlink()
    assert evaluate_quality({"q": model}, eval_ids, base=b, progress=False) == want
    assert not list(cache_dir().glob("*"))


def test_the_base_among_the_compared_models_runs_once_per_window(base, eval_ids):
    """Its row comes from the base's own pass and equals that of an identical copy run separately."""
    b = truncated(base, 2)
    twin = copy.deepcopy(b)
    calls = body_calls(b)
    got = evaluate_quality({"base": b}, eval_ids, base=b, progress=False, base_cache=False)
    assert len(calls) == len(eval_ids)
    want = evaluate_quality({"base": twin}, eval_ids, base=b, progress=False, base_cache=False)
    assert got == want and got["base"]["kld"] == 0 and got["base"]["top1"] == 1


def test_cache_directories_stay_bounded(tmp_path):
    """Beyond the limit the least recently used entries (files or directories) go, never the one just written
    and never a temporary one being written."""
    import os

    from lowbit.io.lru import trim
    for i, name in enumerate(["old", "mid", "new", ".tmp-1"]):
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))
    d = tmp_path / "olddir"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 1000)
    os.utime(d, (999, 999))
    removed = trim(tmp_path, 2500, keep=tmp_path / "old.safetensors")
    assert sorted(p.name for p in removed) == ["mid.safetensors", "olddir"]
    assert sorted(f.name for f in tmp_path.iterdir()) == [".tmp-1.safetensors", "new.safetensors", "old.safetensors"]


def test_evaluate_says_whether_the_base_pass_was_reused(base, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_EVAL_CACHE_DIR", str(tmp_path))
    b = truncated(base, 2)
    model = quantized(truncated(base, 2), bits=4, group_size=64)
    runs = [lowbit.evaluate(model, tokenizer, base=b, ctx=64, max_windows=3, speed=False, progress=False)
            for _ in range(2)]
    assert [r["base_pass"] for r in runs] == ["kept", "reused"]
    assert all(runs[1][k] == runs[0][k] for k in ("ppl", "kld", "top1"))
    monkeypatch.setenv("LOWBIT_EVAL_CACHE", "0")
    assert lowbit.evaluate(model, tokenizer, base=b, ctx=64, max_windows=3, speed=False,
                           progress=False)["base_pass"] == "off"
    assert lowbit.evaluate(model, tokenizer, base=None, ctx=64, max_windows=3, speed=False,
                           progress=False)["base_pass"] is None


def test_reused_buffers_give_the_numbers_of_fresh_tensors(base, eval_ids):
    # evaluate_quality reuses its per-window buffers; over several windows and two compared models the sums must
    # be those of the plain expressions on fresh tensors, bit for bit (with the products evaluation runs:
    # exact float32 by the CPU's library, lowbit.products)
    weight = base.lm_head.weight.detach().clone()
    weight[13] += 0.5
    models = {"changed": with_lm_head(base, weight), "same": base}
    windows = eval_ids[:, :128]   # two windows: the buffers are reused across windows and models, whatever the length
    got = evaluate_quality(models, windows, base=base, progress=False, base_cache=False)
    sums = {n: [0.0, 0.0, 0] for n in models}
    with torch.no_grad(), products("float32"):
        for ids in windows:
            ids = ids.unsqueeze(0)
            base_lp = F.log_softmax(base(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            for name, model in models.items():
                lp = F.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
                sums[name][0] -= lp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum().item()
                sums[name][1] += (base_lp.exp() * (base_lp - lp)).sum().item()
                sums[name][2] += (base_lp.max(-1).indices == lp.max(-1).indices).sum().item()
    count = windows[:, 1:].numel()
    for name, (nll, kld, top1) in sums.items():
        assert got[name]["ppl"] == math.exp(nll / count), name
        assert got[name]["kld"] == kld / count and got[name]["top1"] == top1 / count, name
    assert got["changed"]["kld"] > 0
