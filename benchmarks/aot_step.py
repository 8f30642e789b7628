"""The decode step compiled ahead of time (AOTInductor, `--engine aot`) against torch.compile's (the default), on
the default model, with llama.cpp's own decode in the same run.

For INT4 g64 + INT8 lm_head and INT8 + INT8 lm_head: both engines are built on the same quantized model, their 128
greedy tokens compared with the eager engine's, then decoded alternately (--rounds times each, 128 tokens from the
README's prompt) so that both see the same machine state; the table gives every round and the medians. The
compile columns say how long each engine's first warmup took in this process (cold, or from a disk cache: said).
With --llama-bench: llama.cpp's tg128 for Q4_0 and Q8_0 with 2 threads (decode_engine.llama_bench_rows).

    python benchmarks/aot_step.py --llama-bench build/llama.cpp/build/bin/llama-bench     # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.engine import Engine
from lowbit.eval import environment
from lowbit.eval.system import memory_bandwidth
from lowbit.export.atomic import atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
from decode_engine import PROMPT, llama_bench_rows, loadavg, quantized   # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--llama-bench", type=Path, default=None)
    ap.add_argument("--out", default="benchmarks/results/aot_step")
    args = ap.parse_args()
    args.repeats = 5
    before = loadavg()
    bw = memory_bandwidth(512)
    loaded = lowbit.load_model("default")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    rows = []
    for name, bits, gs in (("INT4 g64 + INT8 lm_head", 4, 64), ("INT8 per channel + INT8 lm_head", 8, -1)):
        print(f"measuring {name}", file=sys.stderr, flush=True)
        model = quantized(loaded.model, bits, gs, True)
        engines, compile_s = {}, {}
        for kind, flag in (("aot", "aot"), ("compiled", True)):
            t0 = time.perf_counter()
            engines[kind] = Engine(model, compile=flag)
            engines[kind].warmup()
            compile_s[kind] = time.perf_counter() - t0
        cached = engines["aot"]._step.compiled_from_scratch == 0
        want = Engine(model, compile=False).generate(ids, args.tokens)["tokens"]
        equal = {k: bool(torch.equal(e.generate(ids, args.tokens)["tokens"], want)) for k, e in engines.items()}
        speeds = {k: [] for k in engines}
        for _ in range(args.rounds):
            for k, e in engines.items():
                speeds[k].append(e.generate(ids, args.tokens)["decode_tokens_per_s"])
        rows.append({"name": name, "decode_tokens_per_s": speeds, "median": {k: statistics.median(v)
                     for k, v in speeds.items()}, "tokens_equal_eager": equal, "warmup_seconds": compile_s,
                     "aot_package_from_disk_cache": cached})
        del engines, model
    peers = llama_bench_rows(args.llama_bench, args, bw["read_gb_s"] * 1e9) if args.llama_bench else []
    env = {**environment(), "loadavg_before": before, "loadavg_after": loadavg(), "memory_bandwidth": bw}
    lines = [f"{env.get('cpu', '')}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"load before {before}, after {env['loadavg_after']}", "",
             "| model | aot decode tok/s (rounds) | compiled decode tok/s (rounds) | aot / compiled (medians) "
             "| tokens = eager | warmup s (aot / compiled) |", "|---|---|---|---|---|---|"]
    for r in rows:
        a, c = r["decode_tokens_per_s"]["aot"], r["decode_tokens_per_s"]["compiled"]
        ma, mc = r["median"]["aot"], r["median"]["compiled"]
        how = " (package from disk cache)" if r["aot_package_from_disk_cache"] else ""
        lines.append(f"| {r['name']} | {' '.join(f'{x:.1f}' for x in a)} | {' '.join(f'{x:.1f}' for x in c)} "
                     f"| {ma:.1f} / {mc:.1f} = **{ma / mc:.2f}x** | {r['tokens_equal_eager']} "
                     f"| {r['warmup_seconds']['aot']:.0f}{how} / {r['warmup_seconds']['compiled']:.0f} |")
    for p in peers:
        lines.append(f"| {p['name']} ({p['engine']}) | tg{args.tokens} {p['decode_tokens_per_s']:.1f} | | | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.out + ".md", text)
    atomic_write_text(args.out + ".json", json.dumps({"environment": env, "rows": rows, "peers": peers},
                                                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
