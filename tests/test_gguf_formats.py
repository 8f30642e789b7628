"""GGUF block formats (formats.gguf): bytes and dequantization against gguf-py, llama.cpp's k-quant bytes (kept as
digests), what the scale searches buy, sizes, errors, and the path through kernels, QuantLinear and checkpoints."""

import hashlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

import lowbit
from lowbit import LowbitError
from lowbit.formats import GGUF_TYPES, GGUFSpec, QuantizedTensor, fallback_type, spec_from_dict
from lowbit.kernels import select_kernel
from lowbit.nn import QuantLinear, set_submodule

from conftest import truncated

SIMPLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@pytest.fixture(scope="module")
def down_proj(default_loaded):
    """A real weight with in_features 1536 = 6 x 256, so every k-quant applies."""
    return default_loaded.model.model.layers[0].mlp.down_proj.weight.detach().clone()


@pytest.fixture(scope="module")
def real_q(down_proj):
    """(type, rotated) -> the QuantizedTensor of down_proj (or of off_grid(down_proj)), each quantized once."""
    cache = {}

    def get(t, rotated=False):
        if (t, rotated) not in cache:
            cache[t, rotated] = GGUFSpec(t).quantize(off_grid(down_proj) if rotated else down_proj)
        return cache[t, rotated]
    return get


def same_bits(a, b) -> bool:
    """Bit-identical float32 arrays (NaN equals NaN, but -0 differs from +0)."""
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and bool(((a.view(np.int32) == b.view(np.int32)) | (np.isnan(a) & np.isnan(b))).all())


def gguf_dequant(spec, qweight):
    return gguf_quants.dequantize(qweight.numpy(), GGMLQuantizationType[spec.type])


