import pytest
import torch

import lowbit
from lowbit import IntSpec, LowbitError
from lowbit.algorithms import Hessian, factor_hessian, gptq_quantize, quantize_rtn
from lowbit.data import calibration_samples, load_text
from lowbit.formats import GGUFSpec, choose_qparams
from lowbit import blockwise
from lowbit.models.calibration import BlockInputs, capture_calls, first_input
from lowbit.models.paused import OutOfOrder, PausedForwards

from conftest import truncated


def test_two_columns_match_the_closed_form_update():
    """Zero damping, per-channel: column 0 is rounded; column 1 absorbs the error optimally,
    w1' = w1 + e0 · H01 / H11, then is rounded."""
    torch.manual_seed(0)
    W = torch.randn(64, 2, dtype=torch.float64)
    A = torch.randn(2, 2, dtype=torch.float64)
    H = A @ A.T + 0.5 * torch.eye(2, dtype=torch.float64)
    spec = IntSpec(4, -1, False)
    qt = gptq_quantize(W, H, spec, damp=0.0)
    s, z = choose_qparams(W, spec)
    s, z = s[:, 0].double(), z[:, 0].double()
    q0 = torch.round(W[:, 0] / s + z).clamp(0, 15)
    e0 = W[:, 0] - (q0 - z) * s
    w1 = W[:, 1] + e0 * H[0, 1] / H[1, 1]
    q1 = torch.round(w1 / s + z).clamp(0, 15)
    assert torch.equal(qt.codes(), torch.stack([q0, q1], 1).to(torch.int32))


def test_gptq_minimises_the_layer_objective_on_synthetic_data():
    torch.manual_seed(1)
    X = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs
    W = torch.randn(64, 128)
    H = Hessian(128)
    H.add(X)
    for spec in (IntSpec(4, 32, True), IntSpec(3, -1, False), IntSpec(2, 64, False), IntSpec(8, -1, True)):
        e_gptq = (X @ (gptq_quantize(W, H.H, spec).dequantize() - W).T).norm()
        e_rtn = (X @ (quantize_rtn(W, spec).dequantize() - W).T).norm()
        assert e_gptq < e_rtn, spec


