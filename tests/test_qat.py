"""Quantization-aware training (lowbit.train) on a tiny random llama: fake-quant op, packing, loss, resume."""

import pytest
import torch

import lowbit
from lowbit.data import calibration_ids
from lowbit.train import FakeQuantLinear, convert, distillation_loss, prepare, qat
from lowbit.train.fakequant import start_latent

FMT = lowbit.RTN(bits=2, group_size=32, symmetric=False)
SMALL = dict(seqlen=32, windows=4, batch=2, progress=False)


def _kl(model, teacher, ids):
    with torch.no_grad():
        return distillation_loss(model(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits).item()


def test_fake_quant_linear_passes_gradients_to_weights_and_scales():
    torch.manual_seed(0)
    w = 0.1 * torch.randn(8, 64)
    m = FakeQuantLinear(lowbit.IntSpec(3, 32, False).quantize(w))
    m(torch.randn(5, 64)).pow(2).sum().backward()
    assert m.q.w0.grad.abs().sum() > 0 and m.q.a_hi.grad.abs().sum() > 0 and m.q.a_lo.grad.abs().sum() > 0
    assert not m.q.v.requires_grad


def test_latent_start_keeps_the_codes_and_sits_where_the_float_weight_does():
    torch.manual_seed(0)
    spec = lowbit.IntSpec(3, 32, False)
    w = 0.1 * torch.randn(16, 64)
    qt = spec.quantize(w)
    latent = start_latent(qt, w)
    m = FakeQuantLinear(qt, start=w)
    assert m.quantized().same_as(qt)                     # exactly the start's codes and scales
    dq = qt.dequantize(torch.float32)
    assert ((latent - w).abs() <= (dq - w).abs() + 1e-7).all()
    # RTN: the float weight itself, except where a range end's code is not the nearest one (6 of 1024 here)
    assert ((latent - w).abs() < 1e-6).float().mean() > 0.98
    assert not torch.equal(latent, dq)
    with pytest.raises(lowbit.LowbitError, match="start weights of shape"):
        start_latent(qt, w[:8])


def test_low_rank_adapters_train_and_merge_before_rounding():
    torch.manual_seed(0)
    w = 0.1 * torch.randn(8, 64)
    qt = lowbit.IntSpec(3, 32, False).quantize(w)
    m = FakeQuantLinear(qt, start=w, train="lora", rank=4)
    assert m.quantized().same_as(qt)                      # B = 0: exactly the start
    m(torch.randn(5, 64)).pow(2).sum().backward()
    assert m.lora_b.grad.abs().sum() > 0 and m.q.a_hi.grad.abs().sum() > 0
    assert not m.q.w0.requires_grad and not m.q.v.requires_grad
    with torch.no_grad():
        m.lora_b.normal_(0, 0.05)
    assert m.quantized().same_as(m.q.quantized((m.lora_b @ m.lora_a).detach()))   # W + B·A, then rounded
    torch.testing.assert_close(m.quantized().dequantize(torch.float32), m(torch.eye(64)).T.detach(), rtol=0, atol=1e-6)
    assert not m.quantized().same_as(qt)
    with pytest.raises(lowbit.LowbitError, match="rank must be an integer in 1..8"):
        FakeQuantLinear(qt, train="lora", rank=9)


def test_scales_only_training_never_changes_a_code():
    torch.manual_seed(0)
    qt = lowbit.IntSpec(2, 32, False).quantize(0.1 * torch.randn(8, 64))
    m = FakeQuantLinear(qt, train="scales")
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(16, 64)
    target = x @ (0.1 * torch.randn(8, 64)).T
    losses = []
    for _ in range(20):
        loss = (m(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.q.project()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    out = m.quantized()
    assert torch.equal(out.codes(), qt.codes()) and torch.equal(out.zeros, qt.zeros)
    assert not torch.equal(out.scales, qt.scales)
    torch.testing.assert_close(out.dequantize(torch.float32), m.q.weight().detach(), rtol=0, atol=0)
    with pytest.raises(lowbit.LowbitError, match="QAT trains one of weights, scales"):
        FakeQuantLinear(qt, train="codes")


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_reports_the_float_weights_it_rounded(tiny_dir, method):
    from lowbit.config import config_for
    loaded = lowbit.load_model(tiny_dir)
    original = {n: m.weight.detach().float().clone() for n, m in loaded.model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n}
    starts = {}
    lowbit.quantize(loaded.model, config_for(method, FMT.spec), tokenizer=loaded.tokenizer, progress=False,
                    dtype=torch.float32, calib_samples=4, calib_seqlen=32, float_weights=starts)
    assert set(starts) == set(original)
    for n, w in starts.items():
        qt = loaded.model.get_submodule(n).quantized_tensor()
        if method == "rtn":
            assert torch.equal(w, original[n])
        # the start rounds back to the codes, and it is not already on the grid
        assert FakeQuantLinear(qt, start=w).quantized().same_as(qt)
        assert not torch.equal(w, qt.dequantize(torch.float32))


@pytest.mark.parametrize("train", ["weights", "scales", "lora"])
def test_packed_logits_equal_fake_quant_logits_after_training(tiny_dir, train):
    trained = qat(tiny_dir, FMT, steps=3, lr=1e-3, train=train, kernel="reference", **SMALL)
    assert trained.model.lowbit["qat"]["train"] == train
    ids = torch.randint(0, 1000, (2, 24))
    model = trained.model
    with torch.no_grad():
        packed = model(ids, use_cache=False).logits
        prepare(model, train=train)       # the packed result, fake-quantized again, computes the same
        fake = model(ids, use_cache=False).logits
    torch.testing.assert_close(packed, fake, rtol=0, atol=1e-5)


def test_packed_logits_equal_fake_quant_logits(tiny_dir):
    loaded = lowbit.load_model(tiny_dir)
    model = lowbit.quantize(loaded.model, lowbit.RTN(bits=3, group_size=32, symmetric=False), progress=False,
                            dtype=torch.float32)
    names = prepare(model)
    assert names and all(isinstance(model.get_submodule(n), FakeQuantLinear) for n in names)
    torch.manual_seed(0)
    with torch.no_grad():   # a trained-looking state: moved weights, shrunk ranges
        for n in names:
            q = model.get_submodule(n).q
            q.w0.add_(0.01 * torch.randn_like(q.w0))
            q.a_lo.uniform_(0.5, 1)
            q.a_hi.uniform_(0.5, 1)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        fake = model(ids, use_cache=False).logits
        convert(model, kernel="reference")
        packed = model(ids, use_cache=False).logits
    torch.testing.assert_close(packed, fake, rtol=0, atol=1e-5)


def test_short_qat_lowers_the_distillation_loss(tiny_dir, tmp_path):
    teacher = lowbit.load_model(tiny_dir).model
    ids = calibration_ids(None, lowbit.load_model(tiny_dir).tokenizer, 4, 32, 0)
    start = lowbit.quantize(lowbit.load_model(tiny_dir).model, FMT, progress=False, dtype=torch.float32)
    trained = qat(tiny_dir, FMT, steps=12, lr=1e-3, **SMALL)
    before, after = _kl(start, teacher, ids), _kl(trained.model, teacher, ids)
    assert after < 0.9 * before, (before, after)     # 0.00252 -> 0.00216 when written
    out = lowbit.save(trained, tmp_path / "q")
    again = lowbit.load(out).model
    assert abs(_kl(again, teacher, ids) - after) < 1e-4   # the checkpoint computes what was trained


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tiny_dir, tmp_path):
    full = qat(tiny_dir, FMT, steps=4, lr=2e-3, **SMALL).model

    def kill(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        qat(tiny_dir, FMT, steps=4, lr=2e-3, state=state, save_every=2, callback=kill, **SMALL)
    assert torch.load(state, weights_only=True)["step"] == 2
    resumed = qat(tiny_dir, FMT, steps=4, lr=2e-3, state=state, save_every=2, resume=True, **SMALL).model
    assert resumed.lowbit["qat"]["losses"] == full.lowbit["qat"]["losses"]
    for (n, a), (_, b) in zip(full.named_buffers(), resumed.named_buffers()):
        assert torch.equal(a, b), n


def test_bad_input_is_one_clear_error(tiny_dir):
    with pytest.raises(lowbit.LowbitError, match="QAT steps must be a positive integer"):
        qat(tiny_dir, FMT, steps=0)
    with pytest.raises(lowbit.LowbitError, match="QAT trains integer formats"):
        qat(tiny_dir, lowbit.FP8(), steps=2)
    with pytest.raises(lowbit.LowbitError, match="calibration text is empty"):
        qat(tiny_dir, FMT, steps=2, text=["  "], progress=False)
    with pytest.raises(lowbit.LowbitError, match="resume needs"):
        qat(tiny_dir, FMT, steps=2, resume=True)


def test_cli_qat(tiny_dir, tmp_path, capsys):
    from lowbit.cli import main
    out = tmp_path / "q"
    assert main(["--quiet", "qat", str(tiny_dir), "--bits", "3", "--group-size", "32", "--asym", "--steps", "2",
                 "--seqlen", "32", "--windows", "4", "--generated", "2", "--lr", "1e-3", "--train", "scales",
                 "--out", str(out)]) == 0
    assert "distillation loss" in capsys.readouterr().out
    rec = lowbit.load(out).model.lowbit
    assert rec["qat"]["steps"] == 2 and rec["qat"]["windows"] == 6     # 4 from the text, 2 self-generated
    assert rec["qat"]["train"] == "scales"
    assert not (tmp_path / "q.qat-state.pt").exists()
    assert main(["--quiet", "qat", str(tiny_dir), "--steps", "2", "--resume", "--out", str(tmp_path / "r")]) == 2
    assert "no training state" in capsys.readouterr().err


def test_qat_starts_from_a_saved_checkpoint(tiny_dir, tmp_path):
    start = lowbit.quantize(lowbit.load_model(tiny_dir), lowbit.GPTQ(bits=2, group_size=32, symmetric=False),
                            progress=False, calib_samples=4, calib_seqlen=32)
    ckpt = lowbit.save(start, tmp_path / "gptq")
    trained = qat(tiny_dir, init=ckpt, steps=1, lr=1e-12, train="scales", kernel="reference", **SMALL).model
    assert trained.lowbit["qat"]["init"] == str(ckpt)
    again = lowbit.load(ckpt, kernel="reference").model
    for n, m in again.named_modules():       # a step too small to move a scale: exactly the start
        if isinstance(m, lowbit.nn.QuantLinear):
            assert trained.get_submodule(n).quantized_tensor().same_as(m.quantized_tensor()), n
    with pytest.raises(lowbit.LowbitError, match="or a lowbit checkpoint"):
        qat(tiny_dir, init=str(tmp_path / "nothing"), steps=1)
    from transformers import LlamaForCausalLM
    other = LlamaForCausalLM(lowbit.load_model(tiny_dir).model.config.__class__(
        **{**lowbit.load_model(tiny_dir).model.config.to_dict(), "intermediate_size": 96}))
    tok = lowbit.load_model(tiny_dir).tokenizer
    ckpt2 = lowbit.save(lowbit.quantize(other, FMT, progress=False), tmp_path / "other", tok)
    with pytest.raises(lowbit.LowbitError, match="not a quantization of this model: its Linear model.layers.0.mlp"):
        qat(tiny_dir, init=ckpt2, steps=1, **SMALL)


def test_cli_qat_from_a_checkpoint(tiny_dir, tmp_path, capsys):
    from lowbit.cli import main
    start = lowbit.save(lowbit.quantize(lowbit.load_model(tiny_dir), FMT, progress=False), tmp_path / "rtn")
    assert main(["--quiet", "qat", str(tiny_dir), "--init", str(start), "--steps", "2", "--seqlen", "32",
                 "--windows", "4", "--train", "lora", "--rank", "4", "--out", str(tmp_path / "q")]) == 0
    rec = lowbit.load(tmp_path / "q").model.lowbit["qat"]
    assert rec["init"] == str(start) and rec["train"] == "lora" and rec["rank"] == 4
    assert main(["--quiet", "qat", str(tiny_dir), "--init", "nonsense", "--steps", "2", "--out", str(tmp_path / "r")]) == 2
    assert "or a lowbit checkpoint" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_qat_trains_a_recipe_checkpoint_keeping_each_modules_format(tiny_dir, tmp_path):
    """Mixed precision: a recipe picks each module's format (and leaves some float); QAT from that checkpoint
    trains every integer Linear in its own format, and what the recipe kept float stays float."""
    recipe = lowbit.Recipe.from_rules([{"match": "*.mlp.down_proj", "method": "rtn", "bits": 8, "group_size": 32},
                                       {"match": "*.self_attn.o_proj", "keep": True}],
                                      lowbit.Learned(bits=2, group_size=32, symmetric=False, iters=2))
    start = lowbit.quantize(lowbit.load_model(tiny_dir), recipe, progress=False, calib_samples=4, calib_seqlen=32)
    ckpt = lowbit.save(start, tmp_path / "mixed")
    model = qat(tiny_dir, init=ckpt, steps=2, lr=1e-3, kernel="reference", **SMALL).model
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.spec.bits == 8 and layer.self_attn.q_proj.spec.bits == 2
    assert not isinstance(layer.self_attn.o_proj, lowbit.nn.QuantLinear)
    before = lowbit.load(ckpt).model.model.layers[0].self_attn.q_proj.quantized_tensor()
    assert not layer.self_attn.q_proj.quantized_tensor().same_as(before)          # trained
