"""The engine's per-layer cost beyond its matmuls, for llama, Gemma 3 and Qwen3-MoE on tiny configs of equal size.

Each family gets a random-weight model at two depths (--layers, default 2 and 8) with the same hidden size,
heads and head size, quantized INT4 g64 (RTN) as lowbit runs them, and the engine's compiled decode step is
timed (median over --steps tokens, best of --repeats runs). The difference between the depths divided by the
difference in layers is the per-layer step time: embedding, final norm and lm_head cancel out. From it the
per-layer time of the same layer's Linears alone (the engine's own fused q/k/v and gate/up QuantLinears, o and
down; for a mixture-of-experts layer every expert's, since the compiled step runs them all, and the router),
called by one compiled function of the same kind, is subtracted: what is left is what a layer costs besides its
matmuls (norms, rotary, cache writes, attention, routing) — Python work per token would show up there.

Sizes are chosen so that the matmul work per layer is the same for every family: the MoE layer's experts
(moe_intermediate_size = intermediate_size / experts) together are as wide as the dense MLP.

Two more columns separate the engine's own cost from the arithmetic a family adds. "Python functions per step"
counts the Python frames entered by one compiled decode step (sys.setprofile), at both depths: equal counts mean
no Python work per layer, equal across families no Python work llama avoids. The row "gemma3_text, llama's ops"
is Gemma 3 with the operations llama lacks taken out of the engine's blocks (q/k norms, the norms on each
branch's output, GeGLU replaced by SiLU; not a model anyone runs): what is left of Gemma's per-layer cost then is
what the engine spends on its structure (sliding and global layers, two rotary tables, (1 + w) norms).

    python benchmarks/engine_overhead.py                       # about 6 minutes on 2 cores
    python benchmarks/engine_overhead.py --quick --out DIR     # seconds: keeps the script alive
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import lowbit
from lowbit.engine import Engine
from lowbit.eval import environment
from lowbit.eval.speed import python_frames
from lowbit.io.atomic import atomic_write_text

FAMILIES = ("llama", "gemma3_text", "qwen3_moe", "gemma3_text, llama's ops")
# the Linears alone compile as the engine's step does: C++ wrapper, no size asserts around each call
LINEARS_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}


def tiny_model(family: str, layers: int, hidden: int, inter: int, experts: int = 4) -> torch.nn.Module:
    kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=hidden // 4, vocab_size=256, max_position_embeddings=1024,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "qwen3_moe":
        kw.update(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=inter // experts)
    if family == "gemma3_text":
        kw.update(sliding_window=128)    # decoding crosses the local layers' window
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
    return lowbit.quantize(model, lowbit.RTN(bits=4, group_size=64), progress=False, dtype=torch.float32)


def linear_work(blocks, hidden: int, inter: int):
    """A function running, for every engine block, only its Linears on one token (outputs kept alive)."""
    def run(x, xa, xi):
        out = []
        for b in blocks:
            out += [b.qkv(x), b.o(xa)]
            if b.experts is None:
                out += [b.gate_up(x), b.down(xi)]
            else:
                out.append(b.router(x.view(1, -1))[0])
                out.append(b.experts_gate_up(x))       # every expert's gate/up, one matmul as the engine runs it
                for e in b.experts:
                    out.append(e.down_proj(xi[..., :e.down_proj.in_features]))
        return out
    return run


def without_llamas_missing_ops(engine) -> None:
    """Take Gemma's q/k norms and branch-output norms out of the engine's blocks and run SiLU instead of GeGLU."""
    for b in engine.decoder.blocks:
        b.q_norm = b.k_norm = None
        b.attn_out_norm, b.mlp_out_norm, b.act = nn.Identity(), nn.Identity(), nn.SiLU()


def median_step(fn, steps: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
        best = min(best, statistics.median(times))
    return best


@torch.no_grad()
def measure(family: str, layers: int, args) -> dict:
    model = tiny_model(family.split(",")[0], layers, args.hidden, args.inter)
    engine = Engine(model, compile=True)
    if family.endswith("llama's ops"):
        without_llamas_missing_ops(engine)
    prompt = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    engine.generate(prompt, 8)                           # compiles
    engine.reserve(8 + args.steps + 1)
    tok = engine.prefill(prompt).argmax(-1, keepdim=True)
    median_step(lambda i: engine.decode(tok, 8 + i), args.steps, 1)   # any recompilation (window crossed) first
    step = median_step(lambda i: engine.decode(tok, 8 + i), args.steps, args.repeats)
    frames = python_frames(lambda: engine.decode(tok, 8 + args.steps))
    blocks = engine.decoder.blocks
    fn = torch.compile(linear_work(blocks, args.hidden, args.inter), dynamic=False, options=LINEARS_OPTIONS)
    x = torch.randn(1, 1, args.hidden)
    xa = torch.randn(1, 1, blocks[0].heads * blocks[0].head_dim)
    xi = torch.randn(1, 1, args.inter)
    median_step(lambda i: fn(x, xa, xi), args.steps, 1)
    lin = median_step(lambda i: fn(x, xa, xi), args.steps, args.repeats)
    return {"family": family, "layers": layers, "step_us": 1e6 * step, "linears_us": 1e6 * lin,
            "python_frames": frames}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 8])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/engine_overhead.json")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.inter, args.steps, args.repeats = [1, 2], 128, 256, 8, 1
    raw = [measure(f, n, args) for f in FAMILIES for n in args.layers]
    lo, hi = args.layers
    rows = []
    for f in FAMILIES:
        a, b = (next(r for r in raw if r["family"] == f and r["layers"] == n) for n in (lo, hi))
        per_step = (b["step_us"] - a["step_us"]) / (hi - lo)
        per_lin = (b["linears_us"] - a["linears_us"]) / (hi - lo)
        rows.append({"family": f, "step_us": {lo: a["step_us"], hi: b["step_us"]}, "layer_step_us": per_step,
                     "layer_linears_us": per_lin, "layer_overhead_us": per_step - per_lin,
                     "python_frames": {lo: a["python_frames"], hi: b["python_frames"]}})
    env = environment()
    lines = [f"Tiny models, hidden {args.hidden}, MLP width {args.inter} (MoE: 4 experts x {args.inter // 4}, top-2, "
             f"all run by the compiled step), 4 heads / 2 KV heads, INT4 g64; decode step median over "
             f"{args.steps} tokens, best of {args.repeats}; per layer = difference between {lo} and {hi} layers.", "",
             f"| family | step, {lo} layers (µs) | step, {hi} layers (µs) | per layer (µs) | its Linears alone (µs) "
             f"| per layer beyond the Linears (µs) | Python functions per step, {lo} / {hi} layers |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['step_us'][lo]:.0f} | {r['step_us'][hi]:.0f} | {r['layer_step_us']:.1f} | "
                     f"{r['layer_linears_us']:.1f} | {r['layer_overhead_us']:.1f} | "
                     f"{r['python_frames'][lo]} / {r['python_frames'][hi]} |")
    lines += ["", f"CPU: {env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}"]
    report = "\n".join(lines)
    print(report)
    atomic_write_text(args.out, json.dumps({"rows": rows, "raw": raw, "meta": env, "markdown": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
