"""Decoding the default model under a weight budget smaller than its weights, blocks streamed from disk.

For each configuration a fresh process loads the model, offloads the blocks that do not fit (`lowbit.offload`),
and decodes greedily with lowbit's engine, as `lowbit generate --max-memory` does (eagerly, nothing fused, each
streamed block's tensors swapped in around its call); resident rows are measured with the eager engine (the
like-for-like baseline) and the compiled one (what `lowbit generate` does without a budget). It records the plan, tokens/s, the
RSS sampled during decoding, the process's RSS before any weights were loaded (the interpreter, torch and the
tokenizer: the stated overhead), the bytes read per token, and the read bandwidth of the shards (from the
page cache: the files were just written), which bounds tokens/s at bandwidth / bytes per token. A resident run
of the same model is measured beside it.

    python benchmarks/offload.py [--out benchmarks/results/offload]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit.io.atomic import atomic_write_text, save_figure

# fp32: the default model saved as a Hugging Face directory and opened lazily (streamed blocks never loaded);
# int4: a lowbit checkpoint loaded (packed weights only), then its streamed blocks written to disk shards
CONFIGS = [("fp32", None, None, "compiled"), ("fp32", None, None, "eager"), ("fp32", "300MB", "lazy", "eager"),
           ("int4", None, None, "compiled"), ("int4", None, None, "eager"), ("int4", "90MB", "disk", "eager")]
LARGE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=2048)

_LARGE_CHILD = r"""
import json, sys, time, gc, torch
from lowbit.eval.system import rss_bytes
from lowbit.eval.memory import PeakRSS
from lowbit.offload import open_streamed
path, budget = sys.argv[1], sys.argv[2]
gc.collect()
overhead = rss_bytes()
with PeakRSS() as load_mem:
    loaded, sm = open_streamed(path, 10**15 if budget == "none" else budget)   # none: everything resident
ids = loaded.tokenizer("The history of the Python language", return_tensors="pt")["input_ids"]
from lowbit.engine import Engine
engine = Engine(loaded.model, compile=False)
with torch.no_grad(), PeakRSS() as mem:
    runs = [engine.generate(ids, 9) for _ in range(3)]   # the first token comes from the prefill; 8 decoded
r = runs[0]
dt = sorted(x["decode_seconds"] for x in runs)[1]   # median of 3
t0 = time.perf_counter(); n = 0
for i in sm.plan.streamed:
    n += sum(t.numel() * t.element_size() for t in sm.store.load(i).values())
read = n / (time.perf_counter() - t0) / 1e9
print(json.dumps({"scheme": "generated llama 1.2B bf16", "budget": budget, "rss_curve": mem.samples, "tokens_per_s": 8 / dt,
                  "peak_rss": max(mem.peak_bytes, load_mem.peak_bytes), "overhead_rss": overhead,
                  "plan": sm.plan.describe(), "bytes_per_token": sm.plan.bytes_moved_per_pass,
                  "planned_peak_weights": sm.plan.peak_weight_bytes,
                  "budget_bytes": None if budget == "none" else sm.plan.budget,
                  "read_gb_s": read, "resident_weight_bytes": sm.plan.fixed_bytes + sum(sm.plan.block_bytes),
                  "streamed_blocks": len(sm.plan.streamed), "store": "lazy", "engine": "eager",
                  "tokens": r["tokens"].tolist()}))
"""


_QUANT_CHILD = r"""
import json, sys, time, gc, torch
from lowbit.eval.system import rss_bytes
from lowbit.eval.memory import PeakRSS
import lowbit
from lowbit.offload import quantize_streamed
path, out = sys.argv[1], sys.argv[2]
gc.collect()
overhead = rss_bytes()
recipe = lowbit.Recipe.default(lowbit.RTN(bits=4, group_size=64))
with PeakRSS() as mem:
    t0 = time.perf_counter()
    quantize_streamed(path, out, recipe, progress=False)
    dt = time.perf_counter() - t0
size = sum(f.stat().st_size for f in __import__("pathlib").Path(out).glob("*.safetensors"))
print(json.dumps({"seconds": dt, "peak_rss": mem.peak_bytes, "overhead_rss": overhead, "checkpoint_bytes": size,
                  "rss_curve": mem.samples}))
