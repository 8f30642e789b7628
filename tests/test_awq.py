import copy

import pytest
import torch

from lowbit import IntSpec, config_for
from lowbit.algorithms import apply_clip, quantize_rtn, search_clip
from lowbit.blockwise import awq_block, awq_scale_block, rtn_block
from lowbit.models import arch_for
from lowbit.models.calibration import run_block

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _plan(spec=IntSpec(4, 64, False), **options):
    return {n: config_for("awq", spec, options=options) for n in LINEARS}


@pytest.mark.parametrize("index", [0, 29])
def test_scaling_leaves_the_unquantized_block_unchanged(base, first_last_inputs, index):
    block = copy.deepcopy(base.model.layers[index])
    before = torch.cat(run_block(block, first_last_inputs[index]).hidden)
    norm_before = block.input_layernorm.weight.detach().clone()
    awq_scale_block(block, first_last_inputs[index], _plan(), arch_for(base.config))
    after = torch.cat(run_block(block, first_last_inputs[index]).hidden)
    assert not torch.equal(norm_before, block.input_layernorm.weight)  # scales were folded in
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [0, 29])
def test_awq_block_output_error_below_rtn(base, first_last_inputs, index):
    arch = arch_for(base.config)
    ref = torch.cat(run_block(base.model.layers[index], first_last_inputs[index]).hidden)
    errors = {}
    for name, driver in (("awq", awq_block), ("rtn", rtn_block)):
        block = copy.deepcopy(base.model.layers[index])
        driver(block, first_last_inputs[index], _plan(), arch)
        errors[name] = (torch.cat(run_block(block, first_last_inputs[index]).hidden) - ref).pow(2).mean().item()
    assert errors["awq"] < errors["rtn"]


