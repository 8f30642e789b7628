"""Decode and prefill speed of lowbit's engine against transformers and llama.cpp, with the bandwidth bound.

Same machine, same run, same model and prompt for every row:
  - transformers eager `generate`, float32 and bfloat16 (the reference path);
  - lowbit's engine (`--engine`, default auto: the decode step `lowbit generate` runs, compiled ahead of time
    on a CPU) on float32, bfloat16, INT8 and INT4 models, with the lm_head kept in bfloat16 (lowbit's default
    recipe) and with the lm_head quantized too (as llama.cpp does); the quantized models' other parts (norms,
    embedding) and so their activations and KV cache are bfloat16, which `lowbit quantize` casts them to by
    default, whether the weights were quantized from the float32 model or from its bfloat16 copy;
  - llama.cpp with the shipped GGUF requantized to Q8_0, Q4_0 and Q4_K_M: natively with `--llama-bench PATH`
    (its own tg128 / pp512 benchmark, no Python in its loop; benchmarks/build_llama_bench.sh builds it), or
    else through llama-cpp-python (Q8_0 and Q4_0, one `eval` per token); with llama-bench, lowbit's engine on
    each of those very files as well (their blocks kept as stored: the same bytes on both engines).
Each lowbit row also checks that its 64 greedy tokens equal transformers' generate on the same model: with the
engine as timed, and with the reference's arithmetic (`Engine(attention="reference", dense="reference")`, eager):
the timed engine runs a decoded token's attention and its matmuls with bfloat16 weights on lowbit's kernels,
whose float32 arithmetic agrees with PyTorch's to the model dtype's rounding, so where the model is near
a tie between two tokens it may pick the other one. `--dense-reference` adds each row that keeps bfloat16
weights (the bf16 model, the bf16 lm_heads) once more with PyTorch's matmuls for them.

The bound: a decode step must read every weight it multiplies once (the whole tied embedding too, as the
lm_head). Bytes read per token over the measured memory bandwidth is the fastest any engine can decode.

    python benchmarks/decode_engine.py --llama-bench "$(bash benchmarks/build_llama_bench.sh)"   # full run
    python benchmarks/decode_engine.py                  # full run through llama-cpp-python (about 10 minutes)
    python benchmarks/decode_engine.py --quick --out DIR  # tiny random model, seconds: keeps the script alive
    python benchmarks/decode_engine.py --formats Q4_0,Q8_0,int5 --out benchmarks/results/decode_formats
                                  # formats on their native kernels and on the reference kernel, lowbit rows only
    python benchmarks/decode_engine.py --only auto,bf16 --no-llamacpp --out DIR
                                  # the quantized rows from the float32 model and from its bfloat16 copy
    python benchmarks/decode_engine.py --formats Q5_0,Q5_0:bytes --kernels auto --out DIR
                                  # 5-7-bit codes packed (the default) and a byte each, native kernels only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from transformers import GenerationConfig

import lowbit
from lowbit.export.atomic import atomic_write_text
from lowbit.formats import GGUFSpec
from lowbit.kernels import native_int8
from lowbit.engine import Engine
from lowbit.eval import decode_speed, environment, prefill_speed
from lowbit.eval.speed import engine_for
from lowbit.eval.system import memory_bandwidth
from lowbit.kernels import native

PROMPT = "The history of the Python language"
DENSE_REFERENCE = "bf16 weights through PyTorch's matmul (dense reference)"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every parameter and buffer of the model once, except the embedding
    table, of which one row is read (unless it is tied to the lm_head, which reads all of it). A quantized
    embedding (QuantEmbedding) counts its stored tensors the same way."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    table = list(emb.parameters(recurse=False)) + list(emb.buffers(recurse=False))
    read_by_head = {t.data_ptr() for t in (list(head.parameters()) + list(head.buffers()))} if head is not None else set()
    tied = any(t.data_ptr() in read_by_head for t in table)
    skip = set() if tied else {t.data_ptr() for t in table}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.data_ptr() in skip:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if not tied:
        total += sum(t.numel() * t.element_size() for t in table) // emb.num_embeddings
    return total


def reference_tokens(model, ids, n: int) -> torch.Tensor:
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        return model.generate(ids, generation_config=gc)[0, ids.shape[1]:]


def lowbit_row(name: str, model, tok, window, args, bw, dense: str = "auto") -> dict:
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    engine = engine_for(model, args.engine, dense=dense)
    t0 = time.perf_counter()
    if args.engine != "eager":
        engine.warmup()
    compile_s = time.perf_counter() - t0
    got = engine.generate(ids, 64)["tokens"]
    exact = Engine(model, compile=False, attention="reference", dense="reference").generate(ids, 64)["tokens"]
    ref = reference_tokens(model, ids, 64)
    # transformers' generate stops at the model's end-of-text token (its generation config supplies one); the
    # engine decodes on: equal means equal up to where the reference ends, and it ends only there
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ended = len(ref) == 64 or int(ref[-1]) in eos
    same = bool(torch.equal(got[:len(ref)], ref) and ended)
    differ = (got[:len(ref)] != ref).nonzero()
    same_prefix = int(differ[0]) if len(differ) else len(ref)
    same_exact = bool(torch.equal(exact[:len(ref)], ref) and ended)
    dec = decode_speed(model, tok, PROMPT, args.tokens, args.repeats, engine=args.engine, dense=dense)
    pre = prefill_speed(model, window, args.repeats, engine=args.engine, dense=dense)
    nbytes = bytes_per_token(model)
    kind = engine.kind if engine.compile or args.engine == "eager" else "eager: compiling failed"
    return {"name": name, "engine": f"lowbit ({kind})", "decode_tokens_per_s": dec,
            "prefill_tokens_per_s": pre, "bytes_per_token": nbytes, "bound_tokens_per_s": bw / nbytes,
            "tokens_equal_reference_64": same, "tokens_equal_before_first_difference": same_prefix,
            "tokens_equal_reference_64_reference_attention": same_exact, "compile_seconds": compile_s,
            "compiled": engine.compile}   # False if compiling failed and the engine fell back to eager


def hf_row(name: str, model, tok, window, args, bw) -> dict:
    dec = decode_speed(model, tok, PROMPT, args.tokens, args.repeats, engine="hf")
    pre = prefill_speed(model, window, args.repeats, engine="hf")
    nbytes = bytes_per_token(model)
    return {"name": name, "engine": "transformers eager generate", "decode_tokens_per_s": dec,
            "prefill_tokens_per_s": pre, "bytes_per_token": nbytes, "bound_tokens_per_s": bw / nbytes}


def llamacpp_rows(tok, window, args, bw) -> list[dict]:
    import llama_cpp
    from gguf import GGUFReader
    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp_peer import requantize
    from lowbit.models.sources import default_model_path
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-llamacpp-"))
    prompt = tok(PROMPT)["input_ids"]
    for t in ("Q8_0", "Q4_0"):
        path = tmp / f"model-{t}.gguf"
        requantize(llama_cpp, default_model_path(), path, t)
        nbytes = sum(int(x.n_bytes) for x in GGUFReader(str(path)).tensors)  # tied token_embd read as output
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, n_threads_batch=2, n_batch=512,
                              verbose=False)
        dec, pre = [], []
        for _ in range(args.repeats):
            llm.reset()
            llm.eval(prompt)
            t0 = time.perf_counter()
            for _ in range(args.tokens - 1):   # greedy, one token at a time, as the other rows
                llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
            dec.append((args.tokens - 1) / (time.perf_counter() - t0))
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(window.tolist())
            pre.append(len(window) / (time.perf_counter() - t0))
        rows.append({"name": f"llama.cpp {t}", "engine": f"llama-cpp-python {llama_cpp.__version__}",
                     "decode_tokens_per_s": statistics.median(dec), "prefill_tokens_per_s": statistics.median(pre),
                     "bytes_per_token": nbytes, "bound_tokens_per_s": bw / nbytes})
        del llm
        path.unlink()
    return rows


def llama_bench_rows(bench: Path, args, bw, tok=None, window=None) -> list[dict]:
    """llama.cpp's own benchmark: tg`tokens` (decode) and pp512 (prefill) with 2 threads, on files made from the
    shipped GGUF by llama-quantize (beside llama-bench). With a tokenizer and window: lowbit on each very file
    too (its blocks kept as stored, `load_model(path, gguf="blocks")`), the same bytes on both engines."""
    from gguf import GGUFReader
    from lowbit.models.sources import default_model_path
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-llamabench-"))
    rows = []
    for t in ("Q8_0", "Q4_0", "Q4_K_M"):
        path = tmp / f"model-{t}.gguf"
        subprocess.run([str(bench.with_name("llama-quantize")), "--allow-requantize", str(default_model_path()),
                        str(path), t], check=True, capture_output=True)
        r = subprocess.run([str(bench), "-m", str(path), "-t", str(torch.get_num_threads()), "-p", "512", "-n",
                            str(args.tokens), "-r", str(max(args.repeats, 5)), "-o", "json"], check=True,
                           capture_output=True, text=True)
        res = json.loads(r.stdout)
        speed = {("pp" if x["n_prompt"] else "tg"): x["avg_ts"] for x in res}
        nbytes = sum(int(x.n_bytes) for x in GGUFReader(str(path)).tensors)  # tied token_embd read as output
        rows.append({"name": f"llama.cpp {t}", "engine": f"llama-bench (build {res[0]['build_commit']})",
                     "decode_tokens_per_s": speed["tg"], "prefill_tokens_per_s": speed["pp"],
                     "bytes_per_token": nbytes, "bound_tokens_per_s": bw / nbytes})
        if tok is not None:
            print(f"measuring lowbit on llama.cpp's {t} file", file=sys.stderr, flush=True)
            model = lowbit.load_model(path, gguf="blocks", cache=False).model
            kinds = sorted({m.kernel.name for m in model.modules() if hasattr(m, "kernel")})
            rows.append(lowbit_row(f"lowbit on llama.cpp's {t} file ({', '.join(kinds)})", model, tok, window,
                                   args, bw))
            del model
        path.unlink()
    return rows


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def quantized(model, bits: int, group_size: int, head: bool, kernels: str = "auto"):
    """kernels: "auto" (lowbit's native kernels where built), or "aten" (PyTorch's packed ones)."""
    import copy
    kernel = {"auto": "auto", "aten": "cpu-int4" if bits == 4 else "cpu-int8"}[kernels]
    scheme = lowbit.config_for("rtn", lowbit.IntSpec(bits, group_size, True), kernel=kernel)
    head_kernel = "cpu-int8" if kernels == "aten" else "auto"
    rules = [{"match": "lm_head", "bits": 8, "group_size": -1, "kernel": head_kernel}] if head else []
    recipe = lowbit.Recipe.from_rules(rules, scheme) if rules else lowbit.Recipe.default(scheme)
    return lowbit.quantize(copy.deepcopy(model), recipe, progress=False)


def in_format(model, fmt: str, kernel: str):
    """Every decoder Linear round-to-nearest in `fmt` (a GGUF type such as Q4_0, or int5 / int6: groups of 64),
    run on `kernel` ("auto", or "reference": what formats without a kernel of their own ran on)."""
    import copy
    spec = lowbit.IntSpec(int(fmt[3:]), 64, False) if fmt.startswith("int") else GGUFSpec(fmt)
    return lowbit.quantize(copy.deepcopy(model), lowbit.Recipe.default(lowbit.config_for("rtn", spec, kernel=kernel)),
                           progress=False)


def table(rows: list[dict], bw: float) -> str:
    lines = ["| model | engine | decode tok/s | prefill tok/s (512) | weight MB read / token | bound tok/s "
             f"(at {bw:.1f} GB/s) | decode / bound | 64 tokens = reference (as timed; reference attention) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r.get("tokens_equal_reference_64")
        if same is not None:
            timed = "yes" if same else f"first {r['tokens_equal_before_first_difference']}"
            same = f"{timed}; {'yes' if r['tokens_equal_reference_64_reference_attention'] else 'NO'}"
        lines.append(f"| {r['name']} | {r['engine']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.0f} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{r['bound_tokens_per_s']:.0f} | {100 * r['decode_tokens_per_s'] / r['bound_tokens_per_s']:.0f}% | "
                     f"{'—' if same is None else same} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, eager and compiled, no llama.cpp")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per decode measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="auto", choices=["auto", "aot", "compiled", "eager"],
                    help="lowbit's decode engine (auto: what `lowbit generate` picks here)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--llama-bench", type=Path, default=None,
                    help="llama.cpp's llama-bench binary (llama-quantize beside it): llama.cpp measured natively")
    ap.add_argument("--no-lowbit-files", action="store_true",
                    help="with --llama-bench: do not also run lowbit on llama.cpp's files (blocks as stored)")
    ap.add_argument("--out", default="benchmarks/results/decode_engine", help="writes OUT.md and OUT.json")
    ap.add_argument("--only", default=None, metavar="KINDS",
                    help="only these quantized rows (of auto, bf16, float, aten; comma-separated), with the "
                         "transformers and lowbit float rows")
    ap.add_argument("--kernels", default="auto,reference",
                    help="with --formats: the kernels each format runs on (auto: its native one)")
    ap.add_argument("--formats", default=None,
                    help="only lowbit rows for these formats (e.g. Q4_0,Q5_0,Q8_0,int5,int6), each on its native "
                         "kernel and on the reference kernel")
    ap.add_argument("--dense-reference", action="store_true",
                    help="also each lowbit row with bfloat16 weights left (the bf16 model, the bf16 lm_heads) with "
                         "PyTorch's matmuls for them (Engine(dense='reference')) instead of lowbit's kernel")
    ap.add_argument("--llamacpp-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.llamacpp_child is not None:   # llama.cpp's rows, in a process of their own (see below)
        from lowbit.data import load_text, token_windows
        tok = lowbit.load_model("default").tokenizer
        window = token_windows(tok, load_text(None, "evaluation"), 512, 1)[0]
        print(json.dumps(llamacpp_rows(tok, window, args, args.llamacpp_child)))
        return 0
    before = loadavg()
    bw = memory_bandwidth(64 if args.quick else 512)
    copy_bw = bw["copy_gb_s"] * 1e9

    if args.quick:
        args.tokens, args.repeats = 8, 1
        from lowbit.models.sources import load_model
        tok = load_model("default").tokenizer
        base = tiny_model()
        window = torch.randint(0, 49152, (64,))
        rows = [hf_row("tiny fp32", base, tok, window, args, copy_bw),
                lowbit_row("tiny fp32", base, tok, window, args, copy_bw),
                lowbit_row("tiny INT4 g32", quantized(base, 4, 32, False), tok, window, args, copy_bw)]
        eager = Engine(base, compile=False).generate(tok(PROMPT, return_tensors="pt")["input_ids"], 8)["tokens"]
        assert torch.equal(eager, reference_tokens(base, tok(PROMPT, return_tensors="pt")["input_ids"], 8))
    else:
        from lowbit.data import load_text, token_windows
        loaded = lowbit.load_model("default")
        base, tok = loaded.model, loaded.tokenizer
        window = token_windows(tok, load_text(None, "evaluation"), 512, 1)[0]
        if args.formats:
            rows = []
            for fmt in args.formats.split(","):
                fmt, _, variant = fmt.partition(":")   # "Q5_0:bytes": 5-7-bit codes a byte each, as before packing
                for kernel in args.kernels.split(","):
                    with (mock.patch.object(native_int8, "packed_width", lambda *a: 0) if variant == "bytes"
                          else contextlib.nullcontext()):
                        model = in_format(base, fmt, kernel)
                    used = sorted({m.kernel.name for m in model.modules() if hasattr(m, "kernel")})
                    used += ["byte codes"] if variant == "bytes" else []
                    print(f"measuring {fmt} on {', '.join(used)}", file=sys.stderr, flush=True)
                    rows.append(lowbit_row(f"{fmt} (lm_head bf16), {', '.join(used)}", model, tok, window, args,
                                           copy_bw))
            args.no_llamacpp, args.llama_bench = True, None
        bf16 = __import__("copy").deepcopy(base).to(torch.bfloat16)
        rows = rows if args.formats else [hf_row("fp32", base, tok, window, args, copy_bw),
                hf_row("bf16", bf16, tok, window, args, copy_bw)]
        rows += [] if args.formats else [lowbit_row("fp32", base, tok, window, args, copy_bw),
                                         lowbit_row("bf16", bf16, tok, window, args, copy_bw)]
        if args.dense_reference and not args.formats:
            rows.append(lowbit_row(f"bf16, {DENSE_REFERENCE}", bf16, tok, window, args, copy_bw, "reference"))
        q8 = "native kernels: int8 activations in decode" if native.available() and native.q8() else None
        # "bf16": weights quantized from the bfloat16 copy of the model instead of the float32 one; every quantized
        # row runs its norms, embedding, activations and cache in bfloat16 (lowbit.quantize's default dtype)
        for name, bits, gs, head, kernels in (("INT8 per channel (lm_head bf16)", 8, -1, False, "auto"),
                                              ("INT8 per channel + INT8 lm_head", 8, -1, True, "auto"),
                                              ("INT8 per channel + INT8 lm_head", 8, -1, True, "bf16"),
                                              ("INT8 per channel + INT8 lm_head", 8, -1, True, "float"),
                                              ("INT8 per channel + INT8 lm_head, ATen kernels", 8, -1, True, "aten"),
                                              ("INT4 g64 (lm_head bf16)", 4, 64, False, "auto"),
                                              ("INT4 g64 + INT8 lm_head", 4, 64, True, "auto"),
                                              ("INT4 g64 + INT8 lm_head", 4, 64, True, "bf16"),
                                              ("INT4 g64 + INT8 lm_head", 4, 64, True, "float"),
                                              ("INT4 g64 + INT8 lm_head, ATen kernels", 4, 64, True, "aten")
                                              ) if not args.formats else ():
            if args.only and kernels not in args.only.split(","):
                continue
            if kernels == "float":   # the native kernels' float32 decode path, where int8 activations are the default
                if q8 is None:
                    continue
                name += ", native float32 decode (LOWBIT_NATIVE_Q8=0)"
            elif kernels in ("auto", "bf16") and q8:
                name += f" ({q8})"
            if kernels == "bf16":
                name += ", quantized from the bfloat16 model"
            print(f"measuring {name}", file=sys.stderr, flush=True)
            os.environ["LOWBIT_NATIVE_Q8"] = "0" if kernels == "float" else "1"   # read when weights are packed
            model = quantized(bf16 if kernels == "bf16" else base, bits, gs, head,
                              "auto" if kernels in ("float", "bf16") else kernels)
            rows.append(lowbit_row(name, model, tok, window, args, copy_bw))
            if args.dense_reference and not head:
                rows.append(lowbit_row(f"{name}, {DENSE_REFERENCE}", model, tok, window, args, copy_bw, "reference"))
            os.environ.pop("LOWBIT_NATIVE_Q8")
        if args.llama_bench is not None:
            rows += llama_bench_rows(args.llama_bench, args, copy_bw, None if args.no_lowbit_files else tok, window)
        elif not args.no_llamacpp:
            # a child process: a crash inside llama.cpp (it segfaulted in eval on an Intel Xeon with AMX) must
            # not lose the rows measured above
            r = subprocess.run([sys.executable, __file__, "--llamacpp-child", str(copy_bw), "--tokens",
                                str(args.tokens), "--repeats", str(args.repeats)], capture_output=True, text=True)
            if r.returncode == 0:
                rows += json.loads(r.stdout.strip().splitlines()[-1])
            else:
                why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
                print(f"llama.cpp rows skipped: {why} (exit status {r.returncode})", file=sys.stderr)
    md = table(rows, bw["copy_gb_s"])
    env = environment()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "prompt": PROMPT, "new_tokens": args.tokens,
            "repeats": args.repeats, "loadavg_before": before, "loadavg_after": loadavg(), "bandwidth": bw,
            "threads": torch.get_num_threads(), **env}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"Machine: {env.get('cpu', 'n/a')}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
              f"CPU features {env.get('cpu_features', 'n/a')}; memory copy {bw['copy_gb_s']:.1f} GB/s (read+write), read {bw['read_gb_s']:.1f} GB/s; "
              f"load average before {before}, after {meta['loadavg_after']}; {args.tokens} new tokens, "
              f"median of {args.repeats}.\n\n")
    atomic_write_text(out.with_suffix(".md"), header + md + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print(header + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
