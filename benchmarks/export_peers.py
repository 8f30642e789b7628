"""llm-compressor as a peer: its `oneshot` GPTQ W4A16, AWQ W4A16 (4-bit groups of 64) and SmoothQuant W8A8 on the default model, with
lowbit's calibration windows (the same token ids), evaluated by lowbit against the float base on held-out windows
next to lowbit's own GPTQ/AWQ/SmoothQuant rows; each output also runs in llm-compressor's environment through
transformers + compressed-tensors, and its logits on one window are compared with lowbit's loading of it.

llm-compressor 0.14 pins transformers <= 5.17, so it runs in its own virtual environment (torch 2.13.0 as here):

    python benchmarks/export_peers.py --setup [--venv /tmp/lc-venv]     # pip installs llmcompressor there
    python benchmarks/export_peers.py --setup-gptq    # GPTQModel 7.6 venv for the slow GPTQ/AWQ loader tests
    python benchmarks/export_peers.py [--calib 16] [--windows 10] [--methods gptq,awq,smoothquant]

Each quantization runs in a child process (the peer's in its venv, lowbit's in this one) that reports its wall
time and peak resident memory (ru_maxrss), so both are measured the same way. Writes
benchmarks/results/export_peers.json and prints a markdown table. The peer directories stay under --work for
tests/test_export.py's reverse-load test (LOWBIT_PEER_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(os.environ.get("LOWBIT_PEER_VENV", "/tmp/lc-venv"))
WORK = Path(os.environ.get("LOWBIT_PEER_WORK", "/tmp/lowbit-peers"))
SEQLEN = 512
GROUP = 64
METHODS = ("gptq", "awq", "smoothquant")


GPTQ_VENV = Path(os.environ.get("LOWBIT_GPTQ_VENV", "/tmp/gptq-venv"))
# transformers' own GPTQ/AWQ loading on CPU: GPTQModel 7.6 is the newest that sits beside torch 2.13.0 (7.7 needs
# torch >= 2.14.1); it is built from source and would replace the main environment's numpy, hence its own venv
GPTQ_PACKAGES = ["torch==2.13.0", "transformers==5.24.0", "gptqmodel==7.6.0", "optimum", "accelerate"]


def setup(venv: Path, packages=("torch==2.13.0", "llmcompressor==0.14.0.1")) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", *packages], check=True)


# the peer's side: runs in llm-compressor's venv, imports nothing from lowbit ----------------------------------
def peer_recipe(method: str):
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    def w4(symmetric):   # W4A16 with groups of 64: the default model's width 576 is no multiple of 128
        return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                                                               "strategy": "group", "group_size": GROUP}}}
    if method == "gptq":
        return [GPTQModifier(config_groups=w4(True), ignore=["lm_head"])]
    if method == "awq":
        return [AWQModifier(config_groups=w4(False), ignore=["lm_head"])]
    return [SmoothQuantModifier(smoothing_strength=0.8),
            QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]


def peer_worker(method: str, model_dir: str, ids_file: str, out: str) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig
    if method == "awq" and not torch.cuda.is_available():
        # llm-compressor's AWQ pins its cached activations with Tensor.pin_memory(), which needs an accelerator
        # on torch 2.13: on a CPU-only machine it raises, so pinning is made a no-op for this process
        torch.Tensor.pin_memory = lambda self, *a, **k: self
    data = torch.load(ids_file)
    calib, window = data["calib"], data["window"]
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=peer_recipe(method), num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], pad_to_max_length=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    del model
    # the peer's own loader on one held-out window
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        logits = hf(window.unsqueeze(0)).logits[0].float()
    torch.save(logits, Path(out) / "peer_logits.pt")
    import llmcompressor
    import transformers
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "llmcompressor": llmcompressor.__version__,
                      "transformers": transformers.__version__}))


# lowbit's side ---------------------------------------------------------------------------------------------
def lowbit_config(method: str):
    import lowbit
    if method == "gptq":
        return lowbit.GPTQ(bits=4, group_size=GROUP, symmetric=True)
    if method == "awq":
        return lowbit.AWQ(bits=4, group_size=GROUP, symmetric=False)
    return lowbit.SmoothQuant(alpha=0.8)


def lowbit_worker(method: str, model_dir: str, ids_file: str, out: str) -> None:
    import torch

    import lowbit
    loaded = lowbit.load_model(model_dir)
    calib = torch.load(ids_file)["calib"]
    t0 = time.perf_counter()
    lowbit.quantize(loaded.model, lowbit.Recipe.default(lowbit_config(method)), calibration=calib,
                    tokenizer=loaded.tokenizer, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lowbit.save(loaded, out, overwrite=True)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))


def run_child(python: str, role: str, method: str, model_dir: Path, ids_file: Path, out: Path) -> dict:
    env = dict(os.environ)
    if role == "lowbit":
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [python, __file__, f"--{role}-worker", method, str(model_dir), str(ids_file), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup", action="store_true", help="create the peer venv (pip install llmcompressor)")
    ap.add_argument("--setup-gptq", action="store_true",
                    help=f"create {GPTQ_VENV} (LOWBIT_GPTQ_VENV) with GPTQModel for tests/test_export.py's slow checks")
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=10, help="held-out evaluation windows of 512 tokens")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tools", default="llm-compressor,lowbit",
                    help="which tools to run; rows already in --out that are not rerun are kept")
    ap.add_argument("--out", default="benchmarks/results/export_peers.json")
    ap.add_argument("--peer-worker", nargs=4, metavar=("METHOD", "MODEL", "IDS", "OUT"))
    ap.add_argument("--lowbit-worker", nargs=4, metavar=("METHOD", "MODEL", "IDS", "OUT"))
    args = ap.parse_args()
    if args.peer_worker:
        return peer_worker(*args.peer_worker)
    if args.lowbit_worker:
        return lowbit_worker(*args.lowbit_worker)
    if args.setup:
        return setup(args.venv)
    if args.setup_gptq:
        return setup(GPTQ_VENV, GPTQ_PACKAGES)
    peer_python = args.venv / "bin" / "python"
    if not peer_python.is_file():
        sys.exit(f"no peer venv at {args.venv}: run with --setup first")

    import torch

    import lowbit
    from lowbit.data import calibration_ids, load_text, token_windows
    from lowbit.eval import environment, evaluate

    args.work.mkdir(parents=True, exist_ok=True)
    base = lowbit.load_model("default")
    model_dir = args.work / "base-hf"
    if not (model_dir / "config.json").is_file():   # the default GGUF as a float32 Hugging Face directory
        base.model.save_pretrained(str(model_dir))
        base.tokenizer.save_pretrained(str(model_dir))
    windows = token_windows(base.tokenizer, load_text(None, "evaluation"), SEQLEN, args.windows)
    ids_file = args.work / "ids.pt"
    torch.save({"calib": calibration_ids(None, base.tokenizer, args.calib, SEQLEN, 0), "window": windows[0]}, ids_file)

    tools = args.tools.split(",")
    kept = json.loads(Path(args.out).read_text())["rows"] if Path(args.out).is_file() else []
    rerun = {(t, m) for t in tools for m in args.methods.split(",")}
    rows = [r for r in kept if (r["tool"], r["method"]) not in rerun]

    def record(**extra) -> None:
        order = [(t, m) for m in METHODS for t in ("llm-compressor", "lowbit")]
        rows.sort(key=lambda r: order.index((r["tool"], r["method"])) if (r["tool"], r["method"]) in order else 99)
        Path(args.out).write_text(json.dumps({"environment": environment(), "calibration_windows": args.calib,
                                              "eval_windows": args.windows, "seqlen": SEQLEN, **extra,
                                              "rows": rows}, indent=2, default=str))

    for method in args.methods.split(","):
        for tool in [t for t in ("llm-compressor", "lowbit") if t in tools]:
            out = args.work / f"{tool}-{method}"
            role, python = ("peer", str(peer_python)) if tool == "llm-compressor" else ("lowbit", sys.executable)
            info = run_child(python, role, method, model_dir, ids_file, out)
            row = {"tool": tool, "method": method, **info}
            if "error" not in info:
                q = lowbit.load(out)
                ev = evaluate(q, base=base.model, max_windows=args.windows, speed=False, progress=False)
                row.update(ppl=ev["ppl"], kld=ev["kld"], top1=ev["top1"], bits_per_weight=ev.get("bits_per_weight"))
                if tool == "llm-compressor":
                    with torch.no_grad():
                        mine = q.model(windows[:1]).logits[0].float()
                    theirs = torch.load(out / "peer_logits.pt")
                    row["max_abs_dlogit_vs_peer_loader"] = (mine - theirs).abs().max().item()
                    row["peer_logit_absmax"] = theirs.abs().max().item()
            row["load_average_1min"] = os.getloadavg()[0]   # a loaded machine makes the seconds meaningless
            rows[:] = [r for r in rows if (r["tool"], r["method"]) != (tool, method)] + [row]
            print(json.dumps(row), flush=True)
            record(partial="run in progress")   # each row is kept at once: a run takes tens of minutes
    with torch.no_grad():
        ppl_base = evaluate(base, base=None, max_windows=args.windows, speed=False, progress=False)["ppl"]
    record(base_ppl=ppl_base)
    env = environment()
    print(f"\nmachine: {env}\ncalibration {args.calib} x {SEQLEN} tokens, evaluation {args.windows} x {SEQLEN} "
          f"held-out tokens, base ppl {ppl_base:.3f}\n")
    print("| tool | method | ppl | KLD | top-1 | bits/weight | calib s | load | peak RSS GiB | max abs dlogit vs peer loader |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tool']} | {r['method']} | failed: {r['error'][:80]} | | | | | |")
            continue
        d = r.get("max_abs_dlogit_vs_peer_loader")
        print(f"| {r['tool']} | {r['method']} | {r['ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.3f} | "
              f"{r['bits_per_weight']:.2f} | {r['seconds']:.0f} | {r.get('load_average_1min', float('nan')):.1f} | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} | {'' if d is None else f'{d:.2e}'} |")


if __name__ == "__main__":
    main()
