"""Peak memory and step time of QAT on the default model: what trains (scales, weights, lora) x activation
checkpointing on/off, each in its own process.

Each row trains W3 g64 asymmetric from RTN for --steps steps of one 256-token window and reports the process's
peak resident memory (ru_maxrss) and the median step time. Activation offloading (`offload=True`) moves what
autograd saves to host memory: on a CPU-only machine that is where it already is, so it saves nothing here and
is not a row.

    python benchmarks/qat_memory.py [--steps 4] [--out benchmarks/results/qat_memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def row(train: str, checkpointing: bool, steps: int) -> dict:
    import lowbit
    from lowbit.train import qat
    times, last = [], [time.perf_counter()]

    def tick(step, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    loaded = lowbit.load("default")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    last[0] = time.perf_counter()
    qat(loaded, lowbit.RTN(bits=3, group_size=64, symmetric=False), init="rtn", steps=steps, train=train,
        checkpointing=checkpointing, windows=16, progress=False, callback=tick)
    return {"train": train, "checkpointing": checkpointing, "steps": steps,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_before_training_bytes": before, "step_seconds": statistics.median(times[1:] or times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/qat_memory")
    ap.add_argument("--row", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(row(args.row[0], args.row[1] == "1", args.steps)))
        return
    from lowbit.eval import environment
    from lowbit.eval.report import write_results
    rows = []
    for train in ("scales", "weights", "lora"):
        for ckpt in (True, False):
            r = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--row", train, str(int(ckpt))],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr.strip().splitlines()[-1])
            rows.append({**json.loads(r.stdout.strip().splitlines()[-1]), "load_average_1min": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    meta = environment()
    out = Path(args.out)
    print(write_results(
        out, rows, meta, f"{meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}; W3 g64 from RTN, one "
        f"256-token window per step, {args.steps} steps",
        ["trains", "activation checkpointing", "peak RSS GiB", "step s"],
        [[r["train"], "on" if r["checkpointing"] else "off", f"{r['peak_rss_bytes'] / 2**30:.2f}",
          f"{r['step_seconds']:.2f}"] for r in rows]))


if __name__ == "__main__":
    main()
