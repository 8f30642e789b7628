"""Offloading on a GPU: decoder blocks streamed from pinned host memory against the PCIe bound, and the device
memory that activation offloading saves in a training step.

    python benchmarks/gpu_offload.py                 # on a CUDA machine, a minute or two
    python benchmarks/gpu_offload.py --quick         # CPU, a tiny model: the same code paths (run by the tests)

It needs torch, transformers and safetensors only (not the gguf package nor the default model). A failure of
lowbit's engine or of the KV-cache offload is written into the table rather than stopping the run, so that one
run on a borrowed GPU reports everything it could measure.

Streaming: a llama-architecture model with random bf16 weights is put on the GPU with a weight budget that
keeps about half of its blocks resident; the rest stream from pinned host memory on a side stream, block i+1
copied while block i computes. Tokens/s of greedy decoding is compared with the fully resident model and with
the bound: host-to-device bandwidth (measured here, pinned memory) over the bytes streamed per token.
KV cache: lowbit's engine after a 1024-token prompt with the cache in device memory and in pinned host memory
(16-bit, INT8, INT4 with per-channel keys), tokens compared.
Activations: one forward and backward pass with and without `offload_activations`; peak device memory and
gradient identity (eager attention and deterministic kernels, the resident pass run twice to show the
comparison is meaningful).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import os  # noqa: E402

# cuBLAS is deterministic only with a fixed workspace when several streams are in use (the copies run on one)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402


def h2d_bandwidth(device, mib: int) -> float:
    """GB/s of a pinned host-to-device copy (median of 5)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8).pin_memory() if device.type == "cuda" else \
        torch.empty(mib * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src, device=device)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return src.numel() / times[len(times) // 2] / 1e9


def make_model(cfg: dict, device, dtype, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**cfg)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    return model.eval()


def decode(model, ids, n: int, device, engine: str = "hf") -> tuple[float, list[int]]:
    """Greedy decode of n tokens: transformers' generate ("hf") or lowbit's engine, eager ("lowbit")."""
    if engine == "lowbit":
        from lowbit.engine import Engine
        e = Engine(model, compile=False)
        e.generate(ids, 3)
        if device.type == "cuda":
            torch.cuda.synchronize()
        r = e.generate(ids, n + 1)          # the first token comes from the prefill
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / r["decode_seconds"], r["tokens"].tolist()[:n]
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    mask = torch.ones_like(ids)   # given, not inferred from the pad id (a random prompt may contain it)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(
            max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, generation_config=gc)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), out[0, ids.shape[1]:].tolist()


def kv_offload(model, ids, n: int, device) -> dict:
    """lowbit's engine with the KV cache in device memory, then in pinned host memory brought back a layer at a
    time (INT8 and per-channel INT4 caches too): tok/s and whether the tokens are the same."""
    from lowbit.engine import Engine
    out = {}
    for bits in (None, 8, 4):
        row = {}
        for where in ("device", "host"):
            try:
                e = Engine(model, compile=False, kv_bits=bits, kv_offload=where == "host")
                e.generate(ids[:, :8], 3)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                r = e.generate(ids, n + 1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row[where] = (n / r["decode_seconds"], r["tokens"].tolist())
                row[f"{where}_cache_bytes"] = e.cache.nbytes
            except Exception as err:  # noqa: BLE001 - recorded, see decode_both
                row[where] = (None, f"{type(err).__name__}: {str(err)[:300]}")
        row["same_tokens"] = row["device"][1] == row["host"][1]
        out[str(bits or "16-bit")] = row
    return out


def decode_both(model, ids, n: int, device) -> dict:
    """tok/s and tokens through transformers' generate and through lowbit's engine; an engine failure is
    recorded, not fatal (this script runs rarely, on borrowed GPUs: one run should say as much as it can)."""
    out = {}
    for engine in ("hf", "lowbit"):
        try:
            out[engine] = decode(model, ids, n, device, engine)
        except Exception as e:  # noqa: BLE001
            out[engine] = (None, f"{type(e).__name__}: {str(e)[:300]}")
    return out


def activation_offload(cfg: dict, device, batch: int, seq: int, min_bytes: int = 1 << 20) -> dict:
    from lowbit.offload import offload_activations
    # eager attention and deterministic kernels: flash/efficient attention backward accumulates with atomics,
    # so two runs differ in the last bits whatever offloading does; the resident run is repeated to show it
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = make_model(cfg, device, torch.float32 if device.type == "cpu" else torch.bfloat16, "eager").train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)
    out = {}
    grads = {}
    for mode in ("resident", "resident again", "offloaded"):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        off = offload_activations(min_bytes=min_bytes)
        t0 = time.perf_counter()
        if mode == "offloaded":
            with off:
                loss = model(ids, labels=ids).loss
        else:
            loss = model(ids, labels=ids).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
        grads[mode] = [p.grad.detach().clone() for p in model.parameters()]
        out[mode] = {"peak_bytes_above_weights": peak, "seconds": seconds,
                     "offloaded_bytes": off.stats.bytes if mode == "offloaded" else 0}
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(grads[a], grads[b]))  # noqa: E731
    out["resident_reproducible"] = same("resident", "resident again")
    out["gradients_identical"] = same("resident", "offloaded")
    torch.use_deterministic_algorithms(False)
    return out


