"""Does lowbit measure a GGUF file as llama.cpp does? The same file evaluated by llama.cpp (llama-cpp-python, its
own logits) and by lowbit (the in-memory model that was written), both against lowbit's float32 base on the
same token windows, lowbit both with its float32 reference arithmetic and with llama.cpp's
(`lowbit.eval.ggml_arith.ggml_arithmetic`: activations rounded to each weight type's vec_dot type, f16 KV).

    pip install llama-cpp-python
    python benchmarks/gguf_agreement.py [--windows 8] [--allocator 5.46]

Files: the float model written as F32 and as F16 (llama.cpp's floor: no quantized weight at all), lowbit RTN
files of fixed type mixes (Q4_0 everywhere; Q5_0 with Q4_K where rows allow and a Q8_0 embedding), and with
--allocator the size-budget allocator's RTN + importance file at that target. F32 files are also run with an
F32 KV cache, which isolates what llama.cpp's f16 cache costs.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lowbit
from lowbit.data import calibration_ids, load_text, token_windows
from lowbit.eval import environment
from lowbit.eval.ggml_arith import ggml_arithmetic
from lowbit.export.gguf import gguf_overhead_bytes, write_gguf
from lowbit.models.arch import arch_for
from lowbit.models.importance import collect_importance
from lowbit.models.sources import default_model_path
from lowbit.plan import measure_sensitivity, planned_tensors

MIXES = {
    "rtn Q4_0 (embedding Q4_0)": [{"match": "model.embed_tokens", "gguf_type": "Q4_0"},
                                  {"match": "lm_head", "gguf_type": "Q4_0"},
                                  {"match": "model.layers.*", "gguf_type": "Q4_0"}],
    "rtn Q5_0 + Q4_K down (embedding Q8_0)": [{"match": "model.embed_tokens", "gguf_type": "Q8_0"},
                                              {"match": "lm_head", "gguf_type": "Q8_0"},
                                              {"match": "*.mlp.down_proj", "gguf_type": "Q4_K"},
                                              {"match": "model.layers.*", "gguf_type": "Q5_0"}],
}
GGML_F32 = 0   # ggml_type of an F32 KV cache (llama-cpp-python's type_k / type_v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--allocator", type=float, default=None, help="also the allocator's RTN file at this target")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    import llama_cpp

    src = default_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-gguf-agreement-"))
    loaded = lowbit.load("default")
    base, tok = loaded.model.float().eval(), loaded.tokenizer
    windows = token_windows(tok, load_text(None, "evaluation"), args.ctx, args.windows)

    # (label, file, lowbit model, float type in the file, llama.cpp KV cache type)
    runs = []
    for ft in ("F32", "F16"):
        path = write_gguf(base, tmp / f"base-{ft}.gguf", source=src, float_type=ft)
        runs.append((f"float model as {ft}", path, base, ft, "F16"))
        if ft == "F32":
            runs.append((f"float model as {ft}, F32 KV cache", path, base, ft, "F32"))
    for label, rules in MIXES.items():
        m = lowbit.load("default")
        lowbit.quantize(m, lowbit.Recipe.from_rules(rules, lowbit.RTN()), dtype=torch.float32, progress=False)
        runs.append((label, write_gguf(m, tmp / f"{len(runs)}.gguf", source=src), m.model.eval(), "F16", "F16"))
    if args.allocator:
        calib = calibration_ids(None, tok, args.calib_samples, 512, 0)
        imp = collect_importance(base, calib)
        sens = measure_sensitivity(base, calib[: args.fisher_windows],
                                   formats="Q2_K,Q3_K,Q4_0,Q4_K,Q5_0,Q5_K,Q6_K,Q8_0", importance=imp,
                                   overhead_bytes=gguf_overhead_bytes(base, planned_tensors(base, arch_for(base)), src))
        alloc = sens.allocate(args.allocator)
        m = lowbit.load("default")
        lowbit.quantize(m, lowbit.Recipe.from_rules(alloc.rules(), lowbit.RTN(importance=True)), calibration=calib,
                        imatrix=imp, dtype=torch.float32, progress=False)
        runs.append((f"allocator RTN+importance @{args.allocator:g}", write_gguf(m, tmp / "alloc.gguf", source=src),
                     m.model.eval(), "F16", "F16"))

    keys = [(r[0], rt) for r in runs for rt in ("llama.cpp", "lowbit", "lowbit, llama.cpp arithmetic")]
    sums = {k: {"nll": 0.0, "kld": 0.0, "top1": 0} for k in keys}
    llms = {r[0]: llama_cpp.Llama(model_path=str(r[1]), n_ctx=args.ctx, logits_all=True, n_threads=2,
                                  n_threads_batch=2, n_batch=args.ctx, verbose=False,
                                  **({"type_k": GGML_F32, "type_v": GGML_F32} if r[4] == "F32" else {}))
            for r in runs}
    count, t0 = 0, time.perf_counter()
    for w, ids in enumerate(windows):
        with torch.no_grad():
            base_lp = F.log_softmax(base(ids[None]).logits[0, :-1].float(), -1)
        target = ids[1:]

        def add(key, logits):
            lp, s = F.log_softmax(logits.float(), -1), sums[key]
            s["nll"] -= lp.gather(-1, target[:, None]).sum().item()
            s["kld"] += (base_lp.exp() * (base_lp - lp)).sum().item()
            s["top1"] += (base_lp.argmax(-1) == lp.argmax(-1)).sum().item()

        for label, _, model, ft, kv in runs:
            llm = llms[label]
            llm.reset()
            llm.eval(ids.tolist())
            add((label, "llama.cpp"), torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32)))
            with torch.no_grad():
                add((label, "lowbit"), model(ids[None]).logits[0, :-1])
                with ggml_arithmetic(model, float_type=ft, kv_type=kv):
                    add((label, "lowbit, llama.cpp arithmetic"), model(ids[None]).logits[0, :-1])
        count += len(target)
        print(f"window {w + 1}/{len(windows)} ({time.perf_counter() - t0:.0f} s): KLD so far "
              + "; ".join(f"{k[0]} / {k[1]} {s['kld'] / count:.5f}" for k, s in sums.items()), flush=True)

    rows = [{"file": label, "runtime": rt, "kld": s["kld"] / count, "ppl": math.exp(s["nll"] / count),
             "top1": s["top1"] / count} for (label, rt), s in sums.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"windows": int(windows.shape[0]), "ctx": args.ctx, "eval_tokens": count,
            "llama_cpp_python": llama_cpp.__version__, **environment()}
    (out / "gguf_agreement.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2, default=str))
    by = {(r["file"], r["runtime"]): r for r in rows}
    print(f"\n{count} predicted tokens ({int(windows.shape[0])} windows x {args.ctx})")
    print("| file | KLD llama.cpp | KLD lowbit (float32 arithmetic) | ratio | KLD lowbit (llama.cpp arithmetic) | "
          "ratio | PPL llama.cpp | PPL lowbit (llama.cpp arithmetic) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, *_ in runs:
        a, b, c = (by[(label, rt)] for rt in ("llama.cpp", "lowbit", "lowbit, llama.cpp arithmetic"))
        ratio = lambda x, y: f"{x / y:.3f}" if y > 0 else "—"
        print(f"| {label} | {a['kld']:.5f} | {b['kld']:.5f} | {ratio(a['kld'], b['kld'])} | {c['kld']:.5f} | "
              f"{ratio(a['kld'], c['kld'])} | {a['ppl']:.3f} | {c['ppl']:.3f} |")


if __name__ == "__main__":
    main()
