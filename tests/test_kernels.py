import pytest
import torch

from lowbit import IntSpec, LowbitError
from lowbit.algorithms import quantize_rtn
from lowbit.kernels import KERNELS, native, select_kernel
from lowbit.nn import QuantLinear

REF = KERNELS["reference"]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


NATIVE = native.available() and native.isa() > 0
INT4_AUTO = "native-int4" if NATIVE else "cpu-int4"
INT8_AUTO = "native-int8" if NATIVE else "cpu-int8"
LOW_AUTO = "native-int8" if NATIVE and native.q8() and native.q8_level() == 2 else INT4_AUTO   # 2-3-bit codes, packed


@pytest.mark.parametrize("spec,kernel", [
    (IntSpec(8, -1, True), INT8_AUTO),
    (IntSpec(4, 32, True), INT4_AUTO),
    (IntSpec(4, 64, True), INT4_AUTO),
    (IntSpec(4, 64, False), INT4_AUTO),
    (IntSpec(4, 128, False), INT4_AUTO),
    (IntSpec(4, -1, True), INT4_AUTO),
    (IntSpec(4, -1, False), INT4_AUTO),
    (IntSpec(3, 64, False), LOW_AUTO),
    (IntSpec(2, 32, True), LOW_AUTO),
], ids=lambda x: getattr(x, "name", x))
def test_fast_kernel_matches_reference_and_restores_exactly(spec, kernel):
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    qt = quantize_rtn(w, spec)
    assert select_kernel(spec, qt.shape).name == kernel
    names = [kernel] + {"native-int4": ["cpu-int4"], "native-int8": ["cpu-int8"]}.get(kernel, [])
    if spec.bits < 4 and kernel != INT4_AUTO:    # the int4 kernels still run them where chosen by hand
        names = [kernel, INT4_AUTO] + (["cpu-int4"] if NATIVE else [])
    for k in (KERNELS[name] for name in names):
        packed = k.prepare(qt)
        back = k.restore(packed, spec, qt.shape)
        assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.scales, qt.scales)
        for m in (1, 7, 64):
            x = torch.randn(m, 256)
            ref = REF.linear(x, REF.prepare(qt), spec, qt.shape, None)
            out = k.linear(x, packed, spec, qt.shape, None)
            assert out.dtype == x.dtype and out.shape == ref.shape
            assert _rel(out, ref) < 1e-2  # bfloat16 activations (and scales inside the ATen kernels)


def test_real_layers_of_default_model(base):
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.29.mlp.down_proj", "lm_head"):
        w = base.get_submodule(name).weight.detach()
        x = torch.randn(3, w.shape[1])
        for spec in (IntSpec(8, -1, True), IntSpec(4, 64, False)):
            q = QuantLinear(quantize_rtn(w, spec))
            assert q.kernel.name != "reference"
            ref = torch.nn.functional.linear(x, q.dequantized_weight())
            assert _rel(q(x), ref) < 1e-2


def test_auto_falls_back_to_reference_and_forcing_an_unsupported_kernel_fails():
    spec = IntSpec(4, 32, True)
    assert select_kernel(IntSpec(4, 16, True), (100, 48)).name == "reference"  # no kernel takes groups of 16
    assert select_kernel(IntSpec(8, 8, True), (64, 64)).name == "reference"  # int8 in groups of 8
    with pytest.raises(LowbitError, match="cannot run"):
        select_kernel(spec, (100, 64), prefer="cpu-int4")
    with pytest.raises(LowbitError, match="unknown kernel"):
        select_kernel(spec, (96, 64), prefer="fast")


def test_misaligned_storage_is_handled():
    # tensors read from safetensors start at arbitrary offsets; ATen's int8 kernel needs aligned data
    w = torch.randn(64, 128)
    qt = quantize_rtn(w, IntSpec(8, -1, True))
    buf = torch.empty(qt.qweight.numel() + 8, dtype=torch.int8)
    shifted = buf[8:].view(64, 128)
    shifted.copy_(qt.qweight)
    qt.qweight = shifted
    assert shifted.data_ptr() % 64 != 0
    q = QuantLinear(qt)
    x = torch.randn(2, 128)
    assert _rel(q(x), torch.nn.functional.linear(x, q.dequantized_weight())) < 1e-2


def test_quantlinear_keeps_buffer_dtypes_under_model_casts():
    q = QuantLinear(quantize_rtn(torch.randn(32, 64), IntSpec(4, 32, False)), bias=torch.randn(32))
    dtypes = {k: v.dtype for k, v in q._buffers.items()}
    q.to(torch.bfloat16)
    assert {k: v.dtype for k, v in q._buffers.items()} == dtypes
    assert q.bias.dtype == torch.bfloat16


def test_resident_memory_shrinks():
    w = torch.randn(1536, 576)
    for spec, bound in ((IntSpec(4, 64, True), 0.20), (IntSpec(8, -1, True), 0.27)):
        q = QuantLinear(quantize_rtn(w, spec))
        assert q.resident_bytes / (w.numel() * 4) < bound
