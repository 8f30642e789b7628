"""Per-layer check on real layers: relative output error ‖WX − ŴX‖ / ‖WX‖ of RTN, GPTQ and AWQ for every
Linear of the first and the last block of the default model, on the calibration inputs of each layer.
(AWQ's is measured against its scaled float layer: same inputs up to its scales, and for a Linear whose
output rows also absorbed the next group's scales, such as up_proj, the same output up to those.)

    python benchmarks/layer_errors.py [--bits 4] [--group-size 64] [--calib-samples 64]

Each block gets the inputs the unquantized model gives it. GPTQ uses the layer's own Hessian; AWQ's error is
measured in its scaled coordinates (W·diag(s) against X·diag(s)⁻¹, the same product), after its clip search.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import lowbit
from lowbit.algorithms import Hessian, apply_clip, gptq_quantize, quantize_rtn, search_clip
from lowbit.blockwise import awq_scale_block, linear_groups
from lowbit.data import calibration_samples, load_text
from lowbit.models import arch_for
from lowbit.models.calibration import capture_block_inputs, capture_calls, first_input, run_block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/layer_errors.md")
    args = ap.parse_args()
    loaded = lowbit.load_model("default")
    base, tok = loaded.model, loaded.tokenizer
    arch = arch_for(base.config)
    spec = lowbit.IntSpec(args.bits, args.group_size, False)
    samples = calibration_samples(tok, load_text(None, "calibration"), args.calib_samples, 512, 0)
    inputs = capture_block_inputs(base, samples)
    blocks = base.model.layers
    lines = ["| layer | RTN | GPTQ | AWQ | GPTQ < RTN | AWQ < RTN |", "|---|---|---|---|---|---|"]
    for i, block in enumerate(blocks):
        if i in (0, len(blocks) - 1):
            names = [n for _, lin, _ in arch.feeds for n in lin]
            calls = capture_calls(block, inputs, [n for n in names])
            plan = {n: lowbit.config_for("awq", spec) for n in names}
            scaled = copy.deepcopy(block)
            group_inputs = awq_scale_block(scaled, inputs, plan, arch)
            awq_x = {n: X for (_p, _l, ns, _i), X in zip(linear_groups(arch, plan), group_inputs) for n in ns}
            for n in names:
                mod = block.get_submodule(n)
                X = torch.cat([first_input(mod, a, kw).reshape(-1, mod.in_features) for a, kw in calls[n]]).double()
                W = mod.weight.detach().double()
                Y = X @ W.T
                rel = lambda What, Xs=X: ((Xs @ What.T - Y).norm() / Y.norm()).item()
                H = Hessian(mod.in_features)
                H.add(X)
                e_rtn = rel(quantize_rtn(W, spec).dequantize(torch.float64))
                e_gptq = rel(gptq_quantize(W, H.H, spec).dequantize(torch.float64))
                # AWQ in its own coordinates: inputs X·diag(s)⁻¹ and the scaled float weight (whose rows may also
                # carry the next group's 1/s, as up_proj's do) give the reference output
                Ws = scaled.get_submodule(n).weight.detach().float()
                Xs = awq_x[n].double()
                Ys = Xs @ Ws.double().T
                Wq = apply_clip(Ws, search_clip(Ws, awq_x[n], spec), spec) if n not in arch.no_clip else Ws
                e_awq = ((Xs @ quantize_rtn(Wq, spec).dequantize(torch.float64).T - Ys).norm() / Ys.norm()).item()
                lines.append(f"| {i}.{n} | {e_rtn:.4f} | {e_gptq:.4f} | {e_awq:.4f} | "
                             f"{'yes' if e_gptq < e_rtn else 'NO'} | {'yes' if e_awq < e_rtn else 'NO'} |")
                print(lines[-1], flush=True)
        inputs = run_block(block, inputs)
    text = (f"Relative layer-output error, {spec.name}, {args.calib_samples} x 512 calibration tokens\n\n"
            + "\n".join(lines) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