def test_dead_inputs_and_nan_activations():
    H = Hessian(64)
    X = torch.randn(256, 64)
    X[:, 5] = 0
    H.add(X)
    W = torch.randn(16, 64)
    qt = gptq_quantize(W, H.H, IntSpec(4, 32, False))
    deq = qt.dequantize()
    assert torch.isfinite(deq).all() and torch.all(deq[:, 5] == 0)
    X[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        Hessian(64).add(X)


def test_act_order_keeps_groups_contiguous_with_static_params():
    torch.manual_seed(2)
    X = torch.randn(1024, 128) * torch.linspace(0.1, 3, 128)
    W = torch.randn(32, 128)
    H = Hessian(128)
    H.add(X)
    spec = IntSpec(4, 32, False)
    qt = gptq_quantize(W, H.H, spec, act_order=True, weighted_grid=False)
    s, z = choose_qparams(W, spec)  # static groups: the original weights' group parameters
    assert torch.equal(qt.scales, s) and torch.equal(qt.zeros, z)
    e_ao = (X @ (qt.dequantize() - W).T).norm()
    e_rtn = (X @ (quantize_rtn(W, spec).dequantize() - W).T).norm()
    assert e_ao < e_rtn


@pytest.mark.parametrize("index", [0, 29])
def test_gptq_beats_rtn_on_every_linear_of_first_and_last_block(base, first_last_inputs, index):
    block = base.model.layers[index]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    calls = capture_calls(block, first_last_inputs[index], names)
    spec = IntSpec(4, 64, False)
    for n in names:
        mod = block.get_submodule(n)
        X = torch.cat([first_input(mod, a, kw).reshape(-1, mod.in_features) for a, kw in calls[n]]).double()
        H = Hessian(mod.in_features)
        H.add(X)
        W = mod.weight.detach()
        err = lambda qt: (X @ (qt.dequantize(torch.float64) - W.double()).T).norm().item()
        assert err(gptq_quantize(W, H.H, spec)) < err(quantize_rtn(W, spec)), n


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_deterministic(base, tokenizer, method):
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=4, seqlen=64, seed=3)
    scheme = lowbit.config_for(method, IntSpec(4, 64, False), options={"act_order": True} if method == "gptq" else {})
    runs = []
    for _ in range(2):
        m = lowbit.quantize(truncated(base, 2), lowbit.Recipe.default(scheme), calibration=samples, progress=False)
        runs.append({n: b.clone() for n, b in m.named_buffers() if n.endswith(("wpack", "scales", "zeros"))})
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) > 0
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_act_order_checkpoint_round_trip(base, tokenizer, tmp_path):
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=4, seqlen=64, seed=0)
    scheme = lowbit.config_for("gptq", IntSpec(4, 64, False), options={"act_order": True})
    m = lowbit.quantize(truncated(base, 2), lowbit.Recipe.default(scheme), calibration=samples, progress=False)
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        before = m(ids).logits
    lowbit.save_checkpoint(m, tokenizer, tmp_path / "ao")
    loaded = lowbit.load_checkpoint(tmp_path / "ao").model
    with torch.no_grad():
        assert torch.equal(before, loaded(ids).logits)
    q = loaded.model.layers[1].mlp.down_proj.quantized_tensor()
    assert q.scales.shape == (576, 1536 // 64)  # one scale per contiguous group of 64 columns


def test_calibrating_method_needs_samples(fresh):
    with pytest.raises(LowbitError, match="calibration"):
        lowbit.quantize(fresh, lowbit.Recipe.default(lowbit.config_for("gptq", IntSpec(4, 64, True))), progress=False)


def test_hessian_float32_products_match_float64_and_the_factor_matches_the_papers():
    """Hessian.add multiplies in float32 and sums in float64: within 1e-6 of an all-float64 H on real-scale
    activations over many samples. factor_hessian's single-Cholesky U equals the paper's
    chol(inv(H), upper) to float32 rounding, with and without act-order."""
    torch.manual_seed(0)
    for K in (1000, 96):   # three tiles of the Gram product (mirrored into an exactly symmetric H), then one
        xs = [torch.randn(256, K) * torch.logspace(-2, 1, K) for _ in range(6)]
        H = Hessian(K)
        assert len(H.tiles) == (3 if K == 1000 else 1)
        for x in xs:
            H.add(x)
        X = torch.cat(xs).double()
        ref = 2 * X.T @ X / X.shape[0]
        assert ((H.H - ref).abs().max() / ref.abs().max()).item() < 1e-6
        assert torch.equal(H.H, H.H.T)
    for act_order in (False, True):
        f = factor_hessian(ref, damp=0.01, act_order=act_order)
        Hp = ref[f.perm][:, f.perm] + 0.01 * ref.diag().mean() * torch.eye(K, dtype=ref.dtype)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
        assert torch.allclose(f.Hinv.double(), U, rtol=1e-5, atol=1e-6 * U.abs().max().item())
        assert torch.equal(f.perm, torch.argsort(ref.diag(), descending=True) if act_order else torch.arange(K))



@pytest.mark.parametrize("matmul", ["float32", "bfloat16"])
def test_reusing_finished_parts_gives_the_same_gptq_and_runs_attention_half_as_often(base, tokenizer, monkeypatch,
                                                                                     matmul):
    """GPTQ's passes over a block reuse the attention's output once its Linears are quantized: the codes, scales
    and the next blocks' inputs are those of recomputing everything, and the attention runs 2 times per sample
    and block instead of 4."""
    import contextlib
    import importlib

    from lowbit.models.calibration import ReuseFinishedParts
    q = importlib.import_module("lowbit.quantize")
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=3, seqlen=64, seed=5)
    scheme = lowbit.GPTQ(bits=4, group_size=64, matmul=matmul)
    runs, calls = [], []
    monkeypatch.setattr(blockwise, "PausedForwards", _NeverPaused)   # passes over the block, as without greenlet
    monkeypatch.setattr(q, "paused_available", lambda: False)
    for reuse in (ReuseFinishedParts, lambda block: contextlib.nullcontext()):
        monkeypatch.setattr(q, "ReuseFinishedParts", reuse)
        model = truncated(base, 2)
        counter = [0]
        for layer in model.model.layers:
            layer.self_attn.k_proj.register_forward_pre_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
        m = lowbit.quantize(model, lowbit.Recipe.default(scheme), calibration=samples, progress=False)
        runs.append({n: b.clone() for n, b in m.named_buffers() if n.endswith(("wpack", "scales", "zeros"))})
        calls.append(counter[0])
        assert all("forward" not in layer.self_attn.__dict__ for layer in m.model.layers)   # forwards restored
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) > 0
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # k_proj runs per sample and block in the o, gate/up and down captures and the outputs' pass (the q/k/v
    # capture stops at q_proj); reused from the gate/up capture on
    assert calls == [2 * 2 * 3, 4 * 2 * 3]


