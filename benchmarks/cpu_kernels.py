"""Per-kernel speed on the default model's real shapes: microseconds per call and GB/s of resident weight bytes
read, at one row of activations (decode) and at 512 rows (prefill), against the machine's read bandwidth.

Shapes are the engine's own matmuls of one SmolLM2-135M block (fused q/k/v 576→960, o 576→576, fused gate/up
576→3072, down 1536→576) and the lm_head (576→49152). Every kernel runs the same quantized weights
(RTN, asymmetric groups of 64; INT8 symmetric per channel) through `QuantLinear`'s kernel call:

  native-int4 — lowbit's own kernel (csrc/cpu_gemm.cpp): with int8 activations (the default where the CPU
                has AVX-512 VNNI or AVX2), then once per float32 instruction-set path this CPU has;
  native-int8 — the same for INT8 per channel (int8 activations where the CPU has them, and the float32 path);
  native-int4 / native-int8 (5- and 6-bit integers, GGUF Q4_0/Q5_0/Q8_0, and Q4_K/Q5_K/Q6_K/Q3_K where
                in_features is a multiple of 256) — the same kernels on those formats' integer view, and the
                reference kernel (dequantize every call), which ran them before, for GGUF Q4_0 and Q6_K on the
                small shapes; for the formats whose scales fit 16 bits (symmetric int4, Q4_0, Q8_0) and the
                k-quants (sub-block codes and 16-bit super-block scales), the same again with float32 scales and
                offsets, as they were resident before; for 5-7-bit codes (packed
                to their width), the same again with a byte per code, as they were resident before;
  cpu-int4 / cpu-int8 — PyTorch's packed ATen kernels (bfloat16 activations);
  dense fp32 / bf16 — torch.nn.functional.linear on the dequantized weight;
  native-dense bf16 — lowbit's kernel for a few rows times a bfloat16 weight (csrc/dense16.cpp), which the
                engine runs for a decoded token's unquantized bfloat16 Linears (PyTorch's matmul beyond 4 rows).

Each figure is the median of --repeats timings of a loop that cycles through enough copies of the weight that
they do not fit the last-level cache (--cold-mib), so the weights stream from memory as in a real decode step.

    python benchmarks/cpu_kernels.py                     # about 2 minutes on 2 cores
    python benchmarks/cpu_kernels.py --quick --out DIR   # seconds: keeps the script alive
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lowbit import IntSpec
from lowbit.algorithms import quantize_rtn
from lowbit.eval import environment
from lowbit.eval.system import memory_bandwidth
from lowbit.io.atomic import atomic_write_text
from lowbit.formats import GGUFSpec
from lowbit.kernels import KERNELS, native, native_dense, select_kernel
from lowbit.kernels.native_int4 import offsets_of, scales_of
from lowbit.kernels.native_int8 import codes_of

SHAPES = {"qkv 576→960": (960, 576), "o 576→576": (576, 576), "gate_up 576→3072": (3072, 576),
          "down 1536→576": (576, 1536), "lm_head 576→49152": (49152, 576)}


def resident_bytes(packed: dict) -> int:
    """What a call reads: every resident tensor except what is kept only for `restore` (the scales and zeros
    beside a kernel's own scales; a GGUF type's block fields beside the native kernels' codes)."""
    def read(k):
        if k in ("scales", "zeros"):
            return k == "scales" and "kscales" not in packed and "scale_zeros" not in packed
        return not k.startswith("field_")
    return sum(t.numel() * t.element_size() for k, t in packed.items() if read(k))


def time_calls(fns: list, rows: int, k: int, calls: int, repeats: int) -> float:
    """Median µs per call, cycling through the weight copies in fns."""
    x = torch.randn(rows, k)
    for f in fns[:2]:
        f(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)](x)
        ts.append((time.perf_counter() - t0) / calls)
    return statistics.median(ts) * 1e6


