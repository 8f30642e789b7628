"""The size-budget allocator (lowbit.plan): the Fisher estimate predicts KL, sensitivity is measured on the
right rows, the knapsack is optimal and never over budget, and bad budgets fail clearly."""

import itertools
import math

import pytest

import lowbit
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.formats import GGUFSpec, IntSpec
from lowbit.plan import (KEEP, Option, allocate, candidate_formats, fisher_diagonal, plan_budget, planned_tensors,
                         predicted_kld, sample_tokens, sensitivity)


def _tiny(vocab=24, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # larger weights than the initializer's, so that predictions are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def _kl(model, ref_lp, ids):
    with torch.no_grad():
        lp = F.log_softmax(model(ids).logits.float(), -1)
    return float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())


def test_fisher_predicts_the_kl_of_a_small_weight_change():
    """½ F_ii ε² is the KL that moving weight i by ε causes (to second order), per token, as measured."""
    model = _tiny()
    ids = torch.randint(0, 24, (1, 16), generator=torch.Generator().manual_seed(1))
    windows = ids.repeat(300, 1)   # one fresh draw of every position per repetition
    name = "model.layers.1.mlp.down_proj"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # hundreds of tiny passes: threads only add overhead
    try:
        fisher = fisher_diagonal(model, windows, [name], progress=False)[name]
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        ref_lp = F.log_softmax(model(ids).logits.float(), -1)
    w = model.get_submodule(name).weight
    for flat in torch.topk(fisher.flatten(), 4).indices.tolist():   # weights the prediction says matter
        i, j = divmod(flat, w.shape[1])
        eps = 0.02
        with torch.no_grad():
            w[i, j] += eps
        measured = _kl(model, ref_lp, ids)
        with torch.no_grad():
            w[i, j] -= eps
        predicted = 0.5 * float(fisher[i, j]) * eps ** 2
        assert measured > 0
        assert 0.75 < predicted / measured < 1.33, (i, j, predicted, measured)


def test_sampled_tokens_follow_their_distribution():
    """Frequencies within 5 standard errors of p, never a token of probability 0, rows that do not sum to 1
    taken as proportions."""
    p = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3], [0.0, 0.0, 0.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0, 1.0]])
    n = 40000
    y = sample_tokens(p.repeat_interleave(n, 0), torch.Generator().manual_seed(0)).reshape(3, n)
    freq = torch.stack([torch.bincount(r, minlength=5) for r in y]).double() / n
    want = (p / p.sum(1, keepdim=True)).double()
    assert torch.all(freq[want == 0] == 0)
    assert torch.all((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-12)


def _fisher_by_autograd(model, windows, names, seed=0):
    """The Fisher pass written plainly: log_softmax, one draw per position, autograd.grad of Σ log p(y)."""
    params = {n: model.get_submodule(n).weight for n in names}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    for ids in windows:
        logp = F.log_softmax(model(ids[None]).logits[0].float(), dim=-1)
        y = sample_tokens(logp.detach().exp(), gen, rows=ids.numel())
        for n, g in zip(params, torch.autograd.grad(logp.gather(1, y).sum(), list(params.values()))):
            acc[n] += g.square()
    return {n: a / windows.numel() for n, a in acc.items()}


def test_fisher_equals_the_plain_autograd_pass_and_tied_weights_get_both_gradients():
    """The pass squares each gradient as backward finishes it and writes the logits' gradient itself (onehot − p):
    the same Fisher as autograd.grad through log_softmax, to float32 rounding; the tied embedding's entry holds
    both its uses (the input lookup and the output layer)."""
    model = _tiny()
    windows = torch.randint(0, 24, (3, 16), generator=torch.Generator().manual_seed(2))
    names = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    got = fisher_diagonal(model, windows, names, progress=False, matmul="float32")
    for p in model.parameters():
        p.requires_grad_(True)
    from lowbit.products import products
    with products("float32"):
        want = _fisher_by_autograd(model, windows, names)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-9 * float(want[n].abs().max()))
    emb = model.get_submodule("model.embed_tokens").weight
    used = torch.zeros(emb.shape[0], dtype=torch.bool)
    used[windows.flatten()] = True
    assert bool((got["model.embed_tokens"][used].sum(1) > 0).all())


