"""Prefill's matmuls: lowbit's dense paths with and without AMX tiles of their own, against ATen's bfloat16 matmul.

Two settings, each in its own processes (the switch is read once per process), alternating `--rounds` times:
  amx    the default: on CPUs with AMX-BF16, int4 / int8 weights dequantized straight into AMX tiles
         (csrc/cpu_gemm_amx.inc); elsewhere the same as `tiles`
  tiles  LOWBIT_NATIVE_AMX=0: the weight dequantized a tile of rows at a time and multiplied by ATen
Each process times (1) the ops at 512 rows of bfloat16 activations on the default model's fused shapes (q/k/v
960 x 576, o 576 x 576, gate/up 3072 x 576, down 576 x 1536): int4 g64, int8 per channel, and ATen's bfloat16
matmul of the same int4 weight already dequantized (F.linear, the bfloat16 model's Linear); (2) a 512-token
prefill through lowbit's engine of INT4 g64 + INT8 lm_head, INT8 + INT8 lm_head and the bfloat16 model.

    python benchmarks/dense_prefill.py [--rounds 3] [--out benchmarks/results/dense_prefill]
    python benchmarks/dense_prefill.py --quick --out DIR      # one round, 64 rows, no engine: keeps it alive
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from results_files import write_results

SHAPES = {"q/k/v (fused)": (960, 576), "o_proj": (576, 576), "gate/up (fused)": (3072, 576), "down_proj": (576, 1536)}
SETTINGS = {"amx": "1", "tiles": "0"}


def per_call_us(f, seconds: float) -> float:
    """Median µs of f() over blocks of calls, for about `seconds` after three warm-up calls."""
    for _ in range(3):
        f()
    blocks, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(blocks) < 3:
        t0 = time.perf_counter()
        for _ in range(10):
            f()
        blocks.append((time.perf_counter() - t0) / 10 * 1e6)
    return statistics.median(blocks)


def worker(rows: int, seconds: float, engine: bool) -> dict:
    import torch
    import torch.nn.functional as F

    import lowbit
    from lowbit.algorithms import quantize_rtn
    from lowbit.kernels import KERNELS, native
    if not native.available():
        raise SystemExit(f"lowbit's native kernels are not built: {native.load()}")
    torch.manual_seed(0)
    int4, int8 = KERNELS["native-int4"], KERNELS["native-int8"]
    ops = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        q4 = int4.prepare(quantize_rtn(w, lowbit.IntSpec(4, 64, True)))
        q8 = int8.prepare(quantize_rtn(w, lowbit.IntSpec(8, -1, True)))
        wb = torch.ops.lowbit.int4_dequant(q4["wpack"], q4["kscales"], q4["offsets"], 64, torch.bfloat16)
        x = torch.randn(rows, k).bfloat16()
        ops[name] = {
            "int4": per_call_us(lambda: torch.ops.lowbit.int4_dense_linear(
                x, q4["wpack"], q4["kscales"], q4["offsets"], 64, torch.bfloat16), seconds),
            "int8": per_call_us(lambda: torch.ops.lowbit.int8_dense_linear(
                x, q8["wq"], q8["kscales"], q8["offsets"], k, torch.bfloat16), seconds),
            "bf16_linear": per_call_us(lambda: F.linear(x, wb), seconds)}
    prefill = {}
    if engine:
        import copy

        from decode_engine import quantized   # a sibling script: this script's folder is on the import path

        from lowbit.eval.speed import engine_for
        base = lowbit.load_model("default").model
        models = {"INT4 g64 + INT8 lm_head": lambda: quantized(base, 4, 64, True),
                  "INT8 + INT8 lm_head": lambda: quantized(base, 8, -1, True),
                  "bfloat16 model": lambda: copy.deepcopy(base).bfloat16()}
        ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
        for name, make in models.items():
            e = engine_for(make(), "auto")
            e.reserve(513)
            us = per_call_us(lambda: e.prefill(ids), 4 * seconds)
            prefill[name] = 512 / (us / 1e6)
    return {"amx": native.amx(), "ops": ops, "prefill": prefill}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/dense_prefill")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    rows, seconds, engine = (64, 0.05, False) if args.quick else (512, 1.0, True)
    if args.worker:
        print(json.dumps(worker(rows, seconds, engine)))
        return
    runs = {s: [] for s in SETTINGS}
    for r in range(1 if args.quick else args.rounds):
        for setting, flag in SETTINGS.items():
            env = {**os.environ, "LOWBIT_NATIVE_AMX": flag}
            cmd = [sys.executable, __file__, "--worker", setting] + (["--quick"] if args.quick else [])
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r} {setting}: AMX tiles {'on' if runs[setting][-1]['amx'] else 'off'}", flush=True)
    from lowbit.eval import environment
    env = environment()
    med = lambda vals: statistics.median(vals)   # noqa: E731
    lines = [f"CPU: {env.get('cpu', '?')} ({env.get('cpu_features', '')}), {env.get('torch_threads')} threads; "
             f"torch {env.get('torch', '?')}; {rows} rows of bfloat16 activations; µs per call, one value per round",
             "", "| shape (out x in) | int4 g64: amx | int4: tiles | int8: amx | int8: tiles | ATen bfloat16 "
             "(F.linear) | int4 amx / tiles | int4 amx / bfloat16 |", "|---|---|---|---|---|---|---|---|"]
    for name, (n, k) in SHAPES.items():
        col = {(s, op): [run["ops"][name][op] for run in runs[s]] for s in SETTINGS for op in ("int4", "int8",
                                                                                           "bf16_linear")}
        bf16 = col[("amx", "bf16_linear")] + col[("tiles", "bf16_linear")]
        cells = [" ".join(f"{v:.0f}" for v in col[key]) for key in
                 (("amx", "int4"), ("tiles", "int4"), ("amx", "int8"), ("tiles", "int8"))]
        lines.append(f"| {name} ({n} x {k}) | {' | '.join(cells)} | {' '.join(f'{v:.0f}' for v in bf16)} | "
                     f"{med(col[('tiles', 'int4')]) / med(col[('amx', 'int4')]):.2f}x | "
                     f"{med(bf16) / med(col[('amx', 'int4')]):.2f}x |")
    if engine:
        lines += ["", "| 512-token prefill, tok/s | amx (rounds) | tiles (rounds) | amx / tiles | amx / bfloat16 "
                  "model (same processes) |", "|---|---|---|---|---|"]
        for name in runs["amx"][0]["prefill"]:
            a = [run["prefill"][name] for run in runs["amx"]]
            t = [run["prefill"][name] for run in runs["tiles"]]
            b = [run["prefill"]["bfloat16 model"] for run in runs["amx"]]
            lines.append(f"| {name} | {' '.join(f'{v:.0f}' for v in a)} | {' '.join(f'{v:.0f}' for v in t)} | "
                         f"{med(a) / med(t):.2f}x | {med(a) / med(b):.2f}x |")
    write_results(args.out, "\n".join(lines), {"rows": rows, "runs": runs, "environment": env})


if __name__ == "__main__":
    main()