def test_clip_search_never_worse_than_no_clip(base, first_last_inputs):
    from lowbit.models.calibration import capture_calls, first_input
    block = base.model.layers[0]
    calls = capture_calls(block, first_last_inputs[0], ["mlp.down_proj"])["mlp.down_proj"]
    X = torch.cat([first_input(block.mlp.down_proj, a, kw).reshape(-1, 1536) for a, kw in calls])
    W = block.mlp.down_proj.weight.detach()
    spec = IntSpec(4, 64, False)
    clipped = apply_clip(W, search_clip(W, X, spec, n_tokens=4096), spec)
    Xs = X[:: max(1, X.shape[0] // 4096)][:4096]
    err = lambda w: (Xs @ (quantize_rtn(w, spec).dequantize() - W).T).pow(2).mean()
    assert err(clipped) <= err(W)
    assert (clipped.abs() <= W.abs()).all()


@pytest.mark.parametrize("matmul", ["float32", "bfloat16"])
def test_next_block_inputs_are_the_float_blocks_outputs_as_the_reference_propagates(base, first_last_inputs, matmul):
    # llm-awq and AutoAWQ pass each block's unquantized outputs on; lowbit's AWQ takes them from its capture
    # pass (the block then runs once per sample, not twice), in the products the configuration chose
    from lowbit.models.calibration import BlockInputs
    from lowbit.products import products
    inputs = first_last_inputs[0]
    with torch.no_grad(), products(matmul):
        expected = run_block(base.model.layers[0], inputs).hidden
    block = copy.deepcopy(base.model.layers[0])
    mine = BlockInputs(inputs.hidden, inputs.kwargs, keep_outputs=True)
    awq_block(block, mine, _plan(matmul=matmul), arch_for(base.config))
    assert len(mine.outputs) == len(expected) and all(torch.equal(a, b) for a, b in zip(mine.outputs, expected))
    quantized = run_block(block, inputs).hidden   # what the quantized block would have given instead
    assert not any(torch.equal(a, b) for a, b in zip(mine.outputs, quantized))


def test_quantize_passes_the_float_outputs_on_for_awq_blocks(base, tokenizer, monkeypatch):
    import sys
    import lowbit
    from conftest import truncated
    from lowbit.models.calibration import BlockInputs
    flow = sys.modules["lowbit.quantize"]   # the module (lowbit.quantize is also the function)
    seen = []
    real = flow.iterate_blocks

    def spy(model, samples):
        for i, block, inputs in real(model, samples):
            seen.append(BlockInputs([h.clone() for h in inputs.hidden], inputs.kwargs))
            yield i, block, inputs
    monkeypatch.setattr(flow, "iterate_blocks", spy)
    model = truncated(base, 2)
    reference = copy.deepcopy(model)
    lowbit.quantize(model, lowbit.AWQ(bits=4, group_size=64), tokenizer=tokenizer, calib_samples=4,
                    calib_seqlen=64, progress=False)
    assert len(seen) == 2
    # block 1 was calibrated on the unquantized block 0's outputs (in the products AWQ's default chose here)
    from lowbit.products import products, resolve_products
    with torch.no_grad(), products(resolve_products(lowbit.AWQ.matmul, torch.device("cpu"))):
        expected = run_block(reference.model.layers[0], seen[0]).hidden
    assert all(torch.equal(a, b) for a, b in zip(seen[1].hidden, expected))


def _scaled_weights(base, inputs, index, search_dtype, norm_gain=1.0):
    from dataclasses import replace
    block = copy.deepcopy(base.model.layers[index])
    with torch.no_grad():
        block.input_layernorm.weight.mul_(norm_gain)
        block.post_attention_layernorm.weight.mul_(norm_gain)
    plan = {n: replace(c, search_dtype=search_dtype) for n, c in _plan().items()}
    awq_scale_block(block, inputs, plan, arch_for(base.config))
    return {k: v.clone() for k, v in block.state_dict().items()}


@pytest.mark.parametrize("index", [0, 29])
def test_float16_search_chooses_scales_as_good_as_the_float32_searchs_on_real_blocks(base, first_last_inputs, index,
                                                                                    monkeypatch):
    # llm-awq and AutoAWQ search in half precision. float16 keeps 11 bits: its output errors differ from
    # float32's by about 1%, so where two α score within that of each other the choice may differ (it does on
    # block 0 of the default model on a CPU with AVX512-FP16 and no AMX-FP16, not on others). What must hold:
    # each α the float16 search picks scores, in float32, within 2% of the float32 search's best.
    from lowbit import blockwise
    real, searches = blockwise.search_scale, []

    def spy(*args, **kwargs):
        searches.append(real(*args, **kwargs))
        return searches[-1]
    monkeypatch.setattr(blockwise, "search_scale", spy)
    half = _scaled_weights(base, first_last_inputs[index], index, "float16")
    n = len(searches)
    _scaled_weights(base, first_last_inputs[index], index, "float32")
    assert n == len(searches) - n >= 3
    for (alpha_half, _s, _e), (alpha_full, _s2, errors) in zip(searches[:n], searches[n:]):
        at = lambda alpha: errors[round(alpha * len(errors))]   # the grid's α are i / len(errors)
        assert at(alpha_half) <= 1.02 * min(errors) == 1.02 * at(alpha_full)
    assert half["self_attn.q_proj.weight"].dtype == torch.float32


def test_float16_search_beyond_its_range_falls_back_to_float32(base, first_last_inputs):
    # norms scaled up so that the attention's and MLP's outputs exceed float16's 65504: the search must not
    # score its candidates on inf
    from lowbit.models.calibration import capture_calls, first_input
    gain = 300.0
    block = copy.deepcopy(base.model.layers[0])
    with torch.no_grad():
        block.post_attention_layernorm.weight.mul_(gain)
    a, kw = capture_calls(block, first_last_inputs[0], ["mlp"])["mlp"][0]
    assert not copy.deepcopy(block.mlp).half()(first_input(block.mlp, a, kw).half()).isfinite().all()
    half = _scaled_weights(base, first_last_inputs[0], 0, "float16", norm_gain=gain)
    full = _scaled_weights(base, first_last_inputs[0], 0, "float32", norm_gain=gain)
    assert all(torch.equal(half[k], full[k]) for k in full)
    assert not torch.equal(full["post_attention_layernorm.weight"],
                           base.model.layers[0].post_attention_layernorm.weight * gain)   # scales were chosen


def test_search_dtype_auto(monkeypatch):
    from lowbit import blockwise
    monkeypatch.setattr(blockwise, "half_matrix_unit", lambda: True)
    assert blockwise.search_dtype("auto", torch.zeros(1)) == torch.float16
    assert blockwise.search_dtype("auto", torch.zeros(1, dtype=torch.bfloat16)) == torch.bfloat16  # the model's own
    assert blockwise.search_dtype("float32", torch.zeros(1)) == torch.float32
    monkeypatch.setattr(blockwise, "half_matrix_unit", lambda: False)   # float16 emulated: several times slower
    monkeypatch.setattr(blockwise, "bf16_matrix_unit", lambda: False)
    assert blockwise.search_dtype("auto", torch.zeros(1)) == torch.float32
    assert blockwise.search_dtype("auto", torch.zeros(1), "bfloat16") == torch.float32   # AVX512-BF16: exact there
    monkeypatch.setattr(blockwise, "bf16_matrix_unit", lambda: True)   # AMX-BF16: the products round already
    assert blockwise.search_dtype("auto", torch.zeros(1), "bfloat16") == torch.bfloat16
    assert blockwise.search_dtype("auto", torch.zeros(1), "float32") == torch.float32      # matmul=float32 asked
    assert blockwise.search_dtype("float32", torch.zeros(1), "bfloat16") == torch.float32


def test_awq_search_dtype_is_validated():
    import lowbit
    from lowbit.errors import LowbitError
    with pytest.raises(LowbitError, match="search_dtype"):
        lowbit.AWQ(search_dtype="int8")


def test_scale_search_quantizes_a_group_as_one_matrix_with_the_same_values(base):
    from lowbit.algorithms import fake_quantize, search_scale
    from lowbit.algorithms.awq import channel_scales
    attn = base.model.layers[3].self_attn
    weights = [attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach()]
    x_absmean = torch.rand(576) + 0.1
    seen = []
    search_scale(x_absmean, weights, IntSpec(4, 64, False), lambda c: seen.append(c) or 0.0, n_grid=3)
    for i, candidates in enumerate(seen):
        s = channel_scales(x_absmean, i / 3)
        for c, w in zip(candidates, weights):
            assert torch.equal(c, fake_quantize(w.float() * s, IntSpec(4, 64, False)) / s)


def test_clip_search_picks_the_bound_of_least_output_error(base, first_last_inputs):
    # the covariance form is the reference's output error summed in another order: where the two disagree, the
    # candidates' errors (float64, from the outputs) are equal to rounding
    from lowbit.algorithms import fake_quantize
    from lowbit.models.calibration import capture_calls, first_input
    block = base.model.layers[0]
    calls = capture_calls(block, first_last_inputs[0], ["mlp.down_proj"])["mlp.down_proj"]
    X = torch.cat([first_input(block.mlp.down_proj, a, kw).reshape(-1, 1536) for a, kw in calls])[:512]
    W = block.mlp.down_proj.weight.detach()[:128]
    spec = IntSpec(4, 64, False)
    bounds = search_clip(W, X, spec, n_tokens=512)
    Xg = X.double().reshape(-1, 24, 64)
    w = W.double().reshape(-1, 24, 64)
    org = W.abs().reshape(-1, 24, 64).amax(-1)
    errs = []
    for i in range(10):
        m = (org * (1 - i / 20)).unsqueeze(-1)
        q = fake_quantize(torch.maximum(torch.minimum(W.reshape(-1, 24, 64), m), -m).reshape(-1, 1536), spec)
        errs.append(torch.einsum("tgk,ngk->ntg", Xg, q.double().reshape(-1, 24, 64) - w).pow(2).mean(1))
    errs = torch.stack(errs)                                                 # [10, n, G]
    matches = torch.stack([bounds == org * (1 - i / 20) for i in range(10)])
    assert matches.any(0).all()
    chosen = matches.float().argmax(0)                                       # the first candidate it equals
    best = errs.min(0).values
    mine = errs.gather(0, chosen.unsqueeze(0))[0]
    assert (chosen == errs.argmin(0)).float().mean() > 0.99
    torch.testing.assert_close(mine, best, rtol=1e-5, atol=1e-12)
