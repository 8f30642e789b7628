"""Below 4 bits: post-training methods against learned rounding and quantization-aware training on the default
model, with torchao's QAT as the peer, all in one run and evaluated the same way by lowbit.

    python benchmarks/low_bits.py [--bits 4,3,2] [--methods rtn,gptq,awq,learned,qat,torchao-qat]
                                  [--qat-steps 150,600] [--qat-init best] [--qat-train scales] [--windows 24]
    pip install torchao==0.18.0   # the peer row; skipped with a note when torchao is absent

Every row is asymmetric groups of 64 (`--group-size`) on every Linear of the decoder blocks; the embedding and
head stay as they are. Each row runs in a child process that reports its wall time and peak resident memory
(ru_maxrss; for the post-training rows also the peak above the resident size just before quantizing, the
method's own memory, sampled by lowbit.eval.memory.PeakRSS), then lowbit evaluates its output against the
float model on the same held-out windows (KLD, perplexity, top-1 agreement). Calibration and training text: the default text's calibration half, the same
windows for every method.

- rtn, gptq, awq, learned: lowbit.quantize with the method's defaults (learned starts from `--learned-init`).
- qat: lowbit.train.qat distilled on the float model's logits, for each of `--qat-steps`, starting from the
  checkpoint of the best row of this run at the same bits (`--qat-init best`; or a method, calibrated on the
  same windows as its row), training the group scales with the codes frozen (`--qat-train scales`, Adam at
  `--qat-lr`) or the latent weights (`--qat-train weights`).
- torchao-qat: torchao's QATConfig (IntxFakeQuantizeConfig, the same bits/groups/asymmetry) on the same
  Linears, trained from the float weights with the same loss, text, steps, batch and learning rate; its
  fake-quantized weights are then written as a float checkpoint, which is exactly what its `convert` step
  would pack (torchao's int-x packed layouts have no CPU kernel for 2/3 bits to evaluate with).

Writes OUT/low_bits.json and OUT/low_bits.png (KLD against wall time of calibration + training) and prints a
markdown table. Rows of an earlier run in OUT are kept unless this run measures the same bits and method, so
the bit widths can be run one at a time (each row records its date, machine and settings).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQLEN = 256   # QAT windows (tokens); post-training calibration uses lowbit's default 512


def config(method: str, bits: int, group: int, learned_init: str):
    import lowbit
    common = {"bits": bits, "group_size": group, "symmetric": False}
    if method == "rtn":
        return lowbit.RTN(**common)
    if method == "gptq":
        return lowbit.GPTQ(**common)
    if method == "awq":
        return lowbit.AWQ(**common)
    return lowbit.Learned(init=learned_init, **common)


def row_worker(method: str, bits: int, args, out: Path) -> dict:
    import torch

    import lowbit
    from lowbit.data import calibration_ids
    from lowbit.eval.memory import PeakRSS
    t0 = time.perf_counter()
    if method in ("rtn", "gptq", "awq", "learned"):
        loaded = lowbit.load("default")
        calibration = calibration_ids(None, loaded.tokenizer, args.calib, 512, 0)
        with PeakRSS() as mem:
            lowbit.quantize(loaded, lowbit.Recipe.default(config(method, bits, args.group_size, args.learned_init)),
                            calibration=calibration, progress=False)
        extra = {"rss_before_bytes": mem.start_bytes, "method_peak_rss_bytes": mem.peak_bytes}
    elif method.startswith("qat@"):
        from lowbit.train import qat
        steps = int(method.split("@")[1])
        loaded = lowbit.load("default")
        init = args.qat_start or args.qat_init    # the best row's own checkpoint, or a method calibrated as above
        calibration = None if args.qat_start else calibration_ids(None, loaded.tokenizer, args.calib, 512, 0)
        loaded = qat(loaded, lowbit.RTN(bits=bits, group_size=args.group_size, symmetric=False), init=init,
                     steps=steps, lr=args.qat_lr, batch=1, seqlen=SEQLEN, windows=args.qat_windows,
                     train=args.qat_train, calibration=calibration,
                     progress=False)
        extra = {"final_loss": loaded.model.lowbit["qat"]["losses"][-1]}
    else:   # torchao-qat@steps
        loaded, extra = torchao_qat(bits, args, int(method.split("@")[1]))
    seconds = time.perf_counter() - t0
    if method.startswith("torchao"):
        loaded.model.save_pretrained(str(out))
        loaded.tokenizer.save_pretrained(str(out))
    else:
        lowbit.save(loaded, out, overwrite=True)
    del torch
    return {"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **extra}


def torchao_qat(bits: int, args, steps: int):
    """torchao's QAT on the decoder's Linears, trained exactly as lowbit.train.qat trains (same windows per step,
    same distillation loss, Adam at the same learning rate, activation checkpointing), from the float weights."""
    import copy

    import torch
    import torchao
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    import lowbit
    from lowbit.data import calibration_ids
    from lowbit.train.qat import distillation_loss
    loaded = lowbit.load("default")
    teacher = loaded.model.float().eval()
    student = copy.deepcopy(teacher)
    dtype = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}[bits]
    wcfg = IntxFakeQuantizeConfig(dtype, group_size=args.group_size, is_symmetric=False)
    in_blocks = {id(m) for m in student.model.layers.modules()}
    quantize_(student, QATConfig(weight_config=wcfg, step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and id(m) in in_blocks)
    for name, p in student.named_parameters():   # as lowbit's QAT: only the blocks' Linear weights train
        p.requires_grad_(".layers." in name and name.endswith("proj.weight"))
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=args.lr)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    data = calibration_ids(None, loaded.tokenizer, args.qat_windows, SEQLEN, 0)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)    # the windows lowbit.train.qat draws at this step (seed 0)
        ids = data[torch.randint(0, data.shape[0], (1,), generator=g)]
        with torch.no_grad():
            target = teacher(ids, use_cache=False).logits
        loss = distillation_loss(student(ids, use_cache=False).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    student.gradient_checkpointing_disable()
    student.eval()
    with torch.no_grad():   # bake the fake quantization into plain float weights (what convert would pack)
        for m in student.modules():
            fq = getattr(m, "weight_fake_quantizer", None)
            if fq is not None:
                m.weight.copy_(fq(m.weight))
    quantize_(student, QATConfig(step="convert"),
              filter_fn=lambda m, fqn: hasattr(m, "weight_fake_quantizer"))
    return lowbit.Loaded(student, loaded.tokenizer, loaded.source), {"final_loss": losses[-1],
                                                                      "torchao": torchao.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="rtn,gptq,awq,learned,qat,torchao-qat")
    ap.add_argument("--calib", type=int, default=64, help="post-training calibration windows of 512 tokens")
    ap.add_argument("--learned-init", default="awq")
    ap.add_argument("--qat-init", default="best",
                    help="best: train from the lowest-KLD row of this run at the same bits; or rtn/gptq/awq/learned")
    ap.add_argument("--qat-train", default="scales", choices=["scales", "weights"])
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--qat-start", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--qat-steps", default="150,600")
    ap.add_argument("--qat-windows", type=int, default=256, help=f"training windows of {SEQLEN} tokens")
    ap.add_argument("--lr", type=float, default=1e-5, help="torchao's QAT learning rate (Adam on the weights)")
    ap.add_argument("--windows", type=int, default=24, help="held-out evaluation windows of 512 tokens")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--row", nargs=3, metavar=("METHOD", "BITS", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        info = row_worker(args.row[0], int(args.row[1]), args, Path(args.row[2]))
        print(json.dumps(info))
        return

    import torch

    import lowbit
    from lowbit.data import load_text, token_windows
    from lowbit.eval import environment, evaluate_quality
    base_loaded = lowbit.load("default")
    base = base_loaded.model.float().eval()
    windows = token_windows(base_loaded.tokenizer, load_text(None, "evaluation"), 512, args.windows)
    methods = []
    for m in args.methods.split(","):
        if m in ("qat", "torchao-qat"):
            methods += [f"{m}@{s}" for s in args.qat_steps.split(",")]
        else:
            methods.append(m)
    try:
        import torchao  # noqa: F401
    except ImportError:
        print("torchao is not installed: its rows are skipped (pip install torchao==0.18.0)")
        methods = [m for m in methods if not m.startswith("torchao")]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    settings = {"group_size": args.group_size, "eval_windows": int(windows.shape[0]), "calib_windows": args.calib,
                "qat_windows": args.qat_windows, "qat_seqlen": SEQLEN, "torchao_lr": args.lr,
                "qat_lr": args.qat_lr, "qat_train": args.qat_train, "qat_init": args.qat_init,
                "learned_init": args.learned_init}
    earlier = load_rows(out / "low_bits.json")
    passthrough = ["--group-size", str(args.group_size), "--calib", str(args.calib), "--learned-init",
                   args.learned_init, "--qat-windows", str(args.qat_windows), "--lr", str(args.lr),
                   "--qat-train", args.qat_train, "--qat-lr", str(args.qat_lr)]
    with tempfile.TemporaryDirectory(prefix="lowbit-low-bits-") as tmp:
        for bits in map(int, args.bits.split(",")):
            for method in methods:
                d = Path(tmp) / f"{method}-{bits}"
                extra, row = [], {"method": method, "bits": bits}
                if method.startswith("qat@"):
                    init = args.qat_init
                    if init == "best":
                        done = [r for r in rows if r["bits"] == bits and "kld" in r and "@" not in r["method"]]
                        init = min(done, key=lambda r: r["kld"])["method"] if done else "rtn"
                    if init not in ("rtn", "gptq", "awq", "learned"):
                        raise SystemExit(f"--qat-init: {init!r} is not a method")
                    start = Path(tmp) / f"{init}-{bits}"
                    extra = ["--qat-start", str(start)] if start.exists() else ["--qat-init", init]
                    row["qat_start"] = init
                r = subprocess.run([sys.executable, __file__, *passthrough, *extra, "--row", method, str(bits), str(d)],
                                   capture_output=True, text=True)
                row["load_average_1min"] = os.getloadavg()[0]
                row["date"] = time.strftime("%Y-%m-%d")
                row["settings"] = settings
                if r.returncode != 0:
                    row["error"] = (r.stderr.strip().splitlines() or ["failed"])[-1]
                else:
                    row.update(json.loads(r.stdout.strip().splitlines()[-1]))
                    model = lowbit.load(d).model.float().eval()
                    with torch.no_grad():
                        q = evaluate_quality({"m": model}, windows, base=base, progress=False)["m"]
                    row.update(kld=q["kld"], ppl=q["ppl"], top1=q["top1"])
                row["machine"] = environment()
                rows.append(row)
                print(json.dumps(row), flush=True)
                merged = merge_rows(earlier, rows)
                (out / "low_bits.json").write_text(json.dumps({"rows": merged}, indent=2, default=str))
    rows = merge_rows(earlier, rows)
    with torch.no_grad():
        base_ppl = evaluate_quality({"b": base}, windows, base=None, progress=False)["b"]["ppl"]
    plot(out / "low_bits.png", rows)
    print(f"\nbase perplexity {base_ppl:.3f}; {environment()}\n")
    print("| bits | method | KLD | PPL | top-1 | wall s | peak RSS GiB | method's own GiB | load | date |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['bits']} | {r['method']} | failed: {r['error'][:100]} | | | | | | | {r.get('date', '')} |")
            continue
        own = (f"{(r['method_peak_rss_bytes'] - r['rss_before_bytes']) / 2**30:.2f}"
               if "method_peak_rss_bytes" in r else "")
        print(f"| {r['bits']} | {r['method']} | {r['kld']:.4f} | {r['ppl']:.2f} | {100 * r['top1']:.2f}% | "
              f"{r['seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | {own} | {r['load_average_1min']:.1f} | "
              f"{r.get('date', '')} |")


def load_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's results (older files kept one run's settings in "meta")."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    return [{**r, "machine": r.get("machine", {k: meta[k] for k in ("cpu", "cores", "torch") if k in meta}),
             "settings": r.get("settings", {k: v for k, v in meta.items() if k not in ("cpu", "cores", "torch")})}
            for r in data.get("rows", [])]


def merge_rows(earlier: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows, each replaced by this run's row of the same bits and method; sorted by bits (high first)
    in the order methods were run. Each row keeps its own date, machine and settings."""
    ran = {(r["bits"], r["method"]) for r in new}
    rows = [r for r in earlier if (r["bits"], r["method"]) not in ran] + new
    return sorted(rows, key=lambda r: -r["bits"])


