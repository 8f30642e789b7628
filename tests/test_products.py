"""lowbit.products: how float32 products are computed. The oneDNN route for exact Linears must be IEEE float32
(within float32's rounding of the float64 result, as ATen's), independent of how many rows a call has, the same
with and without gradients, and taken only where it applies; the library is chosen by the CPU's features."""

import pytest
import torch
import torch.nn.functional as F

import lowbit.products as lp
from lowbit.errors import LowbitError
from lowbit.eval import evaluate_quality
from lowbit.products import OneDNNLinear, float32_gemm, products, state

from conftest import quantized, truncated

needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                  reason="this torch has no oneDNN linear")


@pytest.fixture
def choice(monkeypatch):
    """Set LOWBIT_FLOAT32_GEMM (None: unset) with float32_gemm's cache cleared before and after."""
    def set_(value):
        if value is None:
            monkeypatch.delenv("LOWBIT_FLOAT32_GEMM", raising=False)
        else:
            monkeypatch.setenv("LOWBIT_FLOAT32_GEMM", value)
        float32_gemm.cache_clear()
    yield set_
    monkeypatch.undo()
    float32_gemm.cache_clear()


def float32_bound(x, w):
    """How far an IEEE float32 x·Wᵀ (any summation order) may be from the exact one: K·2^-24·Σ|x||w| per entry."""
    return x.shape[-1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 576, 1536), (511, 576, 1536), (37, 13, 7), (3, 1536, 576)])
def test_onednn_linear_is_float32_and_row_independent(shape):
    m, k, n = shape
    torch.manual_seed(m + k + n)
    x, w, b = torch.randn(2, m, k), torch.randn(n, k), torch.randn(n)
    with OneDNNLinear():
        y = F.linear(x, w, b)
        rows = [F.linear(x[:, i:i + 1], w, b) for i in range(0, m, max(1, m // 5))]
    exact = x.double() @ w.double().T + b.double()
    assert y.dtype == torch.float32 and y.shape == (2, m, n)
    assert ((y.double() - exact).abs() <= float32_bound(x, w) + 1e-6).all()
    # a row's result does not depend on the other rows of the call (an evaluation window alone or in a batch)
    assert all(torch.equal(r, y[:, i:i + 1]) for r, i in zip(rows, range(0, m, max(1, m // 5))))


@needs_onednn
def test_onednn_linear_on_real_weights_and_strided_inputs(base):
    layer = base.model.layers[0].mlp.down_proj
    with torch.no_grad():
        x = torch.randn(1, 64, layer.in_features * 2)[..., ::2]    # not contiguous
        with OneDNNLinear():
            y = layer(x)
        want = layer(x)
    # the two orders of summation differ by at most twice float32's bound, and the route's is within one
    assert ((y.double() - want.double()).abs() <= 2 * float32_bound(x, layer.weight)).all()
    exact = x.double() @ layer.weight.double().T
    assert ((y.double() - exact).abs() <= float32_bound(x, layer.weight)).all()


@needs_onednn
def test_gradients_through_the_route_are_atens_and_the_forward_is_the_same():
    torch.manual_seed(0)
    x = torch.randn(3, 9, 40, requires_grad=True)
    w, b = torch.randn(24, 40, requires_grad=True), torch.randn(24, requires_grad=True)
    weights = torch.randn(24)
    with OneDNNLinear():
        y = F.linear(x, w, b)
        with torch.no_grad():
            assert torch.equal(F.linear(x, w, b), y.detach())   # the forward is the no-gradient one, bit for bit
    (y * weights).sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    (F.linear(x, w, b) * weights).sum().backward()
    for g, t in zip(got, (x, w, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_route_is_taken_only_where_it_applies(monkeypatch):
    calls = []
    real = lp._linear
    monkeypatch.setattr(lp, "_linear", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with OneDNNLinear():
        F.linear(x, w)
        F.linear(x, torch.nn.Parameter(w), torch.nn.Parameter(torch.randn(8)))   # a module's parameters
        assert torch.equal(F.linear(input=x, weight=w), F.linear(x, w))            # arguments by name
        assert len(calls) == 4
        F.linear(x.bfloat16(), w.bfloat16())      # not float32
        F.linear(torch.randn(16), w)              # one vector: ATen's
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            F.linear(x, w)                        # bfloat16-rounded products: ATen's own oneDNN path
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = "none"
    assert len(calls) == 4
    F.linear(x, w)                                # outside
    assert len(calls) == 4


def test_the_library_is_chosen_by_the_cpu(choice, monkeypatch):
    choice(None)
    monkeypatch.setattr(lp, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert float32_gemm() == ("onednn" if onednn else "aten")
    float32_gemm.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")   # MKL's own AVX2 code there
    assert float32_gemm() == "aten"
    float32_gemm.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(lp, "cpu_vendor", lambda: "GenuineIntel")                   # MKL's AVX-512 code there
    assert float32_gemm() == "aten"
    choice("aten")
    assert float32_gemm() == "aten"
    choice("blas")
    with pytest.raises(LowbitError, match="LOWBIT_FLOAT32_GEMM must be one of aten, onednn"):
        float32_gemm()


@needs_onednn
@pytest.mark.parametrize("library", ["aten", "onednn"])
def test_products_float32_routes_as_chosen_and_restores(choice, library):
    choice(library)
    before = state()
    with products("float32"):
        assert state() == ("ieee", library == "onednn")
        with products("bfloat16"):
            assert state()[0] == "bf16"
    assert state() == before
    with products("bfloat16"):                   # ATen's own oneDNN path: nothing to route
        assert state() == ("bf16", False)
    with products("float32", linears=False):     # a method's own arithmetic: no Linears, no function mode
        assert state() == ("ieee", False)
    assert state() == before


@needs_onednn
def test_evaluation_numbers_do_not_depend_on_the_library(choice, base, eval_ids):
    # the two libraries sum in different orders: the metrics agree to float32's rounding, not bit for bit
    b = truncated(base, 2)
    model = quantized(truncated(base, 2), bits=4, group_size=64)
    windows = eval_ids[:2, :256]
    got = {}
    for library in ("aten", "onednn"):
        choice(library)
        got[library] = evaluate_quality({"model": model}, windows, base=b, progress=False, base_cache=False)["model"]
    a, o = got["aten"], got["onednn"]
    assert a["tokens"] == o["tokens"]
    assert abs(a["ppl"] - o["ppl"]) <= 1e-5 * a["ppl"]
    assert abs(a["kld"] - o["kld"]) <= 1e-4 * a["kld"]
    assert abs(a["top1"] - o["top1"]) <= 2 / a["tokens"]
