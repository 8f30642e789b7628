"""Peak resident memory of a calibrating method on the default model, above what the process held just before
`quantize` (the loaded model, the tokenizer, the libraries): the memory the method itself needs. Linux only (the
peak is the kernel's VmHWM, reset through /proc/self/clear_refs before quantizing).

    python benchmarks/calibration_memory.py --method awq      # about 2 minutes on 2 cores
    python benchmarks/calibration_memory.py --method gptq
    python benchmarks/calibration_memory.py --quick --out DIR  # 2 blocks, 4 x 64 tokens: checks the script
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval import environment
from lowbit.eval.report import write_results

CONFIGS = {"gptq": lambda: lowbit.GPTQ(bits=4, group_size=64), "awq": lambda: lowbit.AWQ(bits=4, group_size=64)}


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="awq", choices=sorted(CONFIGS))
    ap.add_argument("--out", default="benchmarks/results/calibration_memory")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    loaded = lowbit.load_model("default")
    model = loaded.model
    calib = {}
    if args.quick:
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
        calib = {"calib_samples": 4, "calib_seqlen": 64}
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    lowbit.quantize(model, CONFIGS[args.method](), tokenizer=loaded.tokenizer, progress=not args.quick, **calib)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    row = {"method": args.method, "rss_before_mib": round(before / 1024), "peak_mib": round(peak / 1024),
           "method_peak_gib": round((peak - before) / 2**20, 3), "seconds": round(seconds, 1),
           "calibration": "4 x 64 tokens, 2 blocks" if args.quick else "64 x 512 tokens"}
    env = environment()
    md = write_results(args.out, [row], env, f"{env.get('cpu')}, {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}",
                       ["method (W4 g64)", "calibration", "resident before, MiB", "peak, MiB",
                        "method's own peak, GiB", "seconds"],
                       [[str(row[k]) for k in ("method", "calibration", "rss_before_mib", "peak_mib",
                                               "method_peak_gib", "seconds")]])
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
