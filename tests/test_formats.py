import pytest
import torch

from lowbit import IntSpec, LowbitError, QuantizedTensor
from lowbit.algorithms import quantize_rtn
from lowbit.formats import FORMATS, FloatSpec, pack_bits, spec_from_dict, unpack_bits

SPECS = [IntSpec(b, g, s) for b in (2, 3, 4, 5, 6, 7, 8) for g in (32, 64, -1) for s in (True, False)]


def test_uint4_pack_round_trip_all_pairs():
    codes = torch.arange(256, dtype=torch.int32)
    pairs = torch.stack([codes % 16, codes // 16], dim=-1).to(torch.uint8).reshape(1, 512)
    packed = pack_bits(pairs, 4)
    assert packed.shape == (1, 256)
    assert torch.equal(packed[0], torch.arange(256, dtype=torch.uint8))  # low nibble = even column
    assert torch.equal(unpack_bits(packed, 4), pairs)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_random_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (37, 96), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (37, 96 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_bit_stream_layout_of_3_and_2_bits():
    # codes 1..8 as a little-endian 3-bit stream: 0b000_111_110_101_100_011_010_001 -> bytes 0xD1, 0x58, 0x1F
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [[0xD1, 0x58, 0x1F]]
    assert pack_bits(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]


def test_pack_rejects_bad_lengths_and_out_of_range():
    with pytest.raises(LowbitError):
        pack_bits(torch.zeros(2, 3, dtype=torch.uint8), 4)
    with pytest.raises(LowbitError):
        pack_bits(torch.zeros(2, 4, dtype=torch.uint8), 3)
    with pytest.raises(LowbitError):
        pack_bits(torch.full((2, 2), 16, dtype=torch.uint8), 4)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_rtn_error_bound_and_code_range(spec):
    torch.manual_seed(0)
    w = torch.randn(48, 192) * torch.logspace(-2, 0, 48).unsqueeze(1)
    qt = quantize_rtn(w, spec)
    codes = qt.codes()
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    g = spec.group_size_for(192)
    step = qt.scales.float().repeat_interleave(g, dim=1)
    err = (qt.dequantize() - w).abs()
    # round to nearest: at most half a step; the scale's float16 rounding (relative 2^-11) can move the
    # clamped end of the range by up to (qmax - qmin) of those
    assert torch.all(err <= step * (0.5 + (spec.qmax - spec.qmin) * 2**-11) + 1e-7)
    assert (err / step).mean() < 0.3
    if spec.symmetric:
        assert qt.zeros is None
        # below 8 bits the full-code grid (step absmax / (2^(b-1) - 0.5)) reaches both ends of the code range
        lo = spec.qmin if spec.bits < 8 else spec.implicit_zero - (spec.qmax - spec.implicit_zero)
        assert codes.min() == lo and codes.max() == spec.qmax
    assert qt.nbytes == spec.nbytes(tuple(w.shape))


def test_bits_per_weight_of_stored_layout():
    shape = (576, 576)
    assert IntSpec(4, 64, True).nbytes(shape) * 8 / (576 * 576) == pytest.approx(4 + 16 / 64)
    assert IntSpec(4, 64, False).nbytes(shape) * 8 / (576 * 576) == pytest.approx(4 + 24 / 64)
    assert IntSpec(8, -1, True).nbytes(shape) * 8 / (576 * 576) == pytest.approx(8 + 16 / 576)


def test_zero_group_dequantizes_to_zero():
    w = torch.zeros(16, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    for spec in (IntSpec(4, 32, True), IntSpec(4, 32, False), IntSpec(8, 32, True)):
        deq = quantize_rtn(w, spec).dequantize()
        assert torch.equal(deq[1:], torch.zeros(15, 64))
        assert torch.equal(deq[0, 32:], torch.zeros(32))


def test_asym_beats_sym_on_shifted_weights():
    w = torch.rand(32, 128) + 0.5  # all positive: symmetric wastes half its codes
    e_sym = (quantize_rtn(w, IntSpec(4, 64, True)).dequantize() - w).norm()
    e_asym = (quantize_rtn(w, IntSpec(4, 64, False)).dequantize() - w).norm()
    assert e_asym < 0.6 * e_sym


def test_group_size_must_divide_and_error_lists_working_sizes():
    with pytest.raises(LowbitError, match=r"group size 128 does not divide in_features=576.*32, 64, -1"):
        IntSpec(4, 128, True).check_shape((576, 576), "q_proj")


def test_bad_specs():
    with pytest.raises(LowbitError, match="unsupported bit width"):
        IntSpec(9, 64, True)
    with pytest.raises(LowbitError, match="bits must be an integer, got '4'"):
        IntSpec("4", 64, True)
    with pytest.raises(LowbitError, match="5-bit packing"):
        IntSpec(5, -1, True).check_shape((8, 12))
    with pytest.raises(LowbitError, match="3-bit packing"):
        IntSpec(3, -1, True).check_shape((8, 12))
    with pytest.raises(LowbitError, match="group size"):
        IntSpec(4, 0, True)


def test_validate_catches_wrong_layout():
    qt = quantize_rtn(torch.randn(16, 64), IntSpec(4, 32, False))
    bad = QuantizedTensor(qt.spec, qt.shape, qt.qweight[:, :-1], qt.scales, qt.zeros)
    with pytest.raises(LowbitError, match="qweight"):
        bad.validate("layer")
    with pytest.raises(LowbitError, match="missing tensor 'zeros'"):
        QuantizedTensor(qt.spec, qt.shape, qt.qweight, qt.scales, None).validate("layer")
    nan_scales = qt.scales.clone()
    nan_scales[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        QuantizedTensor(qt.spec, qt.shape, qt.qweight, nan_scales, qt.zeros).validate("layer")


@pytest.mark.parametrize("spec", [IntSpec(4, 64, False), IntSpec(6, -1, True), FloatSpec("e5m2")], ids=lambda s: s.name)
def test_registry_maps_records_back_to_formats(spec):
    assert spec_from_dict(spec.to_dict()) == spec
    assert FORMATS[spec.kind] is type(spec)
    w = torch.randn(32, 64)
    qt = spec.quantize(w)
    assert set(qt.tensors()) == set(spec.layout((32, 64))) and qt.nbytes == spec.nbytes((32, 64))
    assert torch.equal(QuantizedTensor.from_codes(qt.codes(), qt.scales, qt.zeros, spec).dequantize(), qt.dequantize())
    assert spec.describe()


def test_records_without_a_kind_are_integer_formats_and_unknown_kinds_are_refused():
    assert spec_from_dict({"bits": 4, "group_size": 64, "symmetric": True}) == IntSpec(4, 64, True)
    with pytest.raises(LowbitError, match="unknown weight format kind 'q9'"):
        spec_from_dict({"kind": "q9"})


@pytest.mark.parametrize("spec", [IntSpec(4, 64, True), IntSpec(4, 64, False), IntSpec(3, -1, False),
                                  IntSpec(8, 32, True), IntSpec(2, 32, False)], ids=lambda s: s.name)
def test_weighted_range_search_native_equals_the_tensor_code_bit_for_bit(spec, monkeypatch):
    from lowbit.formats import intq
    from lowbit.kernels import native
    if not native.available():
        pytest.skip(str(native.load()))
    g = torch.Generator().manual_seed(spec.bits)
    w = torch.randn(37, 576, generator=g) * 0.02
    w[0] = 0                       # an all-zero row: every candidate scale is the floor
    w[1, :64] *= 50                # heavy tails
    imp = torch.rand(576, generator=g)
    imp[5] = 0
    native_result = intq.search_qparams(w, spec, imp)
    steps = torch.rand(3, 37, 576 // spec.group_size_for(576), generator=g) * 0.01 + 1e-4
    zeros = torch.randint(0, 2 ** spec.bits, steps.shape, generator=g).float()
    wg = w.reshape(37, steps.shape[2], -1)
    native_errors = intq.grid_errors(wg, imp.reshape(wg.shape[1:]), steps, zeros, spec.qmin, spec.qmax)
    monkeypatch.setattr(intq, "_native_serves", lambda x: False)
    tensor_result = intq.search_qparams(w, spec, imp)
    assert torch.equal(native_result[0], tensor_result[0])
    assert (native_result[1] is None) == (tensor_result[1] is None)
    if native_result[1] is not None:
        assert torch.equal(native_result[1], tensor_result[1])
    assert torch.equal(native_errors, intq.grid_errors(wg, imp.reshape(wg.shape[1:]), steps, zeros, spec.qmin,
                                                       spec.qmax))


def test_native_grid_errors_sum_as_aten_does():
    from lowbit.formats.intq import sum_width
    from lowbit.kernels import native
    if not native.available():
        pytest.skip(str(native.load()))
    for g in (1, 5, 16, 32, 64, 128, 576, 1536, 4096):   # single values, one vector and a tail, the cascade's levels
        assert sum_width(g) is not None, g


@pytest.mark.parametrize("spec", [IntSpec(4, 64, True), IntSpec(4, 64, False), IntSpec(8, -1, True),
                                  IntSpec(3, 32, False), IntSpec(8, 32, False), IntSpec(4, 64, True, scale_bits=6)],
                         ids=lambda s: s.name)
def test_fake_quantize_equals_quantize_then_dequantize(spec):
    g = torch.Generator().manual_seed(spec.bits)
    for w in (torch.randn(30, 512, generator=g) * 0.02, torch.zeros(4, 512), torch.randn(3, 512, generator=g) * 1e-6):
        assert torch.equal(spec.fake_quantize(w), spec.quantize(w).dequantize(torch.float32))
