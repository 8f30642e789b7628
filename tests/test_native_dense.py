"""lowbit's kernel for a few rows times a 16-bit weight (kernels/csrc/dense16.cpp) against float64 math, and the
engine that runs it for a decoded token's unquantized 16-bit Linears."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import quantized
from lowbit.engine.decoder import NativeDense
from lowbit.engine.generate import Engine
from lowbit.errors import LowbitError
from lowbit.kernels import native, native_dense
from test_decode_attention import mean_kl, assert_steps_close, float32_truth

pytestmark = pytest.mark.skipif(not native.available(), reason="lowbit's native kernels are not built")

SHAPES = [   # rows of activations, output features, input features
    (1, 49152, 576), (1, 1536, 576), (1, 576, 1536), (3, 100, 77), (2, 33, 1), (16, 7, 250), (4, 65, 64),
    (1, 5, 31), (1, 9, 100),
]
PATHS = {2: "avx512", 1: "avx2", 0: "portable"}


def _case(M, N, K, dtype, seed=0, bias=True):
    """x, a weight whose rows are a slice of a wider tensor (a row stride beyond K), and a bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K + 3, generator=g).to(dtype)[:, 1:K + 1]
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("isa", sorted(PATHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_kernel_matches_float64_to_one_rounding(M, N, K, dtype, isa):
    x, w, b = _case(M, N, K, dtype)
    got = torch.ops.lowbit.dense16_linear(x, w, b, isa)
    want = native_dense.reference(x, w, b)
    assert got.shape == (M, N) and got.dtype == dtype
    # the output's one rounding, plus float32 sums of exact products (K terms of size up to |x|·|w|)
    scale = (x.double().abs() @ w.double().abs().t()) + b.double().abs()
    tol = torch.finfo(dtype).eps / 2 * want.abs() + K * 2 ** -24 * scale
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max error {err.max():.3g}"
    # and no worse than PyTorch's own 16-bit matmul on the same inputs, beyond float32 noise
    theirs = F.linear(x, w, b).double()
    assert err.max() <= (theirs - want).abs().max() * 1.05 + 1e-6


def test_the_paths_agree_to_float32_rounding_and_rows_are_independent():
    x, w, b = _case(5, 300, 576, torch.bfloat16)
    outs = [torch.ops.lowbit.dense16_linear(x, w, b, isa).float() for isa in PATHS]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=2 ** -7, atol=1e-3)
    # each row of x gives the same output alone as with the others (no row mixes into another's sums)
    alone = torch.cat([torch.ops.lowbit.dense16_linear(x[m:m + 1], w, b) for m in range(5)])
    assert torch.equal(alone, torch.ops.lowbit.dense16_linear(x, w, b))


def test_kernel_result_does_not_depend_on_the_thread_count():
    x, w, b = _case(1, 20000, 576, torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.lowbit.dense16_linear(x, w, b)
        torch.set_num_threads(2)
        two = torch.ops.lowbit.dense16_linear(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_special_values_pass_through():
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [float("inf"), 0, 0, 0], [float("nan"), 0, 0, 0], [0, 0, 0, 0]],
                     dtype=torch.bfloat16)
    got = torch.ops.lowbit.dense16_linear(x, w, None)[0].float()
    assert got[0] == 2.5 and got[1] == float("inf") and got[2].isnan() and got[3] == 0


def test_kernel_rejects_bad_inputs_in_one_line():
    x, w, b = _case(1, 10, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.lowbit.dense16_linear(x, w.half(), None)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.lowbit.dense16_linear(x.float(), w.float(), None)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.lowbit.dense16_linear(x[:, :32], w, None)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.lowbit.dense16_linear(x.expand(17, 64), w, None)
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        torch.ops.lowbit.dense16_linear(x, w.t().contiguous().t(), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.lowbit.dense16_linear(x, w, b[:5])


def test_linear_runs_the_kernel_for_few_rows_and_pytorch_beyond():
    x, w, b = _case(native_dense.MAX_ROWS + 1, 300, 128, torch.bfloat16)
    many = x.view(1, -1, 128)
    assert torch.equal(native_dense.linear(many, w, b), F.linear(many, w, b))   # PyTorch's own call
    few = x[:2].view(2, 1, 128)
    got = native_dense.linear(few, w, b)
    assert got.shape == (2, 1, 300)
    assert torch.equal(got.view(2, 300), torch.ops.lowbit.dense16_linear(x[:2], w, b))


def _tiny_bf16():
    from test_engine import _tiny_model
    return _tiny_model("llama").bfloat16()


def test_engine_dense_choice():
    from test_engine import _tiny_model
    with pytest.raises(LowbitError, match="unknown dense"):
        Engine(_tiny_bf16(), compile=False, dense="fast")
    with pytest.raises(LowbitError, match="not available here"):
        Engine(_tiny_model("llama"), compile=False, dense="native")   # float32 weights
    d = Engine(_tiny_bf16(), compile=False).decoder
    b = d.blocks[0]
    assert isinstance(d.lm_head, NativeDense) and isinstance(b.o, NativeDense) and isinstance(b.down, NativeDense)
    assert all(isinstance(m, NativeDense) for m in (*b.qkv.parts, *b.gate_up.parts))
    # the model's own modules are untouched; a float32 model and dense="reference" keep plain Linears
    model = _tiny_bf16()
    Engine(model, compile=False)
    assert not any(isinstance(m, NativeDense) for m in model.modules())
    for d in (Engine(_tiny_model("llama"), compile=False).decoder,
              Engine(_tiny_bf16(), compile=False, dense="reference").decoder):
        assert type(d.lm_head) is nn.Linear and type(d.blocks[0].o) is nn.Linear


def test_quantized_linears_keep_their_kernels_and_a_bfloat16_head_runs_native(base):
    """The default recipe's shape: quantized blocks, the tied lm_head left in bfloat16."""
    model = quantized(copy.deepcopy(base).bfloat16(), bits=4, group_size=64)
    d = Engine(model, compile=False).decoder
    assert isinstance(d.lm_head, NativeDense) and d.lm_head.source is model.lm_head
    assert not isinstance(d.blocks[0].o, NativeDense) and not isinstance(d.blocks[0].down, NativeDense)


def test_aot_and_compiled_steps_equal_the_eager_step_with_the_kernel():
    """The op inside a compiled decode step (its fake shape, its call) gives the eager step's tokens and logits."""
    model = _tiny_bf16()
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    eager = Engine(model, compile=False)
    want = eager.generate(ids, 12)
    for compile in ("aot", True):
        engine = Engine(model, compile=compile)
        assert isinstance(engine.decoder.lm_head, NativeDense)
        got = engine.generate(ids, 12)
        assert torch.equal(got["tokens"], want["tokens"]), compile


def test_engine_with_the_kernel_stays_within_bfloat16_of_the_reference():
    """A bfloat16 llama, teacher-forced: each decoded token's logits with every Linear on the kernel within
    bfloat16 rounding of the model's own Linears (attention the reference's in both)."""
    model = _tiny_bf16()
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    engines = [Engine(model, compile=False, attention="reference", dense=d) for d in ("native", "reference")]
    assert_steps_close(engines, ids, 8)


def test_default_recipe_decodes_as_close_to_float32_as_the_reference_head(base, eval_ids):
    """INT4 g64 blocks with the tied lm_head left in bfloat16 (lowbit quantize's default): logits of 120 decoded
    positions of held-out text against the same weights run in float32. The head on the kernel must be as close
    as PyTorch's bfloat16 matmul (it skips no rounding of its own: both round the output once)."""
    ids = eval_ids[0][:128].unsqueeze(0)
    model = quantized(copy.deepcopy(base), bits=4, group_size=64)
    assert model.lm_head.weight.dtype == torch.bfloat16
    truth = float32_truth(model, base, ids)
    kl = {d: mean_kl(Engine(model, compile=False, attention="reference", dense=d), ids, truth, 8)
          for d in ("native", "reference")}
    print(f"mean KL against float32: {kl}")
    assert 0 < kl["native"] < 0.01 and kl["native"] <= kl["reference"] * 1.2, kl


def test_a_bfloat16_mixture_runs_its_experts_on_the_kernel():
    """A bfloat16 Qwen3-MoE whose experts are Linears of their own (models.moe.unstack_experts, as quantizing
    leaves experts a recipe keeps): a decoded token runs every expert (ExpertList.dense's shapes); their gate/up
    and down go to the kernel, and each step's logits stay within bfloat16 rounding of the model's own Linears."""
    from lowbit.models.moe import unstack_experts
    from test_architectures import _tiny_qwen3_moe
    model = _tiny_qwen3_moe().bfloat16()
    assert unstack_experts(model)
    ids = torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    engines = [Engine(model, compile=False, attention="reference", dense=d) for d in ("native", "reference")]
    moe = [b for b in engines[0].decoder.blocks if b.experts_gate_up is not None]
    assert moe, "no block runs its experts in the decoder"
    for b in moe:
        assert all(isinstance(m, NativeDense) for m in (*b.experts_gate_up.parts, *b.experts_down))
    assert all(b.experts_down is None for b in engines[1].decoder.blocks)
    # the mixture's own output for one token, each expert's part counted: within bfloat16 rounding of the reference
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    for native_block, block in zip(moe, [b for b in engines[1].decoder.blocks if b.experts_gate_up is not None]):
        with torch.no_grad():
            got, want = (b._moe(x, one_token=True).float() for b in (native_block, block))
        assert (got - want).norm() <= 0.02 * want.norm(), ((got - want).norm(), want.norm())
    assert_steps_close(engines, ids, 8)
