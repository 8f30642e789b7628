"""The `lowbit` command. It parses arguments, calls the library, prints; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from .config import AWQ, GPTQ, MATMUL_CHOICES, METHODS, LLMInt8, SmoothQuant
from .data import CALIB_SAMPLES, CALIB_SEQLEN
from .errors import LowbitError
from .formats.intq import SUPPORTED_BITS
from .io.atomic import check_output

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_quantize(args) -> int:
    from .io.gguf_reader import shared_readers
    with shared_readers():   # a GGUF source is read by the load, the plan's byte count and the writer: parsed once
        return _quantize(args)


def _quantize(args) -> int:
    from . import quantize, save_checkpoint
    from .models import arch_for, load_model
    from .models.sources import source_name
    from .quantize import recipe_for
    from .recipes import Recipe

    if args.format == "lowbit" and str(args.out).endswith(".gguf"):
        args.format = "gguf"
    if args.format != "lowbit" and args.kernel == "auto":
        # the model is only written out in another format: the reference kernel keeps each weight as quantized,
        # where a CPU kernel's layout would be packed here and unpacked again by the writer
        args.kernel = "reference"
    scheme = _scheme_from_args(args, args.method)
    check_output(args.out, args.overwrite)
    if args.target_bpw is not None and (args.recipe or args.stream):
        raise LowbitError("--target-bpw chooses the recipe itself and needs the model in memory: drop "
                          f"{'--recipe' if args.recipe else '--stream'}")
    if args.plan_out and args.target_bpw is None:
        raise LowbitError("--plan-out needs --target-bpw")
    if args.stream:
        return _quantize_streamed(args, scheme)
    loaded = load_model(args.model)
    blocks = arch_for(loaded.model).blocks
    imatrix = None
    if args.target_bpw is not None:
        recipe, imatrix = _budget_recipe(args, loaded, scheme)
    else:
        recipe = Recipe.from_file(args.recipe, scheme, blocks) if args.recipe else recipe_for(scheme, blocks)
    plan = recipe.plan(loaded.model)  # fail on shapes before any work
    imatrix = imatrix or _imatrix_for(args, loaded)
    model = quantize(loaded.model, recipe, calibration=args.calib_text, tokenizer=loaded.tokenizer,
                     calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                     dtype=_DTYPES[args.dtype], progress=not args.quiet, imatrix=imatrix)
    if args.format != "lowbit":   # written directly in a serving engine's format
        from .export import export
        out, warns = export(loaded, args.format, args.out, overwrite=args.overwrite)
        for w in warns:
            print(f"lowbit: warning: {w}", file=sys.stderr)
    else:
        out = save_checkpoint(model, loaded.tokenizer, args.out, base=source_name(args.model),
                              overwrite=args.overwrite,
                              extra={"settings": {k: v for k, v in vars(args).items() if k != "func"}})
    from .eval import weight_stats
    s = weight_stats(model)
    counts: dict[str, int] = {}
    for sch in plan.values():
        counts[sch.name] = counts.get(sch.name, 0) + 1
    print(f"quantized {len(plan)} Linear modules: " + ", ".join(f"{n} x{c}" for n, c in counts.items()))
    unfolded = model.lowbit.get("fold_fallbacks", [])
    if unfolded:   # discovered layouts: where a scale could not be folded into the producer exactly
        scaled = any(getattr(m, "input_scale", None) is not None for m in model.modules())
        print(f"no exact fold for {len(unfolded)} Linear groups"
              + (" (their scales run inside the quantized Linears)" if scaled else "") + ": "
              + ", ".join("+".join(g) for g in unfolded[:6]) + (", ..." if len(unfolded) > 6 else ""))
    fb = model.lowbit.get("gguf_fallbacks", {})
    if fb:
        pairs: dict[str, int] = {}
        for v in fb.values():
            pairs[f"{v['requested']} -> {v['stored']}"] = pairs.get(f"{v['requested']} -> {v['stored']}", 0) + 1
        print(f"GGUF fallback (rows not a multiple of the block) for {len(fb)} Linear modules: "
              + ", ".join(f"{k} x{c}" for k, c in pairs.items()))
    if args.format == "gguf":   # the file, metadata included, per parameter: what --target-bpw budgets
        size = os.path.getsize(out)
        print(f"wrote {out}: {size / 1e6:.1f} MB, {8 * size / s['weights']:.3f} bits/weight (whole file); "
              f"{model.lowbit['quantize_seconds']:.1f} s")
    else:
        print(f"wrote {out}: {s['bytes'] / 1e6:.1f} MB, {s['bits_per_weight']:.2f} bits/weight overall, "
              f"{s['quantized_bits_per_weight']:.2f} in quantized layers; {model.lowbit['quantize_seconds']:.1f} s")
    return 0


def cmd_export(args) -> int:
    from .export import export
    out, warns = export(args.checkpoint, args.format, args.out, overwrite=args.overwrite, tp=args.tp)
    for w in warns:
        print(f"lowbit: warning: {w}", file=sys.stderr)
    print(f"wrote {out} ({args.format})")
    return 0


def _budget_recipe(args, loaded, scheme):
    """--target-bpw: measure every tensor's sensitivity to every candidate format, allocate under the budget,
    print the plan (and write it with --plan-out). RTN then uses calibration importance, as the measurement did."""
    from .config import RTN
    from .data import calibration_ids
    from .models import arch_for
    from .models.importance import ImportanceHooks, collect_importance
    from .plan import candidate_formats, fisher_diagonal, measure_sensitivity, planned_tensors, write_rules
    from .recipes import Recipe

    gguf_out = args.format == "gguf"
    formats = candidate_formats(args.formats or ("gguf" if gguf_out else "lowbit"))
    if gguf_out and any(f.kind != "gguf" for f in formats):
        raise LowbitError("a GGUF output holds only GGUF types: use --formats gguf or a list of GGUF types")
    if isinstance(scheme, RTN):
        scheme = scheme.replace(importance=True)
    model = loaded.model
    start = time.perf_counter()
    ids = calibration_ids(args.calib_text, loaded.tokenizer, args.calib_samples, args.calib_seqlen, args.seed)
    names = planned_tensors(model, arch_for(model))
    fisher_ids = ids[: args.fisher_samples]
    matmul = args.matmul or "auto"
    if args.imatrix and os.path.exists(args.imatrix):
        imp = _imatrix_for(args, loaded)
        fisher = fisher_diagonal(model, fisher_ids, names, seed=args.seed, progress=not args.quiet, matmul=matmul)
    else:
        # importance over all calibration windows, the Fisher pass's forwards counting for its first ones
        hooks = ImportanceHooks(model)
        with hooks:
            fisher = fisher_diagonal(model, fisher_ids, names, seed=args.seed, progress=not args.quiet,
                                     matmul=matmul)
        imp = collect_importance(model, ids[len(fisher_ids):], into=hooks, progress=not args.quiet, matmul=matmul)
        if args.imatrix:
            _save_imatrix(args.imatrix, imp)
    overhead, norm_bytes = 0, 2
    if gguf_out:
        from .export.gguf import gguf_overhead_bytes
        overhead, norm_bytes = gguf_overhead_bytes(model, names, loaded.source), 4
    sens = measure_sensitivity(model, fisher_ids, formats=formats, overhead_bytes=overhead, norm_bytes=norm_bytes,
                               importance=imp, seed=args.seed, progress=not args.quiet, fisher=fisher)
    alloc = sens.allocate(args.target_bpw)
    print(f"plan for {args.target_bpw:g} bits/weight: {alloc.bits_per_weight:.3f} planned "
          f"({alloc.total_bytes / 1e6:.2f} MB), predicted KLD {alloc.predicted_kld:.4f}, measured in "
          f"{time.perf_counter() - start:.0f} s")
    print("  format   tensors      MB   predicted KLD")
    for label, n, nbytes, loss in alloc.summary():
        print(f"  {label:<8} {n:>7} {nbytes / 1e6:>7.2f}   {loss:.5f}")
    if args.plan_out:
        write_rules(args.plan_out, alloc.rules(), method=scheme.method)
        print(f"wrote {args.plan_out}")
    return Recipe.from_rules(alloc.rules(), scheme, arch_for(model).blocks), imp


def _imatrix_for(args, loaded):
    """--imatrix FILE: read it if it exists, else measure importance on the calibration text and write it."""
    if not args.imatrix:
        return None
    from .data import calibration_ids
    from .models.importance import collect_importance, load_importance
    if os.path.exists(args.imatrix):
        return load_importance(args.imatrix)
    ids = calibration_ids(args.calib_text, loaded.tokenizer, args.calib_samples, args.calib_seqlen, args.seed)
    imp = collect_importance(loaded.model, ids, matmul=args.matmul or "auto")
    _save_imatrix(args.imatrix, imp)
    return imp


def _save_imatrix(path, imp) -> None:
    imp.save(path)
    print(f"wrote {path}: importance of {len(imp.values)} Linear modules over {imp.tokens} tokens")


def cmd_qat(args) -> int:
    from pathlib import Path

    from . import save
    from .config import RTN
    from .models.sources import source_name
    from .train import qat

    config = RTN(bits=args.bits, group_size=args.group_size, symmetric=not args.asym, kernel=args.kernel)
    check_output(args.out, args.overwrite or args.resume)
    state = Path(str(args.out).rstrip("/") + ".qat-state.pt")
    if args.resume and not state.exists():
        raise LowbitError(f"--resume: no training state {state} to continue from")
    loaded = qat(args.model, config, init=args.init, steps=args.steps, lr=args.lr, batch=args.batch,
                 seqlen=args.seqlen, text=args.text, windows=args.windows, generated=args.generated, seed=args.seed,
                 checkpointing=args.checkpointing, train=args.train, rank=args.rank, state=state,
                 save_every=args.save_every, resume=args.resume, kernel=args.kernel, progress=not args.quiet)
    out = save(loaded, args.out, base=source_name(args.model), overwrite=args.overwrite or args.resume)
    state.unlink(missing_ok=True)
    losses = loaded.model.lowbit["qat"]["losses"]
    print(f"trained {args.steps} steps: distillation loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote {out}")
    return 0


def _quantize_streamed(args, scheme) -> int:
    from .models import arch_for
    from .models.sources import read_config, resolve_source, source_name
    from .offload import quantize_streamed
    from .recipes import Recipe
    path = resolve_source(args.model)
    recipe = Recipe.from_file(args.recipe, scheme, arch_for(read_config(path)).blocks) if args.recipe else scheme
    kw = dict(calibration=args.calib_text, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
              seed=args.seed, dtype=_DTYPES[args.dtype], base=source_name(args.model), progress=not args.quiet)
    if args.format == "lowbit":
        out = quantize_streamed(path, args.out, recipe, overwrite=args.overwrite, **kw)
        print(f"wrote {out} block by block ({len(list(out.glob('model-block-*.safetensors')))} block shards)")
        return 0
    # another format: stream into a lowbit checkpoint beside --out, then export it (packed, it fits in memory
    # where the float model did not); the intermediate checkpoint is removed either way
    import shutil
    import tempfile
    from pathlib import Path

    from .export import export
    tmp = Path(tempfile.mkdtemp(prefix=".lowbit-stream-", dir=Path(args.out).resolve().parent))
    try:
        ckpt = quantize_streamed(path, tmp / "ckpt", recipe, **kw)
        out, warns = export(ckpt, args.format, args.out, overwrite=args.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for w in warns:
        print(f"lowbit: warning: {w}", file=sys.stderr)
    print(f"wrote {out} ({args.format}), quantized block by block")
    return 0


# command-line option -> the configuration field it sets (None: not given, the configuration's default holds)
_OPTION_ARGS = {
    "gptq": {"act_order": "act_order", "damp": "damp", "block_size": "block_size",
             "true_sequential": "true_sequential", "weighted_grid": "weighted_grid", "matmul": "matmul"},
    "awq": {"n_grid": "awq_grid", "search_samples": "awq_search_samples", "search_dtype": "awq_search_dtype",
            "clip": "clip", "matmul": "matmul"},
    "learned": {"init": "learned_init", "iters": "learned_iters", "batch": "learned_batch", "lr": "learned_lr",
                "optimizer": "learned_optimizer"},
    "w8a8-smooth": {"alpha": "alpha", "act_granularity": "act_granularity"},
    "llm-int8": {"threshold": "threshold", "outlier_fraction": "outlier_fraction"},
    "fp8": {"act": "fp8_act"},
    "fp8-e5m2": {"act": "fp8_act"},
}
_FLAGS = {"clip": "--no-clip", "true_sequential": "--no-true-sequential"}   # dest -> its flag, where they differ


def _scheme_from_args(args, method: str):
    from .config import config_for
    from .formats import IntSpec
    from .config import fixes_format
    from .formats import GGUFSpec
    options = _method_options(args, method)
    if getattr(args, "imatrix", None) and method == "rtn":
        options["importance"] = True
    gguf = getattr(args, "gguf_type", None)
    if gguf is not None and not fixes_format(method):
        if args.bits != 4 or args.group_size is not None or args.asym:
            raise LowbitError(f"--gguf-type {gguf} fixes the format: drop --bits, --group-size and --asym")
        return config_for(method, GGUFSpec(gguf), args.kernel, options)
    group = args.group_size if args.group_size is not None else (-1 if args.bits == 8 else 64)
    return config_for(method, IntSpec(args.bits, group, not args.asym), args.kernel, options)


def _method_options(args, method: str) -> dict:
    """The method options given on the command line; an option given for a method that has no such setting
    is an error (config_for names it), never silently dropped."""
    own = _OPTION_ARGS.get(method, {})
    every = {dest for fields in _OPTION_ARGS.values() for dest in fields.values()}
    elsewhere = {"matmul"} if _measures_statistics(args) else set()   # the plan's or imatrix's passes take it
    stray = sorted(_FLAGS.get(d, "--" + d.replace("_", "-")) for d in every - set(own.values()) - elsewhere
                   if getattr(args, d, None) is not None)
    if stray:
        raise LowbitError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to --method {method}")
    return {field: getattr(args, dest) for field, dest in own.items() if getattr(args, dest, None) is not None}


def _measures_statistics(args) -> bool:
    """Whether the command runs the float model over the calibration text for a plan (--target-bpw) or an
    imatrix (--imatrix): passes that --matmul applies to whatever the method."""
    return getattr(args, "target_bpw", None) is not None or bool(getattr(args, "imatrix", None))


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def cmd_eval(args) -> int:
    from . import evaluate, load_model
    from .io.atomic import atomic_write_text

    if args.json:
        check_output(args.json, overwrite=True)   # an unwritable --json is found before minutes of evaluation
    loaded = load_model(args.model, kernel=args.kernel)
    r = evaluate(loaded, base=args.base or "recorded", text=args.text, ctx=args.ctx, max_windows=args.max_windows,
                 speed=not args.no_speed, progress=not args.quiet, engine=args.engine, arithmetic=args.arithmetic)
    r["model"] = str(args.model)
    base_src = r["base"]
    print(f"model        {args.model}")
    print(f"text         {r['text']}: {r['windows']} windows of {r['ctx']} tokens, {r['eval_tokens']} predicted")
    print(f"perplexity   {r['ppl']:.4f}")
    passes = {"reused": "its pass over these windows reused from an earlier run, window 0 checked",
              "kept": "its pass kept for the next run", "off": "its pass not kept"}
    print(f"KLD vs base  {_fmt(r['kld'], '.5f')}   (base: {base_src or 'none'}"
          + (f"; {passes[r['base_pass']]})" if r.get("base_pass") else ")"))
    print(f"top-1 agree  {_fmt(None if r['top1'] is None else 100 * r['top1'], '.2f')}%")
    qb = r["quantized_bits_per_weight"]
    print(f"weights      {r['bytes'] / 1e6:.1f} MB stored, {r['bits_per_weight']:.3f} bits/weight"
          + (f" (quantized layers {qb:.3f} bits/weight; resident {100 * r['quantized_fp32_ratio']:.1f}% of fp32)" if qb else ""))
    if str(args.model).endswith(".gguf") and os.path.isfile(args.model):
        # transformers dequantizes a GGUF file to float on load, so what was evaluated holds 32 bits per weight;
        # the file's own size is what a user compares (llama.cpp runs the file as it is)
        size = os.path.getsize(args.model)
        r["file_bytes"], r["file_bits_per_weight"] = size, 8 * size / r["weights"]
        print(f"file         {size / 1e6:.1f} MB, {r['file_bits_per_weight']:.3f} bits/weight (loaded dequantized to float)")
    if not args.no_speed:
        print(f"speed        decode {r['decode_tokens_per_s']:.1f} tok/s, prefill {r['prefill_tokens_per_s']:.0f} tok/s"
              f" ({r['speed_engine']} engine)")
    print(f"memory       RSS {r['rss_bytes'] / 2**20:.0f} MiB, peak {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"seconds      {r['seconds']:.1f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(r, indent=2, default=str))
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LowbitError(f"{what} must be comma-separated integers, got '{text}'") from None


def cmd_compare(args) -> int:
    from .comparison import compare, parse_method, scheme_grid
    from .config import METHODS
    from .eval.report import markdown_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if parse_method(m)[0] not in METHODS]
    if unknown or not methods:
        raise LowbitError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(METHODS)}")
    names = {parse_method(m)[0] for m in methods}
    options = {name: {f: getattr(args, d) for f, d in _OPTION_ARGS.get(name, {}).items()
                      if getattr(args, d, None) is not None} for name in names}
    schemes = scheme_grid(methods, _int_list(args.bits, "--bits"), _int_list(args.group_size, "--group-size"),
                          not args.asym, options, args.kernel)
    result = compare(args.model, schemes, args.out, calib_text=args.calib_text, calib_samples=args.calib_samples,
                     calib_seqlen=args.calib_seqlen, seed=args.seed, text=args.text, ctx=args.ctx,
                     max_windows=args.max_windows, speed=not args.no_speed, progress=not args.quiet,
                     overwrite=args.overwrite, engine=args.engine)
    print(markdown_table(result["rows"]))
    print(f"wrote {args.out}/report.md, report.json, tradeoff.png and one checkpoint per method")
    return 0


def cmd_outliers(args) -> int:
    from pathlib import Path

    from . import load_model
    from .data import calibration_samples, load_text
    from .eval.outliers import analyze_outliers, write_outliers

    if not args.threshold > 0:
        raise LowbitError(f"threshold must be positive, got {args.threshold}")
    check_output(args.out, overwrite=True)
    loaded = load_model(args.model)
    samples = calibration_samples(loaded.tokenizer, load_text(args.text, "calibration"), args.samples, args.seqlen, 0)
    r = analyze_outliers(loaded.model, samples, args.threshold)
    write_outliers(r, Path(args.out))
    print(f"largest |x| {r['max_abs']:.2f}; {r['groups_with_outliers']} of {r['groups']} Linear inputs have values "
          f"above {args.threshold} ({r['tokens']} tokens)")
    print("| input (block.group) | max abs | dims > thr | tokens with one | int8 error of normal values: with outliers / without |")
    print("|---|---|---|---|---|")
    worst = sorted(r["layers"].items(), key=lambda kv: -kv[1]["max_abs"])[: args.show]
    for key, v in worst:
        print(f"| {key} | {v['max_abs']:.2f} | {v['dims_over_threshold']}/{v['dims_total']} | "
              f"{100 * v['tokens_with_outlier']:.2f}% | {v['int8_rel_error_normal_values']:.4f} / "
              f"{v['int8_rel_error_normal_values_without_outliers']:.4f} |")
    for kind, dims in r["recurring_top_dims"].items():
        print(f"recurring top dims in {kind}: " + ", ".join(f"{d['dim']} ({d['layers']}/{d['of']})" for d in dims[:6]))
    print(f"wrote {args.out}/outliers.json and outliers.png")
    return 0


def cmd_generate(args) -> int:
    from . import generate
    from .offload import load_with_budget
    engine = args.engine
    if args.offload_dir is not None and args.max_memory is None:
        raise LowbitError("--offload-dir needs --max-memory")
    loaded, streamed = load_with_budget(args.model, args.max_memory, args.offload_dir, args.kernel, args.gguf)
    kept = getattr(loaded.model, "lowbit", {}).get("kept_float")   # set by a GGUF file loaded as blocks
    if kept:
        print(f"GGUF blocks: {len(kept)} weights stay float ({', '.join(sorted(set(kept.values())))})",
              file=sys.stderr)
    if streamed is not None:
        print(streamed.plan.describe(), file=sys.stderr)
        if streamed.plan.streamed and engine in ("auto", "compiled", "aot"):
            print("streaming blocks: the engine runs eagerly (weights are swapped in around each block)",
                  file=sys.stderr)
    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:   # tokens are printed as they come; the decode step compiles in the background meanwhile
        r = generate(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, chat=args.chat,
                     engine=engine, kv_bits=args.kv_bits, kv_offload=args.kv_offload, kv_keys=args.kv_keys,
                     stream=None if engine == "hf" else show, background=args.background,
                     attention=args.attention, dense=args.dense)
    finally:
        if streamed is not None:
            streamed.close(remove_store=not args.keep_offload)
    print(r["text"] if engine == "hf" else "")
    speed = r["decode_tokens_per_s"]
    if r.get("eager_tokens"):
        rate = r["compiled_tokens_per_s"]
        done = "still compiling" if r["compile_seconds"] is None else f"compiled in {r['compile_seconds']:.1f} s"
        how = (f"{r['eager_tokens']} tokens eager while the step compiled ({done}), "
               f"then {_fmt(rate, '.1f')} tok/s compiled" if rate else f"all eager while the step compiled ({done})")
        print(f"[{r['new_tokens']} tokens, {r['seconds']:.2f} s, first after {r['prefill_seconds']:.2f} s; {how}]",
              file=sys.stderr)
        if r["compile_seconds"] is None:
            print("[finishing the compilation for the next run; Ctrl-C skips it]", file=sys.stderr)
            from .eval.speed import wait_compiled
            wait_compiled(loaded.model)
        return 0
    compiled = f", compiled in {r['compile_seconds']:.1f} s" if r.get("compile_seconds") else ""
    print(f"[{r['new_tokens']} tokens, {r['seconds']:.2f} s, decode {_fmt(speed, '.1f')} tok/s, "
          f"{r['engine']} engine{compiled}]", file=sys.stderr)
    return 0


def _positive(x: str) -> int:
    v = int(x)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="auto", choices=["auto", "compiled", "aot", "eager", "hf"],
                   help="generation path: lowbit's engine with its decode step compiled ahead of time by AOTInductor "
                        "(aot: its package cached on disk by graph) or by torch.compile (compiled), or eager, or "
                        "transformers' generate; auto (default): aot on a CPU, compiled on a GPU or with --kv-bits "
                        "or --kv-offload")


def _add_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, choices=list(SUPPORTED_BITS))
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per scale: 32, 64, 128, or -1 per channel (default: 64, or -1 for 8-bit)")
    p.add_argument("--asym", action="store_true", help="asymmetric (with zero points); default symmetric")
    p.add_argument("--kernel", default="auto", help="auto, reference, cpu-int8, cpu-int4, native-int4, native-int8 "
                   "(auto: the fastest for the device; quantize --format X: reference, nothing runs the model)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("calibration (gptq, awq)")
    c.add_argument("--calib-text", default=None, help="calibration text: pydoc (default: its first half), a file, or hf:...")
    c.add_argument("--calib-samples", type=_positive, default=CALIB_SAMPLES,
                   help=f"number of calibration windows (default {CALIB_SAMPLES})")
    c.add_argument("--calib-seqlen", type=_positive, default=CALIB_SEQLEN,
                   help=f"tokens per calibration window (default {CALIB_SEQLEN})")
    c.add_argument("--seed", type=int, default=0, help="seed for choosing the calibration windows")
    c.add_argument("--matmul", default=None, choices=MATMUL_CHOICES,
                   help=f"gptq, awq, and the passes of --target-bpw and --imatrix: the calibration forwards' float32 "
                        f"products ({GPTQ.matmul}: from bfloat16-rounded inputs where the CPU multiplies bfloat16 "
                        "natively (without AMX oneDNN computes them exactly, faster than MKL), else exact)")
    g = p.add_argument_group("gptq")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help=f"columns by decreasing Hessian diagonal, static groups (default: {GPTQ.act_order})")
    g.add_argument("--damp", type=_fraction, default=None,
                   help=f"diagonal dampening, fraction of its mean ({GPTQ.damp})")
    g.add_argument("--weighted-grid", action=argparse.BooleanOptionalAction, default=None,
                   help=f"fit each group's scales weighting its columns by the Hessian's diagonal "
                        f"(default: {GPTQ.weighted_grid})")
    g.add_argument("--block-size", type=_positive, default=None, help=f"columns per lazy update block ({GPTQ.block_size})")
    g.add_argument("--no-true-sequential", dest="true_sequential", action="store_const", const=False, default=None,
                   help="all Hessians from the unquantized block")
    a = p.add_argument_group("awq")
    a.add_argument("--awq-grid", type=_positive, default=None,
                   help=f"grid points for the scale and clip searches ({AWQ.n_grid})")
    a.add_argument("--awq-search-samples", type=_positive, default=None,
                   help=f"calibration windows used in the scale search ({AWQ.search_samples})")
    a.add_argument("--awq-search-dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help=f"precision of the scale search's forwards ({AWQ.search_dtype}: float16 where the CPU "
                        "multiplies it natively, else bfloat16 where its products are bfloat16 on AMX, else "
                        "float32)")
    a.add_argument("--no-clip", dest="clip", action="store_const", const=False, default=None,
                   help="skip the clipping search")
    r = p.add_argument_group("learned (learned rounding per block)")
    r.add_argument("--learned-init", default=None, choices=["rtn", "gptq", "awq"], help="start from (rtn)")
    r.add_argument("--learned-iters", type=_positive, default=None, help="update steps per block (20)")
    r.add_argument("--learned-batch", type=_positive, default=None, help="calibration windows per step (2)")
    r.add_argument("--learned-lr", type=float, default=None, help="learning rate (default 1/iters)")
    r.add_argument("--learned-optimizer", default=None, choices=["sign", "adam"], help="signed gradient (sign) or adam")
    e = p.add_argument_group("8-bit family (w8a8-naive, w8a8-smooth, llm-int8, fp8, fp8-e5m2)")
    e.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength (default: searched)")
    e.add_argument("--act-granularity", default=None, choices=["token", "tensor"],
                   help=f"w8a8-smooth activation scales: per-token dynamic or per-tensor static "
                        f"(default {SmoothQuant.act_granularity})")
    e.add_argument("--threshold", type=float, default=None, help=f"llm-int8 outlier threshold ({LLMInt8.threshold})")
    e.add_argument("--outlier-fraction", type=float, default=None,
                   help="llm-int8: fix the outlier set from calibration as this top fraction of dimensions")
    e.add_argument("--fp8-act", action="store_const", const="fp8", default=None,
                   help="fp8: also FP8 activations (per-token dynamic)")


def _fraction(x: str) -> float:
    v = float(x)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    """Argument errors in the same one-line form as every other error (argparse would print the usage too)."""

    def error(self, message: str):
        command = self.prog.removeprefix("lowbit").strip()   # "quantize" for a subcommand's parser
        self.exit(2, f"lowbit: error: {command + ': ' if command else ''}{message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="Quantize causal LMs, measure them, run them.")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from .export import EXPORTERS   # the formats serving engines load, by name
    export_formats = list(EXPORTERS)

    q = sub.add_parser("quantize", help="quantize a model and write a lowbit checkpoint")
    q.add_argument("model", help='"default" (SmolLM2-135M-Instruct), a Hugging Face directory or a GGUF file')
    q.add_argument("--method", default="rtn", choices=list(METHODS), help="quantization method (default: rtn)")
    _add_format_args(q)
    _add_method_args(q)
    q.add_argument("--recipe", help="TOML/JSON rules mapping module names to schemes (see lowbit.recipes)")
    q.add_argument("--gguf-type", default=None, metavar="TYPE",
                   help="store weights as a GGUF block type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K) "
                        "instead of --bits/--group-size")
    q.add_argument("--imatrix", default=None, metavar="FILE",
                   help="input-channel importance: read FILE if it exists, else measure it on the calibration "
                        "text and write it (rtn then uses the importance-weighted search)")
    q.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES), help="dtype of unquantized parts")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--stream", action="store_true",
                   help="read one block at a time from a Hugging Face safetensors directory and write the "
                        "checkpoint block by block (for models larger than memory)")
    b = q.add_argument_group("size budget")
    b.add_argument("--target-bpw", type=float, default=None, metavar="X",
                   help="choose a format per tensor (embedding included) so that the whole output takes at most X "
                        "bits per parameter, the most sensitive tensors getting the most bits (see lowbit.plan)")
    b.add_argument("--formats", default=None,
                   help="candidate formats for --target-bpw: gguf (default for a .gguf output), lowbit (default "
                        "otherwise), or a comma-separated list such as Q4_K,Q5_0,Q8_0 or int4_g64_asym")
    b.add_argument("--plan-out", default=None, metavar="FILE",
                   help="write the chosen plan as an editable recipe (TOML, or JSON by suffix)")
    b.add_argument("--fisher-samples", type=_positive, default=8,
                   help="calibration windows for the sensitivity measurement (default 8; 16 gave the same plan "
                        "quality on the default model, in twice the time)")
    q.add_argument("--format", default="lowbit", choices=["lowbit", *export_formats],
                   help="checkpoint format of --out: lowbit (default) or a serving engine's (see lowbit export)")
    q.set_defaults(func=cmd_quantize)

    x = sub.add_parser("export", help="write a lowbit checkpoint as compressed-tensors, GPTQ or AWQ for serving")
    x.add_argument("checkpoint", help="a lowbit checkpoint directory")
    x.add_argument("--format", required=True, choices=export_formats)
    x.add_argument("--out", required=True, help="output Hugging Face model directory")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--tp", type=_positive, default=None,
                   help="warn about layers that will not split across N GPUs or fall off the engines' fast kernels")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="perplexity, KLD and top-1 vs base, size, speed")
    e.add_argument("model", help="a lowbit checkpoint, a Hugging Face directory, a GGUF file, or default")
    e.add_argument("--text", default=None, help="evaluation text: pydoc held-out half (default), a file, or hf:...")
    e.add_argument("--ctx", type=_positive, default=512)
    e.add_argument("--max-windows", type=_positive, default=None, help="evaluate only the first N windows")
    e.add_argument("--base", default=None, help="base model for KLD/top-1 (default: the checkpoint's; none to skip)")
    e.add_argument("--kernel", default="auto")
    e.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    e.add_argument("--arithmetic", choices=("torch", "llama.cpp"), default="torch",
                   help="llama.cpp: measure quality as llama.cpp's CPU backend computes the model's GGUF file "
                        "(activations rounded per weight type, f16 KV cache; float32 otherwise)")
    _add_engine_arg(e)
    e.add_argument("--json", help="also write the results to this JSON file")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="several methods on the same data: report.md, report.json, tradeoff.png")
    c.add_argument("model")
    c.add_argument("--methods", default="rtn,gptq,awq",
                   help="comma-separated methods, each optionally NAME:key=value+key=value "
                        "(e.g. fp8:act=fp8, llm-int8:outlier_fraction=0.01); default rtn,gptq,awq")
    c.add_argument("--bits", default="4", help="comma-separated bit widths, each run with every method (default 4)")
    c.add_argument("--group-size", default="64", help="comma-separated group sizes, -1 = per channel (default 64)")
    c.add_argument("--asym", action="store_true", help="asymmetric (with zero points)")
    c.add_argument("--kernel", default="auto")
    _add_method_args(c)
    c.add_argument("--text", default=None, help="evaluation text (default: pydoc held-out half)")
    c.add_argument("--ctx", type=_positive, default=512)
    c.add_argument("--max-windows", type=_positive, default=None)
    c.add_argument("--no-speed", action="store_true")
    _add_engine_arg(c)
    c.add_argument("--out", required=True, help="directory for the report and one checkpoint per method")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_compare)

    o = sub.add_parser("outliers", help="activation outliers per Linear input: JSON and heatmap")
    o.add_argument("model")
    o.add_argument("--text", default=None, help="text (default: pydoc calibration half)")
    o.add_argument("--samples", type=_positive, default=16)
    o.add_argument("--seqlen", type=_positive, default=512)
    o.add_argument("--threshold", type=float, default=LLMInt8.threshold)
    o.add_argument("--show", type=_positive, default=12, help="rows printed (largest max |x| first)")
    o.add_argument("--out", required=True)
    o.set_defaults(func=cmd_outliers)

    t = sub.add_parser("qat", help="quantization-aware training by distillation; writes a lowbit checkpoint")
    t.add_argument("model", help='"default", a Hugging Face directory or a GGUF file')
    t.add_argument("--bits", type=int, default=4, choices=list(SUPPORTED_BITS))
    t.add_argument("--group-size", type=int, default=64, help="columns per scale group; -1 = per channel")
    t.add_argument("--asym", action="store_true", help="asymmetric (with zero points); default symmetric")
    t.add_argument("--init", default="rtn",
                   help="start from: rtn (default), gptq, awq, learned, or a lowbit checkpoint quantized from MODEL")
    t.add_argument("--steps", type=_positive, required=True)
    t.add_argument("--train", default="scales", choices=["scales", "weights", "lora"],
                   help="what trains: group scales with the codes frozen (default), latent weights and ranges "
                        "(full fine-tuning), or low-rank adapters and ranges, merged before rounding")
    t.add_argument("--rank", type=_positive, default=16, help="the adapters' rank with --train lora")
    t.add_argument("--lr", type=float, default=None, help="Adam's first learning rate, decaying linearly to 0 "
                   "(default: 1e-4 training scales or adapters, 1e-5 training weights)")
    t.add_argument("--batch", type=_positive, default=1, help="windows per step")
    t.add_argument("--seqlen", type=_positive, default=256, help="tokens per window")
    t.add_argument("--text", default=None, help="training text: pydoc (default: its calibration half), a file, or hf:...")
    t.add_argument("--windows", type=_positive, default=CALIB_SAMPLES, help="windows cut from the text")
    t.add_argument("--generated", type=int, default=0, help="extra windows sampled from the float model itself")
    t.add_argument("--save-every", type=_positive, default=25, help="steps between training-state checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from OUT.qat-state.pt")
    t.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep activations instead of recomputing each block in the backward pass")
    t.add_argument("--kernel", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="output checkpoint directory")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_qat)

    g = sub.add_parser("generate", help="greedy generation with tokens/second")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--kernel", default="auto")
    g.add_argument("--gguf", choices=["blocks", "float"], default="blocks",
                   help="a GGUF file's quantized weights run as stored, on lowbit's kernels (blocks, the default), "
                        "or dequantized to float32 (as `lowbit eval` measures quality)")
    g.add_argument("--wait-compile", dest="background", action="store_false",
                   help="compile the decode step before the first token (for timing) instead of decoding eagerly "
                        "while it compiles in the background")
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="weight budget (e.g. 300MB, 2GB): decoder blocks that do not fit are streamed, the next "
                        "one read while the current one computes")
    g.add_argument("--offload-dir", default=None,
                   help="stream blocks from shards written here (default: RAM); a directory an earlier run wrote "
                        "for the same model is reused, one for another model replaced")
    g.add_argument("--keep-offload", action="store_true", help="keep the offload directory at exit (for the next run)")
    g.add_argument("--kv-bits", type=int, choices=[8, 4], default=None,
                   help="keep the KV cache in INT8 or INT4 (values per head, position and 64-channel group; keys "
                        "the same for INT8, per channel over 64 positions for INT4: see --kv-keys)")
    g.add_argument("--kv-keys", choices=["auto", "channel", "token"], default="auto",
                   help="key scales per channel over groups of 64 positions (KIVI) or per token like values; "
                        "auto: per channel for INT4")
    g.add_argument("--kv-offload", action="store_true",
                   help="keep the KV cache in host memory, one layer brought back at a time (runs eagerly)")
    g.add_argument("--attention", choices=["auto", "native", "reference"], default="auto",
                   help="a decoded token's attention: lowbit's CPU kernel (native: float32 arithmetic from the "
                        "cache), or the model's own call (reference: greedy tokens bit-identical to transformers'); "
                        "auto (default): native on a CPU")
    g.add_argument("--dense", choices=["auto", "native", "reference"], default="auto",
                   help="a decoded token's matmuls with unquantized 16-bit weights (a bfloat16 lm_head, a bfloat16 "
                        "model's Linears): lowbit's CPU kernel (native: float32 sums of exact products), or the "
                        "model's own Linears (reference; with --attention reference, greedy tokens bit-identical "
                        "to transformers'); auto (default): native on a CPU")
    _add_engine_arg(g)
    g.set_defaults(func=cmd_generate)
    return p


# a command given a memory budget (offloading, streaming) keeps glibc's allocator, which unmaps large blocks as
# they are freed: a block kept for reuse would count against the budget until the next trim
_MEMORY_FLAGS = ("--max-memory", "--stream")


def command() -> int:
    """The `lowbit` command: `main` in a process that keeps the memory it frees (heap.keep_freed_memory), unless
    the command has a memory budget. A library call, or a test calling `main`, leaves the allocator as it is."""
    from .heap import keep_freed_memory
    budget = any(a == f or a.startswith(f + "=") for a in sys.argv[1:] for f in _MEMORY_FLAGS)
    try:
        if not budget:
            keep_freed_memory()
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return main()


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure a user can meet ends in one line `lowbit: error: ...` and exit status 2:
    lowbit's own errors, and the operating system's (a full disk, a missing permission, an unreadable file).
    Anything else is a bug in lowbit: one line saying so, and the traceback with --debug."""
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        return args.func(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, MemoryError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"lowbit: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (the boundary: nothing escapes as a bare traceback)
        if args.debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"lowbit: error: unexpected {type(e).__name__}: {first} (a bug in lowbit: please report it with the "
              "command and the output of --debug)", file=sys.stderr)
        return 2


def _os_error(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, UnicodeDecodeError):
        return f"cannot decode text as {e.encoding}: {e.reason}"
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"


if __name__ == "__main__":
    sys.exit(command())
