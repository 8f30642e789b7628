"""A decode step's attention on the default model's shapes: lowbit's kernel against PyTorch's, per layer.

One query per head (9 heads, 3 key/value heads, head dimension 64: SmolLM2-135M) over T cached positions, keys
and values sliced from a cache as the engine reads them. Columns: lowbit's kernel (`lowbit::decode_attention`,
kernels/native_attention.py) and PyTorch's scaled_dot_product_attention (the reference's call, the engine's
attention='reference') on a bfloat16 cache, then both on a float32 cache of the same values (a model whose
unquantized parts are float32, as a GGUF file loads). Also each one's largest error against float64 math.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention   # about a minute
    python benchmarks/decode_attention.py --quick --out DIR                           # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit.eval import environment
from lowbit.eval.report import write_results
from lowbit.kernels import native, native_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def time_us(fn, calls: int, repeats: int) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/decode_attention", help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    reason = native.load()
    if reason:
        raise SystemExit(f"decode_attention: {reason}")
    env = environment()
    lengths = (16, 100) if args.quick else (16, 64, 100, 150, 300, 1000, 2048)
    calls = 50 if args.quick else 1000
    scale = HEAD_DIM ** -0.5
    torch.manual_seed(0)
    rows = []
    for T in lengths:
        cache_k = torch.randn(1, KV_HEADS, T + 64, HEAD_DIM).bfloat16()
        cache_v = torch.randn(1, KV_HEADS, T + 64, HEAD_DIM).bfloat16()
        q = torch.randn(1, 1, HEADS, HEAD_DIM).bfloat16().transpose(1, 2)
        k, v = cache_k[:, :, :T], cache_v[:, :, :T]
        cache_kf, cache_vf = cache_k.float(), cache_v.float()
        kf, vf, qf = cache_kf[:, :, :T], cache_vf[:, :, :T], q.float()
        exact = native_attention.reference(q, k, v, scale)
        ours = native_attention.decode_attention(q, k, v, scale)
        theirs = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        ours32 = native_attention.decode_attention(qf, kf, vf, scale)
        theirs32 = F.scaled_dot_product_attention(qf, kf, vf, scale=scale, enable_gqa=True)
        row = {"positions": T,
               "lowbit_bf16_us": time_us(lambda: native_attention.decode_attention(q, k, v, scale), calls, args.repeats),
               "torch_bf16_us": time_us(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
                                        calls, args.repeats),
               "lowbit_fp32_us": time_us(lambda: native_attention.decode_attention(qf, kf, vf, scale), calls,
                                         args.repeats),
               "torch_fp32_us": time_us(lambda: F.scaled_dot_product_attention(qf, kf, vf, scale=scale,
                                                                                enable_gqa=True), calls, args.repeats),
               "lowbit_max_error": (ours.double() - exact).abs().max().item(),
               "torch_bf16_max_error": (theirs.double() - exact).abs().max().item(),
               "lowbit_fp32_max_error": (ours32.double() - exact).abs().max().item(),
               "torch_fp32_max_error": (theirs32.double() - exact).abs().max().item()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    caption = f"{env['cpu']} ({env['cpu_features']}), {env['torch_threads']} threads, torch {env['torch']}"
    headers = ["cached positions", "lowbit, bf16 cache (µs)", "torch SDPA, bf16 (µs)", "bf16: torch / lowbit",
               "lowbit, fp32 cache (µs)", "torch SDPA, fp32 (µs)", "fp32: torch / lowbit",
               "max error, bf16: lowbit / torch", "max error, fp32: lowbit / torch"]
    cells = [[str(r["positions"]), f"{r['lowbit_bf16_us']:.1f}", f"{r['torch_bf16_us']:.1f}",
              f"{r['torch_bf16_us'] / r['lowbit_bf16_us']:.1f}x", f"{r['lowbit_fp32_us']:.1f}",
              f"{r['torch_fp32_us']:.1f}", f"{r['torch_fp32_us'] / r['lowbit_fp32_us']:.1f}x",
              f"{r['lowbit_max_error']:.1e} / {r['torch_bf16_max_error']:.1e}",
              f"{r['lowbit_fp32_max_error']:.1e} / {r['torch_fp32_max_error']:.1e}"] for r in rows]
    print(write_results(args.out, rows, env, caption, headers, cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