def weights(n, k, seed=0):
    """Gaussian rows with zero rows, a half-zero row, tiny, huge, one-signed and constant rows mixed in."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0] = 0
    w[1, : k // 2] = 0
    w[2] *= 1e-6
    w[3] *= 3e3
    w[4] = w[4].abs()
    w[5] = -w[5].abs()
    w[6] = -0.375
    w[7] = -0.0
    return w


def synthetic():
    """Integer-only arithmetic, then plain float32 ops: the same weights on every platform and torch version."""
    i = torch.arange(24 * 1024, dtype=torch.int64)
    u = ((i * 2654435761 + 12345) % (1 << 24)).float() / (1 << 24) - 0.5
    w = (u * u * u * 8 + u).reshape(24, 1024)
    w[1] = 0
    w[2, :300] = 0
    w[3] *= 1e-3
    w[4] *= 300
    w[5] = w[5].abs()
    w[6] = -w[6].abs()
    w[7, 256:512] = -0.25
    return w


# sha256 (first 16 hex digits) of the bytes llama.cpp's quantize_row_q*_K_ref writes (ggml-quants.c built as
# ggml-base is on x86-64: gcc, no FMA) for synthetic() and for the default model's layer-0 down_proj
LLAMA_CPP_DIGESTS = {
    "synthetic": {"Q2_K": "be44e413105e628d", "Q3_K": "262498b49c0996d6", "Q4_K": "1f451c6256e3a14e",
                  "Q5_K": "4a8530e777715ba6", "Q6_K": "86b683e27aeb741b"},
    "down_proj": {"Q2_K": "3040ed0fbe64d954", "Q3_K": "c8f583a9cfffbd15", "Q4_K": "7a46652ed272410d",
                  "Q5_K": "4f8da803fb09ad5a", "Q6_K": "1d8054fa97a5b0a3"},
}


# --- layout and sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", GGUF_TYPES)
def test_block_sizes_match_gguf(t):
    spec = GGUFSpec(t)
    assert (spec.block_size, spec.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[t]]
    n, k = 6, 4 * spec.block_size
    assert spec.layout((n, k)) == {"qweight": ((n, 4 * spec.type_size), torch.uint8)}
    assert spec.nbytes((n, k)) == n * 4 * spec.type_size


def test_bits_per_weight():
    bpw = {t: GGUFSpec(t).bits_per_weight((4, 1536)) for t in GGUF_TYPES}
    assert bpw == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0,
                   "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}


# --- dequantization: bit-exact with gguf-py -----------------------------------------------------------------

@pytest.mark.parametrize("t", GGUF_TYPES)
def test_dequantize_random_blocks_bit_exact(t):
    """Random bytes are every kind of block: f16 scales huge, tiny, subnormal, zero, Inf and NaN, any codes."""
    spec = GGUFSpec(t)
    g = torch.Generator().manual_seed(1)
    for n, blocks in ((1, 1), (7, 3), (1000, 2)):
        qweight = torch.randint(0, 256, (n, blocks * spec.type_size), generator=g, dtype=torch.uint8)
        qweight[0] = 0      # an all-zero row
        qt = QuantizedTensor(spec, (n, blocks * spec.block_size), qweight)
        with np.errstate(all="ignore"):
            assert same_bits(qt.dequantize().numpy(), gguf_dequant(spec, qweight))
        assert torch.equal(spec.pack_fields(spec.unpack_fields(qweight)), qweight)


@pytest.mark.parametrize("t", GGUF_TYPES)
def test_dequantize_quantized_weights_bit_exact(t, real_q):
    spec = GGUFSpec(t)
    for qt in (spec.quantize(weights(64, 512)), spec.quantize(weights(8, 256, seed=2) * 1e-3), real_q(t)):
        assert same_bits(qt.dequantize().numpy(), gguf_dequant(spec, qt.qweight))
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16


# --- quantization -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", SIMPLE)
def test_quantize_matches_gguf_py_bytes(t, down_proj):
    spec = GGUFSpec(t)
    huge = weights(32, 256, seed=3) * 4      # row 3 reaches ~4e4: Q4_1's f16 min still holds it
    for w in (weights(300, 256), weights(9, 96, seed=4) * 1e-30, huge, down_proj):
        assert np.array_equal(spec.quantize(w).qweight.numpy(),
                              gguf_quants.quantize(w.numpy(), GGMLQuantizationType[t]))


@pytest.mark.parametrize("t", KQUANTS)
def test_kquants_match_llama_cpp_bytes(t, real_q):
    for name, qt in (("synthetic", GGUFSpec(t).quantize(synthetic())), ("down_proj", real_q(t))):
        got = qt.qweight.numpy().tobytes()
        assert hashlib.sha256(got).hexdigest()[:16] == LLAMA_CPP_DIGESTS[name][t], name


def plain_kquant(spec, w):
    """The same grid filled by plain rounding: each sub-block's scale from its min/max (or signed absmax), the
    sub-block scales rounded against the largest one, weights rounded to nearest."""
    n, k = w.shape
    t, sub = spec.type, 32 if spec.type in ("Q4_K", "Q5_K") else 16
    x = w.reshape(n, k // 256, 256 // sub, sub)
    if t in ("Q2_K", "Q4_K", "Q5_K"):
        nmax, smax = {"Q2_K": (3, 15), "Q4_K": (15, 63), "Q5_K": (31, 63)}[t]
        lo = x.amin(-1).clamp(max=0)
        s, m = (x.amax(-1) - lo) / nmax, -lo
        d, dmin = (s.amax(-1) / smax).half(), (m.amax(-1) / smax).half()
        sc = torch.round(s / d.float()[..., None].clamp(min=1e-30)).clamp(0, smax)
        mn = torch.round(m / dmin.float()[..., None].clamp(min=1e-30)).clamp(0, smax)
        step = (d.float()[..., None] * sc)[..., None]
        q = torch.round((x + (dmin.float()[..., None] * mn)[..., None]) / step.clamp(min=1e-30)).clamp(0, nmax)
        fields = {"d": d, "dmin": dmin, "scales": sc, "mins": mn, "q": q}
    else:
        half, smin, smax = (4, -32, 31) if t == "Q3_K" else (32, -128, 127)
        big = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
        s = big / -half
        sbig = s.gather(-1, s.abs().argmax(-1, keepdim=True))
        d = (sbig / -(smax + 1 if t == "Q6_K" else 32)).squeeze(-1).half()
        sc = torch.round(torch.nan_to_num(s / d.float()[..., None])).clamp(smin, smax)
        step = (d.float()[..., None] * sc)[..., None]
        q = torch.round(torch.nan_to_num(x / step)).clamp(-half, half - 1) + half
        fields = {"d": d, "scales": sc + (32 if t == "Q3_K" else 0), "q": q}
    fields = {key: v if v.dtype == torch.float16 else v.reshape(n, k // 256, -1).to(torch.int32)
              for key, v in fields.items()}
    return QuantizedTensor(spec, (n, k), spec.pack_fields(fields)).dequantize()


def off_grid(w):
    """The default model's weights sit on its GGUF's Q4_1 grid (16 levels per block of 32), which Q4_K's
    sub-blocks of 32 would line up with (Q4_K then looks better than Q5_K). Rotating the columns by 16 makes
    every sub-block of 32 straddle two of those blocks; the values stay the real ones."""
    return w.roll(16, dims=1)


def rel_err(w, w_hat):
    return ((w - w_hat).norm() / w.norm()).item()


@pytest.mark.parametrize("t", KQUANTS)
def test_kquant_search_beats_plain_rounding(t, down_proj, real_q):
    spec = GGUFSpec(t)
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(5))
    cases = [(w, spec.quantize(w)), (synthetic(), spec.quantize(synthetic())), (off_grid(down_proj), real_q(t, True))]
    for w, qt in cases:
        assert rel_err(w, qt.dequantize()) < rel_err(w, plain_kquant(spec, w))


def test_error_ordering_on_a_real_weight(down_proj, real_q):
    order = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
    errs = [rel_err(off_grid(down_proj), real_q(t, True).dequantize()) for t in order]
    assert errs == sorted(errs) and len(set(errs)) == len(errs), dict(zip(order, errs))


@pytest.mark.parametrize("t", ("Q4_0", "Q5_0"))
def test_requantizing_dequantized_weights_is_a_fixed_point(t, down_proj):
    """d = max / -8 (-16) is exact on a dequantized block (the max is -8·d), so every code comes back."""
    spec = GGUFSpec(t)
    for w in (down_proj, weights(64, 256)[8:]):
        qt = spec.quantize(w)
        assert torch.equal(spec.quantize(qt.dequantize()).qweight, qt.qweight)


@pytest.mark.parametrize("t", GGUF_TYPES)
def test_fields_and_codes(t):
    spec = GGUFSpec(t)
    w = weights(16, 512)
    qt = spec.quantize(w)
    f = spec.unpack_fields(qt.qweight)
    lo, hi = spec.block.code_range
    codes = qt.codes()
    assert codes.shape == (16, 512) and codes.dtype == torch.int32
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert torch.equal(codes, f["q"].reshape(16, 512))
    assert all(v.shape[:2] == (16, 512 // spec.block_size) for v in f.values())
    assert torch.equal(spec.pack_fields(f), qt.qweight)
    with pytest.raises(LowbitError, match="must lie in"):
        spec.pack_fields({**f, "q": f["q"] + (hi - lo + 1)})
    with pytest.raises(LowbitError, match="pack_fields"):
        spec.pack(codes)


# --- errors, registry, fallback -----------------------------------------------------------------------------

def test_bad_input_gives_one_clear_error():
    with pytest.raises(LowbitError, match="unknown GGUF type 'Q4_2'; valid: Q8_0, Q4_0, .*Q6_K"):
        GGUFSpec("Q4_2")
    with pytest.raises(LowbitError, match="model.layers.0.mlp.up_proj: in_features=576 is not a multiple of "
                                          "Q4_K's block of 256; types that fit: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; "
                                          "llama.cpp would store it as Q5_0"):
        GGUFSpec("Q4_K").quantize(torch.randn(8, 576), name="model.layers.0.mlp.up_proj")
    with pytest.raises(LowbitError, match="in_features=100 .* types that fit: none"):
        GGUFSpec("Q8_0").check_shape((4, 100))
    with pytest.raises(LowbitError, match="NaN or Inf"):
        GGUFSpec("Q4_0").quantize(torch.full((2, 32), float("nan")))
    with pytest.raises(LowbitError, match="too large for Q8_0's float16 block scales"):
        GGUFSpec("Q8_0").quantize(torch.full((2, 32), 1e8))


def test_registry_round_trip():
    for t in GGUF_TYPES:
        spec = spec_from_dict({"kind": "gguf", "type": t})
        assert spec == GGUFSpec(t) and spec_from_dict(spec.to_dict()) == spec
        assert spec.name == f"gguf_{t.lower()}" and t in spec.describe()


def test_fallback_type_follows_llama_cpp():
    assert {t: fallback_type(t, 576) for t in KQUANTS} == {
        "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
    assert all(fallback_type(t, 1536) == t for t in GGUF_TYPES)
    assert fallback_type("Q4_K", 100) == "F16"
    with pytest.raises(LowbitError, match="no fallback"):
        fallback_type("Q4_0", 100)
    with pytest.raises(LowbitError, match="unknown GGUF type"):
        fallback_type("q4_k", 256)


# --- kernels, QuantLinear, checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("t", GGUF_TYPES)
def test_reference_kernel_and_quant_linear(t):
    """On the reference kernel a GGUF layer is exactly its dequantized weight's Linear; by default it runs on the
    native kernels (codes of at most 4 bits in 32-column sub-blocks on native-int4; 16-column sub-blocks only
    where the CPU has them), close to it, and either way the layer gives back its stored bytes exactly."""
    from lowbit.kernels import native
    spec = GGUFSpec(t)
    w, bias = weights(48, 512), torch.randn(48)
    qt = spec.quantize(w)
    x = torch.randn(3, 5, 512)
    want = torch.nn.functional.linear(x, qt.dequantize(), bias)
    layer = QuantLinear(qt, bias, kernel="reference")
    assert torch.equal(layer(x), want)
    assert torch.equal(layer.quantized_tensor().qweight, qt.qweight)
    auto = QuantLinear(qt, bias)
    sub, _lo, hi = spec.integer_groups(512)
    if not native.available() or sub % 32 and not native.q8():
        expected = "reference"            # 16-column sub-blocks: native only on int8 activations
    else:
        expected = "native-int4" if hi <= 15 and sub % 32 == 0 else "native-int8"
    assert auto.kernel.name == expected
    assert ((auto(x) - want).norm() / want.norm()).item() < 2e-2
    assert torch.equal(auto.quantized_tensor().qweight, qt.qweight)


def test_checkpoint_round_trip(base, tokenizer, tmp_path):
    model = truncated(base, 2)
    for name, t in (("model.layers.0.mlp.down_proj", "Q4_K"), ("model.layers.1.mlp.down_proj", "Q6_K"),
                    ("model.layers.0.mlp.up_proj", fallback_type("Q4_K", 576)),
                    ("model.layers.1.self_attn.q_proj", "Q8_0")):
        linear = model.get_submodule(name)
        set_submodule(model, name, QuantLinear(GGUFSpec(t).quantize(linear.weight, name=name), linear.bias))
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(ids).logits
    lowbit.save_checkpoint(model, tokenizer, tmp_path / "gguf")
    loaded = lowbit.load_checkpoint(tmp_path / "gguf").model
    with torch.no_grad():
        assert torch.equal(before, loaded(ids).logits)
    assert loaded.model.layers[0].mlp.up_proj.spec == GGUFSpec("Q5_0")
    from lowbit.kernels import native
    on_q8 = native.available() and native.q8()   # Q6_K's 16-column sub-blocks: native on int8 activations
    assert loaded.model.layers[1].mlp.down_proj.kernel.name == ("native-int8" if on_q8 else "reference")