def test_sampling_a_few_rows_at_a_time_draws_the_same_tokens():
    p = torch.rand(300, 1000).pow(4)
    whole = sample_tokens(p, torch.Generator().manual_seed(3), rows=300)
    for rows in (1, 7, 64):
        assert torch.equal(sample_tokens(p, torch.Generator().manual_seed(3), rows=rows), whole)


def test_fisher_leaves_gradients_as_they_were():
    """requires_grad and any gradient a caller had accumulated are as before (the pass's own are dropped)."""
    model = _tiny()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    down = model.get_submodule("model.layers.0.mlp.down_proj").weight
    down.grad = torch.full_like(down, 7.0)
    fisher_diagonal(model, torch.zeros(1, 8, dtype=torch.long), ["model.embed_tokens", "lm_head",
                                                                   "model.layers.0.mlp.down_proj"], progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert torch.equal(down.grad, torch.full_like(down, 7.0))
    assert all(p.grad is None for p in model.parameters() if p is not down)


def test_tied_weights_are_one_tensor():
    model = _tiny()
    fisher = fisher_diagonal(model, torch.zeros(1, 8, dtype=torch.long), ["model.embed_tokens", "lm_head"],
                             progress=False)
    assert list(fisher) == ["model.embed_tokens"]
    from lowbit.models.arch import arch_for
    names = planned_tensors(model, arch_for(model.config))
    assert names[0] == "model.embed_tokens" and "lm_head" not in names and len(names) == 1 + 2 * 7


def test_sensitivity_is_exact_on_all_rows_and_unbiased_on_a_sample():
    torch.manual_seed(0)
    W = torch.randn(512, 64)
    fisher = torch.rand(512, 64) * torch.linspace(0.01, 3, 512)[:, None]   # rows matter unequally
    spec = IntSpec(3, 32, False)
    exact = 0.5 * float((fisher * (spec.quantize(W).dequantize() - W).square()).sum())
    assert sensitivity(W, fisher, [spec], rows=512)[spec] == pytest.approx(exact, rel=1e-5)
    estimates = [sensitivity(W, fisher, [spec], rows=64, seed=s)[spec] for s in range(20)]
    assert sum(estimates) / len(estimates) == pytest.approx(exact, rel=0.05)
    assert max(abs(e - exact) for e in estimates) < 0.25 * exact


def test_sensitivity_skips_formats_that_do_not_fit():
    W = torch.randn(8, 96)
    losses = sensitivity(W, torch.ones(8, 96), [GGUFSpec("Q4_0"), GGUFSpec("Q4_K")])
    assert list(losses) == [GGUFSpec("Q4_0")]


def _brute(table, budget):
    names = list(table)
    best = None
    for combo in itertools.product(*(table[n] for n in names)):
        if sum(o.nbytes for o in combo) <= budget:
            loss = sum(o.loss for o in combo)
            if best is None or loss < best:
                best = loss
    return best


def test_allocate_is_within_budget_and_near_optimal():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        table = {}
        for t in range(5):
            sizes = sorted(torch.randint(10, 200, (4,), generator=g).tolist())
            scale = float(torch.rand(1, generator=g)) * 10
            table[f"t{t}"] = [Option(f"o{k}", None, s, scale / s ** 1.5) for k, s in enumerate(sizes)]
        budget = int(sum(min(o.nbytes for o in v) for v in table.values()) * (1.2 + trial / 15))
        choice = allocate(table, budget)
        assert sum(o.nbytes for o in choice.values()) <= budget
        best = _brute(table, budget)
        assert predicted_kld(choice) <= best * 1.1 + 1e-12


def test_allocate_gives_sensitive_tensors_more_bits():
    opts = lambda scale: [Option(b, None, n, scale * 2.0 ** -b_) for b, n, b_ in (("q2", 2, 2), ("q4", 4, 4),
                                                                                  ("q8", 8, 8))]
    table = {"dull": opts(1.0), "sensitive": opts(100.0)}
    choice = allocate(table, 10)
    assert choice["sensitive"].nbytes > choice["dull"].nbytes


def test_impossible_budget_is_one_clear_error():
    table = {"a": [Option("x", None, 10, 1.0)]}
    with pytest.raises(LowbitError, match="below the smallest possible"):
        allocate(table, 9)


def test_plan_budget_counts_everything_and_respects_the_target():
    model = _tiny(vocab=64)
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    n_params = sum(p.numel() for p in model.parameters())
    for target in (6.0, 12.0):
        a = plan_budget(model, windows, target, formats="Q4_0,Q8_0", overhead_bytes=1000, progress=False)
        assert a.total_bytes <= a.budget_bytes == int(target * n_params / 8)
        assert a.params == n_params
        norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
        assert a.fixed_bytes == 1000 + 4 * norms
    assert any(o.label == KEEP for o in a.choice.values())   # at 12 bits something stays 16-bit
    rules = a.rules()
    assert len(rules) == len(a.choice) + 1 and rules[1] == {"match": "lm_head", "keep": True}   # the tied head
    assert all(r["match"] in a.choice for r in rules if r["match"] != "lm_head")
    with pytest.raises(LowbitError, match="below the smallest"):
        plan_budget(model, windows, 1.0, formats="Q4_0", progress=False)
    with pytest.raises(LowbitError, match="positive number"):
        plan_budget(model, windows, float("nan"), progress=False)


def test_candidate_formats_by_name():
    assert candidate_formats("Q4_K,int4_g64_asym,int8_pc_sym") == [GGUFSpec("Q4_K"), IntSpec(4, 64, False),
                                                                   IntSpec(8, -1, True)]
    assert len(candidate_formats("gguf")) == 10
    with pytest.raises(LowbitError, match="unknown format"):
        candidate_formats("Q9_Z")


def test_cli_target_bpw_writes_a_gguf_within_budget_and_an_editable_plan(tiny_dir, tmp_path, capsys):
    """`lowbit quantize --target-bpw X --out F.gguf`: the written file's size is at most X bits per parameter
    (everything counted), llama.cpp's reader reads it, and the plan file reproduces the same plan."""
    import gguf

    from lowbit.cli import main
    from lowbit.recipes import Recipe
    model = lowbit.load_model(tiny_dir).model
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    out, plan = tmp_path / "tiny.gguf", tmp_path / "plan.toml"
    code = main(["--quiet", "quantize", str(tiny_dir), "--target-bpw", "10", "--out", str(out), "--plan-out", str(plan),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--fisher-samples", "2"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert out.stat().st_size * 8 <= 10 * n_params   # the tokenizer in the metadata is most of it
    assert "predicted KLD" in text
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "token_embd.weight" in types and "output.weight" not in types   # tied head: one tensor
    recipe = Recipe.from_file(plan, lowbit.RTN(importance=True))
    reread = recipe.plan(lowbit.load_model(tiny_dir).model)
    assert {n for n in reread} <= {n for n, _ in model.named_modules()}
    # an impossible budget: one line, nothing written
    bad = tmp_path / "bad.gguf"
    assert main(["--quiet", "quantize", str(tiny_dir), "--target-bpw", "2", "--out", str(bad),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--fisher-samples", "1"]) == 2
    assert "below the smallest" in capsys.readouterr().err
    assert not bad.exists() and list(tmp_path.glob(".bad*")) == []


@pytest.mark.parametrize("matmul", ["float32", "bfloat16"])
def test_cli_plan_passes_take_the_matmul_option_whatever_the_method(tiny_dir, tmp_path, capsys, matmul):
    """--matmul applies to the Fisher and importance passes of --target-bpw even for round-to-nearest (which
    has no calibration of its own), and the caller's setting is back afterwards; without a plan it is refused."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from lowbit.cli import main
    flag = torch.backends.mkldnn.matmul
    seen = set()
    handle = register_module_forward_pre_hook(
        lambda mod, args: seen.add(flag.fp32_precision) if isinstance(mod, torch.nn.Linear) else None)
    before = flag.fp32_precision
    try:
        code = main(["--quiet", "quantize", str(tiny_dir), "--target-bpw", "10", "--out", str(tmp_path / "t.gguf"),
                     "--calib-samples", "3", "--calib-seqlen", "32", "--fisher-samples", "1", "--matmul", matmul])
    finally:
        handle.remove()
    assert code == 0, capsys.readouterr().err
    assert seen == {"bf16" if matmul == "bfloat16" else "ieee"} and flag.fp32_precision == before
    assert main(["--quiet", "quantize", str(tiny_dir), "--out", str(tmp_path / "r"), "--matmul", matmul]) == 2
    assert "--matmul does not apply to --method rtn" in capsys.readouterr().err
