import copy

import pytest
import torch

import lowbit
from lowbit import IntSpec, LowbitError, config_for
from lowbit.algorithms import quantize_rtn, top_fraction_dims
from lowbit.blockwise import smooth_block
from lowbit.data import calibration_samples, load_text
from lowbit.formats import FloatSpec, quantize_fp8
from lowbit.formats.act import ActSpec
from lowbit.models import arch_for
from lowbit.models.calibration import capture_block_inputs, run_block
from lowbit.nn import QuantLinear

from conftest import truncated

W8 = IntSpec(8, -1, True)


@pytest.fixture(scope="module")
def layer(base):
    """A real Linear of the default model and realistic inputs with outliers (scaled normal noise)."""
    W = base.model.layers[5].mlp.down_proj.weight.detach()
    torch.manual_seed(0)
    x = torch.randn(9, W.shape[1]) * 0.5
    x[:, 7] *= 40  # a planted outlier dimension
    return W, x


def _int8_reference64(x, qt, scale):
    xq = torch.round(x.double() / scale).clamp(-127, 127)
    return (xq * scale) @ qt.dequantize(torch.float64).T


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_w8a8_int8_kernel_and_reference_match_float64(layer, granularity):
    W, x = layer
    qt = quantize_rtn(W, W8)
    static = (x.abs().max() / 127).reshape(1)
    act = ActSpec("int8", granularity)
    state = {"act_scale": static} if granularity == "tensor" else {}
    scale = static.double() if granularity == "tensor" else x.double().abs().amax(1, keepdim=True) / 127
    expected = _int8_reference64(x, qt, scale)
    for kernel in ("w8a8-int8", "reference"):
        y = QuantLinear(qt, kernel=kernel, act=act, act_state=state)(x)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_llm_int8_decomposition_matches_float64(layer):
    W, x = layer
    qt = quantize_rtn(W, W8)
    q = QuantLinear(qt, act=ActSpec("int8-mixed", threshold=6.0))
    y = q(x)
    outl = (x.abs() > 6).any(0)
    assert outl.nonzero().flatten().tolist() == [7]
    reg = x.double().clone()
    reg[:, outl] = 0
    s = reg.abs().amax(1, keepdim=True) / 127
    Wd = qt.dequantize(torch.float64)
    expected = (torch.round(reg / s).clamp(-127, 127) * s) @ Wd.T + x.double()[:, outl] @ Wd[:, outl].T
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    hp = q.high_precision_fraction()
    assert hp["rows"] == 9 and hp["fraction"] == pytest.approx(1 / W.shape[1])


