"""Generation and its speed: prefill and decode tokens per second, greedy.

Paths (`engine=`): "auto" (default: lowbit's engine, its decode step compiled ahead of time on a CPU and by
torch.compile elsewhere: Engine's compile="auto"), "compiled" (the step compiled by torch.compile), "aot" (the
step compiled ahead of time with AOTInductor: engine.aot), "eager" (the same engine, not compiled) and "hf"
(transformers' generate: the reference path).
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Callable

import torch

from ..errors import LowbitError
from ..models.arch import has_engine

ENGINES = ("auto", "compiled", "aot", "eager", "hf")
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {kind: Engine}


def engine_for(model, engine: str = "auto", kv_bits: int | None = None, kv_offload: bool = False,
               kv_keys: str = "auto", attention: str = "auto", dense: str = "auto"):
    """The model's lowbit engine of that kind, built once per model and kept beside it (compiling is costly)."""
    from ..engine import Engine
    if engine not in ("auto", "compiled", "aot", "eager"):
        raise LowbitError(f"unknown engine '{engine}'; choose from {', '.join(ENGINES)}")
    # kept beside the model, not on it, so that a deepcopy of the model never inherits another model's engine
    from ..offload.runtime import streaming_of
    cache = _ENGINES.setdefault(model, {})
    # an engine built before the model's blocks were offloaded holds fused copies of them: not reused then
    key = (engine, kv_bits, kv_offload, kv_keys, attention, dense, id(streaming_of(model)))
    if key not in cache:
        compile = {"auto": "auto", "compiled": True, "aot": "aot"}.get(engine, False)
        cache[key] = Engine(model, compile=compile, kv_bits=kv_bits, kv_offload=kv_offload,
                            kv_key_group=_key_group(kv_keys, kv_bits, kv_offload), attention=attention,
                            dense=dense)
    return cache[key]


def wait_compiled(model) -> None:
    """Wait for any background compilation of the model's engines (its result lands in inductor's cache, so
    the next run starts compiled)."""
    for e in _ENGINES.get(model, {}).values():
        e.wait_compiled()


def engine_kind(model, engine: str = "auto") -> str:
    """What `engine` runs as for this model: "hf", or its lowbit engine's kind ("aot", "compiled", "eager")."""
    return "hf" if engine == "hf" or not has_engine(model.config) else engine_for(model, engine).kind


def _key_group(kv_keys: str, kv_bits: int | None, kv_offload: bool):
    """'auto' (per channel for 4 bits), 'channel' or 'token' -> the engine's kv_key_group."""
    from ..engine.generate import KEY_GROUP
    if kv_keys not in ("auto", "channel", "token"):
        raise LowbitError(f"unknown KV key layout '{kv_keys}'; choose from auto, channel, token")
    if kv_keys == "channel":
        if kv_bits is None:
            raise LowbitError("per-channel keys need a quantized KV cache (--kv-bits 8 or 4)")
        return KEY_GROUP
    return "auto" if kv_keys == "auto" else None