class _NeverPaused(PausedForwards):
    def calls(self, k):
        self.close()
        raise OutOfOrder("passes instead")


@pytest.mark.parametrize("matmul", ["float32", "bfloat16"])
def test_paused_forwards_give_the_same_gptq_as_passes_and_run_each_linear_once(base, tokenizer, monkeypatch, matmul):
    """GPTQ's true-sequential groups from one paused forward per sample (models.paused): the codes, scales and
    the next blocks' inputs (the quantized model's logits) are those of passes over the block, and k_proj runs
    once per sample and block instead of 4 times; in either precision of the calibration's products."""
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=3, seqlen=64, seed=5)
    ids = samples[:1]
    runs, calls, logits = [], [], []
    for paused in (PausedForwards, _NeverPaused):
        monkeypatch.setattr(blockwise, "PausedForwards", paused)
        model = truncated(base, 2)
        counter = [0]
        for layer in model.model.layers:
            layer.self_attn.k_proj.register_forward_pre_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
        m = lowbit.quantize(model, lowbit.Recipe.default(lowbit.GPTQ(bits=4, group_size=64, matmul=matmul)),
                            calibration=samples, progress=False)
        runs.append({n: b.clone() for n, b in m.named_buffers() if n.endswith(("wpack", "scales", "zeros"))})
        calls.append(counter[0])
        with torch.no_grad():
            logits.append(m(ids).logits)
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) > 0
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert torch.equal(logits[0], logits[1])
    # passes: the o, gate/up and down captures and the outputs' pass (no reused parts: quantize sets them up
    # only where the forwards cannot be paused)
    assert calls == [1 * 2 * 3, 4 * 2 * 3]