def plot(path: Path, rows: list[dict]) -> None:
    """KLD against wall time: one color per method, one marker per bit width; a method's QAT rows at several
    step counts are joined by a line."""
    from lowbit.io.atomic import save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    ok = [r for r in rows if "kld" in r]
    kinds = ["rtn", "gptq", "awq", "learned", "qat", "torchao-qat"]
    kinds += sorted({r["method"].split("@")[0] for r in ok} - set(kinds))
    color = {k: f"C{i}" for i, k in enumerate(kinds)}
    marker = {4: "o", 3: "s", 2: "^"}
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for bits in sorted({r["bits"] for r in ok}, reverse=True):
        for kind in kinds:
            pts = sorted((r["seconds"], r["kld"]) for r in ok if r["bits"] == bits and r["method"].split("@")[0] == kind)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker.get(bits, "D"), color=color[kind],
                        linestyle="-" if len(pts) > 1 else "none", markersize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time of calibration + training (s, 2 cores)")
    ax.set_ylabel("KL divergence vs float model")
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=color[k], marker="o", linestyle="none", label=k) for k in kinds
               if any(r["method"].split("@")[0] == k for r in ok)]
    handles += [Line2D([], [], color="gray", marker=m, linestyle="none", label=f"W{b} g64")
                for b, m in marker.items() if any(r["bits"] == b for r in ok)]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
