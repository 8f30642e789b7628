"""The `lowbit` command. It parses arguments, calls the library, prints; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .errors import LowbitError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _base_name(source: str) -> str:
    from .models.sources import DEFAULT_MODEL
    return DEFAULT_MODEL if source == DEFAULT_MODEL else source


def cmd_quantize(args) -> int:
    from . import IntSpec, Recipe, Scheme, load_model, quantize, save_checkpoint
    from .data import calibration_samples, load_text
    from .models import arch_for

    group = args.group_size if args.group_size is not None else (-1 if args.bits == 8 else 64)
    scheme = Scheme(args.method, IntSpec(args.bits, group, not args.asym), args.kernel)
    loaded = load_model(args.model)
    blocks = arch_for(loaded.model.config).blocks
    recipe = Recipe.from_file(args.recipe, scheme, blocks) if args.recipe else Recipe.default(scheme, blocks)
    plan = recipe.plan(loaded.model)  # fail on shapes before any work
    calib = None
    from .algorithms import METHODS
    if any(METHODS[s.method][0] for s in plan.values()):
        calib = calibration_samples(loaded.tokenizer, load_text(args.calib_text, "calibration"),
                                    args.calib_samples, args.calib_seqlen, args.seed)
    model = quantize(loaded.model, recipe, calibration=calib, dtype=_DTYPES[args.dtype], progress=not args.quiet)
    out = save_checkpoint(model, loaded.tokenizer, args.out, base=_base_name(args.model), overwrite=args.overwrite,
                          extra={"settings": {k: v for k, v in vars(args).items() if k != "func"}})
    from .eval import weight_stats
    s = weight_stats(model)
    counts: dict[str, int] = {}
    for sch in plan.values():
        counts[sch.name] = counts.get(sch.name, 0) + 1
    print(f"quantized {len(plan)} Linear modules: " + ", ".join(f"{n} x{c}" for n, c in counts.items()))
    print(f"wrote {out}: {s['bytes'] / 1e6:.1f} MB, {s['bits_per_weight']:.2f} bits/weight overall, "
          f"{s['quantized_bits_per_weight']:.2f} in quantized layers; {model.lowbit['quantize_seconds']:.1f} s")
    return 0


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def cmd_eval(args) -> int:
    from . import evaluate, load_model
    from .export.atomic import atomic_write_text
    from .models.sources import is_lowbit_checkpoint, resolve_source

    loaded = load_model(args.model, kernel=args.kernel)
    record = getattr(loaded.model, "lowbit", None)
    base_src = args.base if args.base is not None else (record or {}).get("base")
    base = None
    if base_src and base_src != "none":
        if is_lowbit_checkpoint(resolve_source(base_src)):
            raise LowbitError(f"the base model must be a float model, {base_src} is a quantized checkpoint")
        base = load_model(base_src).model
    r = evaluate(loaded.model, loaded.tokenizer, base, text=args.text, ctx=args.ctx, max_windows=args.max_windows,
                 speed=not args.no_speed, progress=not args.quiet)
    r["model"] = str(args.model)
    r["base"] = base_src
    print(f"model        {args.model}")
    print(f"text         {r['text']}: {r['windows']} windows of {r['ctx']} tokens, {r['eval_tokens']} predicted")
    print(f"perplexity   {r['ppl']:.4f}")
    print(f"KLD vs base  {_fmt(r['kld'], '.5f')}   (base: {base_src or 'none'})")
    print(f"top-1 agree  {_fmt(None if r['top1'] is None else 100 * r['top1'], '.2f')}%")
    qb = r["quantized_bits_per_weight"]
    print(f"weights      {r['bytes'] / 1e6:.1f} MB stored, {r['bits_per_weight']:.3f} bits/weight"
          + (f" (quantized layers {qb:.3f} bits/weight; resident {100 * r['quantized_fp32_ratio']:.1f}% of fp32)" if qb else ""))
    if not args.no_speed:
        print(f"speed        decode {r['decode_tokens_per_s']:.1f} tok/s, prefill {r['prefill_tokens_per_s']:.0f} tok/s")
    print(f"memory       RSS {r['rss_bytes'] / 2**20:.0f} MiB, peak {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"seconds      {r['seconds']:.1f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(r, indent=2, default=str))
    return 0


def cmd_generate(args) -> int:
    from . import generate, load_model
    loaded = load_model(args.model, kernel=args.kernel)
    r = generate(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, chat=args.chat)
    print(r["text"])
    speed = r["decode_tokens_per_s"]
    print(f"[{r['new_tokens']} tokens, {r['seconds']:.2f} s, decode {_fmt(speed, '.1f')} tok/s]", file=sys.stderr)
    return 0


def _positive(x: str) -> int:
    v = int(x)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize causal LMs, measure them, run them.")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a lowbit checkpoint")
    q.add_argument("model", help='"default" (SmolLM2-135M-Instruct), a Hugging Face directory or a GGUF file')
    q.add_argument("--method", default="rtn", help="quantization method (default: rtn)")
    q.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    q.add_argument("--group-size", type=int, default=None,
                   help="columns per scale: 32, 64, 128, or -1 per channel (default: 64 for 4-bit, -1 for 8-bit)")
    q.add_argument("--asym", action="store_true", help="asymmetric (with zero points); default symmetric")
    q.add_argument("--recipe", help="TOML/JSON rules mapping module names to schemes (see lowbit.recipes)")
    q.add_argument("--kernel", default="auto", help="auto, reference, cpu-int8, cpu-int4")
    q.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES), help="dtype of unquantized parts")
    q.add_argument("--calib-text", default=None, help="calibration text: pydoc (default), a file, or hf:...")
    q.add_argument("--calib-samples", type=_positive, default=64)
    q.add_argument("--calib-seqlen", type=_positive, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, KLD and top-1 vs base, size, speed")
    e.add_argument("model", help="a lowbit checkpoint, a Hugging Face directory, a GGUF file, or default")
    e.add_argument("--text", default=None, help="evaluation text: pydoc held-out half (default), a file, or hf:...")
    e.add_argument("--ctx", type=_positive, default=512)
    e.add_argument("--max-windows", type=_positive, default=None, help="evaluate only the first N windows")
    e.add_argument("--base", default=None, help="base model for KLD/top-1 (default: the checkpoint's; none to skip)")
    e.add_argument("--kernel", default="auto")
    e.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="greedy generation with tokens/second")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--kernel", default="auto")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        return args.func(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