def test_paused_forwards_stop_when_a_block_calls_its_groups_out_of_order():
    """A block that runs group b before group a: asking for a's inputs stops every forward (OutOfOrder, no
    thread left) so the caller can fall back to passes; in order, the calls and outputs are the block's."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, h):
            return self.a(self.b(h))

    torch.manual_seed(0)
    block = Block()
    inputs = BlockInputs([torch.randn(2, 4) for _ in range(3)], [{} for _ in range(3)])
    with PausedForwards(block, inputs, [("a", ["a"]), ("b", ["b"])]) as p:
        with pytest.raises(OutOfOrder, match="b"):
            p.calls(0)
        assert p.forwards == [None] * 3 and not p.handles   # every forward unwound, the hooks removed
    assert torch.is_grad_enabled()
    with PausedForwards(block, inputs, [("b", ["b"]), ("a", ["a"])]) as p:
        assert all(torch.equal(a[0], h) for (a, _kw), h in zip(p.calls(0), inputs.hidden))
        block.b.weight.data = block.b.weight.detach() * 2      # "quantized" between the groups
        assert all(torch.equal(a[0], block.b(h)) for (a, _kw), h in zip(p.calls(1), inputs.hidden))
        block.a.weight.data = block.a.weight.detach() * 3
        assert all(torch.equal(y, block(h)) for y, h in zip(p.outputs(), inputs.hidden))
    with PausedForwards(block, inputs, [("b", ["b"]), ("a", ["a"])]) as p:
        p.calls(0)
        forwards = list(p.forwards)
    assert all(g.dead for g in forwards) and torch.is_grad_enabled()   # left paused: unwound on exit


def test_without_greenlet_gptq_falls_back_to_passes(monkeypatch):
    from lowbit.models import paused
    monkeypatch.setattr(paused, "greenlet", None)
    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with PausedForwards(block, BlockInputs([torch.randn(2, 4)], [{}]), [("0", ["0"])]) as p:
        with pytest.raises(OutOfOrder, match="greenlet"):
            p.calls(0)


def test_reused_parts_rerun_when_their_weights_or_inputs_change():
    from lowbit.models.calibration import ReuseFinishedParts

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.part = torch.nn.Sequential(torch.nn.Linear(4, 4))
            self.runs = 0
            self.part[0].register_forward_pre_hook(lambda *a: setattr(self, "runs", self.runs + 1))

        def forward(self, h, scale=1.0):
            return self.part(h * scale)

    block, h = Block(), torch.randn(2, 4)
    with torch.no_grad(), ReuseFinishedParts(block):
        y = block(h)
        assert torch.equal(block(h), y) and block.runs == 1       # the second call reused the first's output
        block.part[0].weight.mul_(2)                              # in place: must rerun
        y2 = block(h)
        assert block.runs == 2 and not torch.equal(y2, y)
        block.part[0].weight.data = block.part[0].weight.detach().clone()   # a new tensor, same values: reused
        assert torch.equal(block(h), y2) and block.runs == 2
        assert torch.equal(block(h, scale=2.0), block.part[0](h * 2.0))     # other inputs: rerun
        block.part[0].weight.data = block.part[0].weight.detach() + 1       # new values: rerun
        assert torch.equal(block(h, scale=2.0), block.part[0](h * 2.0))
    block, h = Block(), torch.randn(2, 4)
    with torch.no_grad(), ReuseFinishedParts(block, max_bytes=0):           # nothing may be kept: all rerun
        y = block(h)
        assert torch.equal(block(h), y) and block.runs == 2


@pytest.mark.parametrize("spec", [IntSpec(4, 64, True), IntSpec(3, -1, False), GGUFSpec("Q4_K"), GGUFSpec("Q6_K"),
                                  GGUFSpec("Q4_0")], ids=lambda s: s.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_native_column_loop_is_bit_identical_to_the_reference(spec, act_order, monkeypatch):
    """kernels/csrc/gptq_columns.cpp against round_columns' tensor code: the same codes, stored parameters and
    error-updated weights, bit for bit, on rows that are not a multiple of the kernel's 16-row tasks, 2.5
    blocks of columns, an all-zero row (zero steps), a dead input and heavy tails."""
    from lowbit.algorithms import gptq as gptq_module
    from lowbit.kernels import native
    if not native.available():
        pytest.skip(native.load())
    torch.manual_seed(3)
    N, K = 77, 320 if spec.kind != "gguf" or spec.type.endswith("_0") else 512
    W = torch.randn(N, K) * torch.rand(N, 1) * 3
    W[5] = 0
    W[9, :40] *= 50
    X = torch.randn(1024, K) * torch.logspace(-1, 0.7, K)
    X[:, 7] = 0
    H = Hessian(K)
    H.add(X)
    f = factor_hessian(H.H, 0.01, act_order)
    qn, un = gptq_module.gptq_quantize_updated(W, f, spec, act_order=act_order)
    monkeypatch.setattr(gptq_module, "_native", lambda x: False)
    qr, ur = gptq_module.gptq_quantize_updated(W, f, spec, act_order=act_order)
    assert torch.equal(un, ur)
    assert torch.equal(qn.dequantize(), qr.dequantize())
    assert all(torch.equal(a, b) for a, b in zip(qn.tensors().values(), qr.tensors().values()))


@pytest.mark.parametrize("spec", [IntSpec(4, 64, True), IntSpec(4, 64, False), IntSpec(3, -1, False),
                                  IntSpec(8, 32, True), IntSpec(4, 32, False, scale_bits=6), GGUFSpec("Q4_0")],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_grids_at_once_equal_fit_grid_per_group(spec, weighted):
    """A format's fit_grids (IntSpec: every group in one search) gives the grids fit_grid gives each slice,
    bit for bit, importance floors included (a group of near-zero importance beside large ones)."""
    torch.manual_seed(4)
    W = torch.randn(40, 256) * torch.rand(40, 1)
    W[3] = 0
    imp = torch.rand(256) * 10
    imp[64:96] = 1e-30
    imp[100] = 0
    g = spec.grid_width(256)
    at_once = spec.fit_grids(W, imp if weighted else None)
    one_by_one = [spec.fit_grid(W[:, j:j + g], imp[j:j + g] if weighted else None) for j in range(0, 256, g)]
    assert len(at_once) == len(one_by_one) == 256 // g
    for a, b in zip(at_once, one_by_one):
        assert (a.lo, a.hi) == (b.lo, b.hi)
        for f in ("step", "zero", "offset"):
            assert torch.equal(getattr(a, f).expand_as(getattr(b, f)), getattr(b, f)), f
        assert a.params.keys() == b.params.keys()
        assert all((a.params[k] is None and b.params[k] is None) or torch.equal(torch.as_tensor(a.params[k]), torch.as_tensor(b.params[k]))
                   for k in a.params)


@pytest.mark.parametrize("method,own", [("gptq", "gptq_quantize_updated"), ("awq", "search_clip")])
@pytest.mark.parametrize("matmul", ["float32", "bfloat16"])
def test_calibration_products_in_the_chosen_precision_and_the_methods_own_arithmetic_in_float32(
        base, tokenizer, monkeypatch, matmul, method, own):
    """The calibration forwards (and GPTQ's Hessians, AWQ's scale search) run in the configuration's matmul
    precision; GPTQ's factorization and updates and AWQ's clip search exactly; the setting is the caller's
    again afterwards."""
    flag = torch.backends.mkldnn.matmul
    seen = {"forward": set(), "update": set()}
    update = getattr(blockwise, own)

    def recording(*a, **kw):
        seen["update"].add(flag.fp32_precision)
        return update(*a, **kw)

    monkeypatch.setattr(blockwise, own, recording)
    model = truncated(base, 2)
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda *a: seen["forward"].add(flag.fp32_precision))
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=2, seqlen=32, seed=1)
    before = flag.fp32_precision
    config = lowbit.config_for(method, IntSpec(4, 64, True), options={"matmul": matmul})
    lowbit.quantize(model, config, calibration=samples, progress=False)
    assert seen == {"forward": {"bf16" if matmul == "bfloat16" else "ieee"}, "update": {"ieee"}}
    assert flag.fp32_precision == before


def test_auto_products_follow_the_cpu_and_bad_settings_fail_clearly():
    from lowbit.eval.system import bf16_dot_unit
    from lowbit.products import resolve_products
    cpu = torch.device("cpu")
    assert resolve_products("auto", cpu) == ("bfloat16" if bf16_dot_unit() else "float32")
    assert resolve_products("auto", torch.device("cuda")) == "float32"
    assert resolve_products("float32", cpu) == "float32"
    with pytest.raises(LowbitError, match="CPU setting"):
        resolve_products("bfloat16", torch.device("cuda"))
    with pytest.raises(LowbitError, match="GPTQ matmul"):
        lowbit.GPTQ(matmul="fp16")


@pytest.mark.parametrize("index", [0, 29])
def test_hessian_from_bfloat16_products_stays_close_and_gptq_still_beats_rtn(base, first_last_inputs, index):
    """The Hessian of bfloat16-rounded inputs (products summed in float32) on real layers is within 1% of the
    float32 one, and GPTQ from it still beats round-to-nearest on the float64 output error."""
    from lowbit.products import products
    block = base.model.layers[index]
    names = ["self_attn.o_proj", "mlp.down_proj"]
    calls = capture_calls(block, first_last_inputs[index], names)
    spec = IntSpec(4, 64, False)
    for n in names:
        mod = block.get_submodule(n)
        X = torch.cat([first_input(mod, a, kw).reshape(-1, mod.in_features) for a, kw in calls[n]]).float()
        exact, rounded = Hessian(mod.in_features), Hessian(mod.in_features)
        exact.add(X)
        with products("bfloat16"):
            rounded.add(X)
        assert (rounded.H - exact.H).norm() < 1e-2 * exact.H.norm(), n
        W = mod.weight.detach()
        err = lambda qt: (X.double() @ (qt.dequantize(torch.float64) - W.double()).T).norm().item()
        assert err(gptq_quantize(W, rounded.H, spec)) < err(quantize_rtn(W, spec)), n


def test_hessian_add_all_batches_rows_and_sums_what_add_sums():
    torch.manual_seed(0)
    xs = [torch.randn(1, n, 40) for n in (700, 700, 900, 5, 3000, 1)]
    one, batched = Hessian(40), Hessian(40)
    for x in xs:
        one.add(x)
    batched.add_all(xs)
    assert batched.n == one.n == sum(x.shape[1] for x in xs)
    assert torch.allclose(batched.H, one.H, rtol=0, atol=1e-5 * one.H.abs().max().item())   # float32 sums in another order
    assert torch.equal(batched.H, batched.H.T)
