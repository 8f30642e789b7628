"""Foundation benchmark: round-to-nearest INT8/INT4 against Hugging Face transformers fp32 and bf16,
on the same model, text and machine, in one run.

    python benchmarks/foundation.py                 # full held-out pydoc text, ctx 512 (about 10 minutes on 2 cores)
    python benchmarks/foundation.py --quick         # 2 windows, 1 speed repeat: a smoke run

Prints a markdown table and writes it with the raw numbers to --out (default benchmarks/results/).
Quality columns come from one lockstep pass (the fp32 base runs once per window). Memory is the RSS
of a fresh process that loads only that model and runs one forward pass, minus the same process's RSS
before loading (Python, torch and transformers imported), after returning freed heap to the OS (malloc_trim).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import load_text, token_windows
from lowbit.eval import decode_speed, environment, evaluate_quality, prefill_speed, weight_stats

CONFIGS = {  # name -> (bits, group size, symmetric)
    "lowbit INT8 per-channel": (8, -1, True),
    "lowbit INT4 g64 sym": (4, 64, True),
    "lowbit INT4 g64 asym": (4, 64, False),
    "lowbit INT4 per-channel asym": (4, -1, False),
    "lowbit INT4 g32 asym (aligned to the GGUF's Q4_1 blocks)": (4, 32, False),
}

_RSS_PROBE = r"""
import ctypes, gc, sys, torch, transformers, lowbit
from lowbit.eval import rss_bytes
transformers.utils.logging.disable_progress_bar()
trim = lambda: (gc.collect(), ctypes.CDLL("libc.so.6").malloc_trim(0))
trim()
before = rss_bytes()
loaded = lowbit.load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
with torch.no_grad():
    loaded.model(torch.arange(16).unsqueeze(0))
trim()  # return freed loading buffers to the OS: what stays is what the model holds
print(rss_bytes() - before)
"""


def model_rss(path: str, dtype: str = "float32") -> int:
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, path, dtype], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    max_windows = 2 if args.quick else args.max_windows
    repeats = 1 if args.quick else 3
    import transformers
    transformers.utils.logging.disable_progress_bar()

    load_start = loadavg()
    t0 = time.perf_counter()
    loaded = lowbit.load_model("default")
    base, tok = loaded.model, loaded.tokenizer
    windows = token_windows(tok, load_text(None, "evaluation"), args.ctx, max_windows)
    models = {"HF transformers fp32 (base)": base, "HF transformers bf16": copy.deepcopy(base).to(torch.bfloat16)}
    quant_seconds = {}
    for name, (bits, group, sym) in CONFIGS.items():
        scheme = lowbit.RTN(bits=bits, group_size=group, symmetric=sym)
        models[name] = lowbit.quantize(copy.deepcopy(base), lowbit.Recipe.default(scheme), progress=False)
        quant_seconds[name] = models[name].lowbit["quantize_seconds"]

    quality = evaluate_quality(models, windows, base=base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from lowbit.models.sources import default_model_path, gguf_cache_dir
        base_dir = str(gguf_cache_dir(default_model_path()))  # the float model as safetensors
        for name, model in models.items():
            if name.startswith("lowbit"):
                path = os.path.join(tmp, "ckpt")
                lowbit.save_checkpoint(model, tok, path, overwrite=True)
                rss = model_rss(path)
            else:
                rss = model_rss(base_dir, "bfloat16" if "bf16" in name else "float32")
            size = weight_stats(model)
            if not name.startswith("lowbit"):  # plain models: every weight at its dtype
                size["quantized_fp32_ratio"] = None
            rows.append({
                "name": name, **quality[name],
                "bits_per_weight": size["bits_per_weight"],
                "quantized_bits_per_weight": size["quantized_bits_per_weight"],
                "bytes": size["bytes"],
                "block_linears_vs_fp32": size["quantized_fp32_ratio"],
                "rss_bytes": rss,
                "quantize_seconds": quant_seconds.get(name),
                "decode_tokens_per_s": decode_speed(model, tok, repeats=repeats),
                "prefill_tokens_per_s": prefill_speed(model, windows[0], repeats=repeats),
            })
            print(f"  measured {name}", file=sys.stderr)

    env = environment()
    header = ("| model | bits/weight (all; block linears) | PPL | KLD vs fp32 | top-1 agree | decode tok/s | "
              "prefill tok/s (512) | model RSS MiB | block linears resident vs fp32 | quantize s |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        qb = f"; {r['quantized_bits_per_weight']:.2f}" if r["quantized_bits_per_weight"] else ""
        ratio = f"{100 * r['block_linears_vs_fp32']:.1f}%" if r["block_linears_vs_fp32"] else "—"
        lines.append(
            f"| {r['name']} | {r['bits_per_weight']:.2f}{qb} | {r['ppl']:.3f} | {r['kld']:.4f} | {100 * r['top1']:.2f}% | "
            f"{r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | {r['rss_bytes'] / 2**20:.0f} | "
            f"{ratio} | {'' if r['quantize_seconds'] is None else format(r['quantize_seconds'], '.1f')} |")
    table = "\n".join(lines)
    meta = (f"{env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
            f"transformers {env['transformers']}, lowbit {env['lowbit']}; text: pydoc held-out half, "
            f"{windows.shape[0]} windows x {args.ctx} tokens = {quality['HF transformers fp32 (base)']['tokens']} "
            f"predicted; load average before {load_start}, after {loadavg()}; {time.perf_counter() - t0:.0f} s")
    print(table)
    print(meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "foundation-quick" if args.quick else "foundation"
    (out / f"{stem}.md").write_text(table + "\n\n" + meta + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"rows": rows, "environment": env, "meta": meta}, indent=2))


if __name__ == "__main__":
    main()
