"""The README's main command (quantize the default model to a 5-bit GGUF plan, then evaluate it against the
float model), run as a user runs it: each half a fresh `lowbit` process with an empty LOWBIT_CACHE, so nothing
of an earlier run is reused. Rows alternate between settings of the `lowbit` command's allocator
(LOWBIT_HEAP=system: glibc as it is; keep: the process keeps the pages it frees, lowbit.heap), round by round.

Per run: seconds, minor page faults and peak resident memory of each half (os.wait4), and the evaluation's
numbers; the GGUF files and the numbers must be the same under every setting.

    python benchmarks/main_command.py [--rounds 2] [--heaps system,keep] [--out benchmarks/results/main_command]
    python benchmarks/main_command.py --quick --out DIR      # 2 windows and a short calibration
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_files import write_results

FORMATS = "Q2_K,Q3_K,Q4_0,Q4_K,Q5_0,Q5_K,Q6_K,Q8_0"


def run(cmd: list[str], env: dict) -> dict:
    """One process: its seconds, minor page faults and peak RSS; exits with its stderr when it fails."""
    with tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)   # this child's own resource usage (Popen's wait would not give it)
        seconds = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[3:5])} failed ({p.returncode}): {err.read().strip()[-500:]}")
    return {"seconds": seconds, "minor_faults": usage.ru_minflt, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--heaps", default="system,keep")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/main_command")
    args = p.parse_args()
    from lowbit.eval import environment
    from lowbit.products import float32_gemm

    lowbit = [sys.executable, "-m", "lowbit.cli", "--quiet"]
    extra_q = ["--calib-samples", "3", "--fisher-samples", "1"] if args.quick else []
    windows = "2" if args.quick else "64"
    rounds = 1 if args.quick else args.rounds
    heaps = args.heaps.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(rounds):
            for heap in heaps:
                cache = tmp / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                env = {**os.environ, "LOWBIT_CACHE": str(cache), "LOWBIT_HEAP": heap}
                gguf, report = tmp / f"{heap}.gguf", tmp / f"{heap}.json"
                q = run([*lowbit, "quantize", "default", "--target-bpw", "5", "--formats", FORMATS, "--out",
                         str(gguf), "--overwrite", *extra_q], env)
                e = run([*lowbit, "eval", str(gguf), "--base", "default", "--no-speed", "--max-windows", windows,
                         "--json", str(report)], env)
                result = json.loads(report.read_text())
                rows.append({"round": r, "heap": heap,
                             "quantize": q, "eval": e,
                             "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
                             "numbers": {k: result[k] for k in ("ppl", "kld", "top1")}})
                row = rows[-1]
                print(f"round {r} {heap}: quantize {q['seconds']:.1f} s, eval {e['seconds']:.1f} s, "
                      f"total {q['seconds'] + e['seconds']:.1f} s", flush=True)
    same = len({(row["gguf_sha256"], json.dumps(row["numbers"])) for row in rows}) == 1
    env = environment()
    lines = [f"CPU: {env.get('cpu', '?')} ({env.get('cpu_features', '')}), {env.get('cores')} cores; "
             f"torch {env.get('torch', '?')}; float32 products: {float32_gemm()}; {windows} windows", "",
             "| round | LOWBIT_HEAP | quantize s | eval s | total s | page faults (q, e) | peak RSS MB (q, e) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        q, e = row["quantize"], row["eval"]
        lines.append(f"| {row['round']} | {row['heap']} | {q['seconds']:.1f} | {e['seconds']:.1f} | "
                     f"{q['seconds'] + e['seconds']:.1f} | {q['minor_faults']:,}, {e['minor_faults']:,} | "
                     f"{q['peak_rss_mb']:.0f}, {e['peak_rss_mb']:.0f} |")
    n = rows[0]["numbers"]
    lines += ["", f"Same GGUF file and numbers in every row: {'yes' if same else 'NO'} (PPL {n['ppl']!r}, "
              f"KLD {n['kld']!r}, top-1 {n['top1']!r})"]
    write_results(args.out, "\n".join(lines), {"rows": rows, "same": same, "environment": env})
    if not same:
        raise SystemExit("the settings gave different files or numbers")


if __name__ == "__main__":
    main()
