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


def _plan(spec=IntSpec(4, 64, False)):
    return {n: config_for("awq", spec) for n in LINEARS}


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


def test_next_block_inputs_are_the_float_blocks_outputs_as_the_reference_propagates(base, first_last_inputs):
    # llm-awq and AutoAWQ pass each block's unquantized outputs on; lowbit's AWQ takes them from its capture
    # pass (the block then runs once per sample, not twice)
    from lowbit.models.calibration import BlockInputs
    inputs = first_last_inputs[0]
    expected = run_block(base.model.layers[0], inputs).hidden
    block = copy.deepcopy(base.model.layers[0])
    mine = BlockInputs(inputs.hidden, inputs.kwargs, keep_outputs=True)
    awq_block(block, mine, _plan(), arch_for(base.config))
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
    # block 1 was calibrated on the unquantized block 0's outputs
    expected = run_block(reference.model.layers[0], seen[0]).hidden
    assert all(torch.equal(a, b) for a, b in zip(seen[1].hidden, expected))
