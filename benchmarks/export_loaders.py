"""lowbit's exports of the default model, loaded by the serving engines' own loaders on CPU and evaluated there.

For each export format, the default model is quantized by lowbit (with the reference kernel and float32 for
everything left unquantized, so that lowbit's own logits are float32 arithmetic on exactly the stored weights),
exported, loaded back by

    compressed-tensors  transformers + compressed-tensors (this environment), CompressedTensorsConfig(run_compressed=False):
                        the CPU path decompresses every weight to float32 and runs dense; W8A8's and FP8's
                        activation quantization is not emulated there (lowbit's row quantizes activations)
    gptq, awq           transformers + optimum + GPTQModel 7.6 in their own environment
                        (`python benchmarks/export_peers.py --setup-gptq`): GPTQModel's CPU kernel

and evaluated on the same held-out windows against the float base: perplexity, KL divergence and top-1 through
the foreign loader, beside lowbit's own numbers for the same weights, and the largest |Δlogit| between the two.

    python benchmarks/export_loaders.py [--windows 4] [--gptq-venv DIR] [--gptq-checkpoint DIR]

--gptq-checkpoint: a lowbit GPTQ checkpoint to export as well (e.g. export_peers.py's lowbit-gptq, calibrated on
16 windows); the other rows use round-to-nearest (SmoothQuant calibrates on 16 windows), which is enough to check
a loader: the layout does not depend on how the values were chosen. Writes benchmarks/results/export_loaders.json
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.data import load_text, token_windows
from lowbit.eval import environment
from lowbit.export import export

SEQLEN = 512
GPTQ_VENV = Path(os.environ.get("LOWBIT_GPTQ_VENV", "/tmp/gptq-venv"))

# format, label, lowbit configuration (kernel="reference": float32 arithmetic on the stored weights)
ROWS = [
    ("compressed-tensors", "RTN int4 g64 asym (pack-quantized)",
     lambda: lowbit.RTN(bits=4, group_size=64, symmetric=False, kernel="reference")),
    ("compressed-tensors", "RTN int8 per-channel sym (pack-quantized)",
     lambda: lowbit.RTN(bits=8, group_size=-1, symmetric=True, kernel="reference")),
    ("compressed-tensors", "SmoothQuant W8A8, per-token activations (int-quantized)",
     lambda: lowbit.SmoothQuant(alpha=0.8, kernel="reference")),
    ("compressed-tensors", "FP8 e4m3 weights (float-quantized)", lambda: lowbit.FP8(kernel="reference")),
    ("compressed-tensors", "FP8 e4m3 weights, dynamic per-token FP8 activations (float-quantized)",
     lambda: lowbit.FP8(act="fp8", kernel="reference")),
    ("gptq", "RTN int4 g64 sym (GPTQ v1)", lambda: lowbit.RTN(bits=4, group_size=64, symmetric=True, kernel="reference")),
    ("awq", "RTN int4 g64 asym (AWQ GEMM)",
     lambda: lowbit.RTN(bits=4, group_size=64, symmetric=False, kernel="reference")),
]

# runs in the GPTQModel environment: logits of every window through transformers' own GPTQ/AWQ loading
_GPTQ_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
d, ids, out = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, device_map="cpu")
kinds = sorted({type(x).__name__ for x in m.modules() if hasattr(x, "qweight")})
with torch.no_grad():
    logits = torch.cat([m(w[None]).logits.float() for w in torch.load(ids)])
torch.save({"logits": logits, "modules": kinds}, out)
"""


