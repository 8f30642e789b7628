"""Wall time of the calibrating methods on the default model with the default calibration (64 x 512 tokens of
the default text), and the quality they reach (KLD, perplexity and top-1 against the float model on held-out
windows), so that a speed-up can be shown not to change the result.

    python benchmarks/calibration_time.py                          # GPTQ W4 g64: about 3 minutes on 2 cores
    python benchmarks/calibration_time.py --methods gptq,awq --windows 24
    python benchmarks/calibration_time.py --quick --out DIR        # seconds: keeps the script alive
    python benchmarks/calibration_time.py --methods awq,awq:search_dtype=bfloat16   # settings after a colon
    python benchmarks/calibration_time.py --methods gptq:matmul=float32,gptq:matmul=bfloat16 --seeds 0,1,2
                                           # GPTQ's products exact / from bfloat16 inputs, three calibration draws
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import load_text, token_windows
from lowbit.eval import environment
from lowbit.eval.quality import evaluate_quality
from lowbit.io.atomic import atomic_write_text

CONFIGS = {"gptq": lambda: lowbit.GPTQ(bits=4, group_size=64), "awq": lambda: lowbit.AWQ(bits=4, group_size=64)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="gptq")
    ap.add_argument("--windows", type=int, default=24, help="held-out windows of 512 tokens for the quality check")
    ap.add_argument("--seeds", default="0", help="calibration draws (lowbit.quantize's seed), comma-separated")
    ap.add_argument("--out", default="benchmarks/results/calibration_time")
    ap.add_argument("--quick", action="store_true", help="4 x 64 calibration tokens, 2 windows: checks the script")
    args = ap.parse_args()
    calib = {"calib_samples": 4, "calib_seqlen": 64} if args.quick else {}
    args.windows = 2 if args.quick else args.windows
    loaded = lowbit.load_model("default")
    base, tok = loaded.model, loaded.tokenizer
    windows = token_windows(tok, load_text(None, "evaluation"), 512, args.windows)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            name, _, settings = method.partition(":")
            config = CONFIGS[name]()
            if settings:
                config = dataclasses.replace(config, **dict(kv.split("=", 1) for kv in settings.split(":")))
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            lowbit.quantize(model, config, tokenizer=tok, progress=not args.quick, seed=seed, **calib)
            seconds = time.perf_counter() - t0
            q = evaluate_quality({method: model}, windows, base=base, progress=False)[method]
            rows.append({"method": method, "seed": seed, "seconds": round(seconds, 1),
                         **{k: round(q[k], 5) for k in ("kld", "ppl", "top1")}})
            print(json.dumps(rows[-1]), flush=True)
    env = environment()
    md = (f"{env.get('cpu')} ({env.get('cpu_features')}), {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.windows} held-out windows\n\n| method (W4 g64) | seed | seconds | KLD | PPL | top-1 |\n"
          "|---|---|---|---|---|---|\n" + "".join(
              f"| {r['method']} | {r['seed']} | {r['seconds']} | {r['kld']} | {r['ppl']} | {r['top1']} |\n"
              for r in rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"machine": env, "rows": rows}, indent=2, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
