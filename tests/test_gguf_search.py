"""The native GGUF searches (kernels/csrc/gguf_search.cpp) against the tensor code they replace
(formats.gguf._make_qx, _make_qkx2, _make_qp, _make_q3): bit-identical scales, mins and codes on awkward rows, and identical bytes for
every GGUF type, with and without importance, on real weights of the default model."""

import pytest
import torch

from lowbit.formats import GGUF_TYPES, GGUFSpec
from lowbit.formats import gguf as gguf_module
from lowbit.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=str(native.load()))

# (n, nmax) of every make_qx call: Q4_0/Q5_0 under importance, Q3_K codes and scales, Q6_K
QX_CASES = [(32, 8), (32, 16), (16, 4), (16, 32)]
# (n, nmax, rmin, rdelta, nstep, use_mad) of every make_qkx2 call: Q2_K, Q4_K, Q5_K, and the importance searches
QKX2_CASES = [(16, 3, -0.5, 0.1, 15, True), (32, 15, -1.0, 0.1, 20, False), (32, 31, -0.5, 0.1, 15, False),
              (32, 15, -0.9, 0.05, 36, False), (32, 31, -0.9, 0.05, 36, False), (16, 3, -0.9, 0.05, 36, False)]


def awkward_rows(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows mixed with tiny, heavy-tailed, all-zero, sparse (zeros of both signs), one-signed and
    constant rows; `rows` not a multiple of the 16 rows searched together."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    x[::7] *= 1e-3
    x[1::11] = torch.randn(x[1::11].shape, generator=g).pow(3)
    x[2::13] = 0.0
    keep = torch.rand(x[3::5].shape, generator=g) > 0.3
    x[3::5] = torch.where(keep, x[3::5], torch.zeros(())) * torch.randn(x[3::5].shape, generator=g).sign()
    x[4::17] = -x[4::17].abs()
    x[5::19] = x[5::19].abs()
    x[6::23] = -0.25
    x[8::29] *= 1e-20
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (signed zeros and NaN payloads included)."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture
def tensor_code(monkeypatch):
    """Run the searches as tensor code (the reference) inside the `with` block."""
    class Switch:
        def __enter__(self):
            monkeypatch.setattr(gguf_module, "native_searches", lambda x: False)

        def __exit__(self, *exc):
            monkeypatch.undo()
    return Switch()


@pytest.mark.parametrize("n,nmax", QX_CASES)
def test_make_qx_is_bit_identical(n, nmax, tensor_code):
    x = awkward_rows(1001, n)
    for w in (torch.rand(1001, n, generator=torch.Generator().manual_seed(1)) + 0.01, None):
        scale, codes = gguf_module._make_qx(x, nmax, w)
        with tensor_code:
            ref_scale, ref_codes = gguf_module._make_qx(x, nmax, w)
        assert same_bits(scale, ref_scale) and torch.equal(codes, ref_codes)


@pytest.mark.parametrize("case", QKX2_CASES)
def test_make_qkx2_is_bit_identical(case, tensor_code):
    n, nmax, *search = case
    x = awkward_rows(1001, n, seed=2)
    w = torch.rand(1001, n, generator=torch.Generator().manual_seed(3)) + x.abs()
    got = gguf_module._make_qkx2(x, w, nmax, *search)
    with tensor_code:
        ref = gguf_module._make_qkx2(x, w, nmax, *search)
    assert all(same_bits(a, b) for a, b in zip(got[:2], ref[:2])) and torch.equal(got[2], ref[2])


def test_make_q3_is_bit_identical(tensor_code):
    x = awkward_rows(1001, 16, seed=7)
    scale, codes = gguf_module._make_q3(x, 4)
    with tensor_code:
        ref_scale, ref_codes = gguf_module._make_q3(x, 4)
    assert same_bits(scale, ref_scale) and torch.equal(codes, ref_codes)


@pytest.mark.parametrize("n,nmax", [(8, 63), (16, 15)])
def test_make_qp_is_bit_identical(n, nmax, tensor_code):
    """Sub-block scales and mins (non-negative, some rows all zero) weighted by sub-block importance."""
    x = awkward_rows(1001, n, seed=5).abs()
    w = torch.rand(1001, n, generator=torch.Generator().manual_seed(6)).pow(3) * 50
    scale, codes = gguf_module._make_qp(x, nmax, w)
    with tensor_code:
        ref_scale, ref_codes = gguf_module._make_qp(x, nmax, w)
    assert same_bits(scale, ref_scale) and torch.equal(codes, ref_codes)


@pytest.mark.parametrize("t", [t for t in GGUF_TYPES if t != "Q8_0"])
def test_every_type_writes_the_same_bytes(t, default_loaded, tensor_code):
    """Real weights of the default model (a down_proj for the k-quants, whose rows are 6 x 256; a q_proj for the
    32-weight types), plain and under an importance vector."""
    layer = default_loaded.model.model.layers[3]
    spec = GGUFSpec(t)
    w = (layer.mlp.down_proj if spec.block.block_size == 256 else layer.self_attn.q_proj).weight.detach()
    importance = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(4)).pow(4) + 1e-3
    for imp in (None, importance):
        got = spec.quantize(w, importance=imp).qweight
        with tensor_code:
            ref = spec.quantize(w, importance=imp).qweight
        assert torch.equal(got, ref), f"{t} importance={imp is not None}"


def test_rows_it_cannot_take_go_to_the_tensor_code():
    assert not gguf_module.native_search(torch.zeros(4, 65))
    assert not gguf_module.native_search(torch.zeros(4, 32, dtype=torch.float64))
    x = awkward_rows(40, 80)
    scale, codes = gguf_module._make_qx(x, 8)      # rows longer than 64: the tensor code, no error
    assert scale.shape == (40,) and codes.shape == x.shape
    with pytest.raises(RuntimeError, match="rows of 1 to 64"):
        torch.ops.lowbit.gguf_make_qx(torch.zeros(4, 65), torch.zeros(4, 65), 8)