def variants(w: torch.Tensor):
    """(name, make) for every kernel that runs this weight here; make() prepares a fresh copy of the kernel's
    resident tensors and returns (weight bytes a call reads, call(x))."""
    n, k = w.shape
    q4 = quantize_rtn(w, IntSpec(4, 64, False))
    q8 = quantize_rtn(w, IntSpec(8, -1, True))
    out = []

    def kernel_call(name, qt, one_row=None, float32_scales=False, byte_codes=False):
        """one_row(x, packed, group): the call for one row of activations (a given path), else the kernel's.
        float32_scales: the native kernels' scales and offsets widened to float32 (as they were resident before
        16-bit ones), to show what the narrower ones save in the same run. byte_codes: packed 2-3- or 5-7-bit codes a byte
        each (as they were resident before they were packed to their width)."""
        kern = KERNELS[name]
        # a copy of its own (native-int8 keeps the storage tensor itself: copies would share it and stay cached)
        packed = {key: t.clone() for key, t in kern.prepare(qt).items()}
        if float32_scales:   # (k-quants: d · sc and dmin · m, formed once here)
            packed.update(kscales=scales_of(packed), offsets=offsets_of(packed).float())
            packed.pop("kscales_super", None)
            packed.pop("offsets_super", None)
        if byte_codes and packed.get("wq") is not None and packed["wq"].dtype == torch.uint8:
            packed["wq"] = codes_of(packed["wq"], k).clone()
        if one_row is None:
            return resident_bytes(packed), lambda x: kern.linear(x, packed, qt.spec, qt.shape, None)
        g = k // packed["kscales"].shape[1]
        return resident_bytes(packed), lambda x: (one_row(x, packed, g) if x.shape[0] == 1
                                                  else kern.linear(x, packed, qt.spec, qt.shape, None))

    if native.available():
        ops = torch.ops.lowbit
        q8_name = native.Q8_NAMES[native.q8_level()]
        if native.q8():
            out.append((f"native-int4 ({q8_name}, int8 activations)", lambda: kernel_call(
                "native-int4", q4, lambda x, p, g: ops.int4_gemm_q8(x, p["wpack"], p["kscales"], p["offsets"], g))))
        for isa in range(native.isa(), 0, -1):
            out.append((f"native-int4 ({native.ISA_NAMES[isa]})", lambda isa=isa: kernel_call(
                "native-int4", q4, lambda x, p, g: ops.int4_gemm(x, p["wpack"], p["kscales"], p["offsets"], g, isa))))
        if native.q8():
            out.append((f"native-int8 ({q8_name}, int8 activations)", lambda: kernel_call(
                "native-int8", q8, lambda x, p, g: ops.int8_gemm_q8(x, p["wq"], p["kscales"], p["offsets"], g))))
        out.append(("native-int8 (float32)", lambda: kernel_call(
            "native-int8", q8, lambda x, p, g: ops.int8_gemm(x, p["wq"], p["kscales"], p["offsets"], g))))
        # other integer formats through their integer view (formats.base.IntegerView), each kernel's default path
        others = [("int4 g64 symmetric", quantize_rtn(w, IntSpec(4, 64, True))),
                  ("int5 g64", quantize_rtn(w, IntSpec(5, 64, False))), ("int6 g64", quantize_rtn(w, IntSpec(6, 64, True)))]
        others += [(f"GGUF {t}", GGUFSpec(t).quantize(w)) for t in ("Q4_0", "Q5_0", "Q8_0")]
        others += [(f"GGUF {t}", GGUFSpec(t).quantize(w)) for t in ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K") if k % 256 == 0]
        for label, qt in others:
            kern = select_kernel(qt.spec, qt.shape)
            out.append((f"{kern.name} ({label})", lambda kern=kern, qt=qt: kernel_call(kern.name, qt)))
            if label in ("int4 g64 symmetric", "GGUF Q4_0", "GGUF Q8_0", "GGUF Q4_K", "GGUF Q5_K", "GGUF Q6_K",
                         "GGUF Q3_K", "GGUF Q2_K"):   # 16-bit scales; the k-quants' codes times 16-bit scales
                out.append((f"{kern.name} ({label}, float32 scales)",
                            lambda kern=kern, qt=qt: kernel_call(kern.name, qt, float32_scales=True)))
            if (label in ("int5 g64", "int6 g64", "GGUF Q5_0", "GGUF Q5_K", "GGUF Q6_K", "GGUF Q3_K", "GGUF Q2_K")
                    and kern.name == "native-int8"):
                out.append((f"{kern.name} ({label}, byte codes)",
                            lambda kern=kern, qt=qt: kernel_call(kern.name, qt, byte_codes=True)))
            if label in ("GGUF Q4_0", "GGUF Q6_K") and n * k <= 1 << 21:   # what they ran on before: the reference
                out.append((f"reference ({label})", lambda qt=qt: kernel_call("reference", qt)))
    for name, qt in (("cpu-int4", q4), ("cpu-int8", q8)):
        if KERNELS[name].unsupported(qt.spec, qt.shape, torch.device("cpu")) is None:
            out.append((f"{name} (ATen)", lambda name=name, qt=qt: kernel_call(name, qt)))
    for dtype in (torch.float32, torch.bfloat16):
        def dense(dtype=dtype):
            wd = q4.dequantize(torch.float32).to(dtype)
            return wd.numel() * wd.element_size(), lambda x: torch.nn.functional.linear(x.to(dtype), wd)
        out.append((f"dense {str(dtype).split('.')[-1]}", dense))
    if native.available():   # what the engine runs for a decoded token's bfloat16 weights (PyTorch's beyond 4 rows)
        def native_dense_bf16():
            wd = q4.dequantize(torch.float32).to(torch.bfloat16)
            return wd.numel() * 2, lambda x: native_dense.linear(x.to(torch.bfloat16), wd)
        out.append(("native-dense bf16 (lowbit::dense16_linear)", native_dense_bf16))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes, few calls: checks the script runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold-mib", type=int, default=256, help="weight copies per kernel: at least this many MiB")
    ap.add_argument("--out", default="benchmarks/results/cpu_kernels", help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    shapes = {"o 128→128": (128, 128), "down 256→128": (128, 256)} if args.quick else SHAPES
    calls = {1: 20 if args.quick else 400, 512: 2 if args.quick else 10}
    bw = memory_bandwidth(16 if args.quick else 512)
    env = {**environment(), "native_path": native.ISA_NAMES[native.isa()] if native.available() else native.load()}
    torch.manual_seed(0)
    rows = []
    for shape_name, (n, k) in shapes.items():
        w = torch.randn(n, k) * 0.02
        for name, make in variants(w):
            nbytes, first = make()
            # independent copies, each call reading the next one, as successive layers do
            copies = max(1, min(4096, -(-args.cold_mib * 2**20 // max(nbytes, 1))))
            fns = [first] + [make()[1] for _ in range(copies - 1)]
            for m in (1, 512):
                if m == 512 and "lm_head" in shape_name:
                    continue
                n_calls = calls[m] if nbytes < 2**25 else max(2, calls[m] // 8)
                if m == 1:   # every copy once per timing: none is still cached from the previous timing
                    n_calls = max(n_calls, len(fns))
                us = time_calls(fns, m, k, n_calls, args.repeats)
                rows.append({"shape": shape_name, "kernel": name, "rows": m, "us": us,
                             "weight_bytes": nbytes, "gb_s": nbytes / us / 1e3})
                print(json.dumps(rows[-1]), flush=True)
    table = render(rows, bw, env)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), table)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"machine": env, "bandwidth": bw, "rows": rows},
                                                           indent=2, default=str))
    return 0


def render(rows: list[dict], bw: dict, env: dict) -> str:
    lines = [f"{env['cpu']} ({env['cpu_features']}), {env['torch_threads']} threads, torch {env['torch']}; "
             f"native path: {env['native_path']}; memory read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s",
             "", "| shape | kernel | weight MB | µs at 1 row | GB/s at 1 row | of read bandwidth | µs at 512 rows |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["rows"] != 1:
            continue
        pre = next((p["us"] for p in rows if p["rows"] == 512 and p["shape"] == r["shape"]
                    and p["kernel"] == r["kernel"]), None)
        lines.append(f"| {r['shape']} | {r['kernel']} | {r['weight_bytes'] / 1e6:.2f} | {r['us']:.1f} | "
                     f"{r['gb_s']:.1f} | {100 * r['gb_s'] / bw['read_gb_s']:.0f}% | "
                     f"{'' if pre is None else f'{pre:.0f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
