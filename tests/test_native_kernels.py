"""lowbit's native CPU kernel (csrc/cpu_gemm.cpp) against the reference kernel: every instruction-set path
this CPU has, odd shapes and group tails, real layers, the compiled engine, and the fallback without it."""

import os
import subprocess
import sys

import pytest
import torch

from lowbit import IntSpec
from lowbit.algorithms import quantize_rtn
from lowbit.formats import GGUFSpec, QuantizedTensor
from lowbit.kernels import KERNELS, native, select_kernel
from lowbit.kernels.base import DENSE_FROM_ROWS
from lowbit.kernels.cpu import int4pack_block_rows
from lowbit.kernels.native_int4 import from_row_blocks, offsets_of, pack_chunks, scales_of, to_row_blocks, unpack_chunks
from lowbit.nn import QuantLinear

pytestmark = pytest.mark.skipif(not native.available(), reason=str(native.load()))
REF = KERNELS["reference"]
NATIVE = KERNELS["native-int4"]
NATIVE8 = KERNELS["native-int8"]


def packed4(codes):
    """codes [N, K] of 0..15 as native-int4 keeps them resident."""
    return to_row_blocks(pack_chunks(codes))


def blocks8(codes):
    """int8 codes [N, K] as native-int8 keeps byte codes resident."""
    return to_row_blocks(codes.to(torch.int8))


def test_layout_round_trips_and_puts_columns_where_documented():
    codes = torch.randint(0, 16, (5, 192), dtype=torch.uint8)
    wpack = pack_chunks(codes)
    assert wpack.shape == (5, 96) and torch.equal(unpack_chunks(wpack), codes)
    # byte j of chunk c: column 64c + j low, 64c + 32 + j high
    assert wpack[2, 32 + 7] == codes[2, 64 + 7] | (codes[2, 96 + 7] << 4)


@pytest.mark.parametrize("m,n,k,group", [(1, 1536, 576, 64), (1, 33, 64, 32), (3, 100, 576, 32),
                                         (5, 77, 1536, 128), (9, 17, 192, 192), (2, 8, 256, 256)])
