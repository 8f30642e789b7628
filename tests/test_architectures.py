"""Any transformers decoder: tiny random-weight models built from the real configuration classes of many
families, run through discovery, every method, checkpoints, MoE handling and the unsupported-model errors."""

import copy
import functools
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.models.arch import ARCHES, arch_for
from lowbit.models.calibration import capture_block_inputs
from lowbit.models.discovery import discover_arch, discover_feeds, fold_is_exact
from lowbit.models.moe import ExpertList, route_all_experts, unstack_experts
from lowbit.nn import QuantLinear

DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere"]
MOE = ["qwen3_moe", "mixtral"]
FAMILIES = DENSE + MOE


@functools.lru_cache(maxsize=None)
def _tiny(model_type: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, vocab_size=vocab, max_position_embeddings=256, num_experts=4,
        num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # norms away from their init, so that folds into them are really exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny(model_type, tokenizer):
    return copy.deepcopy(_tiny(model_type, len(tokenizer)))


def ids(n=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n, t), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize("family", ["llama", "qwen3"] + [pytest.param(f, marks=pytest.mark.slow)
                                                         for f in ("mistral", "qwen2")])
def test_discovery_reproduces_the_table(family, tokenizer):
    model = tiny(family, tokenizer)
    table = ARCHES[family]
    found = discover_arch(model)
    assert {k: found[k] for k in ("blocks", "embed", "final_norm", "lm_head", "rotary")} == \
        {"blocks": table.blocks, "embed": table.embed, "final_norm": table.final_norm, "lm_head": table.lm_head,
         "rotary": table.rotary}
    assert set(found["no_clip"]) == {n.rpartition(".")[2] for n in table.no_clip}
    inp = capture_block_inputs(model, ids(1))
    feeds, offsets, fallbacks = discover_feeds(model.model.layers[0], inp.hidden[0], inp.kwargs[0])
    assert feeds == table.feeds and offsets == () and fallbacks == ()


def test_gemma_norm_folds_only_as_one_plus_w(tokenizer):
    """Gemma's RMSNorm multiplies by (1 + w): dividing w by s is not exact, (1 + w) / s - 1 is; its post-norms
    sit between attention/MLP and the residual, so they feed no Linear and are no producer."""
    model = tiny("gemma3_text", tokenizer)
    block = model.model.layers[0]
    inp = capture_block_inputs(model, ids(1))
    h, kw = inp.hidden[0], inp.kwargs[0]
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert not fold_is_exact(block, h, kw, "input_layernorm", qkv, offset=False)
    assert fold_is_exact(block, h, kw, "input_layernorm", qkv, offset=True)
    feeds, offsets, _ = discover_feeds(block, h, kw)
    assert set(offsets) == {"input_layernorm", "pre_feedforward_layernorm"}
    producers = {p for p, _, _ in feeds}
    assert "post_attention_layernorm" not in producers and "post_feedforward_layernorm" not in producers
    # a Linear producer: the fold into v_proj is exact, into gate_proj (through the activation) it is not
    assert fold_is_exact(block, h, kw, "mlp.up_proj", ["mlp.down_proj"])
    assert not fold_is_exact(block, h, kw, "mlp.gate_proj", ["mlp.down_proj"])


@pytest.mark.parametrize("family", [f if f in ("gemma3_text", "qwen3_moe") else
                                    pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_rtn_runs_and_reloads_to_identical_logits(family, tokenizer, tmp_path):
    model = tiny(family, tokenizer)
    x = ids(2, 16)
    ref = logits(model, x)
    lowbit.quantize(model, lowbit.RTN(bits=4, group_size=16), progress=False)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    assert n_linear == 0 or family in MOE    # every Linear of the blocks quantized (routers of MoE excepted)
    out = logits(model, x)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 0
    lowbit.save(model, tmp_path / "q", tokenizer)
    back = lowbit.load(tmp_path / "q").model
    assert torch.equal(logits(back, x), out)


def _block_error(block, plan_cfg, arch, calib, held) -> float:
    from lowbit.blockwise import quantize_block
    from lowbit.models.calibration import run_block
    b = copy.deepcopy(block)
    ref = run_block(b, held).hidden
    plan = {n: plan_cfg for n, m in b.named_modules() if isinstance(m, nn.Linear)}
    quantize_block(b, calib, plan, arch)       # leaves each planned Linear holding its dequantized weight
    out = run_block(b, held).hidden
    return sum((o - r).pow(2).sum().item() for o, r in zip(out, ref)) / sum(r.numel() for r in ref)


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f != "gemma3_text" else f
                                    for f in ["llama", "gemma3_text", "phi3", "olmo2", "qwen3_moe"]])
def test_calibrated_methods_lower_block_error_below_rtn(family, tokenizer):
    """Block 0 in float32 with the feeds discovered on it: GPTQ and AWQ beat round-to-nearest on the block
    output error over their calibration inputs (the error they minimize)."""
    from dataclasses import replace
    model = tiny(family, tokenizer)
    unstack_experts(model)
    calib = capture_block_inputs(model, ids(4, 32, seed=1))
    block = model.model.layers[0]
    feeds, offsets, fallbacks = discover_feeds(block, calib.hidden[0], calib.kwargs[0])
    arch = replace(arch_for(model), feeds=feeds, fold_offset=offsets, fallbacks=fallbacks)
    err = {name: _block_error(block, cfg, arch, calib, calib) for name, cfg in [
        ("rtn", lowbit.RTN(bits=3, group_size=16)), ("gptq", lowbit.GPTQ(bits=3, group_size=16)),
        ("awq", lowbit.AWQ(bits=3, group_size=16, n_grid=5))]}
    assert err["gptq"] < err["rtn"] and err["awq"] < err["rtn"], err


@pytest.mark.parametrize("method", ["fp8"] + [pytest.param(m, marks=pytest.mark.slow)
                                            for m in ("w8a8-naive", "w8a8-smooth", "llm-int8")])
def test_other_methods_run_on_a_discovered_family(method, tokenizer, tmp_path):
    model = tiny("gemma3_text", tokenizer)
    x = ids(2, 16)
    ref = logits(model, x)
    lowbit.quantize(model, lowbit.config_for(method), calibration=ids(4, 32, seed=1), progress=False)
    out = logits(model, x)
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()
    lowbit.save(model, tmp_path / "q", tokenizer)
    assert torch.equal(logits(lowbit.load(tmp_path / "q").model, x), out)


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_unstacked_experts_compute_the_same(family, tokenizer):
    model = tiny(family, tokenizer)
    x = ids(2, 16)
    ref = logits(model, x)
    names = unstack_experts(model)
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert unstack_experts(model) == []
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    with route_all_experts(model):     # every expert runs on every token; the output still follows the router
        torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)


