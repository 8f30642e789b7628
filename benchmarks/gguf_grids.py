"""Grid choices on real layers of the default model: plain and Hessian-weighted error of RTN and GPTQ for the
symmetric integer grids (step absmax/7, the full-code absmax/7.5, and Q4_0's signed max -> -8), and for the GGUF
types with and without importance (RTN) and with and without a Hessian-weighted grid fit (GPTQ).

    python benchmarks/gguf_grids.py --blocks 2 --out benchmarks/results/gguf_grids.json

Layers: q_proj, o_proj, up_proj and down_proj of the first `--blocks` blocks; Hessians from 16 calibration
windows of 512 tokens of the default text (inputs of the float model). k-quants only see the layers whose rows
are a multiple of 256 (down_proj on this model). Errors are sums over the layers of ‖ΔW‖² and tr(ΔW H ΔWᵀ).
"""

import argparse
import json

import torch

import lowbit
from lowbit.algorithms import Hessian, gptq_quantize
from lowbit.data import calibration_ids
from lowbit.formats import GGUFSpec, IntSpec
from lowbit.models.calibration import capture_block_inputs, capture_calls, first_input, run_block

LINEARS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]


def real_layers(n_blocks: int) -> dict:
    loaded = lowbit.load("default")
    inputs = capture_block_inputs(loaded.model, calibration_ids(None, loaded.tokenizer, 16, 512, 0))
    layers = {}
    for b in range(n_blocks):
        block = loaded.model.model.layers[b]
        calls = capture_calls(block, inputs, LINEARS)
        for n in LINEARS:
            mod = block.get_submodule(n)
            H = Hessian(mod.in_features)
            for a, kw in calls[n]:
                H.add(first_input(mod, a, kw))
            layers[f"{b}.{n}"] = (mod.weight.detach().float().clone(), H.H.clone())
        inputs = run_block(block, inputs)
    return layers


def total(layers: dict, fn) -> dict:
    plain = hw = 0.0
    for W, H in layers.values():
        try:
            D = fn(W, H).double() - W.double()
        except lowbit.LowbitError:   # a k-quant on rows it cannot hold
            continue
        plain += D.pow(2).sum().item()
        hw += torch.einsum("ij,jk,ik->", D, H, D).item()
    return {"plain": plain, "hessian_weighted": hw}


def signed_max_grid(W: torch.Tensor, H=None, g: int = 64) -> torch.Tensor:
    """Q4_0's symmetric choice at g columns: the largest-magnitude weight maps to code -8 (negative steps)."""
    wg = W.reshape(W.shape[0], -1, g)
    s = (wg.gather(-1, wg.abs().argmax(-1, keepdim=True)) / -8).half().float()
    s = torch.where(s == 0, torch.ones_like(s), s)
    return ((torch.round(wg / s + 8).clamp(0, 15) - 8) * s).reshape(W.shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers = real_layers(args.blocks)
    res = {}
    spec = IntSpec(4, 64, True)
    divisor = IntSpec.sym_divisor
    for label, div in (("int4 g64 absmax/7", 7.0), ("int4 g64 absmax/7.5 (full code)", 7.5)):
        IntSpec.sym_divisor = property(lambda self, d=div: d)
        res[f"RTN {label}"] = total(layers, lambda W, H: spec.quantize(W).dequantize())
        res[f"RTN+importance {label}"] = total(layers, lambda W, H: spec.quantize(W, torch.diag(H).float()).dequantize())
        res[f"GPTQ {label}"] = total(layers, lambda W, H: gptq_quantize(W, H, spec).dequantize())
        res[f"GPTQ weighted grid {label}"] = total(
            layers, lambda W, H: gptq_quantize(W, H, spec, weighted_grid=True).dequantize())
    IntSpec.sym_divisor = divisor
    res["RTN int4 g64 signed max -> -8 (Q4_0's)"] = total(layers, signed_max_grid)
    for t in ("Q4_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        g = GGUFSpec(t)
        res[f"{t} RTN"] = total(layers, lambda W, H: g.quantize(W).dequantize())
        res[f"{t} RTN+importance"] = total(layers, lambda W, H: g.quantize(W, torch.diag(H).float()).dequantize())
        res[f"{t} GPTQ"] = total(layers, lambda W, H: gptq_quantize(W, H, g).dequantize())
        res[f"{t} GPTQ weighted grid"] = total(layers, lambda W, H: gptq_quantize(W, H, g, weighted_grid=True).dequantize())
    for k, v in res.items():
        print(f"{k:45s} plain {v['plain']:11.4f}  H-weighted {v['hessian_weighted']:9.4f}")
    if args.out:
        from lowbit.io.atomic import atomic_write_text
        atomic_write_text(args.out, json.dumps({"layers": list(layers), "errors": res}, indent=1))


if __name__ == "__main__":
    main()
