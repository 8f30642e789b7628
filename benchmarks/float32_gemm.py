"""Exact float32 Linears by ATen (MKL) and by oneDNN (lowbit.products.OneDNNLinear), on the default model's real
shapes, alternating in one process: GFLOP/s per shape, and how far each result is from the float64 product.

Rows: one evaluation window (511 positions) against each distinct weight shape of a decoder block (q/o, k/v,
gate/up, down) and the output layer (the tied embedding, 49,152 x 576); then one whole forward of the model over
a 512-token window, the way `lowbit eval` runs it, under each library. Both libraries compute IEEE float32
products summed in float32; the error column is the largest |result − float64 result| over the largest float32
bound K·2^-24·Σ|x||w| (at most 1 for any order of the sums).

    python benchmarks/float32_gemm.py [--rounds 3] [--out benchmarks/results/float32_gemm]
    python benchmarks/float32_gemm.py --quick --out DIR      # one round, small: keeps the script alive
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from results_files import write_results


def rate(f, flops: float, seconds: float = 0.5) -> float:
    """GFLOP/s of f() repeated for about `seconds` after one warm-up call."""
    f()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f()
        n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/float32_gemm")
    args = p.parse_args()
    import lowbit
    from lowbit.eval import environment
    from lowbit.products import OneDNNLinear, float32_gemm

    rounds, seconds, rows_m = (1, 0.05, 64) if args.quick else (args.rounds, 0.5, 511)
    model = lowbit.load_model("default").model
    block = model.model.layers[0]
    shapes = {"q_proj, o_proj": block.self_attn.q_proj.weight, "k_proj, v_proj": block.self_attn.k_proj.weight,
              "gate_proj, up_proj": block.mlp.gate_proj.weight, "down_proj": block.mlp.down_proj.weight,
              "lm_head": model.lm_head.weight}
    libraries = {"aten": contextlib.nullcontext, "onednn": OneDNNLinear}
    torch.manual_seed(0)
    results = {name: {lib: [] for lib in libraries} for name in [*shapes, "whole forward"]}
    errors = {name: {} for name in shapes}
    window = torch.randint(0, model.config.vocab_size, (1, rows_m + 1))
    for name, w in shapes.items():
        x = torch.randn(1, rows_m, w.shape[1])
        exact = x.double() @ w.detach().double().T
        bound = (w.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.detach().double().abs().T)).max().item()
        for lib, ctx in libraries.items():
            with torch.no_grad(), ctx():
                errors[name][lib] = ((F.linear(x, w) - exact).abs().max().item()) / bound
    with torch.no_grad():
        for r in range(rounds):
            for lib, ctx in libraries.items():
                with ctx():
                    for name, w in shapes.items():
                        x = torch.randn(1, rows_m, w.shape[1])
                        results[name][lib].append(rate(lambda: F.linear(x, w), 2.0 * rows_m * w.numel(), seconds))
                    t = time.perf_counter()
                    model(window, use_cache=False)
                    results["whole forward"][lib].append(time.perf_counter() - t)
            print(f"round {r}: " + ", ".join(f"{lib} forward {results['whole forward'][lib][-1]:.3f} s"
                                             for lib in libraries), flush=True)
    env = environment()
    lines = [f"CPU: {env.get('cpu', '?')} ({env.get('cpu_features', '')}), {env.get('torch_threads')} threads; "
             f"torch {env.get('torch', '?')}; lowbit's choice here: {float32_gemm()}; {rows_m} rows", "",
             "| shape (out x in) | ATen (MKL), GFLOP/s (rounds) | oneDNN, GFLOP/s (rounds) | oneDNN / ATen (medians) "
             "| error / bound: ATen, oneDNN |", "|---|---|---|---|---|"]
    for name, by in results.items():
        a, o = by["aten"], by["onednn"]
        if name == "whole forward":
            lines.append(f"| whole forward of one window, s | {' '.join(f'{v:.3f}' for v in a)} | "
                         f"{' '.join(f'{v:.3f}' for v in o)} | {statistics.median(a) / statistics.median(o):.2f}x | |")
            continue
        w = shapes[name]
        lines.append(f"| {name} ({w.shape[0]} x {w.shape[1]}) | {' '.join(f'{v:.0f}' for v in a)} | "
                     f"{' '.join(f'{v:.0f}' for v in o)} | {statistics.median(o) / statistics.median(a):.2f}x | "
                     f"{errors[name]['aten']:.3f}, {errors[name]['onednn']:.3f} |")
    write_results(args.out, "\n".join(lines), {"rows": rows_m, "results": results, "error_over_bound": errors,
                                               "choice": float32_gemm(), "environment": env})


if __name__ == "__main__":
    main()