def ct_logits(path: Path, windows: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        return torch.cat([m(w[None]).logits.float() for w in windows])


def gptq_logits(path: Path, windows: torch.Tensor, venv: Path) -> tuple[torch.Tensor, list]:
    python = venv / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"no GPTQModel environment at {venv}: python benchmarks/export_peers.py --setup-gptq")
    ids, out = path / "ids.pt", path / "foreign_logits.pt"
    torch.save(windows, ids)
    r = subprocess.run([str(python), "-c", _GPTQ_CHILD, str(path), str(ids), str(out)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError((r.stderr.strip().splitlines() or ["failed"])[-1])
    got = torch.load(out)
    return got["logits"], got["modules"]


def quality(logits: torch.Tensor, base_lp: torch.Tensor, windows: torch.Tensor) -> dict:
    lp = F.log_softmax(logits[:, :-1], -1)
    target = windows[:, 1:]
    n = target.numel()
    return {"ppl": math.exp(-lp.gather(-1, target[..., None]).sum().item() / n),
            "kld": (base_lp.exp() * (base_lp - lp)).sum().item() / n,
            "top1": (base_lp.argmax(-1) == lp.argmax(-1)).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (SmoothQuant)")
    ap.add_argument("--gptq-venv", type=Path, default=GPTQ_VENV)
    ap.add_argument("--gptq-checkpoint", type=Path, help="a lowbit GPTQ checkpoint to export too")
    ap.add_argument("--out", default="benchmarks/results/export_loaders.json")
    args = ap.parse_args()

    base = lowbit.load_model("default")
    windows = token_windows(base.tokenizer, load_text(None, "evaluation"), SEQLEN, args.windows)
    with torch.no_grad():
        base_lp = torch.cat([F.log_softmax(base.model(w[None]).logits[:, :-1].float(), -1) for w in windows])
    from lowbit.data import calibration_ids
    calib = calibration_ids(None, base.tokenizer, args.calib, SEQLEN, 0)
    jobs = [(fmt, label, make) for fmt, label, make in ROWS]
    if args.gptq_checkpoint:
        for fmt in ("compressed-tensors", "gptq"):
            jobs.append((fmt, f"GPTQ int4 g64 sym from {args.gptq_checkpoint.name}", args.gptq_checkpoint))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (fmt, label, make) in enumerate(jobs):
            t0 = time.perf_counter()
            if isinstance(make, Path):
                q = lowbit.load(make)
            else:
                q = lowbit.load_model("default")
                # float32 for what stays unquantized and for activations: the loaders below compute in float32
                lowbit.quantize(q, lowbit.Recipe.default(make()), calibration=calib, dtype=torch.float32,
                                progress=False)
            with torch.no_grad():
                mine = torch.cat([q.model(w[None]).logits.float() for w in windows])
            path = Path(tmp) / f"{k}-{fmt}"
            export(q, fmt, path)
            row = {"format": fmt, "lowbit": label, "lowbit_quality": quality(mine, base_lp, windows)}
            try:
                if fmt == "compressed-tensors":
                    theirs, kinds = ct_logits(path, windows), ["dense (decompressed)"]
                    row["loader"] = "transformers + compressed-tensors, run_compressed=False, float32, CPU"
                else:
                    theirs, kinds = gptq_logits(path, windows, args.gptq_venv)
                    row["loader"] = "transformers + optimum + GPTQModel 7.6, CPU"
                row.update(modules=kinds, foreign_quality=quality(theirs, base_lp, windows),
                           max_abs_dlogit=(theirs - mine).abs().max().item(), logit_absmax=mine.abs().max().item())
            except (RuntimeError, FileNotFoundError, OSError) as e:
                row["error"] = str(e)[:300]
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"environment": environment(), "windows": args.windows, "seqlen": SEQLEN, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nmachine: {result['environment']}\n{args.windows} held-out windows x {SEQLEN} tokens\n")
    print("| format | lowbit quantized | loader (CPU) | KLD lowbit | KLD loader | PPL lowbit | PPL loader | "
          "max abs Δlogit (max abs logit) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["lowbit_quality"]
        if "error" in r:
            print(f"| {r['format']} | {r['lowbit']} | failed: {r['error'][:80]} | {a['kld']:.4f} | | {a['ppl']:.3f} | | |")
            continue
        b = r["foreign_quality"]
        print(f"| {r['format']} | {r['lowbit']} | {r['loader']} | {a['kld']:.4f} | {b['kld']:.4f} | {a['ppl']:.3f} | "
              f"{b['ppl']:.3f} | {r['max_abs_dlogit']:.4f} ({r['logit_absmax']:.1f}) |")


if __name__ == "__main__":
    main()
