"""GPU benchmark of the triton-w4a16 kernel (4-bit weights, 16-bit activations) against dense float16, plus FP8.

For each weight shape N×K and batch M the script
  * checks the Triton kernel against a float32 matmul of the dequantized weight (relative error printed; a
    config over tolerance is reported as FAIL, never chosen, and makes the script exit with status 1),
  * times F.linear with the dense float16 weight and a few block configurations of the Triton kernel (the
    heuristic's default first; the best is reported with its config, and every candidate goes to the JSON).
    Times are per call, from CUDA-graph replays between CUDA events (median of 9 replays of about 2 ms each),
    with activations — and weights, where one copy would fit in L2 — rotating among several copies so that
    they are read from HBM; the graphs leave out the host's launch overhead, which on a slow host exceeds the
    kernels' own time. The "eager" column is triton.testing.do_bench (median, L2 flushed before every call),
    launch overhead included,
  * on GPUs of compute capability >= 8.9: checks and times torch._scaled_mm with e4m3 weights (per-channel
    scales) and e4m3 per-token activations (their quantization included in the time) against float16,
and once checks lowbit's own fp8 kernel (Fp8Kernel with FP8 activations, torch._scaled_mm on CUDA) against
its CPU emulation. The table goes to OUT.md and OUT.json (device name, versions, date, best config per case).

    python benchmarks/gpu_w4a16.py                 # on a CUDA machine; about 90 s on an H100
    python benchmarks/gpu_w4a16.py --quick         # CPU, Triton interpreter, tiny shapes, no real timing

Runs from a source checkout without installing lowbit (its src/ goes on sys.path).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton  # noqa: E402
import triton.testing  # noqa: E402

from lowbit.formats import FloatSpec, IntSpec, QuantizedTensor, quantize_fp8  # noqa: E402
from lowbit.formats.act import ActSpec  # noqa: E402
from lowbit.kernels.triton_w4a16 import default_config, repack, split_for, w4a16_matmul  # noqa: E402
from lowbit.kernels.w8a8 import Fp8Kernel  # noqa: E402

FULL_SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (N, K) = (out, in) features
FULL_MS = [1, 16, 64, 128]
QUICK_SHAPES = [(128, 256)]
QUICK_MS = [1, 4]
GROUP = 128
TOL = 1e-2  # relative error of a float16 result against the float32 product of the same dequantized weight
L2_BYTES = 50 * 2**20


def candidates(m: int, n: int, k: int, sms: int, quick: bool) -> list[dict]:
    """Block configurations per case (the heuristic's default first), around the best of earlier H100 runs;
    SPLIT_K from programs per SM (as the kernel's heuristic: at least a few chunks per split). MODE (see the kernel): 0 float32 GEMV, 4 float16-pair GEMV, 1 one dot per
    nibble (dq: float16-pair dequantization), 2 one dot per 128-column chunk, 3 as 2 but yᵀ = W xᵀ; split-K
    partial sums reduced by a second kernel, atomically (at) or by the last program of each tile (last)."""
    G0 = lambda bn, pf=True: dict(BLOCK_M=1, BLOCK_N=bn, num_warps=4, num_stages=1, PREFETCH=pf)
    G4 = lambda bn, w, last=True: dict(BLOCK_M=1, BLOCK_N=bn, MODE=4, num_warps=w, num_stages=1,
                                       **({"LAST": True} if last else {}))
    D = lambda mode, bm, bn, w=4, st=4, at=False, last=False, dq=False: dict(
        BLOCK_M=bm, BLOCK_N=bn, MODE=mode, num_warps=w, num_stages=st, **({"ATOMIC": True} if at else {}),
        **({"LAST": True} if last else {}), **({"DQ16": True} if dq else {}))
    if quick:
        raw = [(G0(64), 4), (G4(64, 4), 4), (D(1, 16, 64, st=2), 4), (D(1, 16, 64, st=2, last=True, dq=True), 4),
               (D(3, 16, 64, st=2), 4)]
    elif m == 1:
        raw = [(G4(64, 4), 4), (G4(64, 4), 16), (G4(32, 2), 8), (G4(128, 8), 4), (G4(64, 4, last=False), 8),
               (G0(64), 16), (G0(32), 8)]
    elif m <= 16:
        raw = [(D(1, 16, 64, at=True), 8), (D(1, 16, 64, st=3), 4), (D(1, 16, 64, last=True), 4),
               (D(1, 16, 64, dq=True), 4), (D(1, 16, 128, last=True, dq=True), 4)]
    elif m <= 64:
        raw = [(D(2, 64, 128, 4, 3), 4), (D(2, 64, 64, 4, 3, True), 4), (D(1, 32, 64, 4, 3, True), 4),
               (D(1, 16, 64, 4, 4, True), 4), (D(1, 64, 128, 4, 3, last=True, dq=True), 4),
               (D(1, 32, 64, 4, 3, last=True, dq=True), 4)]
    else:
        raw = [(D(3, 128, 256, 8, 3, True), 2), (D(3, 128, 128, 8, 3, True), 2), (D(3, 128, 64, 4, 3), 2),
               (D(1, 64, 128, 4, 3, last=True, dq=True), 2)]
    out = [default_config(m, n, k, sms)]
    for c, per_sm in raw:
        if c["BLOCK_M"] == 1 and m > 2:
            continue
        c = _with_split(c, m, n, k, sms, per_sm)
        if c not in out:
            out.append(c)
    return out


def _with_split(cfg: dict, m: int, n: int, k: int, sms: int, per_sm: int) -> dict:
    return {**cfg, "SPLIT_K": split_for(cfg, m, n, k, sms, per_sm)}


def cfg_str(c: dict) -> str:
    mode = c.get("MODE", 0) if c["BLOCK_M"] == 1 else c.get("MODE", 2)
    s = (f"m{mode} {c['BLOCK_M']}x{c['BLOCK_N']} sk{c.get('SPLIT_K', 1)} w{c.get('num_warps', 4)} "
         f"s{c.get('num_stages', 3)}")
    return (s + (" pf" if c.get("PREFETCH") else "") + (" at" if c.get("ATOMIC") else "")
            + (" last" if c.get("LAST") and not c.get("ATOMIC") else "") + (" dq" if c.get("DQ16") else ""))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def random_weight(n: int, k: int, device, symmetric=True, group=GROUP, seed=0) -> QuantizedTensor:
    """Random codes and scales in lowbit's storage layout (timing does not depend on the values)."""
    g = torch.Generator(device=device).manual_seed(seed)
    spec = IntSpec(4, group, symmetric)
    codes = torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.uint8)
    ng = spec.num_groups(k)
    scales = (torch.rand(n, ng, generator=g, device=device) * 0.02 + 0.005).to(torch.float16)
    zeros = None if symmetric else torch.randint(4, 12, (n, ng), generator=g, device=device, dtype=torch.uint8)
    return QuantizedTensor.from_codes(codes, scales, zeros, spec)


class Timer:
    """Per-call GPU time in µs of functions called in turn (each on its own rotating inputs).

    graph(): the calls are captured in a CUDA graph (enough passes for about 2 ms) and the graph is replayed
    between CUDA events; the median replay over the number of calls. This leaves out the host's launch overhead
    (Python, Triton's launcher), which on a slow host exceeds the kernels' own time at these sizes.
    eager(): triton.testing.do_bench, median, with the L2 flushed before every call; includes launch overhead
    whenever the host falls behind the GPU."""

    def __init__(self, quick: bool):
        self.quick = quick

    def _perf_counter(self, fns) -> float:
        for f in fns:
            f()
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) * 1e6 / len(fns)

    def graph(self, fns: list) -> float:
        if self.quick:
            return self._perf_counter(fns)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:  # compile / autotune outside the capture
                f()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

        def capture(passes):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(passes):
                    for f in fns:
                        f()
            return g

        def replay(g, reps):
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) * 1e3)
            return sorted(ts)[len(ts) // 2]

        g = capture(1)
        once = replay(g, 3)
        del g
        passes = max(1, min(200, math.ceil(2000.0 / max(once, 1.0))))
        g = capture(passes)
        replay(g, 1)
        us = replay(g, 9) / (passes * len(fns))
        del g
        return us

    def eager(self, fns: list) -> float:
        if self.quick:
            return self._perf_counter(fns)
        cyc = itertools.cycle(fns)
        return triton.testing.do_bench(lambda: next(cyc)(), warmup=5, rep=20, return_mode="median") * 1e3


def fp8_pack(w16: torch.Tensor):
    ws = (w16.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
    w8 = (w16.float() / ws).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w8, ws.t().contiguous()


def fp8_act(x: torch.Tensor):
    """Per-token e4m3 activations and their float32 scales [M, 1]."""
    xs = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (x.float() / xs).clamp(-448, 448).to(torch.float8_e4m3fn), xs


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, ws_row: torch.Tensor) -> torch.Tensor:
    x8, xs = fp8_act(x)
    return torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.bfloat16)