def test_every_path_equals_exact_float_math(m, n, k, group):
    """Every instruction-set path against float64 math on the same bfloat16-rounded activations: the codes
    are exact and every sum float32, so the only difference is float32 rounding."""
    g = torch.Generator().manual_seed(m * n + k)
    codes = torch.randint(0, 16, (n, k), generator=g)
    s = torch.rand(n, k // group, generator=g) * 0.1
    z = torch.randint(0, 16, (n, k // group), generator=g).float()
    x = torch.randn(m, k, generator=g) * 3
    w = ((codes.double().view(n, -1, group) - z.double()[..., None]) * s.double()[..., None]).reshape(n, k)
    want = x.to(torch.bfloat16).double() @ w.t()
    for isa in range(native.isa() + 1):
        y = torch.ops.lowbit.int4_gemm(x, packed4(codes), s, (z * s).contiguous(), group, isa)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        err = ((y.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (native.ISA_NAMES[isa], err)
    with pytest.raises(RuntimeError, match="lacks the instructions"):
        torch.ops.lowbit.int4_gemm(x, packed4(codes), s, (z * s).contiguous(), group, native.isa() + 1)


def round_int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """What the int8-activation kernels multiply: each row in blocks of `block` columns, d = max|x| / 127,
    x ≈ d · a with a = round-to-even(x / d) (float64 of the rounded values)."""
    m, k = x.shape
    b = x.reshape(m, k // block, block)
    d = b.abs().amax(-1, keepdim=True) / 127
    a = torch.where(d > 0, torch.round(b / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(b))
    return (a.double() * d.double()).reshape(m, k)


q8 = pytest.mark.skipif(not native.available() or not native.q8(), reason="this CPU has neither AVX-512 VNNI nor AVX2")
Q8_LEVELS = range(1, native.q8_level() + 1) if native.available() else ()   # every int8-activation path this CPU runs


@q8
@pytest.mark.parametrize("m,n,k,group", [(1, 1536, 576, 64), (1, 33, 64, 32), (3, 100, 576, 32),
                                         (5, 77, 1536, 128), (9, 17, 192, 192), (2, 8, 256, 256),
                                         (1, 64, 576, 576), (2, 20, 640, 64), (1, 24, 320, 160)])
def test_int8_activation_kernels_equal_exact_math_on_the_rounded_activations(m, n, k, group):
    """int4_gemm_q8 / int8_gemm_q8: activations rounded to int8 per block (64 columns for int4, 32 for int8),
    integer dot products, float32 scale sums: equal to float64 math on the rounded activations to float32
    rounding, for every scale mode (per channel, groups spanning a step, pairs, groups of 32) and K tails."""
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g) * 3
    x[0, 5] = 40.0    # an outlier channel: its block's scale, not the others'
    s = torch.rand(n, k // group, generator=g) * 0.1
    codes = torch.randint(0, 16, (n, k), generator=g)
    z = torch.randint(0, 16, (n, k // group), generator=g).float()
    w = ((codes.double().view(n, -1, group) - z.double()[..., None]) * s.double()[..., None]).reshape(n, k)
    c8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    c8[0, :64] = -128    # the extreme codes: AVX2 multiplies |q| by a · sign q, which must not wrap at -128
    c8[-1, :64] = 127
    z8 = torch.randint(-5, 5, (n, k // group), generator=g).float()
    w8 = ((c8.double().view(n, -1, group) - z8.double()[..., None]) * s.double()[..., None]).reshape(n, k)
    want8 = round_int8_blocks(x, 32) @ w8.t()
    for level in Q8_LEVELS:   # AVX-512 VNNI and AVX2 where the CPU has both
        if k % 64 == 0:
            want = round_int8_blocks(x, 64) @ w.t()
            got = torch.ops.lowbit.int4_gemm_q8(x, packed4(codes), s, (z * s).contiguous(), group, level=level)
            assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
        got8 = torch.ops.lowbit.int8_gemm_q8(x, blocks8(c8), s, (z8 * s).contiguous(), group, level=level)
        assert ((got8.double() - want8).abs().max() / want8.abs().max()).item() < 1e-5
    # and what the rounding costs against the unrounded activations (the outlier's block rounds coarsely)
    exact = x.double() @ w8.t()
    assert ((got8.double() - exact).norm() / exact.norm()).item() < 5e-2


@pytest.mark.parametrize("n", [1, 3, 4, 6, 9])
@pytest.mark.parametrize("b", [32, 96, 128])
def test_rows_in_blocks_of_four_sit_where_documented(n, b):
    """to_row_blocks: byte j of row r at r0·B + 64c·t + (r − r0)·w + j % 64 (r0 = r rounded down to a multiple of
    4, t the rows of its block, c = j // 64, w the step's width: 64, or 32 for a last half step), the offset
    csrc/cpu_gemm.cpp's block_offset computes; from_row_blocks undoes it."""
    t = torch.arange(n * b).reshape(n, b)
    stored = to_row_blocks(t)
    assert stored.shape == t.shape and torch.equal(from_row_blocks(stored), t)
    r, j = torch.arange(n)[:, None], torch.arange(b)[None, :]
    r0, c = r - r % 4, j // 64
    rows, width = (n - r0).clamp(max=4), (b - 64 * c).clamp(max=64)
    assert torch.equal(stored.reshape(-1)[r0 * b + 64 * c * rows + (r - r0) * width + j % 64], t)


@q8
def test_zero_and_bfloat16_activations():
    codes = torch.randint(0, 16, (16, 128))
    s = torch.rand(16, 2) * 0.1
    zero = torch.zeros(1, 128)
    assert torch.equal(torch.ops.lowbit.int4_gemm_q8(zero, packed4(codes), s, s, 64), torch.zeros(1, 16))
    # bfloat16 rows are read as they are (widened in registers): the same bits as their float32 values give,
    # for both ops, a non-contiguous input and a tail of 32 columns (int8: K = 160)
    x = torch.randn(3, 128).to(torch.bfloat16)
    got = torch.ops.lowbit.int4_gemm_q8(x, packed4(codes), s, s, 64)
    assert torch.equal(got, torch.ops.lowbit.int4_gemm_q8(x.float(), packed4(codes), s, s, 64))
    wide = torch.randn(3, 256).to(torch.bfloat16)[:, ::2]
    assert torch.equal(torch.ops.lowbit.int4_gemm_q8(wide, packed4(codes), s, s, 64),
                       torch.ops.lowbit.int4_gemm_q8(wide.float(), packed4(codes), s, s, 64))
    c8 = torch.randint(-128, 128, (16, 160), dtype=torch.int8)
    s8 = torch.rand(16, 5) * 0.1
    x8 = torch.randn(3, 160).to(torch.bfloat16)
    assert torch.equal(torch.ops.lowbit.int8_gemm_q8(x8, blocks8(c8), s8, s8, 32),
                       torch.ops.lowbit.int8_gemm_q8(x8.float(), blocks8(c8), s8, s8, 32))


@pytest.mark.parametrize("m,n,k,group", [(1, 1536, 576, 576), (1, 33, 32, 32), (3, 100, 576, 64),
                                         (6, 77, 1536, 96)])
def test_int8_every_path_equals_exact_float_math(m, n, k, group):
    g = torch.Generator().manual_seed(m * n + k)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, k // group, generator=g) * 0.01
    z = torch.randint(-5, 5, (n, k // group), generator=g).float()
    x = torch.randn(m, k, generator=g) * 3
    w = ((codes.double().view(n, -1, group) - z.double()[..., None]) * s.double()[..., None]).reshape(n, k)
    want = x.to(torch.bfloat16).double() @ w.t()
    for isa in range(native.isa() + 1):
        y = torch.ops.lowbit.int8_gemm(x, blocks8(codes), s, (z * s).contiguous(), group, isa)
        err = ((y.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (native.ISA_NAMES[isa], err)


@pytest.mark.parametrize("spec", [IntSpec(8, -1, True), IntSpec(8, 64, True), IntSpec(8, 32, False)],
                         ids=lambda s: s.name)
def test_int8_real_layers_match_reference_and_keep_the_storage(base, spec):
    w = base.get_submodule("model.layers.3.mlp.down_proj").weight.detach()
    qt = quantize_rtn(w, spec)
    assert select_kernel(spec, qt.shape).name == "native-int8"
    packed = NATIVE8.prepare(qt)
    assert packed["wq"].shape == qt.qweight.shape and packed["wq"].dtype == torch.int8   # the stored bytes, reordered
    assert torch.equal(from_row_blocks(packed["wq"]), qt.qweight)
    assert "qweight" not in packed
    back = NATIVE8.restore(packed, spec, qt.shape)
    assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.scales, qt.scales)
    dense = qt.dequantize(torch.float32)
    for rows in (1, 5, 64):
        x = torch.randn(rows, w.shape[1])
        decode = rows < DENSE_FROM_ROWS
        seen = round_int8_blocks(x, 32).float() if decode and NATIVE8.q8 else x.to(torch.bfloat16).float()
        want = torch.nn.functional.linear(seen, dense)
        err = ((NATIVE8.linear(x, packed, spec, qt.shape, None) - want).norm() / want.norm()).item()
        assert err < (1e-5 if decode else 1e-2), (rows, err)


def expected_kernel(spec, k):
    """Codes of at most 4 bits on native-int4, else native-int8; 2-3-bit codes on native-int8 where the CPU has
    AVX-512 VNNI (there it keeps them at their width, at native-int4's speed)."""
    qmax = spec.integer_groups(k)[2]
    if qmax > 15 or (int(qmax).bit_length() in (2, 3) and native.q8() and native.q8_level() == 2 and k % 64 == 0):
        return NATIVE8
    return NATIVE


@pytest.mark.parametrize("spec", [IntSpec(5, 64, False), IntSpec(6, 64, True), IntSpec(7, 32, True),
                                  IntSpec(3, 64, False), IntSpec(2, 64, True),
                                  IntSpec(5, 64, False, scale_bits=6, super_block=192), GGUFSpec("Q8_0"), GGUFSpec("Q5_0"),
                                  GGUFSpec("Q5_1"), GGUFSpec("Q5_K"), GGUFSpec("Q4_0"), GGUFSpec("Q4_1"),
                                  GGUFSpec("Q4_K")], ids=lambda s: s.name)
def test_other_integer_formats_run_natively_and_match_reference(base, spec):
    """2-3- and 5-7-bit integer formats and the GGUF types whose sub-blocks are 32 wide run on the native kernels
    through their integer view (expected_kernel): the stored tensors
    come back exactly, and decode and prefill equal the reference's float math on what the kernel sees."""
    names = ["model.layers.29.mlp.down_proj"] + ([] if getattr(spec, "block_size", 32) == 256 else
                                                 ["model.layers.0.self_attn.q_proj"])
    for name in names:
        w = base.get_submodule(name).weight.detach()
        qt = spec.quantize(w) if isinstance(spec, GGUFSpec) else quantize_rtn(w, spec)
        kernel = expected_kernel(spec, w.shape[1])
        assert select_kernel(spec, qt.shape) is kernel
        packed = kernel.prepare(qt)
        back = kernel.restore(packed, spec, qt.shape)
        assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), qt.tensors().values()))
        assert back.tensors().keys() == qt.tensors().keys()
        dense = qt.dequantize(torch.float32)
        for rows in (1, 5, DENSE_FROM_ROWS, 64):
            x = torch.randn(rows, w.shape[1])
            decode = rows < DENSE_FROM_ROWS
            block = 64 if kernel is NATIVE else 32
            seen = round_int8_blocks(x, block).float() if decode and kernel.q8 else x.to(torch.bfloat16).float()
            want = torch.nn.functional.linear(seen, dense)
            err = ((kernel.linear(x, packed, spec, qt.shape, None) - want).norm() / want.norm()).item()
            assert err < (1e-5 if decode else 1e-2), (name, rows, err)


@pytest.mark.parametrize("t", ["Q6_K", "Q3_K", "Q2_K"])
def test_sixteen_wide_sub_blocks_run_on_int8_activations_where_the_cpu_has_them(base, t, monkeypatch):
    """GGUF's 16-column sub-blocks: native-int8 with groups of 16 where the CPU has AVX-512 VNNI or AVX2 (decode on int8
    activations, equal to the float math on the rounded activations; a last 32-column step included), the
    reference kernel elsewhere; the stored bytes come back exactly."""
    spec = GGUFSpec(t)
    if not native.q8():
        assert select_kernel(spec, (64, 256)).name == "reference"
        return
    w = base.get_submodule("model.layers.29.mlp.down_proj").weight.detach()
    for qt in (spec.quantize(w), spec.quantize(w[:77, :1280])):   # 1280 = 20 steps of 64 columns... and 256-multiples
        assert select_kernel(spec, qt.shape) is NATIVE8
        packed = NATIVE8.prepare(qt)
        back = NATIVE8.restore(packed, spec, qt.shape)
        assert torch.equal(back.qweight, qt.qweight)
        dense = qt.dequantize(torch.float32)
        for rows in (1, 3, DENSE_FROM_ROWS):
            x = torch.randn(rows, qt.shape[1])
            decode = rows < DENSE_FROM_ROWS
            seen = round_int8_blocks(x, 32).float() if decode else x.to(torch.bfloat16).float()
            want = torch.nn.functional.linear(seen, dense)
            err = ((NATIVE8.linear(x, packed, spec, qt.shape, None) - want).norm() / want.norm()).item()
            # float32 sums of 4x as many group terms, each offset (zero 32 or 4, code bias 128) large against
            # the result: a few 1e-5 of cancellation, against about 5e-3 that the int8 activations cost
            assert err < (5e-5 if decode else 1e-2), (rows, err)
    x = torch.randn(2, 96)     # groups of 16 on a last step of 32 columns: 96 = one step of 64 and one of 32
    codes = torch.randint(-128, 128, (5, 96), dtype=torch.int8)
    s, off = torch.rand(5, 6) + 0.5, torch.randn(5, 6)
    y = torch.ops.lowbit.int8_gemm_q8(x, blocks8(codes), s, off, 16)
    wd = codes.float() * s.repeat_interleave(16, 1) - off.repeat_interleave(16, 1)
    want = torch.nn.functional.linear(round_int8_blocks(x, 32).float(), wd)
    assert ((y - want).norm() / want.norm()).item() < 1e-5
    monkeypatch.setattr(NATIVE8, "q8", False)    # without int8 activations: the dense path
    x = torch.randn(1, w.shape[1])
    qt = spec.quantize(w)
    got = NATIVE8.linear(x, NATIVE8.prepare(qt), spec, qt.shape, None)
    want = torch.nn.functional.linear(x.to(NATIVE8.dense_dtype).float(), qt.dequantize(torch.float32))
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_dequantize_equals_the_python_formula_bit_for_bit():
    for group in (32, 64, 192):
        qt = quantize_rtn(torch.randn(40, 192), IntSpec(4, group, False))
        packed = NATIVE.prepare(qt)
        want = NATIVE.dense(packed, qt.shape)
        for dtype in (torch.float32, torch.bfloat16):
            got = torch.ops.lowbit.int4_dequant(packed["wpack"], packed["kscales"], packed["offsets"], group, dtype)
            assert got.dtype == dtype and torch.equal(got, want.to(dtype))
        assert torch.allclose(want, qt.dequantize(torch.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,k,group", [(42, 192, 32), (133, 576, 64), (7, 192, 96), (66, 384, 128), (5, 128, 32)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_by_table_equals_the_formula_bit_for_bit(n, k, group, scale_dtype):
    """The dense path's dequantization (a group's 16 values made once, each code looking its value up) against
    q · s − offset in float32 rounded once: rows past a multiple of four (the stored layout's last block), a last
    half step (K % 128 == 64), groups of 32, of 96 (chunks straddling two groups) and of whole chunks, 16-bit
    scales widened per run of 64 rows; a NaN scale gives NaN where the formula does."""
    g = torch.Generator().manual_seed(n * k + group)
    codes = torch.randint(0, 16, (n, k), generator=g)
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).to(scale_dtype)
    off = (torch.randn(n, k // group, generator=g) * 0.05).to(scale_dtype)
    wpack = packed4(codes)
    for nan in (False, True):
        if nan:
            s[n // 2, -1] = float("nan")
        want = codes.float() * s.float().repeat_interleave(group, 1) - off.float().repeat_interleave(group, 1)
        for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
            got = torch.ops.lowbit.int4_dequant(wpack, s, off, group, dtype)
            if nan:
                torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0, equal_nan=True)
            else:
                assert torch.equal(got.view(bits), want.to(dtype).view(bits)), dtype


def test_dense_prefill_path_equals_a_dense_matmul_across_tiles():
    """Many rows: the weight is dequantized a tile of rows at a time (here 5000 rows of 576: two tiles)."""
    qt = quantize_rtn(torch.randn(5000, 576), IntSpec(4, 64, False))
    packed = NATIVE.prepare(qt)
    x = torch.randn(20, 576)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.ops.lowbit.int4_dequant(packed["wpack"], packed["kscales"], packed["offsets"], 64, dtype)
        want = torch.nn.functional.linear(x.to(dtype), w).float()
        got = torch.ops.lowbit.int4_dense_linear(x, packed["wpack"], packed["kscales"], packed["offsets"], 64, dtype)
        assert got.dtype == torch.float32 and got.shape == (20, 5000)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)


def int4pack(codes: torch.Tensor, block: int) -> torch.Tensor:
    """ATen's CPU int4 packing as int4pack_dense_linear's source documents it, for blocks of `block` rows."""
    n, k = codes.shape
    parts = []
    for r in range(0, n, block):
        b = codes[r:r + block].t().to(torch.uint8)    # [k, rows]: column-major within a block
        rows = b.shape[1]
        lo, hi = (b[:, :rows // 2], b[:, rows // 2:]) if rows == block else (b[:, 0::2], b[:, 1::2])
        parts.append((lo | (hi << 4)).reshape(-1))
    return torch.cat(parts).reshape(n, k // 2)


@pytest.mark.parametrize("n,k,group", [(80, 128, 32), (112, 576, 64), (5040, 576, 64), (192, 1536, 256)])
def test_prefill_on_pytorchs_int4_layout_equals_exact_float_math(n, k, group):
    """lowbit::int4pack_dense_linear reads aten._convert_weight_to_int4pack_for_cpu's layout (blocks of 64 rows
    with AVX-512, 32 with AVX2, and a last shorter block; several tiles for 5040 rows): against float64 math on the
    same codes, scales and offsets, for the layout PyTorch writes on this CPU and for every block size as
    documented (the packing written here equals PyTorch's where the sizes match)."""
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    sz = (torch.rand(k // group, n, 2, generator=g) * 0.1).to(torch.bfloat16)
    wpack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    here = int4pack_block_rows()
    assert torch.equal(wpack, int4pack(codes, here))
    s, o = sz[..., 0].double().t().repeat_interleave(group, 1), sz[..., 1].double().t().repeat_interleave(group, 1)
    w = (codes.double() - 8) * s + o
    x = torch.randn(DENSE_FROM_ROWS + 3, k, generator=g)
    for block in (here, *({16, 32, 64} - {here})):
        packed = int4pack(codes, block)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            want = x.to(dtype).double() @ w.t()
            got = torch.ops.lowbit.int4pack_dense_linear(x, packed, sz, group, dtype, block)
            assert got.dtype == torch.float32 and got.shape == (x.shape[0], n)
            err = ((got.double() - want).norm() / want.norm()).item()
            assert err < tol, (block, dtype, err)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.lowbit.int4pack_dense_linear(x, wpack, sz[:, :16], group, torch.float32, here)


@pytest.mark.parametrize("spec", [IntSpec(4, 64, False), IntSpec(3, 64, False), IntSpec(4, -1, True)],
                         ids=lambda s: s.name)
def test_pytorchs_int4_kernel_prefills_through_the_native_library(base, spec):
    """cpu-int4: few rows run ATen's kernel, many rows lowbit's dense path on the same packed tensors; both
    agree with the reference kernel to bfloat16 rounding, and the compiled call equals the eager one."""
    cpu4 = KERNELS["cpu-int4"]
    w = base.get_submodule("model.layers.3.mlp.down_proj").weight.detach()
    qt = quantize_rtn(w, spec)
    packed = cpu4.prepare(qt)
    assert cpu4.dense_dtype == (torch.bfloat16 if native.isa() == 3 else torch.float32)
    dense = qt.dequantize(torch.float32)
    for rows in (1, DENSE_FROM_ROWS - 1, DENSE_FROM_ROWS, 200):
        x = torch.randn(rows, w.shape[1])
        want = torch.nn.functional.linear(x, dense)
        err = ((cpu4.linear(x, packed, spec, qt.shape, None) - want).norm() / want.norm()).item()
        assert err < 1e-2, (rows, err)
    q = QuantLinear(qt, kernel="cpu-int4")
    x = torch.randn(1, 40, w.shape[1])
    f = torch.compile(lambda t: q(t) * 2, fullgraph=True)
    assert torch.equal(f(x), q(x) * 2)


def test_bad_shapes_are_refused_with_a_clear_message():
    codes = torch.randint(0, 16, (4, 64))
    s = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="multiple of 32 dividing K"):
        torch.ops.lowbit.int4_gemm(torch.randn(1, 64), packed4(codes), s, s, 48)
    with pytest.raises(RuntimeError, match="K must be a multiple of 64"):
        torch.ops.lowbit.int4_gemm(torch.randn(1, 32), torch.zeros(4, 16, dtype=torch.uint8), s, s, 32)
    with pytest.raises(RuntimeError, match=r"\[N, K / group_size\]"):
        torch.ops.lowbit.int4_gemm(torch.randn(1, 64), packed4(codes), s[:, :1], s[:, :1], 32)


@pytest.mark.parametrize("spec", [IntSpec(4, 64, False), IntSpec(4, 32, True), IntSpec(3, 64, False),
                                  IntSpec(2, 64, True), IntSpec(4, -1, False),
                                  IntSpec(4, 64, False, scale_bits=6, super_block=192)],
                         ids=lambda s: s.name)
def test_real_layers_match_reference_decode_and_prefill(base, spec):
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        w = base.get_submodule(name).weight.detach()
        qt = quantize_rtn(w, spec)
        assert select_kernel(spec, qt.shape) is expected_kernel(spec, qt.shape[1])   # native-int4's numerics here
        packed = NATIVE.prepare(qt)
        back = NATIVE.restore(packed, spec, qt.shape)
        assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.scales, qt.scales)
        dense = qt.dequantize(torch.float32)
        for rows in (1, 4, DENSE_FROM_ROWS - 1, DENSE_FROM_ROWS, 100):
            x = torch.randn(rows, w.shape[1])
            decode = rows < DENSE_FROM_ROWS
            seen = round_int8_blocks(x, 64).float() if decode and NATIVE.q8 else x.to(torch.bfloat16).float()
            want = torch.nn.functional.linear(seen, dense)
            got = NATIVE.linear(x, packed, spec, qt.shape, None)
            err = ((got - want).norm() / want.norm()).item()
            assert err < (1e-5 if decode else 1e-2), (rows, err)


def test_bfloat16_inputs_and_bias():
    w = torch.randn(48, 128)
    b = torch.randn(48)
    q = QuantLinear(quantize_rtn(w, IntSpec(4, 64, False)), bias=b, kernel="native-int4")
    x = torch.randn(2, 3, 128)
    seen = round_int8_blocks(x.reshape(6, 128), 64).float() if NATIVE.q8 else x.to(torch.bfloat16).float()
    ref = torch.nn.functional.linear(seen.reshape(2, 3, 128), q.dequantized_weight(), b)
    assert torch.allclose(q(x), ref, atol=1e-4, rtol=1e-4)
    y16 = q.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and y16.shape == (2, 3, 48)


def test_compiled_call_equals_eager():
    q = QuantLinear(quantize_rtn(torch.randn(64, 192), IntSpec(4, 64, False)), kernel="native-int4")
    x = torch.randn(1, 192)
    f = torch.compile(lambda t: q(t) * 2, fullgraph=True)
    assert torch.equal(f(x), q(x) * 2)


def test_without_the_library_the_pytorch_kernel_runs():
    code = ("import torch; from lowbit import IntSpec; from lowbit.kernels import select_kernel;"
            "print(select_kernel(IntSpec(4, 64, True), (96, 256)).name)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, LOWBIT_NATIVE="0"))
    assert r.stdout.strip() == "cpu-int4", r.stderr
    r = subprocess.run([sys.executable, "-c", code.replace("IntSpec(4, 64, True)", "IntSpec(8, -1, True)")],
                       capture_output=True, text=True, env=dict(os.environ, LOWBIT_NATIVE="0"))
    assert r.stdout.strip() == "cpu-int8", r.stderr


def test_fake_kernels_give_the_real_output_shapes(monkeypatch):
    """The compiled engine trusts these shapes without run-time size asserts (engine.generate): every native op,
    called as the kernels call it at decode and prefill sizes, against its fake (meta) registration."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "lowbit" and args:    # not the CPU-feature queries
                key = (func, args[0].dtype, any(a is not None for a in args[6:]))   # two-level scales or not
                self.calls.setdefault(key, (args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    specs = [(IntSpec(4, 64, False), "native-int4", 192), (IntSpec(4, 32, True), "native-int4", 192),
             (IntSpec(8, -1, True), "native-int8", 192), (IntSpec(5, 64, True), "native-int8", 192),   # packed codes
             (GGUFSpec("Q4_K"), "native-int4", 256), (GGUFSpec("Q5_K"), "native-int8", 256),   # two-level scales
             (IntSpec(4, 64, False), "cpu-int4", 192)]
    rec = Record()
    for q8 in ("1", "0"):    # int8 activations (where the CPU has them), then float32 ones
        monkeypatch.setenv("LOWBIT_NATIVE_Q8", q8)
        layers = [(QuantLinear(spec.quantize(torch.randn(96, k)), kernel=kernel), k) for spec, kernel, k in specs]
        with rec, torch.no_grad():
            for q, k in layers:
                for rows in (1, 3, DENSE_FROM_ROWS, 40):
                    for dtype in (torch.float32, torch.bfloat16):   # dense paths answer bfloat16 in bfloat16
                        q(torch.randn(rows, k).to(dtype))
    names = {op.name() for op, _, _ in rec.calls}
    want = {"lowbit::int4_gemm", "lowbit::int8_gemm", "lowbit::int4_dense_linear", "lowbit::int8_dense_linear",
            "lowbit::int4pack_dense_linear"}
    assert names == want | ({"lowbit::int4_gemm_q8", "lowbit::int8_gemm_q8"} if torch.ops.lowbit.cpu_q8() else set())
    assert {dtype for _, dtype, _ in rec.calls} == {torch.float32, torch.bfloat16}
    assert any(two_level for _, _, two_level in rec.calls)
    for (op, _, _), (args, kwargs) in rec.calls.items():
        torch.library.opcheck(op, args, kwargs, test_utils="test_faketensor")
    packed = KERNELS["native-int8"].prepare(quantize_rtn(torch.randn(96, 192), IntSpec(5, 64, True)))["wq"]
    torch.library.opcheck(torch.ops.lowbit.int8_unpack.default, (packed, 192), {}, test_utils="test_faketensor")


def _every_native_op(x, wpack, wq, group):
    """Each native op on the same problem, by name, as a function of (scales, offsets)."""
    ops = torch.ops.lowbit
    out = {}
    for isa in range(native.isa() + 1):
        out[f"int4_gemm isa {isa}"] = lambda s, o, isa=isa: ops.int4_gemm(x, wpack, s, o, group, isa)
        out[f"int8_gemm isa {isa}"] = lambda s, o, isa=isa: ops.int8_gemm(x, wq, s, o, group, isa)
    for level in Q8_LEVELS:
        out[f"int4_gemm_q8 level {level}"] = lambda s, o, level=level: ops.int4_gemm_q8(x, wpack, s, o, group, level=level)
        out[f"int8_gemm_q8 level {level}"] = lambda s, o, level=level: ops.int8_gemm_q8(x, wq, s, o, group, level=level)
    for dtype in (torch.float32, torch.bfloat16):
        out[f"int4_dense_linear {dtype}"] = lambda s, o, dtype=dtype: ops.int4_dense_linear(x, wpack, s, o, group, dtype)
    out["int4_dequant"] = lambda s, o: ops.int4_dequant(wpack, s, o, group, torch.float32)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,group", [(1, 200, 576, 32), (3, 130, 576, 64), (40, 65, 1536, 64), (1, 7, 640, 640)])
def test_sixteen_bit_scales_give_the_float32_results_bit_for_bit(dtype, m, n, k, group):
    # n not a multiple of the 64 rows widened at a time, several runs per thread, a run of 7 rows
    g = torch.Generator().manual_seed(n)
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).to(dtype)
    o = (s.float() * 8).to(dtype)
    o[0, 0] = -0.375   # not a multiple of the scale: offsets are any 16-bit values
    x = torch.randn(m, k, generator=g)
    wpack = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    for name, op in _every_native_op(x, wpack, wq, group).items():
        assert torch.equal(op(s, o), op(s.float(), o.float())), name


@q8
def test_sixteen_bit_scales_of_sixteen_column_groups():
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(50, 32, generator=g) * 0.1).half()
    o = (torch.rand(50, 32, generator=g) * 0.1).half()
    wq = torch.randint(-32, 32, (50, 512), dtype=torch.int8, generator=g)
    x = torch.randn(1, 512, generator=g)
    assert torch.equal(torch.ops.lowbit.int8_gemm_q8(x, wq, s, o, 16),
                       torch.ops.lowbit.int8_gemm_q8(x, wq, s.float(), o.float(), 16))


def test_scales_and_offsets_of_different_dtypes_are_refused():
    s = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="both the same"):
        torch.ops.lowbit.int4_gemm(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), s, s.half(), 32)


@pytest.mark.parametrize("spec,dtype,offsets,shared", [
    (GGUFSpec("Q4_0"), torch.float16, "multiple", "field_d"), (GGUFSpec("Q8_0"), torch.float16, "multiple", "field_d"),
    (GGUFSpec("Q4_1"), torch.float16, "16-bit", "field_d"), (GGUFSpec("Q5_1"), torch.float16, "16-bit", "field_d"),
    (IntSpec(4, 64, True), torch.float16, "multiple", "scales"), (IntSpec(8, -1, True), torch.float16, "multiple", "scales"),
    (IntSpec(4, 64, False), torch.float16, "zero points", "scales"),
    (GGUFSpec("Q4_K"), torch.uint8, "two-level", "field_scales"),
    (GGUFSpec("Q5_K"), torch.uint8, "two-level", "field_scales"),
    (IntSpec(4, 32, True, 6, 256), torch.uint8, "two-level", "scale_codes"),
    (IntSpec(4, 32, False, 6, 256), torch.uint8, "two-level", "scale_codes"),
    (IntSpec(4, 64, False, 4, -1), torch.uint8, "two-level", "scale_codes")], ids=lambda v: getattr(v, "name", str(v)))
def test_resident_scales_are_as_narrow_as_exact_and_not_kept_twice(base, spec, dtype, offsets, shared):
    w = base.model.layers[0].mlp.down_proj.weight.detach()   # 1536 inputs: Q4_K fits
    qt = spec.quantize(w)
    layer = QuantLinear(qt, kernel="auto")
    assert layer.kernel.name in ("native-int4", "native-int8")
    b = layer._buffers
    assert b["kscales"].dtype == dtype
    n, k = w.shape
    groups = b["kscales"].numel()
    codes = b["wpack"].numel() if "wpack" in b else b["wq"].numel()   # 4 bits, 5-7 bits packed, or a byte
    resident = sum(t.numel() * t.element_size() for t in b.values())
    marker = 8 * b[f"kscales_is_{shared}"].numel() if shared else 0
    if offsets == "multiple":   # symmetric: the offsets are c times the scales, c one float
        assert b["offsets"].shape == (1,) and resident == codes + 2 * groups + 4 + marker
        assert resident - 4 - marker == sum(t.numel() * t.element_size() for t in (qt.qweight, qt.scales) if t is not None)
    elif offsets == "zero points":   # the stored scales and zero points, nothing else
        assert b["offsets"].dtype == torch.uint8 and "offsets_is_zeros" in b
        assert resident == codes + 3 * groups + marker + 8 * b["offsets_is_zeros"].numel()
    elif offsets == "16-bit":
        # Q4_1/Q5_1: offsets −m, which give back the stored m (negation is exact): the stored size
        assert b["offsets"].dtype == dtype and "field_m" not in b and "offsets_is_minus_field_m" in b
        minus = 8 * b["offsets_is_minus_field_m"].numel()
        assert resident == codes + 4 * groups + marker + minus
    else:
        # k-quants and lowbit's two-level scales: the kernels read the stored sub-block codes and super-block
        # scales, the zero points or mins, nothing else besides the codes (the stored tensors pack Q4_K's 6-bit
        # codes tighter: 12 bytes per 256 weights, here 16; lowbit's likewise)
        markers = sum(8 * t.numel() for key, t in b.items() if "_is_" in key)
        multiple = 4 if b["offsets"].shape == (1,) else 0   # symmetric: offsets c · scale
        stored_rest = sum(t.numel() * t.element_size() for t in spec.integer_rest(qt).values())
        assert resident == codes + stored_rest + markers + multiple
        assert not any(key.startswith("field_") or key in ("scale_codes", "scale_super", "zeros") for key in b)
        assert resident - markers - multiple <= qt.nbytes * 1.05
    if shared:   # the format's own scales are the kernel's, kept once
        assert shared not in b
    back = layer.quantized_tensor()   # saved exactly as stored
    for key, t in qt.tensors().items():
        assert torch.equal(back.tensors()[key], t), key
    x = torch.randn(3, k)
    full = {**{key: t for key, t in b.items() if not key.endswith("_super")},
            "kscales": scales_of(b), "offsets": offsets_of(b).float()}
    assert torch.equal(layer(x), layer.kernel.linear(x, full, spec, (n, k), None))
    x = torch.randn(DENSE_FROM_ROWS + 1, k)   # the dense path
    assert torch.equal(layer(x), layer.kernel.linear(x, full, spec, (n, k), None))


def test_offsets_as_a_multiple_of_the_scales_or_as_zero_points_equal_the_full_offsets():
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(100, 9, generator=g) * 0.1).half()
    wpack = torch.randint(0, 256, (100, 288), dtype=torch.uint8, generator=g)
    wq = torch.randint(-128, 128, (100, 576), dtype=torch.int8, generator=g)
    x = torch.randn(2, 576, generator=g)
    for c in (8.0, 0.0, -4.0):
        full = s.float() * c
        for name, op in _every_native_op(x, wpack, wq, 64).items():
            assert torch.equal(op(s, torch.tensor([c])), op(s.float(), full)), (name, c)
    z = torch.randint(0, 256, s.shape, dtype=torch.uint8, generator=g)   # zero points
    for name, op in _every_native_op(x, wpack, wq, 64).items():
        assert torch.equal(op(s, z), op(s.float(), z.float() * s.float())), name
    with pytest.raises(RuntimeError, match="power of two"):
        torch.ops.lowbit.int4_gemm(x, wpack, s, torch.tensor([3.0]), 64)
    with pytest.raises(RuntimeError, match=r"\[N, K / group_size\]"):   # a multiple needs 16-bit scales
        torch.ops.lowbit.int4_gemm(x, wpack, s.float(), torch.tensor([8.0]), 64)


def test_q4_1_mins_of_both_zero_signs_come_back_exactly_and_are_kept_once():
    # the kernel's offsets are −m; −0.0 and 0.0 compare equal, so the stored m must come back bit for bit
    g = torch.Generator().manual_seed(3)
    w = torch.rand(64, 256, generator=g)
    w[:32, :32] -= w[:32, :32].min()        # a block whose minimum is exactly 0: m = +0.0
    qt = GGUFSpec("Q4_1").quantize(w)
    m = qt.spec.integer_rest(qt)["field_m"]
    assert (m == 0).any()
    layer = QuantLinear(qt, kernel="auto")
    assert "field_m" not in layer._buffers and "offsets_is_minus_field_m" in layer._buffers
    assert torch.equal(layer.quantized_tensor().qweight, qt.qweight)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_packed_codes_round_trip_and_sit_where_documented(bits):
    from lowbit.kernels.native_int8 import codes_of, pack_codes
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (9, 192), dtype=torch.int64, generator=g)
    wq = pack_codes(codes, bits)
    assert wq.dtype == torch.uint8 and wq.shape == (9, bits * 24)   # b bits per weight
    assert torch.equal(codes_of(wq, 192), codes.to(torch.int8))
    assert torch.equal(torch.ops.lowbit.int8_unpack(wq, 192, 0), codes.to(torch.int8))   # the portable loop
    # row 5, column 64·2 + 37: rows 4-7 are the second block of four, each row a step of S bytes per chunk of 64
    # columns, so chunk 2 of row 5 starts at 4·R + (2·4 + 1)·S (R: the row's bytes); in it (5-7 bits) the low nibble
    # in byte 5's high half, then bit 4 + j in mask j after the 32 nibble bytes; (2-3 bits) bit j in mask j
    n, c, i = 5, 2, 37
    code = int(codes[n, 64 * c + i])
    nibbles, low = (32, 4) if bits > 4 else (0, 0)
    count = bits - low
    step = nibbles + 8 * count
    at0 = 4 * wq.shape[1] + (c * 4 + 1) * step
    flat = wq.reshape(-1)
    if bits > 4:
        assert (int(flat[at0 + i - 32]) >> 4) == code & 15
    for j in range(count):
        at = at0 + nibbles + j * 8
        mask = int.from_bytes(bytes(flat[at: at + 8].tolist()), "little")
        assert (mask >> i) & 1 == (code >> (low + j)) & 1
    # the last block holds the 9 % 4 = 1 remaining row, its chunks one after the other
    assert torch.equal(codes_of(wq[8:].contiguous(), 192), codes[8:].to(torch.int8))


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
@pytest.mark.parametrize("m,n,k,group", [(1, 200, 576, 32), (3, 130, 1536, 64), (40, 7, 640, 640), (2, 70, 256, 16)])
def test_packed_codes_give_the_byte_codes_results(bits, m, n, k, group):
    # every path and op, rows not a multiple of the 64 unpacked at a time, float32 and 16-bit scales. The float
    # paths read the same code bytes: bit for bit. The int8-activation decode multiplies packed codes as the
    # unsigned bytes they are, where byte codes are shifted by 128 and the shift taken back: the same integer
    # products, fewer float32 cancellations, so at least as close to the exact result
    from lowbit.kernels.native_int8 import pack_codes
    g = torch.Generator().manual_seed(n + bits)
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.int64, generator=g)
    wq, packed = blocks8(codes), pack_codes(codes, bits)
    x = torch.randn(m, k, generator=g)
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).half()
    for scales, offsets in ((s.float(), torch.randn(n, k // group, generator=g)), (s, torch.tensor([16.0]))):
        if group != 16:
            for isa in range(native.isa() + 1):
                op = lambda w: torch.ops.lowbit.int8_gemm(x, w, scales, offsets, group, isa)
                assert torch.equal(op(packed), op(wq)), isa
        off = offsets.expand(n, k // group) * scales.float() if offsets.numel() == 1 else offsets
        dense = codes.double() * scales.double().repeat_interleave(group, 1) - off.double().repeat_interleave(group, 1)
        want = round_int8_blocks(x, 32) @ dense.T
        for level in Q8_LEVELS:
            err = {}
            for name, w in (("packed", packed), ("bytes", wq)):
                y = torch.ops.lowbit.int8_gemm_q8(x, w, scales, offsets, group, level=level)
                err[name] = ((y.double() - want).norm() / want.norm()).item()
            # VNNI (level 2) shifts byte codes by 128 and takes 128 · Σa back in float32: for 2-7-bit codes
            # (mean 1.5-63) that sum is up to ~80x the result's, so its rounding is too; AVX2 (level 1) multiplies
            # byte codes unshifted (|q| × a · sign q), nothing to take back there
            assert err["packed"] < 2e-6 and err["bytes"] < (1e-5 if level == 2 else 2e-6), (level, err)
            if level == 2:
                assert err["packed"] <= err["bytes"] * 1.01 + 1e-9, err


def test_packed_codes_of_a_wrong_width_are_refused():
    x = torch.randn(1, 128)
    s = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.lowbit.int8_gemm(x, torch.zeros(4, 70, dtype=torch.uint8), s, s, 64)   # 64 + 6: not b bits
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.lowbit.int8_unpack(torch.zeros(4, 64 + 64, dtype=torch.uint8), 128)    # 8 bits: int8 instead


@pytest.mark.parametrize("spec", [GGUFSpec("Q2_K"), GGUFSpec("Q3_K"), GGUFSpec("Q5_0"), GGUFSpec("Q5_1"),
                                  GGUFSpec("Q5_K"), GGUFSpec("Q6_K"),
                                  IntSpec(5, 64, True), IntSpec(6, 64, False), IntSpec(7, 64, True)],
                         ids=lambda s: s.name)
def test_packed_code_formats_are_resident_at_their_width(base, spec):
    w = base.get_submodule("model.layers.29.mlp.down_proj").weight.detach()
    qt = spec.quantize(w) if isinstance(spec, GGUFSpec) else quantize_rtn(w, spec)
    if select_kernel(spec, qt.shape) is not NATIVE8:
        pytest.skip("16-column sub-blocks need int8 activations (AVX-512 VNNI or AVX2)")
    layer = QuantLinear(qt, kernel="auto")
    bits = spec.integer_groups(w.shape[1])[2].bit_length()
    assert layer._buffers["wq"].dtype == torch.uint8 and layer._buffers["wq"].numel() * 8 == bits * w.numel()
    assert all(torch.equal(a, b) for a, b in zip(layer.quantized_tensor().tensors().values(), qt.tensors().values()))
    ref = QuantLinear(qt, kernel="reference")
    for rows in (1, DENSE_FROM_ROWS):
        x = torch.randn(rows, w.shape[1])
        assert ((layer(x) - ref(x)).norm() / ref(x).norm()).item() < 1e-2


@pytest.mark.parametrize("bits", [0, 3, 5, 7])
@pytest.mark.parametrize("n,k,group", [(130, 576, 32), (70, 256, 16), (200, 192, 192), (65, 1536, 64)])
def test_int8_prefill_equals_a_dense_matmul_of_the_dequantized_weight(bits, n, k, group):
    # tiles of rows dequantized into the thread's buffer (codes a byte each, or packed): the same values as
    # dequantizing the whole weight, so in float32 the same products up to the matmul's order
    from lowbit.kernels.native_int8 import pack_codes
    g = torch.Generator().manual_seed(n + bits)
    codes = torch.randint(0, 2 ** (bits or 7), (n, k), dtype=torch.int64, generator=g)
    wq = pack_codes(codes, bits) if bits else blocks8(codes)
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).half()
    off = (s.float() * torch.randint(0, 8, s.shape, generator=g)).half()
    x = torch.randn(DENSE_FROM_ROWS + 5, k, generator=g)
    wd = codes.float() * s.float().repeat_interleave(group, 1) - off.float().repeat_interleave(group, 1)
    got = torch.ops.lowbit.int8_dense_linear(x, wq, s, off, group, torch.float32)
    want = torch.nn.functional.linear(x, wd)
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    got16 = torch.ops.lowbit.int8_dense_linear(x, wq, s, off, group, torch.bfloat16)
    want16 = torch.nn.functional.linear(x.bfloat16(), wd.bfloat16()).float()
    assert ((got16 - want16).norm() / want16.norm()).item() < 1e-2


@pytest.mark.parametrize("bits,n,k,group", [(0, 42, 96, 32), (0, 133, 576, 576), (0, 7, 160, 16), (5, 42, 192, 32),
                                            (5, 133, 576, 576), (6, 7, 128, 16)])
def test_int8_prefill_dequantizes_as_the_formula_bit_for_bit(bits, n, k, group):
    """The int8 dense path's values, read through an identity matrix of activations (each output one product by
    1, so exact): q · s − offset in float32, rounded once, for codes read as stored (rows past a multiple of four,
    a last half step where K % 64 == 32) or unpacked, groups of 16 to a whole row, 16-bit scales widened."""
    from lowbit.kernels.native_int8 import pack_codes
    g = torch.Generator().manual_seed(n + k + bits)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g) if bits else torch.randint(-128, 128, (n, k), generator=g)
    wq = pack_codes(codes, bits) if bits else blocks8(codes)
    for scale_dtype in (torch.float32, torch.float16):
        s = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).to(scale_dtype)
        off = (torch.randn(n, k // group, generator=g) * 0.05).to(scale_dtype)
        want = codes.float() * s.float().repeat_interleave(group, 1) - off.float().repeat_interleave(group, 1)
        for dtype, bits_view in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
            eye = torch.eye(k, dtype=dtype)
            got = torch.ops.lowbit.int8_dense_linear(eye, wq, s, off, group, dtype).t()
            assert torch.equal(got.contiguous().view(bits_view), want.to(dtype).view(bits_view)), (scale_dtype, dtype)


def _dense_bf16_case(kind, n, k, group, seed):
    """(codes' dequantized weight float32 [n, k], op(x) for bfloat16 x) for int4 or int8 codes."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).half()
    off = (torch.randn(n, k // group, generator=g) * 0.05).half()
    low, high = (0, 16) if kind == "int4" else (-128, 128)
    codes = torch.randint(low, high, (n, k), generator=g)
    w = codes.float() * s.float().repeat_interleave(group, 1) - off.float().repeat_interleave(group, 1)
    if kind == "int4":
        wpack = packed4(codes)
        return w, lambda x: torch.ops.lowbit.int4_dense_linear(x, wpack, s, off, group, torch.bfloat16)
    wq = blocks8(codes)
    return w, lambda x: torch.ops.lowbit.int8_dense_linear(x, wq, s, off, group, torch.bfloat16)


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("n,k,group,m", [(100, 576, 64, 571), (133, 192, 32, 192), (64, 128, 128, 40)])
def test_bfloat16_prefill_values_bit_for_bit(kind, n, k, group, m, act):
    """The dense path's bfloat16 products (on AMX tiles where native.amx(): weights dequantized into the tile
    layout, 32 rows and 32 columns at a time), output in the activations' dtype: through rows of an identity
    matrix each output is one weight value times 1, so it must be the formula's value rounded to bfloat16 exactly,
    for a last block of fewer than 32 weight rows (n = 100, 133) and of fewer than 32 activation rows (m = 571,
    40)."""
    w, op = _dense_bf16_case(kind, n, k, group, n + k)
    got = op(torch.eye(k, dtype=act)[:m])
    assert got.dtype == act and got.shape == (m, n)
    assert torch.equal(got, w.t()[:m].bfloat16().to(act))


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("m,n,k", [(32, 96, 64), (37, 576, 576), (512, 200, 1536)])
def test_bfloat16_prefill_equals_exact_products(kind, m, n, k, act):
    """Random activations (float32 ones rounded to bfloat16 by the op): each output within float32 summation and
    one bfloat16 rounding of the exact (float64) product of the same bfloat16 values, for whole and partial blocks
    of rows and columns."""
    w, op = _dense_bf16_case(kind, n, k, 64, m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(act)
    xb, wb = x.bfloat16().double(), w.bfloat16().double()
    want = xb @ wb.t()
    bound = 2.0 ** -8 * want.abs() + 2.0 ** -22 * (xb.abs() @ wb.abs().t())
    got = op(x)
    assert got.dtype == act and ((got.double() - want).abs() <= bound).all()


def _every_op_two_level(x, wpack, wq, group):
    """Each native op (int8_dense_linear too) as a function of (scales, offsets, scale_super, offset_super)."""
    ops = torch.ops.lowbit
    out = {}
    for isa in range(native.isa() + 1):
        out[f"int4_gemm isa {isa}"] = lambda *a, isa=isa: ops.int4_gemm(x, wpack, a[0], a[1], group, isa, *a[2:])
        out[f"int8_gemm isa {isa}"] = lambda *a, isa=isa: ops.int8_gemm(x, wq, a[0], a[1], group, isa, *a[2:])
    for level in Q8_LEVELS:
        out[f"int4_gemm_q8 level {level}"] = lambda *a, level=level: ops.int4_gemm_q8(x, wpack, a[0], a[1], group,
                                                                                   *a[2:], level=level)
        out[f"int8_gemm_q8 level {level}"] = lambda *a, level=level: ops.int8_gemm_q8(x, wq, a[0], a[1], group,
                                                                                   *a[2:], level=level)
    for dtype in (torch.float32, torch.bfloat16):
        out[f"int4_dense_linear {dtype}"] = lambda *a, dtype=dtype: ops.int4_dense_linear(x, wpack, a[0], a[1], group,
                                                                                          dtype, *a[2:])
        out[f"int8_dense_linear {dtype}"] = lambda *a, dtype=dtype: ops.int8_dense_linear(x, wq, a[0], a[1], group,
                                                                                          dtype, *a[2:])
    out["int4_dequant"] = lambda *a: ops.int4_dequant(wpack, a[0], a[1], group, torch.float32, *a[2:])
    return out


@pytest.mark.parametrize("super_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("codes_dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("m,n,k,group,per_super", [(1, 200, 512, 32, 8), (3, 130, 1536, 32, 8), (2, 65, 512, 64, 4),
                                                     (1, 33, 768, 32, 8)])
def test_two_level_scales_give_the_float32_products_bit_for_bit(super_dtype, codes_dtype, m, n, k, group, per_super):
    # GGUF's k-quants: scale = d · sc per group (d per super-block), offsets c · scale or dmin · m
    g = torch.Generator().manual_seed(n + k)
    groups = k // group
    lo, hi = (0, 64) if codes_dtype == torch.uint8 else (-128, 128)
    sc = torch.randint(lo, hi, (n, groups), dtype=codes_dtype, generator=g)
    d = (torch.rand(n, groups // per_super, generator=g) * 0.01 + 1e-4).to(super_dtype)
    mins = torch.randint(0, 64, (n, groups), dtype=torch.uint8, generator=g)
    dmin = (torch.rand(n, groups // per_super, generator=g) * 0.01).to(super_dtype)
    scale = d.float().repeat_interleave(per_super, 1) * sc.float()
    offset = dmin.float().repeat_interleave(per_super, 1) * mins.float()
    x = torch.randn(m, k, generator=g)
    wpack = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    for name, op in _every_op_two_level(x, wpack, wq, group).items():
        assert torch.equal(op(sc, mins, d, dmin), op(scale, offset)), name
        assert torch.equal(op(sc, torch.tensor([32.0]), d), op(scale, scale * 32)), name
        assert torch.equal(op(sc, mins, d), op(scale, mins.float() * scale)), name   # zero points
    # Q6_K-like 16-column groups: the int8 ops that take them
    if native.q8():
        sc16 = sc.repeat_interleave(2, 1)   # twice the groups under the same super-block scales
        s16 = d.float().repeat_interleave(2 * per_super, 1) * sc16.float()
        for op in (torch.ops.lowbit.int8_gemm_q8, lambda *a: torch.ops.lowbit.int8_dense_linear(*a[:5], torch.float32, *a[5:])):
            assert torch.equal(op(x, wq, sc16, torch.tensor([32.0]), group // 2, d),
                               op(x, wq, s16, s16 * 32, group // 2))


def test_two_level_scales_of_the_wrong_kind_are_refused():
    x, wpack = torch.randn(1, 512), torch.zeros(4, 256, dtype=torch.uint8)
    sc, d = torch.ones(4, 16, dtype=torch.uint8), torch.ones(4, 2, dtype=torch.float16)
    op = torch.ops.lowbit.int4_gemm
    with pytest.raises(RuntimeError, match="int8 or uint8 codes"):
        op(x, wpack, sc.half(), torch.tensor([8.0]), 32, -1, d)
    with pytest.raises(RuntimeError, match="S dividing"):
        op(x, wpack, sc, torch.tensor([8.0]), 32, -1, torch.ones(4, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="offset_super needs scale_super"):
        op(x, wpack, d.repeat(1, 8), d.repeat(1, 8), 32, -1, None, d)
    with pytest.raises(RuntimeError, match="offset_super must be as scale_super"):
        op(x, wpack, sc, sc, 32, -1, d, d.bfloat16())
    with pytest.raises(RuntimeError, match="offsets must be float32"):
        op(x, wpack, sc, sc.half(), 32, -1, d)
    with pytest.raises(RuntimeError, match="zero points must be uint8"):
        op(x, wpack, sc, sc[:, :8], 32, -1, d)


@pytest.mark.parametrize("t", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_are_resident_as_stored_and_compute_as_their_float32_scales(base, t):
    spec = GGUFSpec(t)
    w = base.model.layers[0].mlp.down_proj.weight.detach()   # 1536 inputs: every k-quant fits
    qt = spec.quantize(w)
    layer = QuantLinear(qt, kernel="auto")
    if t in ("Q2_K", "Q3_K", "Q6_K") and not native.q8():
        pytest.skip("16-column sub-blocks run natively only where the CPU has AVX-512 VNNI or AVX2")
    b = layer._buffers
    assert "kscales_super" in b and not any(key.startswith("field_") for key in b)   # every field kept once
    own = sum(t.numel() * t.element_size() for key, t in b.items() if "_is_" not in key)
    rest = sum(t.numel() * t.element_size() for t in spec.integer_rest(qt).values())
    codes = b["wpack"].numel() if "wpack" in b else b["wq"].numel()
    multiple = 4 if b["offsets"].shape == (1,) else 0   # Q3_K, Q6_K: offsets c · scale, c one float
    assert own == codes + rest + multiple
    # the stored blocks pack sub-block codes to 4 or 6 bits where the kernels keep a byte each: per weight, Q4_K/Q5_K
    # 2 · 2 bits per 32 columns more, Q3_K 2 bits per 16, Q2_K 2 · 4 bits per 16, Q6_K (int8 codes) nothing
    extra = {"Q2_K": 0.5, "Q3_K": 0.125, "Q4_K": 0.125, "Q5_K": 0.125, "Q6_K": 0.0}[t]
    assert (own - multiple) * 8 / w.numel() == spec.bits_per_weight(tuple(w.shape)) + extra
    assert torch.equal(layer.quantized_tensor().qweight, qt.qweight)   # saved exactly as stored
    n, k = w.shape
    full = {**{key: v for key, v in b.items() if not key.endswith("_super")},
            "kscales": scales_of(b), "offsets": offsets_of(b)}
    for rows in (1, 5, DENSE_FROM_ROWS + 3):
        x = torch.randn(rows, k)
        assert torch.equal(layer(x), layer.kernel.linear(x, full, spec, (n, k), None)), rows


def test_compiled_graphs_are_cached_per_build_of_the_kernels():
    # inductor's on-disk cache does not key graphs by custom ops' schemas: a graph compiled against an older build
    # would call the ops with that build's arguments; the build's source hash is part of the cache key instead
    assert native.available()
    assert f"lowbit-native-{native.library_path().parent.name}" in torch.compiler.config.cache_key_tag.split(",")


def test_two_level_integer_scales_with_stray_padding_bits_are_kept_as_stored():
    # 18 groups of 6-bit codes fill 13.5 bytes: the last byte's high nibble is padding, zero as lowbit writes it;
    # a file with it set must still save back bit for bit (its scales are then decoded once, in float32)
    spec = IntSpec(4, 32, True, 6, -1)
    qt = spec.quantize(torch.randn(64, 576))
    layer = QuantLinear(qt, kernel="auto")
    assert "kscales_super" in layer._buffers and layer._buffers["kscales"].dtype == torch.uint8
    scales = qt.scales.clone()
    scales[:, 13] |= 0xF0
    crafted = QuantizedTensor(spec, qt.shape, qt.qweight, scales, None)
    assert torch.equal(crafted.dequantize(), qt.dequantize())   # padding: not part of any code
    layer = QuantLinear(crafted, kernel="auto")
    assert "kscales_super" not in layer._buffers and layer._buffers["kscales"].dtype == torch.float32
    assert torch.equal(layer.quantized_tensor().scales, scales)
    x = torch.randn(2, 576)
    assert torch.equal(layer(x), QuantLinear(qt, kernel="auto")(x))


@pytest.mark.parametrize("m", [1, 40])
def test_every_native_op_gives_the_same_bits_on_any_number_of_threads(m):
    """The native ops split rows (or column chunks) among threads, each row's sums within one thread, so their
    results must not depend on the thread count. The test run may give each worker a single thread
    (tests/conftest.py), so the splits are exercised here explicitly: one thread against three (uneven tasks
    on rows that are not a multiple of any grain), every op this CPU runs, the searches and GPTQ's column loop
    included."""
    from lowbit.algorithms.gptq import Hessian, factor_hessian, gptq_quantize_updated
    from lowbit.formats import intq
    g = torch.Generator().manual_seed(m)
    n, k, group = 203, 576, 64
    x = torch.randn(m, k, generator=g)
    wpack = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, k // group, generator=g) * 0.1 + 1e-3
    o = torch.randn(n, k // group, generator=g) * 0.01
    w = torch.randn(300, 512, generator=g) * torch.rand(300, 1, generator=g)
    imp = torch.rand(512, generator=g)
    X = torch.randn(600, 512, generator=g)
    H = Hessian(512)
    H.add(X)
    factors = factor_hessian(H.H, 0.01, True)
    steps = torch.rand(3, 300, 8, generator=g) * 0.01 + 1e-4
    zeros = torch.randint(0, 16, steps.shape, generator=g).float()
    wide = torch.randn(64, 1536, generator=g)   # 24 chunks of 64 columns

    def every_result():
        out = {name: op(s, o) for name, op in _every_native_op(x, wpack, wq, group).items()}
        out["column_moments"] = torch.ops.lowbit.column_moments(wide)
        out["grid_errors"] = intq.grid_errors(w.reshape(300, 8, 64), imp.reshape(8, 64), steps, zeros, 0, 15)
        out["search_qparams"] = intq.search_qparams(w, IntSpec(4, 64, False), imp)
        for t in ("Q4_K", "Q6_K", "Q3_K", "Q4_0"):
            out[f"{t} search"] = GGUFSpec(t).quantize(w, imp).tensors()
        out["gptq columns"] = gptq_quantize_updated(w[:77], factors, IntSpec(4, 64, True), act_order=True)[1]
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = every_result()
        torch.set_num_threads(3)
        three = every_result()
    finally:
        torch.set_num_threads(threads)
    def leaves(r):   # a tensor, or tuples and dicts of them (None where a format has no offsets)
        if isinstance(r, dict):
            return [t for v in r.values() for t in leaves(v)]
        if isinstance(r, (tuple, list)):
            return [t for v in r for t in leaves(v)]
        return [] if r is None else [r]
    for name in one:
        a, b = leaves(one[name]), leaves(three[name])
        assert a and len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b)), name
