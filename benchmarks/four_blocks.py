"""GPTQ W4 g64 symmetric on the first 4 blocks of the default model: lowbit's grids against the number
llm-compressor's GPTQ reached on the same protocol (KLD 0.0293, recorded; llm-compressor is not run here).

    python benchmarks/four_blocks.py [--calib 16] [--windows 10] [--dtype bfloat16]

Protocol: the default model cut to its first 4 blocks (then its final norm and tied head), float32 = the base;
16 calibration windows of 512 tokens (seed 0) and 10 held-out windows of 512; every Linear of the 4 blocks
quantized by GPTQ (damp 0.01, block 128, true-sequential, no act-order) to 4-bit groups of 64, symmetric.
Rows: the step absmax/7 lowbit used before 0.1.0 (codes 1..15), the full-code step absmax/7.5, each with and
without the Hessian-weighted grid fit (weighted_grid).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import calibration_ids, load_text, token_windows
from lowbit.eval import environment, evaluate_quality
from lowbit.formats import IntSpec

LLM_COMPRESSOR_KLD = 0.0293   # recorded: llm-compressor 0.14 GPTQ W4 g64 symmetric, same protocol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", help="activations/unquantized dtype of the quantized model")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    loaded = lowbit.load("default")
    tok = loaded.tokenizer
    base = copy.deepcopy(loaded.model).float().eval()
    base.model.layers = base.model.layers[: args.blocks]
    base.config.num_hidden_layers = args.blocks
    calib = calibration_ids(None, tok, args.calib, 512, 0)
    windows = token_windows(tok, load_text(None, "evaluation"), 512, args.windows)
    dtype = getattr(torch, args.dtype)
    divisor = IntSpec.sym_divisor
    rows = {}
    for grid, div in (("absmax/7 (before 0.1.0)", 7.0), ("absmax/7.5 (full code)", 7.5)):
        for wg in (False, True):
            IntSpec.sym_divisor = property(lambda self, d=div: d if self.bits == 4 else divisor.fget(self))
            try:
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                lowbit.quantize(model, lowbit.Recipe.default(lowbit.GPTQ(bits=4, group_size=64, symmetric=True,
                                                                         weighted_grid=wg)),
                                calibration=calib, dtype=dtype, progress=False)
                secs = time.perf_counter() - t0
            finally:
                IntSpec.sym_divisor = divisor
            q = evaluate_quality({"m": model.eval()}, windows, base=base, progress=False)["m"]
            label = f"GPTQ W4 g64 sym, step {grid}, weighted_grid={wg}"
            rows[label] = {"kld": q["kld"], "ppl": q["ppl"], "top1": q["top1"], "quantize_seconds": secs}
            print(f"{label}: KLD {q['kld']:.4f}, PPL {q['ppl']:.3f}, top-1 {100 * q['top1']:.2f}% ({secs:.0f} s)",
                  flush=True)
    meta = {"blocks": args.blocks, "calib_windows": args.calib, "eval_windows": int(windows.shape[0]),
            "dtype": args.dtype, "llm_compressor_kld_recorded": LLM_COMPRESSOR_KLD, **environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "four_blocks.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2, default=str))
    print(f"\n| GPTQ W4 g64 sym, first {args.blocks} blocks | KLD | vs llm-compressor {LLM_COMPRESSOR_KLD} |")
    print("|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['kld']:.4f} | {r['kld'] / LLM_COMPRESSOR_KLD:.2f}x |")


if __name__ == "__main__":
    main()
