"""Perplexity cost of a quantized KV cache at long context, and the cache's size.

Each held-out window of CTX tokens runs through the engine's prefill with attention over keys and values as
the cache returns them (quantized when kv_bits is set), so every position sees a quantized cache of all the
positions before it, exactly as in decoding.

    python benchmarks/kv_cache.py [--ctx 2048] [--max-windows 8] [--out benchmarks/results/kv_cache]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.export.atomic import atomic_write_text
from lowbit.data import load_text, token_windows
from lowbit.engine import Engine
from lowbit.eval import environment

# (bits, group of channels per scale, keys per channel over groups of this many positions or None: per token)
CONFIGS = ((None, None, None), (8, None, None), (4, None, None), (4, 32, None), (4, None, 64), (4, 32, 64),
           (4, None, 32))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="benchmarks/results/kv_cache")
    args = ap.parse_args()
    loaded = lowbit.load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    windows = token_windows(tok, load_text(None, "evaluation"), args.ctx, args.max_windows)
    base_lp = []
    rows = []
    for bits, group, key_group in CONFIGS:
        engine = Engine(model, compile=False, kv_bits=bits, kv_group_size=group, kv_key_group=key_group)
        engine.reserve(args.ctx)
        nll = kld = agree = count = 0.0
        t0 = time.perf_counter()
        for i, ids in enumerate(windows):
            with torch.no_grad():
                logits = engine.decoder(ids[None], engine.decoder.positions[:len(ids)], all_logits=True)[0, :-1]
            lp = F.log_softmax(logits.float(), -1)
            if bits is None:
                base_lp.append(lp)
            ref = base_lp[i]
            nll -= lp.gather(-1, ids[1:, None]).sum().item()
            kld += (ref.exp() * (ref - lp)).sum().item()
            agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
            count += len(ids) - 1
        head_dim = engine.decoder.blocks[0].head_dim
        rows.append({"kv_bits": bits or str(model.dtype).removeprefix("torch."),
                     "group_size": (group or head_dim) if bits else None, "key_group": key_group,
                     "ppl": math.exp(nll / count), "kld": kld / count, "top1": agree / count,
                     "cache_bytes_per_token": engine.cache.nbytes / engine.decoder.max_len,
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], file=sys.stderr, flush=True)
    base = rows[0]
    lines = [f"| KV cache | group (channels) | keys | PPL (ctx {args.ctx}) | ΔPPL | KLD vs unquantized cache | "
             "top-1 agree | cache bytes / token |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        keys = (f"per channel, groups of {r['key_group']} positions" if r["key_group"]
                else "per token" if r["group_size"] else "—")
        lines.append(f"| {r['kv_bits']} | {r['group_size'] or '—'} | {keys} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {r['kld']:.5f} | {100 * r['top1']:.2f}% | "
                     f"{r['cache_bytes_per_token']:.0f} |")
    md = (f"{len(windows)} held-out windows of {args.ctx} tokens ({int(sum(len(w) - 1 for w in windows))} "
          f"predicted), model {args.model} ({model.dtype}).\n\n" + "\n".join(lines) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"rows": rows, "ctx": args.ctx, "windows": len(windows),
                                                            **environment()}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
