"""llama.cpp as a peer row: the shipped GGUF requantized to Q8_0, Q4_0 and Q4_K_M through llama-cpp-python,
evaluated on exactly the token windows lowbit uses (the same tokenizer ids, fed to llama.cpp), with KL divergence
and top-1 agreement against lowbit's float32 base computed window by window. A different runtime: its numbers
sit beside lowbit's, not inside them.

    pip install llama-cpp-python          # builds llama.cpp from source (several minutes on 2 cores)
    python benchmarks/llamacpp_peer.py [--types Q8_0,Q4_0,Q4_K_M] [--ctx 512] [--max-windows N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lowbit
from lowbit.data import load_text, token_windows
from lowbit.eval import environment
from lowbit.models.sources import default_model_path

FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def requantize(llama_cpp, src: Path, dst: Path, ftype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}: {rc}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/llamacpp_peer.json")
    args = ap.parse_args()
    import llama_cpp

    loaded = lowbit.load_model("default")
    base, tok = loaded.model, loaded.tokenizer
    n_params = sum(p.numel() for p in base.parameters())  # tied lm_head counted once
    windows = token_windows(tok, load_text(None, "evaluation"), args.ctx, args.max_windows)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-llamacpp-"))
    models = {}
    for t in args.types.split(","):
        path = tmp / f"model-{t}.gguf"
        requantize(llama_cpp, default_model_path(), path, t)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.ctx, logits_all=True, n_threads=2,
                              n_threads_batch=2, n_batch=args.ctx, verbose=False)
        models[t] = (llm, path.stat().st_size)
    sums = {t: {"nll": 0.0, "kld": 0.0, "top1": 0} for t in models}
    count = 0
    for ids in windows:
        with torch.no_grad():
            base_lp = F.log_softmax(base(ids.unsqueeze(0)).logits[0, :-1].float(), -1)
        target = ids[1:]
        for t, (llm, _) in models.items():
            llm.reset()
            llm.eval(ids.tolist())
            lp = F.log_softmax(torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32)), -1)
            s = sums[t]
            s["nll"] -= lp.gather(-1, target.unsqueeze(-1)).sum().item()
            s["kld"] += (base_lp.exp() * (base_lp - lp)).sum().item()
            s["top1"] += (base_lp.argmax(-1) == lp.argmax(-1)).sum().item()
        count += len(target)
    rows = []
    prompt = tok("The history of the Python language")["input_ids"]
    for t, (llm, size) in models.items():
        speeds = []
        for _ in range(3):
            llm.reset()
            llm.eval(prompt)
            t0 = time.perf_counter()
            for _ in range(64):  # greedy decode, one token at a time
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                llm.eval([nxt])
            speeds.append(64 / (time.perf_counter() - t0))
        rows.append({"type": t, "file_bytes": size, "bits_per_weight": 8 * size / n_params,
                     "ppl": math.exp(sums[t]["nll"] / count), "kld": sums[t]["kld"] / count,
                     "top1": sums[t]["top1"] / count, "decode_tokens_per_s": sorted(speeds)[1]})
        print(rows[-1], flush=True)
    meta = {"llama_cpp_python": llama_cpp.__version__, "windows": int(windows.shape[0]), "ctx": args.ctx,
            "eval_tokens": count, **environment()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
    print("| llama.cpp type | bits/weight (file) | PPL | KLD vs lowbit fp32 base | top-1 agree | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['bits_per_weight']:.2f} | {r['ppl']:.3f} | {r['kld']:.4f} | {100 * r['top1']:.2f}% | "
              f"{r['decode_tokens_per_s']:.1f} |")


if __name__ == "__main__":
    main()
