"""Scales inside the quantized Linear: groups of Linears with no exact fold into a producer (OLMo 2's
post-norms leave q/k/v and gate/up reading the residual stream) are still scaled by AWQ and SmoothQuant, the
division by s running in the QuantLinear, stored in the checkpoint and refused by formats that cannot hold it."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.export import export
from lowbit.formats import IntSpec
from lowbit.models.arch import arch_for
from lowbit.models.calibration import capture_block_inputs
from lowbit.models.discovery import discover_feeds
from lowbit.nn import QuantLinear
from lowbit.nn.fuse import fuse_linears
from lowbit.nn.qlinear import divide_input, input_scale_of
from test_architectures import _block_error, ids, logits, tiny

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def test_quantlinear_divides_its_input_and_fuses_only_equal_scales():
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(48, 64, generator=g), torch.randn(3, 64, generator=g)
    s = torch.rand(64, generator=g) + 0.5
    qt = IntSpec(bits=4, group_size=16).quantize(W * s)
    lin = QuantLinear(qt, kernel="reference", act_state={"input_scale": s})
    assert torch.equal(lin(x), F.linear(divide_input(x, s), qt.dequantize(torch.float32)))
    other = QuantLinear(qt, kernel="reference", act_state={"input_scale": s})
    fused = fuse_linears([lin, other])
    assert fused is not None and torch.equal(fused(x), torch.cat([lin(x), other(x)], -1))
    assert fuse_linears([lin, QuantLinear(qt, kernel="reference", act_state={"input_scale": s * 2})]) is None
    assert fuse_linears([lin, QuantLinear(qt, kernel="reference")]) is None


def test_awq_scales_unfoldable_groups_inside_the_linears(tokenizer):
    """Block 0 of OLMo 2 in float32: the groups with no producer are scaled inside their Linears, and that lowers
    the block output error below AWQ without it (and below round-to-nearest)."""
    model = tiny("olmo2", tokenizer)
    calib = capture_block_inputs(model, ids(4, 32, seed=1))
    block = model.model.layers[0]
    feeds, offsets, fallbacks = discover_feeds(block, calib.hidden[0], calib.kwargs[0])
    assert set(fallbacks) == {QKV, ("mlp.gate_proj", "mlp.up_proj")}
    arch = replace(arch_for(model), feeds=feeds, fold_offset=offsets, fallbacks=fallbacks)
    awq = lowbit.AWQ(bits=3, group_size=16, n_grid=5)
    err = {"rtn": _block_error(block, lowbit.RTN(bits=3, group_size=16), arch, calib, calib),
           "awq": _block_error(block, awq, arch, calib, calib),
           "awq, unfolded groups unscaled": _block_error(block, awq, replace(arch, fallbacks=()), calib, calib)}
    assert err["awq"] < err["awq, unfolded groups unscaled"] < err["rtn"], err


@pytest.mark.parametrize("method", ["awq", "w8a8-smooth"])
def test_input_scales_are_saved_reloaded_and_refused_by_exports(method, tokenizer, tmp_path):
    """The whole model: closer to the float logits on its calibration windows than the same format unscaled
    (RTN, W8A8 without smoothing); the checkpoint reloads to identical logits; exports refuse it."""
    model = tiny("olmo2", tokenizer)
    calib, x = ids(4, 32, seed=1), ids(2, 16)
    ref = logits(model, calib)
    cfg, plain = ((lowbit.AWQ(bits=4, group_size=16, n_grid=5), lowbit.RTN(bits=4, group_size=16)) if method == "awq"
                  else (lowbit.config_for(method), lowbit.config_for("w8a8-naive")))
    unscaled = lowbit.quantize(copy.deepcopy(model), plain, calibration=calib, progress=False, dtype=torch.float32)
    lowbit.quantize(model, cfg, calibration=calib, progress=False, dtype=torch.float32)
    assert list(QKV) in model.lowbit["fold_fallbacks"]
    attn = model.model.layers[1].self_attn
    assert all(input_scale_of(getattr(attn, p)) is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert input_scale_of(attn.o_proj) is None      # folded into v_proj
    assert (logits(model, calib) - ref).pow(2).mean() < (logits(unscaled, calib) - ref).pow(2).mean()
    out = logits(model, x)
    lowbit.save(model, tmp_path / "q", tokenizer)
    back = lowbit.load(tmp_path / "q").model
    assert torch.equal(input_scale_of(back.model.layers[1].self_attn.q_proj), input_scale_of(attn.q_proj))
    assert torch.equal(logits(back, x), out)
    with pytest.raises(lowbit.LowbitError, match="per-channel scale"):
        export(copy.deepcopy(model), "compressed-tensors", tmp_path / "ct", tokenizer=tokenizer)
    assert not (tmp_path / "ct").exists()
