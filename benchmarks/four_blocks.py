"""GPTQ W4 g64 symmetric on the first 4 blocks of the default model, lowbit against llm-compressor in the same run.

    python benchmarks/four_blocks.py [--calib 16] [--windows 10] [--peer-venv /tmp/lc-venv]

Protocol: the default model cut to its first 4 blocks (then its final norm and tied head), float32 = the base;
16 calibration windows of 512 tokens (seed 0) and 10 held-out windows of 512; every Linear of the 4 blocks
quantized by GPTQ (damp 0.01, block 128) to 4-bit groups of 64, symmetric, everything else float32. lowbit's
rows vary the two choices that matter here: column order (act_order, static groups) and the Hessian-weighted
grid fit. llm-compressor (its venv, see benchmarks/export_peers.py --setup) runs `oneshot` with GPTQModifier
on the same windows, in its defaults (which order columns by activation, "static"); its output directory is
evaluated by lowbit's loader of compressed-tensors checkpoints against the same base.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import calibration_ids, load_text, token_windows
from lowbit.eval import environment, evaluate_quality

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--peer-venv", type=Path, default=Path("/tmp/lc-venv"))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    loaded = lowbit.load("default")
    tok = loaded.tokenizer
    base = copy.deepcopy(loaded.model).float().eval()
    base.model.layers = base.model.layers[: args.blocks]
    base.config.num_hidden_layers = args.blocks
    calib = calibration_ids(None, tok, args.calib, 512, 0)
    windows = token_windows(tok, load_text(None, "evaluation"), 512, args.windows)
    rows = {}

    def add(label: str, model, secs: float) -> None:
        q = evaluate_quality({"m": model.eval()}, windows, base=base, progress=False)["m"]
        rows[label] = {"kld": q["kld"], "top1": q["top1"], "quantize_seconds": secs}
        print(f"{label}: KLD {q['kld']:.4f}, top-1 {100 * q['top1']:.2f}% ({secs:.0f} s)", flush=True)

    for act_order in (False, True):
        for wg in (False, True):
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            cfg = lowbit.GPTQ(bits=4, group_size=64, symmetric=True, act_order=act_order, weighted_grid=wg)
            lowbit.quantize(model, lowbit.Recipe.default(cfg), calibration=calib, dtype=torch.float32,
                            progress=False)
            add(f"lowbit GPTQ, act_order={act_order}, weighted_grid={wg}", model, time.perf_counter() - t0)

    peer_python = args.peer_venv / "bin" / "python"
    if peer_python.is_file():
        with tempfile.TemporaryDirectory(prefix="lowbit-four-blocks-") as tmp:
            tmp = Path(tmp)
            base.save_pretrained(tmp / "base")
            tok.save_pretrained(tmp / "base")
            torch.save({"calib": calib, "window": windows[0]}, tmp / "ids.pt")
            r = subprocess.run([str(peer_python), str(HERE / "export_peers.py"), "--peer-worker", "gptq",
                                str(tmp / "base"), str(tmp / "ids.pt"), str(tmp / "peer")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                info = json.loads(r.stdout.strip().splitlines()[-1])
                peer = lowbit.load(tmp / "peer").model.float()
                add(f"llm-compressor {info['llmcompressor']} GPTQ (its defaults)", peer, info["seconds"])
            else:
                print("llm-compressor failed:", (r.stderr.strip().splitlines() or ["?"])[-1])
    else:
        print(f"no llm-compressor venv at {args.peer_venv}: its row is skipped")

    meta = {"blocks": args.blocks, "calib_windows": args.calib, "eval_windows": int(windows.shape[0]),
            **environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "four_blocks.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2, default=str))
    print(f"\n| GPTQ W4 g64 sym, first {args.blocks} blocks | KLD | top-1 | quantize s |")
    print("|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['kld']:.4f} | {100 * r['top1']:.2f}% | {r['quantize_seconds']:.0f} |")


if __name__ == "__main__":
    main()