def _tps(r) -> str:
    return f"{r[0]:.1f}" if r[0] is not None else f"failed ({r[1]})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gpu_offload", help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    from lowbit.io.atomic import atomic_write_text
    from lowbit.offload import offload_blocks
    from lowbit.nn.surgery import module_tensors
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
        act_cfg, batch, seq, n_tokens, mib = dict(cfg), 2, 64, 8, 16
    else:
        cfg = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
        act_cfg = dict(cfg, num_hidden_layers=8)
        batch, seq, n_tokens, mib = 4, 2048, 32, 1024
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    bw = h2d_bandwidth(device, mib)
    model = make_model(cfg, device, dtype)
    ids = torch.randint(0, cfg["vocab_size"], (1, 16), device=device)
    resident = decode_both(model, ids, n_tokens, device)
    resident_tps, resident_tokens = resident["hf"]
    long_ids = torch.randint(1, cfg["vocab_size"], (1, 32 if args.quick else 1024), device=device)
    kv = kv_offload(model, long_ids, n_tokens, device)
    blocks = model.model.layers
    per_block = sum(t.numel() * t.element_size() for t in module_tensors(blocks[0]).values())
    fixed = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".layers." not in n)
    budget = fixed + (len(blocks) // 2) * per_block
    sm = offload_blocks(model, budget)
    try:
        streamed = decode_both(model, ids, n_tokens, device)
        streamed_tps, streamed_tokens = streamed["hf"]
    finally:
        sm.close()
    moved = sm.plan.bytes_moved_per_pass
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    act = activation_offload(act_cfg, device, batch, seq, min_bytes=1024 if args.quick else 1 << 20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (quick check, no GPU)"
    result = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "h2d_gb_s": bw, "model": cfg, "plan": sm.plan.describe(), "bytes_streamed_per_token": moved,
              "resident_tokens_per_s": resident_tps, "streamed_tokens_per_s": streamed_tps,
              "bound_tokens_per_s": bw * 1e9 / moved if moved else None,
              "same_tokens": resident_tokens == streamed_tokens, "activations": act,
              "kv_offload": kv, "kv_prompt_tokens": long_ids.shape[1],
              "engine": {"resident": resident["lowbit"], "streamed": streamed["lowbit"],
                         "same_tokens_as_hf": [resident["lowbit"][1] == resident_tokens,
                                               streamed["lowbit"][1] == resident_tokens]},
              "activation_model": act_cfg, "batch": batch, "seq": seq}
    peak = act["resident"]["peak_bytes_above_weights"]
    peak_off = act["offloaded"]["peak_bytes_above_weights"]
    md = (f"# Offloading on {name}\n\ntorch {torch.__version__}, {result['date']}; host-to-device "
          f"{bw:.1f} GB/s (pinned).\n\n"
          "| what | resident | streamed / offloaded | bound |\n|---|---|---|---|\n"
          f"| decode tok/s ({len(blocks)} blocks, {len(sm.plan.streamed)} streamed, "
          f"{moved / 1e6:.0f} MB per token) | {resident_tps:.1f} | {streamed_tps:.1f} | "
          f"{(bw * 1e9 / moved if moved else 0):.1f} |\n"
          f"| decode tok/s, lowbit engine (eager) | {_tps(resident['lowbit'])} | {_tps(streamed['lowbit'])} | "
          f"{(bw * 1e9 / moved if moved else 0):.1f} |\n"
          + "".join(f"| decode tok/s after {long_ids.shape[1]} prompt tokens, KV cache {b} in device memory | "
                    f"{_tps(r['device'])} | host memory: {_tps(r['host'])} (same tokens: {r['same_tokens']}) | — |\n"
                    for b, r in kv.items()) +
          f"| training step peak memory above weights, MB (batch {batch} x {seq}) | "
          f"{'—' if peak is None else f'{peak / 1e6:.0f}'} | {'—' if peak_off is None else f'{peak_off / 1e6:.0f}'} "
          f"| — |\n"
          f"| training step seconds (forward + backward) | {act['resident']['seconds']:.2f} | "
          f"{act['offloaded']['seconds']:.2f} | — |\n\n"
          f"Same greedy tokens streamed as resident: {result['same_tokens']}; gradients identical with activation "
          f"offloading: {act['gradients_identical']} ({act['offloaded']['offloaded_bytes'] / 1e6:.0f} MB moved "
          f"to the host; two resident runs identical: {act['resident_reproducible']}). lowbit's engine gives "
          f"transformers' tokens: resident {result['engine']['same_tokens_as_hf'][0]}, streamed "
          f"{result['engine']['same_tokens_as_hf'][1]}.\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2, default=str))
    print(md)
    return 0 if result["same_tokens"] and act["gradients_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