def check_vocabulary(model, ids: torch.Tensor) -> None:
    """Token ids must index the model's embedding: a tokenizer that does not belong to the model is an error
    here, not an index error deep inside the forward pass."""
    n = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= n:
        raise LowbitError(f"the tokenizer produced token id {int(ids.max())}, beyond the model's vocabulary of {n} "
                          "(does the tokenizer belong to this model?)")


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False,
             engine: str = "auto", kv_bits: int | None = None, kv_offload: bool = False,
             kv_keys: str = "auto", stream: Callable[[str], None] | None = None,
             background: bool = False, attention: str = "auto", dense: str = "auto") -> dict:
    """Greedy continuation of `prompt`; returns text, token counts, and timings.

    decode_tokens_per_s excludes the prompt's forward pass, which is timed on its own (prefill). With a lowbit
    engine, compile_seconds is the one-time cost of compiling (or loading) the decode step, not counted in
    the speeds. stream(text) receives the continuation piece by piece as tokens are decoded (lowbit engines).
    background=True (compiled engine): no wait for the compiler — tokens are decoded eagerly while it compiles
    in a thread, then by the compiled step (see lowbit.engine.Engine); eager_tokens says how many were eager,
    compiled_tokens_per_s is the rate of the others, and compile_seconds is the compiler's own time.
    attention: how a decoded token attends to the cache; dense: how it multiplies by unquantized 16-bit weights
    (lowbit.engine.Engine; both "reference" for greedy tokens bit-identical to transformers' on a bfloat16 model).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LowbitError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if engine not in ENGINES:
        raise LowbitError(f"unknown engine '{engine}'; choose from {', '.join(ENGINES)}")
    if not isinstance(prompt, str):
        raise LowbitError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = _prompt_ids(tokenizer, prompt, chat)
    check_vocabulary(model, ids)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + max_new_tokens > limit:   # every path, transformers' included, stops here
        raise LowbitError(f"prompt ({ids.shape[1]} tokens) plus {max_new_tokens} new tokens exceed the model's "
                          f"{limit} positions")
    if engine != "hf" and not has_engine(model.config) and kv_bits is None and not kv_offload:
        print(f"note: the fast engine does not cover '{model.config.model_type}'; generating with transformers",
              file=sys.stderr)
        engine = "hf"
    if (kv_bits is not None or kv_offload) and not has_engine(model.config):
        raise LowbitError(f"a quantized or host-memory KV cache needs the fast engine, which does not cover "
                          f"'{model.config.model_type}'")
    if (kv_bits is not None or kv_offload) and engine == "hf":
        raise LowbitError("a quantized or host-memory KV cache needs a lowbit engine (--engine compiled or eager)")
    if engine != "hf":
        e = engine_for(model, engine, kv_bits, kv_offload, kv_keys, attention, dense)
        e.wait_compiled()
        e.background = bool(background and e.compile and kv_bits is None)
        compile_s = e.warmup() if e.compile and not e.background else 0.0
        t0 = time.perf_counter()
        r = e.generate(ids, max_new_tokens, eos_token_id=_eos_ids(model, tokenizer),
                       on_token=None if stream is None else _text_stream(tokenizer, stream))
        total_s = time.perf_counter() - t0
        new = r["tokens"]
        out = {
            "text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new.tolist(),
            "prompt_tokens": int(ids.shape[1]), "new_tokens": int(new.numel()),
            "prefill_seconds": r["prefill_seconds"], "seconds": total_s,
            "decode_tokens_per_s": r["decode_tokens_per_s"], "tokens_per_s": new.numel() / total_s,
            "engine": e.kind, "compile_seconds": compile_s,
        }
        if e.background:
            out.update(eager_tokens=r["eager_tokens"], compiled_tokens_per_s=r["compiled_tokens_per_s"],
                       compile_seconds=e.compile_seconds if r["eager_tokens"] else 0.0)
        return out
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    total_s = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new.tolist(),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(new.numel()),
        "prefill_seconds": prefill_s,
        "seconds": total_s,
        "decode_tokens_per_s": (new.numel() - 1) / decode_s if new.numel() > 1 else None,
        "tokens_per_s": new.numel() / total_s,
        "engine": "hf",
    }


def _text_stream(tokenizer, stream: Callable[[str], None]) -> Callable[[torch.Tensor], None]:
    """on_token for Engine.generate: hands `stream` each new piece of the decoded text (a piece that ends in an
    incomplete character waits for the next token)."""
    ids: list[int] = []
    shown = [""]

    def on_token(tok: torch.Tensor) -> None:
        ids.append(int(tok))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(shown[0]):
            return
        if len(text) > len(shown[0]):
            stream(text[len(shown[0]):])
            shown[0] = text
    return on_token


def _median(xs):
    return sorted(xs)[len(xs) // 2]


@torch.no_grad()
def decode_speed(model, tokenizer, prompt: str = "The history of the Python language", new_tokens: int = 64,
                 repeats: int = 3, engine: str = "auto", dense: str = "auto") -> float:
    """Median decode tokens/s over `repeats` greedy runs that always generate exactly new_tokens
    (the prompt's own forward pass, timed separately, is subtracted; compiling happens before timing).
    dense: the lowbit engine's choice for 16-bit weights (lowbit.engine.Engine)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if engine != "hf":
        e = engine_for(model, engine, dense=dense)
        e.warmup()
        return _median([e.generate(ids, new_tokens)["decode_tokens_per_s"] for _ in range(repeats)])
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
        speeds.append((new_tokens - 1) / max(time.perf_counter() - t0 - pre, 1e-9))
    return _median(speeds)


@torch.no_grad()
def prefill_speed(model, window: torch.Tensor, repeats: int = 3, engine: str = "auto", dense: str = "auto") -> float:
    """Median tokens/s of one forward pass over a window (LongTensor [T]). The lowbit engines run the
    prompt pass of generation (filling the KV cache, logits of the last position only); "hf" runs the
    model's forward over the window without a cache."""
    ids = window.unsqueeze(0)
    if engine != "hf":
        e = engine_for(model, engine, dense=dense)
        e.reserve(ids.shape[1] + 1)
        e.prefill(ids)   # first call allocates; not timed
        speeds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            e.prefill(ids)
            speeds.append(ids.shape[1] / (time.perf_counter() - t0))
        return _median(speeds)
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        speeds.append(ids.shape[1] / (time.perf_counter() - t0))
    return _median(speeds)


def python_frames(fn: Callable[[], object]) -> int:
    """How many Python functions are entered while fn() runs (calls into C builtins are not counted): the
    Python work of one call, e.g. of a compiled decode step, which should not grow with the model's depth."""
    frames = 0

    def count(frame, event, arg):
        nonlocal frames
        frames += event == "call"
    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return frames