def test_moe_gptq_quantizes_every_expert_keeps_the_router_and_counts_tokens(tokenizer, tmp_path):
    model = tiny("qwen3_moe", tokenizer)
    calib = ids(2, 16, seed=1)
    lowbit.quantize(model, lowbit.GPTQ(bits=4, group_size=16), calibration=calib, progress=False, all_experts=True)
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, ExpertList)
        assert all(isinstance(getattr(e, p), QuantLinear) for e in layer.mlp.experts
                   for p in ("gate_proj", "up_proj", "down_proj"))
        assert layer.mlp.gate.weight.dtype == torch.bfloat16 and not isinstance(layer.mlp.gate, QuantLinear)
    routed = model.lowbit["expert_tokens"]["routed"]
    k = model.config.num_experts_per_tok
    assert all(sum(c) == calib.numel() * k for c in routed.values())    # each token goes to k experts
    assert model.lowbit["expert_tokens"]["all_experts"] is True
    x = ids(2, 16)
    out = logits(model, x)
    lowbit.save(model, tmp_path / "q", tokenizer)
    assert torch.equal(logits(lowbit.load(tmp_path / "q").model, x), out)


@pytest.mark.slow
def test_all_experts_changes_what_rare_experts_are_calibrated_on(tokenizer):
    """With all_experts every expert's Hessian sees every token, so its weights differ from the routed run."""
    base = tiny("mixtral", tokenizer)
    calib = ids(2, 16, seed=3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    lowbit.quantize(a, lowbit.GPTQ(bits=4, group_size=16), calibration=calib, progress=False)
    lowbit.quantize(b, lowbit.GPTQ(bits=4, group_size=16), calibration=calib, progress=False, all_experts=True)
    eye = torch.eye(a.model.layers[0].mlp.experts[0].down_proj.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        qa, qb = (m.model.layers[0].mlp.experts[0].down_proj(eye) for m in (a, b))
    assert not torch.equal(qa, qb)


def test_recipe_patterns_reach_experts(tokenizer):
    model = tiny("mixtral", tokenizer)
    recipe = lowbit.Recipe.from_rules([{"match": "*.experts.*", "bits": 8, "group_size": 16}],
                                      lowbit.RTN(bits=4, group_size=16))
    lowbit.quantize(model, recipe, progress=False)
    assert model.model.layers[1].mlp.experts[3].up_proj.spec.bits == 8
    assert model.model.layers[1].self_attn.q_proj.spec.bits == 4


def test_generate_falls_back_to_transformers_with_a_notice(tokenizer, capsys):
    model = tiny("olmo2", tokenizer)
    r = lowbit.generate(model, tokenizer, "Hello", max_new_tokens=4, engine="compiled")
    assert "generating with transformers" in capsys.readouterr().err
    hf = lowbit.generate(model, tokenizer, "Hello", max_new_tokens=4, engine="hf")
    assert r["text"] == hf["text"]


def _tiny_gemma3():
    """Three layers, local-global-local, with a window of 16 that 64 generated tokens cross, q/k norms and
    query_pre_attn_scalar other than head_dim, every norm away from zero (so that 1 + w matters)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(
        "gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=24,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("prompt_len, compiled", [(8, False), (40, False),
                                                  pytest.param(8, True, marks=pytest.mark.slow)])
def test_gemma3_engine_generates_the_reference_tokens(prompt_len, compiled):
    """Sliding and global layers, sandwich and (1 + w) norms, the scaled embedding, q/k norms, GeGLU: 64 greedy
    tokens equal to transformers' generate, from a prompt shorter and one longer than the window."""
    from test_engine import reference_logits, reference_tokens

    from lowbit.engine import Engine
    from lowbit.models.arch import has_engine
    model = _tiny_gemma3()
    assert has_engine(model.config)
    x = torch.randint(3, 256, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    engine = Engine(model, compile=compiled)
    engine.reserve(prompt_len + 1)
    with torch.no_grad():
        torch.testing.assert_close(engine.prefill(x), reference_logits(model, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(engine.generate(x, 64)["tokens"], reference_tokens(model, x, 64))


@pytest.mark.parametrize("family", [pytest.param("gemma3_text", marks=pytest.mark.slow), "qwen3_moe"])
def test_quantized_engine_generates_the_reference_tokens(family, tokenizer):
    """INT4 Gemma 3, and Qwen3-MoE (its MoE layers called whole, one dense layer among them, experts
    unstacked and quantized): 64 greedy tokens equal to transformers' generate on the same model."""
    from test_engine import reference_tokens

    from lowbit.engine import Engine
    from lowbit.models.arch import has_engine
    model = _tiny_gemma3() if family == "gemma3_text" else _tiny_qwen3_moe()
    assert has_engine(model.config)
    model = lowbit.quantize(model, lowbit.RTN(bits=4, group_size=16), progress=False)
    x = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(Engine(model, compile=False).generate(x, 64)["tokens"], reference_tokens(model, x, 64))


def _tiny_qwen3_moe():
    """Three layers, the middle one a dense MLP (mlp_only_layers), four experts of which two per token."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=64, mlp_only_layers=[1], pad_token_id=0)
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.slow
def test_moe_compiled_decode_is_one_graph_bit_equal_to_eager():
    """Qwen3-MoE quantized with AWQ (the experts' gate/up have no producer to fold into: their scales run
    inside the QuantLinears): the compiled decode step (routing as ExpertList.dense) has no graph break, its
    logits equal the eager engine's bit for bit, and 64 greedy tokens equal transformers' generate."""
    from test_engine import reference_tokens

    from lowbit.engine import Engine
    from lowbit.nn.qlinear import input_scale_of
    model = _tiny_qwen3_moe()
    model = lowbit.quantize(model, lowbit.AWQ(bits=4, group_size=16, n_grid=5), progress=False,
                            calibration=torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(2)))
    assert input_scale_of(model.model.layers[0].mlp.experts[1].up_proj) is not None
    x = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    eager, compiled = Engine(model, compile=False), Engine(model, compile=True)
    torch._dynamo.utils.counters.clear()
    tokens = compiled.generate(x, 64)["tokens"]
    assert compiled.compile and not torch._dynamo.utils.counters["graph_break"]
    assert torch.equal(tokens, reference_tokens(model, x, 64))
    assert torch.equal(eager.generate(x, 64)["tokens"], tokens)
    for e in (eager, compiled):
        e.reserve(40)
        e.prefill(x)
    for i in range(4):
        la, ta = eager.decode(tokens[i].view(1, 1), 8 + i)
        lb, tb = compiled.decode(tokens[i].view(1, 1), 8 + i)
        assert torch.equal(la, lb) and torch.equal(ta, tb)


def test_blocks_run_with_their_own_layer_types_inputs():
    """Block by block (as calibration runs them), each Gemma 3 layer gets its own type's mask and rotary
    table: the hidden states equal the model's own at every layer, the local layers' window crossed."""
    from lowbit.models.calibration import iterate_blocks
    model = _tiny_gemma3()
    x = ids(2, 40, seed=2) % 256
    with torch.no_grad():
        want = [model(s.unsqueeze(0), output_hidden_states=True).hidden_states for s in x]
        for i, _, inputs in iterate_blocks(model, x):
            for s, h in enumerate(inputs.hidden):
                torch.testing.assert_close(h, want[s][i], rtol=1e-5, atol=1e-5)


def _write_dir(path, config: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config, message", [
    ({"model_type": "t5"}, "encoder-decoder"),
    ({"model_type": "vit"}, "no causal-LM class"),
    ({"model_type": "my_remote_lm", "auto_map": {"AutoModelForCausalLM": "m.M"}}, "remote code"),
    ({"model_type": "gpt2"}, "hold no torch Linear"),
])
def test_unsupported_models_fail_with_one_line_and_write_nothing(config, message, tmp_path, capsys):
    from lowbit.cli import main
    src = _write_dir(tmp_path / "m", config)
    with pytest.raises(lowbit.LowbitError, match=message):
        arch_for(config)
    code = main(["quantize", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "unsupported architecture" in err[0] and message in err[0]
    assert not (tmp_path / "o").exists()


def test_awq_rounds_an_expert_no_calibration_token_reached(tokenizer):
    """An expert the router never picks on the calibration text has no inputs to search scales or clipping on:
    it is rounded to nearest, the others are calibrated, and nothing fails."""
    model = tiny("qwen3_moe", tokenizer)
    reference = copy.deepcopy(model)
    never = 3

    def no_expert_3(router, args, out):   # the router as it is, with one expert's logit pushed down
        logits = out[0].clone()
        logits[:, never] = -1e4
        top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
        if router.norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    for m in (model, reference):
        for layer in m.model.layers:
            layer.mlp.gate.register_forward_hook(no_expert_3)
    lowbit.quantize(model, lowbit.AWQ(bits=4, group_size=16), calibration=ids(2, 16, seed=1), progress=False)
    routed = model.lowbit["expert_tokens"]["routed"]
    assert all(c[never] == 0 and sum(c) > 0 for c in routed.values()), routed
    unstack_experts(reference)
    for i, layer in enumerate(model.model.layers):
        for p in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp.experts[never], p)
            w = getattr(reference.model.layers[i].mlp.experts[never], p).weight.detach().float()
            rtn = lowbit.IntSpec(4, 16, True).quantize(w)
            assert lin.quantized_tensor().same_as(rtn), (i, p)     # plain round-to-nearest of its own weights
    assert torch.isfinite(logits(model, ids(2, 16))).all()


def _python_calls_per_decode_step(model_type: str, layers: int) -> int:
    """Python functions entered during one compiled decode step of an INT4 model (calls into C builtins are not
    counted: torch's generated wrapper makes one isinstance check per graph input, that is per weight tensor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.engine import Engine
    from lowbit.eval.speed import python_frames
    cfg = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, pad_token_id=0,
        **({"sliding_window": 8} if model_type == "gemma3_text" else {}))
    torch.manual_seed(0)
    model = lowbit.quantize(AutoModelForCausalLM.from_config(cfg).eval(), lowbit.RTN(bits=4, group_size=16),
                            progress=False)
    engine = Engine(model, compile=True, background=False)
    x = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    engine.reserve(16)
    with torch.no_grad():
        tok = engine.prefill(x).argmax(-1, keepdim=True)
        engine.decode(tok, 12)                   # compiles (past the window of 8: every layer type is exercised)
        engine.decode(tok, 13)
        return python_frames(lambda: engine.decode(tok, 14))


def test_decode_step_does_the_same_python_work_for_every_family_and_depth():
    """The compiled decode step of Gemma 3 (sandwich norms, q/k norms, sliding and global layers) and of
    Qwen3-MoE (routing, every expert) makes exactly the Python calls llama's makes, at one layer and at two:
    no Python work per layer or per token that llama avoids (what each layer costs beyond that is compiled
    code: benchmarks/engine_overhead.py)."""
    counts = {(f, n): _python_calls_per_decode_step(f, n)
              for f, n in [("llama", 1), ("llama", 2), ("gemma3_text", 2), ("qwen3_moe", 2)]}
    assert len(set(counts.values())) == 1, counts
