"""Seconds to quantize real weights of the default model into every GGUF type under an importance vector (what
`lowbit quantize --target-bpw` and `--imatrix` run for every tensor), with the searches as lowbit's native ops
and as the tensor code they replace, in the same run; the bytes must be identical.

    python benchmarks/gguf_search.py                 # about 1 minute on 2 cores
    python benchmarks/gguf_search.py --quick --out DIR
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lowbit
from lowbit.eval import environment
from lowbit.eval.report import write_results
from lowbit.formats import GGUF_TYPES, GGUFSpec
from lowbit.formats import gguf as gguf_module
from lowbit.kernels import native


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/gguf_search")
    ap.add_argument("--quick", action="store_true", help="a 64-row slice, one repeat: checks the script")
    args = ap.parse_args()
    if not native.available():
        print(f"lowbit's native library is not built ({native.load()}): only the tensor code can be timed")
    layer = lowbit.load_model("default").model.model.layers[3]
    rows = []
    for t in GGUF_TYPES:
        spec = GGUFSpec(t)
        w = (layer.mlp.down_proj if spec.block.block_size == 256 else layer.self_attn.q_proj).weight.detach()
        w = w[:64] if args.quick else w
        imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)).pow(4) + 1e-3
        repeats = 1 if args.quick else args.repeats
        fast, got = timed(lambda: spec.quantize(w, importance=imp).qweight, repeats)
        real = gguf_module.native_searches
        gguf_module.native_searches = lambda x: False    # the tensor code, as where the library is not built
        try:
            slow, ref = timed(lambda: spec.quantize(w, importance=imp).qweight, repeats)
        finally:
            gguf_module.native_searches = real
        rows.append({"type": t, "shape": list(w.shape), "native_s": round(fast, 4), "tensor_s": round(slow, 4),
                     "speedup": round(slow / fast, 1), "same_bytes": bool(torch.equal(got, ref))})
        print(json.dumps(rows[-1]), flush=True)
    env = environment()
    md = write_results(args.out, rows, env,
                       f"{env.get('cpu')} ({env.get('cpu_features')}), {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}; native library {'built' if native.available() else 'absent'}; "
                       "importance-weighted",
                       ["type", "weight", "native ops, s", "tensor code, s", "speed-up", "same bytes"],
                       [[r["type"], f"{r['shape'][0]}x{r['shape'][1]}", str(r["native_s"]), str(r["tensor_s"]),
                         f"{r['speedup']}x", str(r["same_bytes"])] for r in rows])
    print(md)
    return 0 if all(r["same_bytes"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