"""


def make_large(path: Path) -> None:
    """A llama-architecture model of about 1.2B parameters with random weights, saved in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import lowbit
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LARGE))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    model.save_pretrained(path)
    lowbit.load_model("default").tokenizer.save_pretrained(path)
    del model

_CHILD = r"""
import json, sys, time, copy, torch, gc
from lowbit.eval.system import rss_bytes
from lowbit.eval.memory import PeakRSS
import lowbit
scheme, budget, where, tmp, engine_kind = sys.argv[1:6]
tok = lowbit.load_model("default").tokenizer   # warms the cache; the model itself is dropped
gc.collect()
overhead = rss_bytes()
plan = None
if where == "lazy":
    from lowbit.offload import open_streamed
    loaded, sm = open_streamed(tmp + "/hf", budget, dtype=torch.float32)
    model, plan = loaded.model, sm.plan
    weights = plan.fixed_bytes + sum(plan.block_bytes)
else:
    # int4: a checkpoint written by the parent process (loading it never allocates the float weights)
    model = lowbit.load_model(tmp + "/int4" if scheme == "int4" else "default").model
    weights = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}.values())
if where == "disk":
    from lowbit.offload import offload_blocks
    sm = offload_blocks(model, budget, tmp + "/offload")
    plan = sm.plan
if plan is not None:
    gc.collect()
    t0 = time.perf_counter(); n = 0
    for i in plan.streamed:
        n += sum(t.numel() * t.element_size() for t in sm.store.load(i).values())
    read_gb_s = n / (time.perf_counter() - t0) / 1e9
ids = tok("The history of the Python language", return_tensors="pt")["input_ids"]
from lowbit.engine import Engine
engine = Engine(model, compile=engine_kind == "compiled")
with torch.no_grad():
    engine.generate(ids, 4)                     # compiles (or loads the compiled step) / first touch
    with PeakRSS() as mem:
        runs = [engine.generate(ids, 33) for _ in range(3)]   # the first token comes from the prefill; 32 decoded
    r = sorted(runs, key=lambda x: x["decode_tokens_per_s"])[1]                   # median of 3
print(json.dumps({"scheme": scheme, "budget": budget, "store": where, "rss_curve": mem.samples, "engine": engine_kind,
                  "streamed_blocks": 0 if plan is None else len(plan.streamed),
                  "tokens_per_s": r["decode_tokens_per_s"], "peak_rss": mem.peak_bytes,
                  "overhead_rss": overhead, "tokens": r["tokens"].tolist(),
                  "plan": None if plan is None else plan.describe(),
                  "bytes_per_token": None if plan is None else plan.bytes_moved_per_pass,
                  "planned_peak_weights": None if plan is None else plan.peak_weight_bytes,
                  "budget_bytes": None if plan is None else plan.budget,
                  "read_gb_s": None if plan is None else read_gb_s,
                  "resident_weight_bytes": weights}))
"""


