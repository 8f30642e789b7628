"""The triton-w4a16 kernel, run on CPU by Triton's interpreter (TRITON_INTERPRET=1).

Triton decides whether a kernel is compiled or interpreted when it is decorated, at import: conftest.py sets
TRITON_INTERPRET=1 before lowbit is imported wherever CUDA is absent.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the kernels under Triton's interpreter (TRITON_INTERPRET=1 before lowbit is imported)",
                allow_module_level=True)

from lowbit import IntSpec, LowbitError  # noqa: E402
from lowbit.algorithms import quantize_rtn  # noqa: E402
from lowbit.kernels import KERNELS, native, select_kernel  # noqa: E402
from lowbit.kernels import triton_w4a16 as tw  # noqa: E402
from lowbit.kernels.triton_w4a16 import Mode  # noqa: E402
from lowbit.kernels.triton_w4a16.launch import tile_counters  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNEL = KERNELS["triton-w4a16"]
GEMV_F16X2, DOT_PER_NIBBLE, DOT_UNPACKED, DOT_TRANSPOSED = (Mode.GEMV_F16X2, Mode.DOT_PER_NIBBLE, Mode.DOT_UNPACKED,
                                                            Mode.DOT_TRANSPOSED)


def _qt(spec, n=96, k=256, seed=0):
    torch.manual_seed(seed)
    return quantize_rtn(torch.randn(n, k), spec)


def _reference(qt, x, bias=None):
    """Dequantize in float64, multiply, round to x's dtype (the reference kernel's semantics, in float64)."""
    y = x.double() @ qt.dequantize(torch.float64).t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [16, 32, 64, 128, 256, -1])
def test_repack_is_an_exact_round_trip(symmetric, group):
    qt = _qt(IntSpec(4, group, symmetric), n=40, k=512)
    packed = tw.repack(qt)
    g = qt.spec.num_groups(512)
    assert packed["qweight"].dtype == torch.int32 and tuple(packed["qweight"].shape) == (512 // 8, 40)
    assert packed["scales"].dtype == torch.float16 and tuple(packed["scales"].shape) == (g, 40)
    assert ("zeros" in packed) == (not symmetric)
    if not symmetric:
        assert packed["zeros"].dtype == torch.float16 and tuple(packed["zeros"].shape) == (g, 40)
    back = tw.unpack(packed, qt.spec, qt.shape)
    assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.scales, qt.scales)
    assert (back.zeros is None) == (qt.zeros is None)
    if qt.zeros is not None:
        assert torch.equal(back.zeros, qt.zeros)
    back.validate()


def test_layout_is_as_documented():
    qt = _qt(IntSpec(4, 64, False), n=24, k=256)
    codes = qt.codes()
    words = tw.repack(qt)["qweight"].to(torch.int64) & 0xFFFFFFFF
    for c, r, i, n in [(0, 0, 0, 0), (0, 15, 7, 23), (1, 3, 5, 7), (1, 9, 2, 11)]:
        nibble = (words[16 * c + r, n] >> (4 * i)) & 15
        assert nibble == codes[n, 128 * c + 16 * i + r]


CASES = [
    # (spec, dtype, m, config); n = 96 is not a multiple of the 64-wide blocks, m = 3 / 17 not of 16
    (IntSpec(4, 64, True), torch.float16, 1, None),
    (IntSpec(4, 64, True), torch.bfloat16, 1, None),
    (IntSpec(4, 32, False), torch.float16, 3, None),
    (IntSpec(4, 128, False), torch.bfloat16, 17, None),
    (IntSpec(4, -1, True), torch.float16, 1, dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=2, PREFETCH=True)),
    (IntSpec(4, 16, False), torch.bfloat16, 1, dict(BLOCK_M=1, BLOCK_N=32, SPLIT_K=1)),
    (IntSpec(4, 32, True), torch.float16, 3, dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_PER_NIBBLE, SPLIT_K=2)),
    (IntSpec(4, -1, False), torch.bfloat16, 17,
      dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_PER_NIBBLE, SPLIT_K=2, ATOMIC=True)),
    (IntSpec(4, 64, False), torch.float16, 17, dict(BLOCK_M=16, BLOCK_N=32, MODE=DOT_UNPACKED, SPLIT_K=1)),
    (IntSpec(4, 16, True), torch.bfloat16, 3,
      dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_UNPACKED, SPLIT_K=2, ATOMIC=True)),
    (IntSpec(4, 128, True), torch.float16, 16, dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_TRANSPOSED, SPLIT_K=2)),
    (IntSpec(4, 32, False), torch.bfloat16, 17, dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_TRANSPOSED, SPLIT_K=1)),
    (IntSpec(4, 64, False), torch.float32, 3, dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_PER_NIBBLE, SPLIT_K=1)),
    # float16-pair GEMV: groups of 128, 64, 256 (one division per chunk) and per channel; several rows;
    # last-program split-K reduction, second-kernel reduction, masked and unmasked (BLOCK_N dividing N) tiles
    (IntSpec(4, 128, True), torch.float16, 1, dict(BLOCK_M=1, BLOCK_N=64, MODE=GEMV_F16X2, SPLIT_K=2, LAST=True)),
    (IntSpec(4, 64, False), torch.float16, 1, dict(BLOCK_M=1, BLOCK_N=32, MODE=GEMV_F16X2, SPLIT_K=1)),
    (IntSpec(4, 256, False), torch.float16, 3, dict(BLOCK_M=1, BLOCK_N=32, MODE=GEMV_F16X2, SPLIT_K=1)),
    (IntSpec(4, -1, False), torch.float16, 3, dict(BLOCK_M=1, BLOCK_N=64, MODE=GEMV_F16X2, SPLIT_K=2)),
    (IntSpec(4, 64, True), torch.float16, 1, dict(BLOCK_M=1, BLOCK_N=64, MODE=GEMV_F16X2, SPLIT_K=2, LAST=True)),
    # GEMV_F16X2 asked for where it cannot run (bfloat16 x, groups of 32): the float32 GEMV instead
    (IntSpec(4, 128, True), torch.bfloat16, 1, dict(BLOCK_M=1, BLOCK_N=64, MODE=GEMV_F16X2, SPLIT_K=2, LAST=True)),
    (IntSpec(4, 32, False), torch.float16, 1, dict(BLOCK_M=1, BLOCK_N=64, MODE=GEMV_F16X2, SPLIT_K=1)),
    # tensor-core dot per nibble on float16 pairs (DQ16), and the last-program reduction for every dot mode
    (IntSpec(4, 128, True), torch.float16, 17,
      dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_PER_NIBBLE, SPLIT_K=2, LAST=True, DQ16=True)),
    (IntSpec(4, 64, False), torch.float16, 3,
      dict(BLOCK_M=16, BLOCK_N=32, MODE=DOT_PER_NIBBLE, SPLIT_K=1, DQ16=True)),
    (IntSpec(4, 256, True), torch.float16, 17,
      dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_PER_NIBBLE, SPLIT_K=2, DQ16=True)),
    (IntSpec(4, -1, False), torch.float16, 3,
      dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_PER_NIBBLE, SPLIT_K=2, LAST=True, DQ16=True)),
    (IntSpec(4, 32, True), torch.bfloat16, 3,
      dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_PER_NIBBLE, SPLIT_K=2, LAST=True, DQ16=True)),
    (IntSpec(4, 64, True), torch.float16, 17, dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_UNPACKED, SPLIT_K=2, LAST=True)),
    (IntSpec(4, 128, False), torch.bfloat16, 17,
      dict(BLOCK_M=16, BLOCK_N=32, MODE=DOT_TRANSPOSED, SPLIT_K=2, LAST=True)),
]


def _mode_name(config):
    return "default" if config is None else Mode(config.get("MODE", 0)).name


@pytest.mark.parametrize("spec,dtype,m,config", CASES,
                         ids=[f"{s.name}-{str(d).split('.')[1]}-m{m}-{_mode_name(c)}"
                              f"-sk{1 if c is None else c.get('SPLIT_K', 1)}" for s, d, m, c in CASES])
def test_matches_the_reference(spec, dtype, m, config):
    qt = _qt(spec)
    packed = tw.repack(qt)
    torch.manual_seed(1)
    x = torch.randn(m, 256).to(dtype)
    bias = torch.randn(96).to(dtype)
    for b in (None, bias):
        y = tw.w4a16_matmul(x, packed, spec.group_size, b, config)
        assert y.dtype == dtype and tuple(y.shape) == (m, 96)
        assert _rel(y, _reference(qt, x, b)) < 1e-2


@pytest.mark.parametrize("config", [None, dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=2),
                                    dict(BLOCK_M=1, BLOCK_N=64, MODE=GEMV_F16X2, SPLIT_K=2, LAST=True),
                                    dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_UNPACKED, SPLIT_K=2, ATOMIC=True),
                                    dict(BLOCK_M=16, BLOCK_N=64, MODE=DOT_PER_NIBBLE, SPLIT_K=2, LAST=True,
                                         DQ16=True),
                                    dict(BLOCK_M=16, BLOCK_N=32, MODE=DOT_TRANSPOSED, SPLIT_K=1)])
def test_a_poisoned_output_is_fully_overwritten(config):
    qt = _qt(IntSpec(4, 64, False))
    packed = tw.repack(qt)
    m = 1 if config is None or config["BLOCK_M"] == 1 else 5
    x = torch.randn(m, 256).half()
    out = torch.full((m, 96), float("nan"), dtype=torch.float16)
    y = tw.w4a16_matmul(x, packed, 64, None, config, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    assert _rel(out, _reference(qt, x)) < 1e-2


def test_last_program_reduction_leaves_its_counters_at_zero():
    qt = _qt(IntSpec(4, 128, True))
    packed = tw.repack(qt)
    x = torch.randn(1, 256).half()
    ref = _reference(qt, x)
    cfg = dict(BLOCK_M=1, BLOCK_N=32, MODE=GEMV_F16X2, SPLIT_K=2, LAST=True)  # 3 tiles, 2 splits each
    first = tw.w4a16_matmul(x, packed, 128, None, cfg)
    counters = tile_counters(torch.device("cpu"), 3)
    assert int(counters.abs().sum()) == 0
    again = tw.w4a16_matmul(x, packed, 128, None, cfg)  # the counters are reused
    assert torch.equal(first, again) and _rel(first, ref) < 1e-2


def test_default_config_and_the_float16_pair_variants():
    assert tw.default_config(1, 8192, 8192)["MODE"] == Mode.GEMV_F16X2
    assert tw.default_config(1, 8192, 8192, f16x2=False).get("MODE", Mode.GEMV_F32) == Mode.GEMV_F32
    # one wave of GEMV_F16X2 programs: at most 9 per SM of 132, at least a few chunks per split
    assert tw.default_config(1, 28672, 8192)["SPLIT_K"] == 2 and tw.default_config(1, 8192, 28672)["SPLIT_K"] == 9
    assert tw.default_config(1, 8192, 8192)["SPLIT_K"] == 8 and tw.default_config(1, 4096, 4096)["SPLIT_K"] == 8
    for m in (1, 16, 64, 128):
        cfg = tw.default_config(m, 4096, 4096)
        assert 1 <= cfg["SPLIT_K"] <= 32 and cfg["BLOCK_M"] in (1, 16, 32, 64, 128)
    # the float16-pair emulation (interpreter) matches the float32 path to float16 rounding of the products
    qt = _qt(IntSpec(4, 64, False), n=64, k=512)
    packed = tw.repack(qt)
    x = (torch.randn(1, 512) * 50).half()
    ref = _reference(qt, x)
    y4 = tw.w4a16_matmul(x, packed, 64, None, dict(BLOCK_M=1, BLOCK_N=32, MODE=GEMV_F16X2, SPLIT_K=1))
    y0 = tw.w4a16_matmul(x, packed, 64, None, dict(BLOCK_M=1, BLOCK_N=32, SPLIT_K=1))
    assert _rel(y4, ref) < 2e-3 and _rel(y0, ref) < 2e-3
    yd = tw.w4a16_matmul(x, packed, 64, None, dict(BLOCK_M=16, BLOCK_N=32, MODE=DOT_PER_NIBBLE, SPLIT_K=1, DQ16=True))
    assert _rel(yd, ref) < 2e-3


def test_inline_ptx_assembles_for_sm90():
    """The float16-pair variants carry inline PTX that the interpreter never runs: compile them for an H100
    (Triton's bundled ptxas, no GPU needed) so that a typo in the assembly fails here. In a fresh process, since
    this one's kernels were decorated for the interpreter."""
    code = r"""
import json, sys
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton
except ImportError:
    print(json.dumps({"skip": "no Triton compiler API"})); sys.exit()
from lowbit.kernels.triton_w4a16.gemm import dot_per_nibble_kernel
from lowbit.kernels.triton_w4a16.gemv import gemv_f16x2_kernel
types = dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", b_ptr="*fp16", y_ptr="*fp16",
             p_ptr="*fp32", cnt_ptr="*i32")
base = dict(GROUP_NIBS=8, SYMMETRIC=False, HAS_BIAS=True, SPLIT_OUT=True, ATOMIC=False, LAST=True, G128=True,
            USE_ASM=True)
out = []
for fn, extra in ((gemv_f16x2_kernel, dict(BLOCK_N=64, EVEN_N=True)),
                  (dot_per_nibble_kernel, dict(BLOCK_M=16, BLOCK_N=64, DOT_F32=False, DQ16=True))):
    consts = {**base, **extra}
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    try:
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, num_stages=2))
    except (RuntimeError, FileNotFoundError) as e:  # no ptxas / backend on this machine
        if "ptxas" in str(e).lower() and "error" not in str(e).lower():
            print(json.dumps({"skip": str(e)[:200]})); sys.exit()
        raise
    out.append({"f16x2": "fma.rn.f16x2" in k.asm["ptx"], "cubin": len(k.asm["cubin"])})
print(json.dumps({"kernels": out}))
"""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert len(result["kernels"]) == 2
    for k in result["kernels"]:
        assert k["f16x2"] and k["cubin"] > 0


def test_batched_input_and_quantlinear_end_to_end():
    qt = _qt(IntSpec(4, 32, False))
    bias = torch.randn(96).half()
    layer = QuantLinear(qt, bias, kernel="triton-w4a16")
    assert layer.kernel.name == "triton-w4a16"
    x = torch.randn(2, 3, 256).half()
    y = layer(x)
    assert tuple(y.shape) == (2, 3, 96) and y.dtype == torch.float16
    ref = _reference(qt, x.reshape(6, 256), bias).reshape(2, 3, 96)
    assert _rel(y, ref) < 1e-2
    back = layer.quantized_tensor()  # what saving stores
    assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.scales, qt.scales)
    assert torch.equal(back.zeros, qt.zeros)


