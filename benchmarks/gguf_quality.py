"""Quality per byte on the default model: KL divergence against the float model vs the GGUF file's total bits
per parameter, for llama.cpp's own types (made by `llama_model_quantize`) and for lowbit's size-budget
allocator (`--target-bpw`) with RTN + importance, GPTQ and AWQ, written as GGUF files. Every file, llama.cpp's
and lowbit's, is evaluated by llama.cpp itself on the same token windows; lowbit's files are also evaluated
by lowbit (same weights, another runtime): with lowbit's float32 arithmetic, and with llama.cpp's
(lowbit.eval.ggml_arith: activations rounded to each weight type's vec_dot type, f16 KV cache), which is what
must agree with llama.cpp's own measurement. The allocator's predicted KLD is recorded beside the measured one.

    pip install llama-cpp-python      # builds llama.cpp from source (several minutes on 2 cores)
    python benchmarks/gguf_quality.py [--targets 4.5,5.46,6.27] [--methods rtn,gptq,awq] [--windows 24]

Writes OUT/gguf_quality.json and OUT/gguf_quality.png (KLD vs bits/weight) and prints a markdown table.
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
from lowbit.data import calibration_ids, load_text, token_windows
from lowbit.eval import environment, peak_rss_bytes
from lowbit.eval.ggml_arith import ggml_arithmetic
from lowbit.export.gguf import gguf_overhead_bytes, write_gguf
from lowbit.io.atomic import save_figure
from lowbit.models.importance import collect_importance
from lowbit.models.sources import default_model_path
from lowbit.plan import measure_sensitivity, planned_tensors
from lowbit.models.arch import arch_for

LLAMA_FTYPES = {"Q2_K": 10, "Q3_K_M": 12, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7}
METHODS = {"rtn": lambda: lowbit.RTN(importance=True), "gptq": lambda: lowbit.GPTQ(), "awq": lambda: lowbit.AWQ()}


def llama_quantize(llama_cpp, src: Path, dst: Path, ftype: str) -> float:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 2
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="4.0,4.5,5.46,6.27,7.0")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--method-targets", default="gptq:5.46,6.27;awq:5.46,6.27",
                    help="targets per method where fewer than --targets are wanted (method:t1,t2;...)")
    ap.add_argument("--llama-types", default="Q2_K,Q3_K_M,Q4_0,Q4_K_M,Q5_K_M,Q6_K,Q8_0")
    ap.add_argument("--formats", default="Q2_K,Q3_K,Q4_0,Q4_K,Q5_0,Q5_K,Q6_K,Q8_0",
                    help="the allocator's candidates. The default model's weights sit exactly on a Q4_1 grid (it "
                         "ships as Q4_1), so Q4_1 (and Q5_1, which can hold that grid) would reproduce them without "
                         "error and say nothing about quality per byte: they are left out unless named")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--fisher-windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=lowbit.data.CALIB_SAMPLES)
    ap.add_argument("--lowbit-eval", action="store_true", default=True)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    import llama_cpp

    src = default_model_path()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-gguf-quality-"))
    base_loaded = lowbit.load("default")
    base, tok = base_loaded.model.float().eval(), base_loaded.tokenizer
    n_params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    windows = token_windows(tok, load_text(None, "evaluation"), args.ctx, args.windows)

    files: dict[str, dict] = {}
    for t in args.llama_types.split(","):
        path = tmp / f"llama-{t}.gguf"
        secs = llama_quantize(llama_cpp, src, path, t)
        files[f"llama.cpp {t}"] = {"path": path, "kind": "llama.cpp", "type": t, "quantize_seconds": secs}
        print(f"llama.cpp {t}: {path.stat().st_size} bytes", flush=True)

    # lowbit: one sensitivity measurement, then one allocation per target and method
    t0 = time.perf_counter()
    calib = calibration_ids(None, tok, args.calib_samples, 512, 0)
    imp = collect_importance(base, calib)
    imp_seconds = time.perf_counter() - t0
    sens = measure_sensitivity(base, calib[: args.fisher_windows], formats=args.formats,
                               overhead_bytes=gguf_overhead_bytes(base, planned_tensors(base, arch_for(base)), src),
                               importance=imp)
    print(f"sensitivity: {sens.seconds:.0f} s, importance: {imp_seconds:.0f} s, peak RSS "
          f"{peak_rss_bytes() / 2**30:.2f} GiB", flush=True)
    per_method = {m: args.targets for m in args.methods.split(",")}
    for part in filter(None, args.method_targets.split(";")):
        m, ts = part.split(":")
        if m in per_method:
            per_method[m] = ts
    lowbit_models = {}
    for method, ts in per_method.items():
        for target in map(float, ts.split(",")):
            try:
                alloc = sens.allocate(target)
            except lowbit.LowbitError as e:   # below the smallest size this model's shapes allow: say so, go on
                print(f"lowbit {method} @{target:g}: {e}", flush=True)
                continue
            loaded = lowbit.load("default")
            recipe = lowbit.Recipe.from_rules(alloc.rules(), METHODS[method]())
            t1 = time.perf_counter()
            # float32: the norms go into the file as they are, and lowbit's runtime computes as llama.cpp does
            lowbit.quantize(loaded, recipe, calibration=calib, imatrix=imp, dtype=torch.float32, progress=False)
            secs = time.perf_counter() - t1
            label = f"lowbit {method} @{target:g}"
            path = tmp / f"lowbit-{method}-{target:g}.gguf"
            write_gguf(loaded, path, source=src)
            files[label] = {"path": path, "kind": f"lowbit {method}", "target_bpw": target,
                            "predicted_kld": alloc.predicted_kld, "quantize_seconds": secs,
                            "plan": [list(r) for r in alloc.summary()]}
            lowbit_models[label] = loaded.model.eval()
            print(f"{label}: {path.stat().st_size} bytes ({8 * path.stat().st_size / n_params:.3f} bpw), "
                  f"quantized in {secs:.0f} s, predicted KLD {alloc.predicted_kld:.4f}", flush=True)

    llms = {k: llama_cpp.Llama(model_path=str(v["path"]), n_ctx=args.ctx, logits_all=True, n_threads=2,
                               n_threads_batch=2, n_batch=args.ctx, verbose=False) for k, v in files.items()}
    runtimes = (" (lowbit runtime)", " (lowbit runtime, llama.cpp arithmetic)")
    sums = {k: {"nll": 0.0, "kld": 0.0, "top1": 0} for k in list(files) + [k + r for k in lowbit_models
                                                                          for r in runtimes]}
    count = 0
    t2 = time.perf_counter()
    for w, ids in enumerate(windows):
        with torch.no_grad():
            base_lp = F.log_softmax(base(ids[None]).logits[0, :-1].float(), -1)
        target = ids[1:]

        def add(key, lp):
            s = sums[key]
            s["nll"] -= lp.gather(-1, target[:, None]).sum().item()
            s["kld"] += (base_lp.exp() * (base_lp - lp)).sum().item()
            s["top1"] += (base_lp.argmax(-1) == lp.argmax(-1)).sum().item()

        for k, llm in llms.items():
            llm.reset()
            llm.eval(ids.tolist())
            add(k, F.log_softmax(torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32)), -1))
        for k, m in lowbit_models.items():
            with torch.no_grad():
                add(k + runtimes[0], F.log_softmax(m(ids[None]).logits[0, :-1].float(), -1))
                with ggml_arithmetic(m):
                    add(k + runtimes[1], F.log_softmax(m(ids[None]).logits[0, :-1].float(), -1))
        count += len(target)
        print(f"window {w + 1}/{len(windows)} ({time.perf_counter() - t2:.0f} s)", flush=True)

    rows = []
    for k, s in sums.items():
        f = files.get(k) or files[k.split(" (lowbit runtime")[0]]
        size = f["path"].stat().st_size
        runtime = ("llama.cpp" if k in files else "lowbit" if k.endswith(runtimes[0])
                   else "lowbit, llama.cpp arithmetic")
        rows.append({"name": k, "runtime": runtime,
                     "kind": f["kind"], "file_bytes": size, "bits_per_weight": 8 * size / n_params,
                     "ppl": math.exp(s["nll"] / count), "kld": s["kld"] / count, "top1": s["top1"] / count,
                     **{x: f[x] for x in ("target_bpw", "predicted_kld", "quantize_seconds", "plan", "type")
                        if x in f}})
    meta = {"llama_cpp_python": llama_cpp.__version__, "windows": int(windows.shape[0]), "ctx": args.ctx,
            "eval_tokens": count, "calib_samples": args.calib_samples, "fisher_windows": args.fisher_windows,
            "sensitivity_seconds": sens.seconds, "importance_seconds": imp_seconds,
            "peak_rss_bytes": peak_rss_bytes(), **environment()}
    (out / "gguf_quality.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2, default=str))
    plot(out / "gguf_quality.png", [r for r in rows if r["runtime"] == "llama.cpp"], meta)
    print("| file | runtime | bits/weight (file) | KLD | PPL | top-1 | predicted KLD | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["kind"], r["bits_per_weight"])):
        pred = f"{r['predicted_kld']:.4f}" if "predicted_kld" in r else ""
        qs = f"{r['quantize_seconds']:.0f}" if "quantize_seconds" in r else ""
        print(f"| {r['name']} | {r['runtime']} | {r['bits_per_weight']:.3f} | {r['kld']:.4f} | {r['ppl']:.3f} | "
              f"{100 * r['top1']:.2f}% | {pred} | {qs} |")


def plot(path: Path, rows: list[dict], meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: (k != "llama.cpp", k))
    for kind in kinds:
        pts = sorted((r["bits_per_weight"], r["kld"], r.get("type", "")) for r in rows if r["kind"] == kind)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "s--" if kind == "llama.cpp" else "o-", label=kind)
        if kind == "llama.cpp":
            for x, y, t in pts:
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (whole GGUF file)")
    ax.set_ylabel("KL divergence vs float model (nats/token)")
    ax.set_title(f"SmolLM2-135M, {meta['eval_tokens']} held-out tokens, all measured by llama.cpp")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