def test_planted_outliers_are_found():
    torch.manual_seed(1)
    x = torch.randn(256, 64)
    planted = [3, 17, 40]
    x[::16, planted] = 25.0
    assert top_fraction_dims(x.abs().amax(0), 3 / 64).tolist() == planted
    W = torch.randn(32, 64)
    q = QuantLinear(quantize_rtn(W, W8), act=ActSpec("int8-mixed", threshold=6.0))
    q(x)
    assert q.high_precision_fraction()["fraction"] == pytest.approx(3 / 64)
    fixed = QuantLinear(quantize_rtn(W, W8), act=ActSpec("int8-mixed"), act_state={"outlier_idx": torch.tensor(planted)})
    torch.testing.assert_close(fixed(x), q(x), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_weight_only_and_w8a8_match_float64(layer, fmt):
    W, x = layer
    spec = FloatSpec(fmt)
    qt = quantize_fp8(W, spec)
    Wd = qt.qweight.double() * qt.scales.double()
    torch.testing.assert_close(qt.dequantize(torch.float64), Wd)
    assert (qt.dequantize() - W).abs().max() <= W.abs().max() * (2 ** -3 if fmt == "e4m3" else 2 ** -2)
    y = QuantLinear(qt)(x)
    torch.testing.assert_close(y.double(), x.double() @ Wd.T, rtol=1e-5, atol=1e-5)
    act = ActSpec(f"fp8-{fmt}")
    xs = x.abs().amax(1, keepdim=True) / spec.fmax
    x8 = (x / xs).clamp(-spec.fmax, spec.fmax).to(spec.dtype).double() * xs.double()
    for kernel in ("fp8", "reference"):
        y = QuantLinear(qt, kernel=kernel, act=act)(x)
        torch.testing.assert_close(y.double(), x8 @ Wd.T, rtol=1e-5, atol=1e-5)


def test_smoothing_leaves_the_unquantized_model_unchanged(base, tokenizer):
    model = copy.deepcopy(base)
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=3, seqlen=96, seed=0)
    ids = calibration_samples(tokenizer, load_text(None, "evaluation"), n=2, seqlen=96, seed=1)
    with torch.no_grad():
        before = model(ids).logits
    arch = arch_for(model.config)
    inputs = capture_block_inputs(model, samples)
    plan = {n: config_for("w8a8-smooth", options={"alpha": 0.5}) for _, lin, _ in arch.feeds for n in lin}
    norm = model.model.layers[0].post_attention_layernorm.weight.detach().clone()
    for block in model.model.layers:
        smooth_block(block, inputs, plan, arch)
        inputs = run_block(block, inputs)
    assert not torch.equal(norm, model.model.layers[0].post_attention_layernorm.weight)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("method,options", [
    ("w8a8-naive", {}), ("w8a8-smooth", {}), ("w8a8-smooth", {"act_granularity": "tensor", "alpha": 0.6}),
    ("llm-int8", {}), ("llm-int8", {"outlier_fraction": 0.02}), ("fp8", {}), ("fp8", {"act": "fp8"}), ("fp8-e5m2", {}),
])
def test_each_method_round_trips_with_identical_logits(base, tokenizer, tmp_path, method, options):
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=3, seqlen=64, seed=0)
    m = lowbit.quantize(truncated(base, 2), lowbit.Recipe.default(config_for(method, options=options)), calibration=samples,
                        progress=False)
    ids = torch.randint(0, 49152, (1, 20))
    with torch.no_grad():
        before = m(ids).logits
    lowbit.save_checkpoint(m, tokenizer, tmp_path / "c")
    loaded = lowbit.load_checkpoint(tmp_path / "c").model
    with torch.no_grad():
        assert torch.equal(before, loaded(ids).logits)
    q = loaded.model.layers[1].mlp.down_proj
    assert q.act == m.model.layers[1].mlp.down_proj.act
    if method == "w8a8-naive" or options.get("act_granularity") == "tensor":
        assert q.act_scale.numel() == 1


@pytest.mark.slow
def test_naive_w8a8_is_the_worst_of_the_8bit_family(base, tokenizer):
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=4, seqlen=128, seed=0)
    ids = calibration_samples(tokenizer, load_text(None, "evaluation"), n=2, seqlen=128, seed=1)
    small = base
    with torch.no_grad():
        ref = torch.log_softmax(small(ids).logits.float(), -1)
    kld = {}
    for method in ("w8a8-naive", "llm-int8"):
        m = lowbit.quantize(copy.deepcopy(small), lowbit.Recipe.default(config_for(method)), calibration=samples,
                            progress=False)
        with torch.no_grad():
            lp = torch.log_softmax(m(ids).logits.float(), -1)
        kld[method] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert kld["w8a8-naive"] > 10 * kld["llm-int8"]


def test_bad_options():
    with pytest.raises(LowbitError, match="threshold must be positive"):
        config_for("llm-int8", options={"threshold": 0})
    with pytest.raises(LowbitError, match="alpha must be in"):
        config_for("w8a8-smooth", options={"alpha": 1.2})
    with pytest.raises(LowbitError, match="alpha must be in"):
        config_for("w8a8-smooth", options={"alpha": -0.1})
    with pytest.raises(LowbitError, match="fraction"):
        config_for("llm-int8", options={"outlier_fraction": 1.5})


def test_cli_bad_inputs_and_outliers_command(capsys, tmp_path):
    from lowbit.cli import main
    for argv, msg in [
        (["quantize", "default", "--method", "llm-int8", "--threshold", "-1", "--out", str(tmp_path / "o")], "threshold"),
        (["quantize", "default", "--method", "w8a8-smooth", "--alpha", "2", "--out", str(tmp_path / "o")], "alpha"),
        (["quantize", "default", "--method", "w8a8-smooth", "--calib-text", str(tmp_path / "none.txt"),
          "--out", str(tmp_path / "o")], "text file not found"),
        (["outliers", "default", "--threshold", "0", "--out", str(tmp_path / "x")], "threshold must be positive"),
    ]:
        assert main(["--quiet", *argv]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    assert main(["--quiet", "outliers", "default", "--samples", "2", "--seqlen", "64", "--out", str(tmp_path / "ol")]) == 0
    import json
    r = json.loads((tmp_path / "ol" / "outliers.json").read_text())
    assert r["groups"] == 120 and r["max_abs"] > 6 and "29.down_in" in r["layers"]
    assert (tmp_path / "ol" / "outliers.png").read_bytes()[:4] == b"\x89PNG"