def check_lowbit_fp8(device) -> dict:
    """lowbit's Fp8Kernel with per-token FP8 activations on `device` against its CPU emulation."""
    torch.manual_seed(0)
    n, k, m = (512, 1024, 16) if device.type == "cuda" else (64, 128, 4)
    w = torch.randn(n, k)
    qt = quantize_fp8(w, FloatSpec("e4m3"))
    act = ActSpec("fp8-e4m3", "token")
    kern = Fp8Kernel()
    x = torch.randn(m, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    ref = kern.linear(x, kern.prepare(qt), qt.spec, qt.shape, bias, act)
    packed = {key: t.to(device) for key, t in kern.prepare(qt).items()}
    out = kern.linear(x.to(device), packed, qt.spec, qt.shape, bias.to(device), act).cpu()
    from lowbit.kernels.w8a8 import scaled_mm_ok
    err = rel_err(out, ref)
    return {"device": str(device), "scaled_mm": bool(scaled_mm_ok(device)), "shape": [n, k], "m": m,
            "rel_err_vs_cpu": err, "ok": err < 2e-2}


def correctness_extras(device, quick: bool) -> list[dict]:
    """Formats and paths beyond the timed one: asymmetric, small groups, per channel, bf16, bias, edges."""
    out = []
    n, k = (96, 256) if quick else (1000, 4096)
    ms = (1, 3) if quick else (1, 7, 40, 100)
    for sym, group, dt in ((False, 32, torch.bfloat16), (True, 64, torch.float16), (False, -1, torch.float16),
                           (False, 128, torch.float16)):
        qt = random_weight(n, k, device, sym, group, seed=1)
        packed = repack(qt)
        w = qt.dequantize(torch.float32)
        bias = torch.randn(n, device=device).to(dt)
        for m in ms:
            x = torch.randn(m, k, device=device).to(dt)
            ref = x.float() @ w.t() + bias.float()
            tol = TOL if dt == torch.float16 else 2 * TOL
            row = {"format": qt.spec.name, "dtype": str(dt).split(".")[1], "n": n, "k": k, "m": m,
                   "config": "default"}
            try:
                err = rel_err(w4a16_matmul(x, packed, group, bias), ref)
                out.append({**row, "rel_err": err, "ok": err < tol})
            except Exception as e:  # the default path must run: a failure
                out.append({**row, "rel_err": float("nan"), "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
        # every kernel variant, split-K with each reduction, on this format (the float16-pair variants fall
        # back to the float32 ones for bfloat16 x and groups of 32)
        for m, cfg in ((1, dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=4, PREFETCH=True)),
                       (1, dict(BLOCK_M=1, BLOCK_N=64, MODE=4, SPLIT_K=4, LAST=True)),
                       (1, dict(BLOCK_M=1, BLOCK_N=128, MODE=4, SPLIT_K=1, num_warps=8)),
                       (ms[1], dict(BLOCK_M=16, BLOCK_N=64, MODE=1, SPLIT_K=2, ATOMIC=True)),
                       (ms[1], dict(BLOCK_M=16, BLOCK_N=64, MODE=1, SPLIT_K=2, LAST=True, DQ16=True)),
                       (ms[1], dict(BLOCK_M=16, BLOCK_N=64, MODE=2, SPLIT_K=2)),
                       (ms[-1], dict(BLOCK_M=64, BLOCK_N=64, MODE=3, SPLIT_K=2, ATOMIC=True)),
                       (ms[-1], dict(BLOCK_M=64, BLOCK_N=128, MODE=2, SPLIT_K=2, LAST=True)),
                       (ms[-1], dict(BLOCK_M=64, BLOCK_N=64, MODE=1, SPLIT_K=2, LAST=True, DQ16=True, num_stages=3))):
            x = torch.randn(m, k, device=device).to(dt)
            ref = x.float() @ w.t() + bias.float()
            tol = TOL if dt == torch.float16 else 2 * TOL
            row = {"format": qt.spec.name, "dtype": str(dt).split(".")[1], "n": n, "k": k, "m": m,
                   "config": cfg_str(cfg)}
            try:
                y = w4a16_matmul(x, packed, group, bias, cfg)
                y2 = w4a16_matmul(x, packed, group, bias, cfg)  # a second call (split-K counters reused)
                err = max(rel_err(y, ref), rel_err(y2, ref))
                out.append({**row, "rel_err": err, "ok": err < tol})
            except Exception as e:  # a variant that does not compile here: reported, not a wrong result
                out.append({**row, "rel_err": float("nan"), "ok": True, "error": f"{type(e).__name__}: {e}"[:300]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes, no real timing")
    ap.add_argument("--out", default=None, help="output path without suffix (writes OUT.md and OUT.json)")
    args = ap.parse_args()
    quick = args.quick
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("gpu_w4a16-quick" if quick else "gpu_w4a16"))
    out = out.with_suffix("") if out.suffix in (".md", ".json") else out

    if quick:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --quick for the CPU check", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    cuda = device.type == "cuda"
    card = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)"
    cap = torch.cuda.get_device_capability(device) if cuda else None
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    has_fp8 = cuda and cap >= (8, 9) and hasattr(torch, "_scaled_mm")
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if quick else (FULL_SHAPES, FULL_MS)
    timer = Timer(quick)
    meta = {"device": card, "capability": list(cap) if cap else None, "sms": sms, "torch": torch.__version__,
            "triton": triton.__version__, "python": sys.version.split()[0],
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": quick,
            "format": f"int4 g{GROUP} symmetric",
            "timing": ("CUDA-graph replay between CUDA events (median), inputs rotating so that they exceed L2; "
                       "eager = triton.testing.do_bench median with L2 flushed, launch overhead included")
            if not quick else "time.perf_counter (interpreter; not a measurement)"}
    print(f"# {card}  torch {torch.__version__}  triton {triton.__version__}  sms {sms}", flush=True)
    failures, errors = [], []
    t_start = time.time()

    extras = correctness_extras(device, quick)
    for e in extras:
        print(f"check {e['format']:>16} {e['dtype']:>9} {e['n']}x{e['k']} m={e['m']:<4} {e['config']:<26} "
              f"rel err {e['rel_err']:.2e} {'ok' if e['ok'] else 'FAIL'}" + (f"  ERROR {e['error']}" if "error" in e
                                                                           else ""), flush=True)
        if not e["ok"]:
            failures.append(f"extra check {e}")
        if "error" in e:
            errors.append(f"extra check {e['format']} {e['dtype']} m={e['m']} {e['config']}: {e['error']}")
    fp8_check = check_lowbit_fp8(device)
    print(f"lowbit Fp8Kernel on {fp8_check['device']} (scaled_mm={fp8_check['scaled_mm']}) vs CPU emulation: "
          f"rel err {fp8_check['rel_err_vs_cpu']:.2e} {'ok' if fp8_check['ok'] else 'FAIL'}", flush=True)
    if not fp8_check["ok"]:
        failures.append(f"lowbit fp8 check {fp8_check}")

    rows = []

    def write(complete: bool) -> str:
        meta["seconds"] = round(time.time() - t_start, 1)
        meta["complete"] = complete
        result = {**meta, "rows": rows, "extra_checks": extras, "lowbit_fp8_check": fp8_check,
                  "best_configs": {f"{r['shape']}/m{r['m']}": r["config"] for r in rows}, "failures": failures,
                  "errors": errors}
        table = markdown(meta, rows, extras, fp8_check, has_fp8, errors)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        out.with_suffix(".md").write_text(table)
        return table

    for n, k in shapes:
        torch.manual_seed(0)
        qt = random_weight(n, k, device)
        w32 = qt.dequantize(torch.float32)
        w16 = w32.to(torch.float16)
        packed0 = repack(qt)
        wbytes = sum(t.numel() * t.element_size() for t in packed0.values())
        n_w = 1 if quick else max(1, min(8, math.ceil(2 * L2_BYTES / wbytes)))
        n_d = 1 if quick else max(1, min(8, math.ceil(2 * L2_BYTES / (w16.numel() * 2))))
        packs = [packed0] + [{key: t.clone() for key, t in packed0.items()} for _ in range(n_w - 1)]
        denses = [w16] + [w16.clone() for _ in range(n_d - 1)]
        fp8 = fp8_pack(w16) if has_fp8 else None
        for m in ms:
            xs = [torch.randn(m, k, device=device).to(torch.float16) for _ in range(1 if quick else 4)]
            ref = xs[0].float() @ w32.t()
            row = {"n": n, "k": k, "m": m, "shape": f"{n}x{k}"}
            n_rot = max(len(xs), len(denses), len(packs))
            dense_fns = [lambda x=x, w=w: F.linear(x, w)
                         for x, w, _ in zip(itertools.cycle(xs), itertools.cycle(denses), range(n_rot))]
            row["fp16_us"] = timer.graph(dense_fns)
            tried = []
            for ci, c in enumerate(candidates(m, n, k, sms, quick)):
                try:
                    y = w4a16_matmul(xs[0], packed0, GROUP, None, c)
                    y2 = w4a16_matmul(xs[1 % len(xs)], packed0, GROUP, None, c)  # counters reused, other input
                    err = max(rel_err(y, ref), rel_err(y2, xs[1 % len(xs)].float() @ w32.t()))
                except Exception as e:  # does not compile with this Triton: reported, never chosen
                    msg = f"{type(e).__name__}: {e}"[:300]
                    tried.append({"config": c, "us": float("nan"), "rel_err": float("nan"), "ok": False,
                                  "error": msg})
                    errors.append(f"{n}x{k} m={m} {cfg_str(c)}: {msg}")
                    print(f"ERROR {n}x{k} m={m} {cfg_str(c)}: {msg}", flush=True)
                    if ci == 0:
                        failures.append(f"{n}x{k} m={m} default {cfg_str(c)}: {msg}")
                    continue
                ok = err < TOL
                us = timer.graph([lambda x=x, p=p, c=c: w4a16_matmul(x, p, GROUP, None, c)
                                  for x, p, _ in zip(itertools.cycle(xs), itertools.cycle(packs), range(n_rot))]
                                 ) if ok else float("nan")
                tried.append({"config": c, "us": us, "rel_err": err, "ok": ok})
                if not ok:
                    failures.append(f"{n}x{k} m={m} {cfg_str(c)}: rel err {err:.3e}")
                    print(f"FAIL {n}x{k} m={m} {cfg_str(c)}: rel err {err:.3e} > {TOL}", flush=True)
            good = [t for t in tried if t["ok"]]
            best = min(good, key=lambda t: t["us"]) if good else None
            row["w4a16_default_us"] = tried[0]["us"]
            row["w4a16_us"] = best["us"] if best else float("nan")
            row["config"] = best["config"] if best else None
            row["rel_err"] = max((t["rel_err"] for t in tried if "error" not in t), default=float("nan"))
            row["candidates"] = [{"config": cfg_str(t["config"]), "us": t["us"], "rel_err": t["rel_err"],
                                  **({"error": t["error"]} if "error" in t else {})} for t in tried]
            row["speedup"] = row["fp16_us"] / row["w4a16_us"] if best else float("nan")
            row["fp16_eager_us"] = timer.eager(dense_fns)
            row["w4a16_eager_us"] = timer.eager([lambda x=x, c=best["config"]: w4a16_matmul(x, packed0, GROUP, None, c)
                                                 for x in xs]) if best else float("nan")
            io_bytes = wbytes + m * k * 2 + m * n * 2
            row["gbps"] = io_bytes / (row["w4a16_us"] * 1e-6) / 1e9 if best else float("nan")
            if fp8 is not None:
                w8, ws_row = fp8
                try:
                    y8 = fp8_linear(xs[0], w8, ws_row)
                    y16 = F.linear(xs[0], w16)
                    row["fp8_rel_err_vs_fp16"] = rel_err(y8, y16)
                    row["fp8_us"] = timer.graph([lambda x=x: fp8_linear(x, w8, ws_row) for x in xs])
                    row["fp8_speedup"] = row["fp16_us"] / row["fp8_us"]
                    x8s = [fp8_act(x) for x in xs]
                    row["fp8_gemm_us"] = timer.graph([lambda a=a: torch._scaled_mm(
                        a[0], w8.t(), scale_a=a[1], scale_b=ws_row, out_dtype=torch.bfloat16) for a in x8s])
                except RuntimeError as e:  # e.g. a shape _scaled_mm refuses
                    row["fp8_error"] = str(e).splitlines()[0][:200]
            rows.append(row)
            print(f"{n:>6}x{k:<6} m={m:<4} fp16 {row['fp16_us']:9.1f} us  w4a16 {row['w4a16_us']:9.1f} us "
                  f"(default {row['w4a16_default_us']:.1f}, eager {row['w4a16_eager_us']:.1f} vs {row['fp16_eager_us']:.1f})"
                  f"  x{row['speedup']:.2f}  "
                  f"{row['gbps']:7.0f} GB/s  [{cfg_str(row['config']) if row['config'] else '-'}]  "
                  f"err {row['rel_err']:.1e}"
                  + (f"  fp8 {row['fp8_us']:.1f} us (gemm {row['fp8_gemm_us']:.1f}) x{row['fp8_speedup']:.2f} "
                     f"err {row['fp8_rel_err_vs_fp16']:.1e}"
                     if "fp8_us" in row else ""), flush=True)
        del packs, denses, fp8, w32, w16
        if cuda:
            torch.cuda.empty_cache()
        write(False)  # after every shape, so that an interrupted run still leaves its rows

    table = write(True)
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}\n")
    print(table)
    if errors:
        print(f"{len(errors)} candidate configs did not run:\n  " + "\n  ".join(errors), file=sys.stderr)
    if failures:
        print(f"{len(failures)} FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def markdown(meta, rows, extras, fp8_check, has_fp8, errors=()) -> str:
    lines = [f"# triton-w4a16 vs float16 ({meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; weights {meta['format']}; "
             f"timing: {meta['timing']}. GB/s counts packed weights + scales + activations + output.", ""]
    head = ("| shape N×K | M | fp16 µs | w4a16 µs | speedup | GB/s | config (mode BMxBN splitK warps stages) | "
            "default µs | eager fp16 / w4a16 µs |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if has_fp8:
        head += " fp8 µs (gemm only) | fp8 speedup | fp8 err vs fp16 |"
        sep += "---|---|---|"
    lines += [head, sep]
    for r in rows:
        line = (f"| {r['shape']} | {r['m']} | {r['fp16_us']:.1f} | {r['w4a16_us']:.1f} | {r['speedup']:.2f} | "
                f"{r['gbps']:.0f} | {cfg_str(r['config']) if r['config'] else 'FAIL'} | {r['w4a16_default_us']:.1f} | "
                f"{r['fp16_eager_us']:.0f} / {r['w4a16_eager_us']:.0f} |")
        if has_fp8:
            line += (f" {r['fp8_us']:.1f} ({r['fp8_gemm_us']:.1f}) | {r['fp8_speedup']:.2f} | "
                     f"{r['fp8_rel_err_vs_fp16']:.1e} |" if "fp8_us" in r
                     else f" {r.get('fp8_error', '-')} | | |")
        lines.append(line)
    ran = [e for e in extras if "error" not in e]
    worst = max((e["rel_err"] for e in ran), default=float("nan"))
    lines += ["", f"Extra correctness checks (asymmetric g32 bf16, symmetric g64, asymmetric per channel, asymmetric "
              f"g128; bias; M/N edges; every kernel variant and split-K reduction, each run twice): "
              f"{sum(e['ok'] for e in ran)}/{len(ran)} ok, worst relative error {worst:.1e}.",
              f"lowbit Fp8Kernel (FP8 activations) on {fp8_check['device']} vs its CPU emulation: relative error "
              f"{fp8_check['rel_err_vs_cpu']:.1e} (torch._scaled_mm used: {fp8_check['scaled_mm']}).", ""]
    if errors:
        lines += [f"Candidate configurations that did not run ({len(errors)}):", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
