"""How long a user waits for the first token of `lowbit generate` on a checkpoint nothing has compiled before.

A checkpoint of the default model (RTN INT4 g64) is written once; then `lowbit generate CKPT` runs as a fresh
process, each time with its own empty caches (inductor's TORCHINDUCTOR_CACHE_DIR and lowbit's LOWBIT_AOT_DIR)
unless said otherwise, for the default engine (auto: the step compiled ahead of time on a CPU) and for
--engine compiled (torch.compile's step):

- background (the default): tokens decode eagerly while the step compiles in a thread;
- --wait-compile (with --wait-compile-run): the step compiles before the first token;
- warm: background again, on the caches the engine's cold run filled (the next run of the same checkpoint).

For each: seconds from the process start to the first byte of generated text on stdout, to its last byte,
and to the process exit (a cold background run finishes the compilation for the next run before it
exits), plus what the command reports (tokens decoded eagerly, compiled decode rate).

    python benchmarks/cold_start.py [--new-tokens 64] [--engines auto,compiled] [--out benchmarks/results/cold_start]
    python benchmarks/cold_start.py --quick --out DIR      # a few tokens: keeps the script alive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The history of the Python language"


def timed_run(ckpt: Path, cache: Path, new_tokens: int, extra: list[str]) -> dict:
    """Run lowbit generate; time the first and the last stdout byte and the exit."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "LOWBIT_AOT_DIR": str(cache / "aot"),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lowbit.cli", "generate", str(ckpt), "--prompt", PROMPT,
           "--max-new-tokens", str(new_tokens), *extra]
    t0 = time.perf_counter()
    err_file = tempfile.TemporaryFile()     # not a pipe: a full stderr pipe would stall the child
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, env=env)
    chunks, t_first, t_text = [], None, None
    while True:     # the time of the first and of the last byte of text (the process may stay on to compile)
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        t_text = time.perf_counter() - t0
        t_first = t_text if t_first is None else t_first
        chunks.append(chunk)
    text = b"".join(chunks)
    p.wait()
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    t_exit = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"lowbit generate failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    report = [line for line in err.splitlines() if line.startswith("[") and "tokens" in line]
    return {"first_token_s": t_first, "text_done_s": t_text, "exit_s": t_exit, "report": report[-1] if report else "",
            "text": text.decode(errors="replace").strip()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/cold_start")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wait-compile-run", action="store_true", help="also a cold run that waits for the compiler")
    ap.add_argument("--engines", default="auto,compiled", help="which engines' runs: auto, compiled or both")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens = 4

    import lowbit
    from lowbit.eval import environment
    from lowbit.eval.report import write_results

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lowbit-cold-") as tmp:
        tmp = Path(tmp)
        loaded = lowbit.quantize(lowbit.load("default"), lowbit.RTN(bits=4, group_size=64), progress=False)
        ckpt = lowbit.save(loaded, tmp / "ckpt")
        del loaded
        runs = [("auto (aot here), background, cold cache", "cold-a", []),
                ("auto (aot here), background, warm cache", "cold-a", []),
                ("--engine compiled, background, cold cache", "cold-c", ["--engine", "compiled"]),
                ("--engine compiled, background, warm cache", "cold-c", ["--engine", "compiled"])]
        if args.wait_compile_run:
            runs.insert(1, ("auto (aot here), --wait-compile, cold cache", "cold-b", ["--wait-compile"]))
        runs = [r for r in runs if ("compiled" if "compiled" in r[0] else "auto") in args.engines.split(",")]
        rows = []
        for name, cache, extra in runs:
            r = timed_run(ckpt, tmp / cache, args.new_tokens, extra)
            rows.append({"run": name, "load_average_1min": os.getloadavg()[0], **r})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "text"}), flush=True)
    same = len({r["text"] for r in rows}) == 1
    meta = {"new_tokens": args.new_tokens, "prompt": PROMPT, "same_text_every_run": same, **environment()}
    print(write_results(
        out, rows, meta, f"{meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}; {args.new_tokens} new "
        f"tokens; same text in every run: {same}", ["run", "first token s", "text done s", "exit s", "reported"],
        [[r["run"], f"{r['first_token_s']:.1f}", f"{r['text_done_s']:.1f}", f"{r['exit_s']:.1f}",
          r["report"].strip("[]")] for r in rows]))


if __name__ == "__main__":
    main()