def plot_curves(rows: list[dict], path: Path) -> None:
    """RSS while decoding, resident vs streamed, one panel per model (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for r in rows:
            if r["scheme"] != m:
                continue
            t, b = zip(*r["rss_curve"])
            label = (f"resident ({r['engine']})" if r["budget"] in (None, "none")
                     else f"budget {r['budget']} ({r['engine']})")
            ax.plot(t, [x / 2**20 for x in b], label=label)
            if r.get("budget_bytes"):
                ax.axhline((r["budget_bytes"] + r["overhead_rss"]) / 2**20, ls="--", lw=0.8, color="grey")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("seconds into decoding")
        ax.set_ylabel("RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle("RSS while decoding (dashed: budget + interpreter overhead)", fontsize=10)
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/offload")
    ap.add_argument("--no-large", action="store_true", help="skip the generated 1.2B model")
    ap.add_argument("--only-quantize", action="store_true", help="just quantize the generated 1.2B model")
    args = ap.parse_args()
    rows = []
    if args.only_quantize:
        with tempfile.TemporaryDirectory() as tmp:
            make_large(Path(tmp) / "large")
            r = subprocess.run([sys.executable, "-c", _QUANT_CHILD, str(Path(tmp) / "large"), str(Path(tmp) / "q")],
                               capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            q = json.loads(r.stdout.strip().splitlines()[-1])
        line = (f"RTN INT4 g64 of the generated 1.2B model (2.34 GB bf16 on disk), block by block "
                f"(`quantize_streamed`): {q['seconds']:.0f} s, peak RSS {q['peak_rss'] / 2**20:.0f} MiB (of which "
                f"{q['overhead_rss'] / 2**20:.0f} MiB interpreter, torch and tokenizer before any weights), "
                f"checkpoint {q['checkpoint_bytes'] / 1e6:.0f} MB.")
        atomic_write_text(Path(args.out).with_name("offload_quantize.json"), json.dumps(q))
        print(line)
        return 0
    if not args.no_large:
        with tempfile.TemporaryDirectory() as tmp:
            make_large(Path(tmp) / "large")
            for budget in ("2GB", "none"):
                r = subprocess.run([sys.executable, "-c", _LARGE_CHILD, str(Path(tmp) / "large"), budget],
                                   capture_output=True, text=True)
                if r.returncode:
                    print(r.stderr[-3000:], file=sys.stderr)
                    return 1
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(rows[-1]["plan"], file=sys.stderr)
    for scheme, budget, where, engine_kind in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            import lowbit
            if where == "lazy":
                loaded = lowbit.load_model("default")
                loaded.model.save_pretrained(Path(tmp) / "hf")
                loaded.tokenizer.save_pretrained(Path(tmp) / "hf")
                del loaded
            if scheme == "int4":
                loaded = lowbit.load_model("default")
                scheme_ = lowbit.RTN(bits=4, group_size=64)
                lowbit.save_checkpoint(lowbit.quantize(loaded.model, lowbit.Recipe.default(scheme_), progress=False),
                                       loaded.tokenizer, Path(tmp) / "int4")
                del loaded
            r = subprocess.run([sys.executable, "-c", _CHILD, scheme, budget or "none", where or "none", tmp,
                                engine_kind], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1]["plan"] or f"{scheme}: resident", file=sys.stderr)
    by = {(r["scheme"], r["budget"], r["engine"]): r for r in rows}
    lines = ["| model | weight budget | lowbit engine | blocks streamed | MB read / token | decode tok/s | read-only "
             "bound tok/s (shard read GB/s) | read + compute, one after the other, tok/s | peak RSS while decoding, "
             "MiB | of which interpreter + torch + tokenizer | same tokens as resident |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        resident = by.get((r["scheme"], "none", "eager"), r)
        streamed = f"{r['streamed_blocks']} ({r.get('store') or 'disk'})" if r["plan"] else "0"
        mb = f"{r['bytes_per_token'] / 1e6:.1f}" if r["bytes_per_token"] else "0"
        bound = (f"{r['read_gb_s'] * 1e9 / r['bytes_per_token']:.0f} ({r['read_gb_s']:.1f})"
                 if r["bytes_per_token"] else "—")
        # the resident model's own time per token plus the reads, not overlapped: on a CPU both are memory copies
        # through the same DRAM bandwidth, so overlapping them gains little
        serial = (f"{1 / (1 / resident['tokens_per_s'] + r['bytes_per_token'] / (r['read_gb_s'] * 1e9)):.1f}"
                  if r["bytes_per_token"] and resident is not r else "—")
        lines.append(f"| {r['scheme']} ({r['resident_weight_bytes'] / 1e6:.0f} MB of weights) | "
                     f"{r['budget'] or 'none (resident)'} | {r['engine']} | {streamed} | {mb} | {r['tokens_per_s']:.1f} | {bound} | "
                     f"{serial} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {r['overhead_rss'] / 2**20:.0f} | "
                     f"{'—' if r['tokens'] is None else ('yes' if r['tokens'] == resident['tokens'] else 'NO')} |")
    md = "\n".join(lines) + "\n\n" + "\n\n".join(f"```\n{r['plan']}\n```" for r in rows if r["plan"]) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(rows, out.with_suffix(".png"))
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"rows": rows, "date": time.strftime("%Y-%m-%d %H:%M")},
                                                           indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