def test_unsupported_reasons(monkeypatch):
    cpu = torch.device("cpu")
    assert KERNEL.unsupported(IntSpec(4, 64, True), (96, 256), cpu) is None
    assert "4-bit" in KERNEL.unsupported(IntSpec(8, -1, True), (96, 256), cpu)
    assert "4-bit" in KERNEL.unsupported(IntSpec(3, 64, True), (96, 256), cpu)
    assert "does not divide" in KERNEL.unsupported(IntSpec(4, 256, True), (96, 384), cpu)
    assert "divisible by 128" in KERNEL.unsupported(IntSpec(4, 32, True), (96, 96), cpu)
    assert "group size" in KERNEL.unsupported(IntSpec(4, 48, True), (96, 384), cpu)
    monkeypatch.setattr(tw.launch, "triton", None)
    assert KERNEL.unsupported(IntSpec(4, 64, True), (96, 256), cpu) == "triton is not installed"
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in KERNEL.unsupported(IntSpec(4, 64, True), (96, 256), cpu)


def test_automatic_selection_on_cpu_is_unchanged(monkeypatch):
    spec = IntSpec(4, 64, True)
    cpu = "native-int4" if native.available() and native.isa() > 0 else "cpu-int4"   # the CPU kernel auto picks
    assert select_kernel(spec, (96, 256)).name == cpu  # interpreter on: never picked automatically
    assert select_kernel(spec, (96, 256), prefer="triton-w4a16").name == "triton-w4a16"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert select_kernel(spec, (96, 256)).name == cpu
    with pytest.raises(LowbitError, match="cannot run"):
        select_kernel(spec, (96, 256), prefer="triton-w4a16")


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch\nfrom lowbit import IntSpec\nfrom lowbit.kernels import KERNELS, select_kernel\n"
            "k = KERNELS['triton-w4a16']\n"
            "assert k.unsupported(IntSpec(4, 64, True), (64, 256), torch.device('cpu')) == 'triton is not installed'\n"
            "assert select_kernel(IntSpec(4, 64, True), (64, 256)).name in ('cpu-int4', 'native-int4')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow   # a benchmark script's quick mode, as in test_benchmark_scripts.py
def test_gpu_benchmark_quick_mode_runs(tmp_path):
    out = tmp_path / "bench"
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_w4a16.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["rows"] and all(row["rel_err"] < 1e-2 for row in data["rows"]) and not data["failures"]
    assert "| shape" in out.with_suffix(".md").read_text()
