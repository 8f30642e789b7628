"""Greedy generation through the lean decoder: a prefill pass, then one compiled graph per decoded token.

Per token the Python work is one call of the compiled step and one argmax; everything per layer (fused
q/k/v and gate/up matmuls through the packed kernels, rotary, in-place cache writes, attention, norms)
runs inside the compiled graph. The KV cache is sized to the request, rounded up to a bucket (a power of
two, at least 256 positions), so that a new graph is compiled only when a longer request needs a larger
bucket and attention never reads much more cache than it needs.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..argmax import last_dim_argmax
from ..errors import LowbitError
from .cache import StaticKVCache
from .aot import AotStep
from .decoder import Decoder
from .reduction import aten_reductions

MIN_BUCKET = 256
_MODULE_CALL = nn.Module.__call__   # as torch defines it, for noticing when a tracer replaced it (see below)
KEY_GROUP = 64   # positions per key scale in a 4-bit cache (divides every bucket)
# Python's thread switch interval while a compilation runs beside eager decoding. Every PyTorch op releases
# the GIL and takes it back, and taking it back from a thread busy in Python (the compiler's tracing and code
# generation) waits out the interval, 5 ms by default: hundreds of ops per eager token. Measured on a 2-core
# Xeon, the default model's first 20 eager tokens took 125 s at 5 ms, 13.5 s at 100 µs and 8.8 s at 20 µs.
COMPILING_SWITCH_INTERVAL = 2e-5


_WEIGHT_HOLDERS = ("_modules['blocks']", "_modules['lm_head']", "_modules['embed']", "_modules['norm']")


def _skip_weight_guards(entries) -> list[bool]:
    """Guard filter for torch.compile: drop the per-call checks on the model's weights and modules (thousands
    of them, about 1 ms per token on a small CPU). The engine owns those modules and never changes them;
    the checks that matter stay: the inputs, the KV cache and the rotary tables (a resized cache recompiles)."""
    return [not any(h in e.name for h in _WEIGHT_HOLDERS) and e.guard_type != "NO_TENSOR_ALIASING"
            for e in entries]


def _inductor_options() -> dict:
    # cpp_wrapper: the graph's calling code is C++ too, so a decode step pays no Python per kernel call.
    # emulate_precision_casts: fused 16-bit arithmetic rounds where eager rounds (bit-equal to the reference).
    # No size/stride/alignment asserts around each kernel call: the guards already check every input that can
    # change between calls (token, position, cache), an engine's weights keep their shapes for its whole life
    # (streaming swaps in same-shaped copies), and the asserts cost about 4 µs per layer and token in a llama
    # step, 10 in Gemma 3's (benchmarks/engine_overhead.py; the fake kernels' shapes are tested against the real)
    return {"cpp_wrapper": True, "emulate_precision_casts": True, "guard_filter_fn": _skip_weight_guards,
            "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}


def _bucket(n: int) -> int:
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return b


_ENGINE_COUNT = itertools.count()


def _own_code(method):
    """The bound method with a private copy of its code object. torch.compile keeps its compiled graphs and
    their guards per code object; since the guards on weights and modules are skipped, two engines sharing one
    code object could pick up each other's graphs. A copy per engine keeps their caches apart."""
    code = method.__func__.__code__.replace(co_name=f"{method.__name__}_{next(_ENGINE_COUNT)}")
    fn = types.FunctionType(code, method.__func__.__globals__, code.co_name)
    return types.MethodType(fn, method.__self__)


class Engine:
    """Fast greedy generation for a loaded (quantized or not) llama-family model, batch 1.

    compile=True compiles the decode step with torch.compile (inductor); the first request of each cache
    bucket pays the compilation (seconds to a minute on a small CPU). compile=False runs the same code
    eagerly — the ground truth the compiled graph is tested against. compile="aot" compiles it ahead of time
    with AOTInductor instead (engine.aot: weights held as constants, so no Python work per weight and token;
    cached on disk under a key read from the modules, so another model of the same architecture and format
    loads it), for a KV cache in the model's dtype; a model with sliding-window layers, or one export or
    AOTInductor fails on (said in a warning), gets torch.compile's step instead. compile="auto" (default):
    "aot" on a CPU with a KV cache in the model's dtype (measured 1.11-1.14x torch.compile's step on an AVX2
    EPYC and an AVX-512 Xeon: BENCHMARKS.md), torch.compile otherwise (the AOT step is not measured on GPUs
    yet). background=True (with compile) decodes eagerly while a thread compiles, and switches to the compiled step once it is ready: tokens start at once
    and are the same either way (the two paths are bit-equal); a quantized KV cache compiles in front.
    kv_bits=8 or 4 keeps the KV cache quantized (symmetric, per head, position and group of kv_group_size
    channels, default the head dimension); kv_offload=True keeps it in host memory, each layer brought to the
    compute device when read, the next one prefetched (runs eagerly); see engine.cache.
    kv_key_group=G quantizes keys per channel over groups of G positions instead (KIVI; values stay per token),
    the newest incomplete group kept exact: engine.cache.ChannelKeyKVCache. "auto" (default): groups of
    KEY_GROUP positions for a 4-bit cache, per token otherwise; None: always per token.
    attention="auto" (default) runs a decoded token's attention on lowbit's CPU kernel (float32 arithmetic from
    the cache as stored: equal to the model's forward to the cache dtype's rounding, where the rest is bit-equal);
    "reference" keeps the model's own call, "native" asks for the kernel (engine.decoder.Decoder).
    dense="auto" (default) runs a decoded token's matmuls with unquantized 16-bit weights (a bfloat16 lm_head,
    a bfloat16 model's Linears) on lowbit's CPU kernel, equal to the model's forward to 16-bit rounding;
    "reference" keeps the model's own Linears (with attention="reference": tokens bit-identical to its forward).
    A model whose blocks stream from a store (`lowbit.offload.offload_blocks` or `open_streamed`) runs
    eagerly too, its streamed blocks unfused, each block's weights brought in just before it runs.
    """

    def __init__(self, model: nn.Module, compile: bool | str = "auto", max_positions: int | None = None,
                 kv_bits: int | None = None, kv_group_size: int | None = None, kv_offload: bool = False,
                 kv_key_group: int | None | str = "auto", background: bool = False, attention: str = "auto",
                 dense: str = "auto"):
        if kv_key_group == "auto":   # measured: +1.3% perplexity at 2048 tokens against +16.7% per token
            kv_key_group = KEY_GROUP if kv_bits == 4 else None
        self.model = model
        self.limit = max_positions or getattr(model.config, "max_position_embeddings", None) or 2048
        self.decoder = Decoder(model, MIN_BUCKET, kv_bits, kv_group_size, kv_offload, kv_key_group, attention,
                               dense).eval()
        if compile == "auto":
            cpu = self.decoder.positions.device.type == "cpu"
            compile = "aot" if cpu and kv_bits is None and not kv_offload else True
        if compile not in (True, False, "aot"):
            raise LowbitError(f"unknown compile mode {compile!r}; choose from True, False, 'aot', 'auto'")
        # host-side copies per layer, and blocks whose weights are swapped in per call, stay out of a graph
        if compile == "aot" and (kv_bits is not None or kv_offload):
            raise LowbitError("the ahead-of-time compiled step runs a KV cache in the model's dtype on the compute "
                              "device; use the compiled engine for a quantized or host KV cache")
        compile = compile if not kv_offload and not self.decoder.streamed else False
        if compile == "aot" and any(b.window is not None for b in self.decoder.blocks):
            compile = True   # sliding windows branch on the visible length, which export cannot keep symbolic
        self.compile = compile
        self._compiled_once = False
        self._step = self._decode_step
        if compile == "aot":   # engine.aot: no Python work per weight and token
            self._step = AotStep(self.decoder, _inductor_options())
        elif compile:
            self._step = self._torch_compiled_step()
        # background compilation runs the compiled step once on the cache's next-to-last slot, which decoding writes
        # before it ever reads; a quantized cache keeps per-group state across slots, so it compiles in front
        self.background = bool(compile) and background and kv_bits is None
        self._compiled_sizes: set[int] = set()
        self._compiler: threading.Thread | None = None
        self._compile_error: BaseException | None = None
        self.compile_seconds: float | None = None     # how long the last background compilation took
        self.eager_steps = 0                           # decode steps run eagerly while it compiled

    def _torch_compiled_step(self):
        return torch.compile(_own_code(self._decode_step), dynamic=False, options=_inductor_options())

    def _decode_step(self, token, pos, visible):
        logits = self.decoder(token, pos, visible)
        return logits, last_dim_argmax(logits)

    def reserve(self, needed: int) -> None:
        """Make the cache hold `needed` positions (rounded up to a bucket)."""
        if needed > self.limit:
            raise LowbitError(f"prompt plus new tokens ({needed}) exceed the model's {self.limit} positions")
        size = min(_bucket(needed), max(self.limit, MIN_BUCKET))
        if size != self.decoder.max_len:
            self.wait_compiled()      # a compilation in flight reads the cache being replaced
            self.decoder.resize(size)

    def _compile_in_background(self) -> None:
        """Thread body: compile the step for the current bucket by running it once near the cache's end."""
        size, t0 = self.decoder.max_len, time.perf_counter()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, COMPILING_SWITCH_INTERVAL))
        try:
            with torch.no_grad(), aten_reductions():
                # not the last slot: a visible length equal to the cache's would be traced as the same size,
                # and the graph would then be guarded to that length alone (every real step recompiling)
                last = size - 2
                visible = self.decoder.positions[:last + 1]
                torch._dynamo.maybe_mark_dynamic(visible, 0)
                token = torch.zeros(1, 1, dtype=torch.long, device=self.decoder.positions.device)
                if isinstance(self._step, AotStep):   # loaded or compiled, checked at its first decode step
                    self._step.prepare(token, self.decoder.positions[last:last + 1], visible)
                else:
                    self._step(token, self.decoder.positions[last:last + 1], visible)
            self._compiled_sizes.add(size)
        except Exception as e:  # noqa: BLE001 - reported by the decoding thread, which then stays eager
            self._compile_error = e
        finally:
            sys.setswitchinterval(switch)
        self.compile_seconds = time.perf_counter() - t0

    def wait_compiled(self) -> None:
        """Wait for a background compilation in flight, if any."""
        if self._compiler is not None:
            self._compiler.join()
            self._compiler = None

    def _eager_while_compiling(self) -> bool:
        """With background compilation: whether this step runs eagerly (starting the compilation if needed)."""
        if self.decoder.max_len in self._compiled_sizes:
            return False
        if self._compile_error is not None:
            e, self._compile_error = self._compile_error, None
            self._run_eagerly_after(e)
            return True
        if self._compiler is None or not self._compiler.is_alive():
            self.compile_seconds = None
            # in a copy of this thread's context: torch's compile settings made here (they are per thread; the
            # native kernels' cache tag among them, kernels.native) hold for the compilation too
            context = contextvars.copy_context()
            self._compiler = threading.Thread(target=context.run, args=(self._compile_in_background,),
                                              name="lowbit-compile", daemon=True)
            self._compiler.start()
        return True

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ids ([1, T]) from position 0; fills the cache, returns the last logits [1, vocab]."""
        t = ids.shape[1]
        return self._beside_compiler(self.decoder, ids, self.decoder.positions[:t])

    def _run_eagerly_after(self, e: Exception) -> None:
        """Compiling the step failed (here or in the background): say where and run eagerly from now on, unless
        LOWBIT_STRICT_COMPILE (any value but empty or 0) asks for the error itself."""
        if os.environ.get("LOWBIT_STRICT_COMPILE", "").strip() not in ("", "0"):
            raise e
        import traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        aot = isinstance(self._step, AotStep)
        warnings.warn(f"compiling the decode step{' ahead of time' if aot else ''} failed ({type(e).__name__}: "
                      f"{str(e)[:200]} at {Path(where.filename).name}:{where.lineno}); "
                      f"{'compiling it with torch.compile' if aot else 'running eagerly'}")
        if aot:
            self.compile, self._step = True, self._torch_compiled_step()
            return
        self.compile, self._step = False, self._decode_step

    def _beside_compiler(self, run, *args):
        """An eager step or prefill while the compiler thread may run. While torch traces a graph (AOTAutograd,
        export) it replaces nn.Module.__call__ for the whole process, and its tracer rejects calls of modules
        outside the traced one ("module is not installed as a submodule": seen on a slow CPU, whose eager steps
        overlapped the tracing). So wait until the replacement is gone, and run again if a tracing started
        meanwhile: a step or prefill only writes its own positions' keys and values, the same values again."""
        if self._compiler is None or not self._compiler.is_alive():
            return run(*args)
        for _ in range(10_000):
            while nn.Module.__call__ is not _MODULE_CALL:
                time.sleep(0.002)
            try:
                return run(*args)
            except NameError as e:
                if "not installed as a submodule" not in str(e):
                    raise
        raise LowbitError("the decode step could not run beside the background compilation")

    @torch.no_grad()
    def decode(self, token: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ([1, 1]) at position pos; returns its logits [1, vocab] and the greedy next token [1, 1]."""
        visible = self.decoder.positions[:pos + 1]
        if self.background and self.compile and self._eager_while_compiling():
            self.eager_steps += 1      # bit-equal to the compiled step (tests/test_engine.py)
            return self._beside_compiler(self._decode_step, token, self.decoder.positions[pos:pos + 1], visible)
        if not self.compile:
            return self._step(token, self.decoder.positions[pos:pos + 1], visible)
        try:
            if isinstance(self._step, AotStep):   # already compiled with aten_reductions, and not by dynamo
                out = self._step(token, self.decoder.positions[pos:pos + 1], visible)
            else:
                torch._dynamo.maybe_mark_dynamic(visible, 0)
                with aten_reductions():
                    out = self._step(token, self.decoder.positions[pos:pos + 1], visible)
        except Exception as e:  # noqa: BLE001 - a model the compiler cannot handle still runs, eagerly
            if self._compiled_once:
                raise
            self._run_eagerly_after(e)
            return self.decode(token, pos)
        self._compiled_once = True
        return out

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> dict:
        """Greedy continuation of ids ([1, T] or [T]). Stops early at an eos token (if given).
        on_token(token [1, 1]) is called as each new token is known.

        Returns tokens (LongTensor [n]), prefill_seconds, decode_seconds and decode_tokens_per_s (tokens
        after the first, which comes from the prefill logits, over decode time); with background compilation
        also eager_tokens (decoded eagerly while it compiled) and compiled_tokens_per_s (the others' rate).
        """
        ids = ids.view(1, -1)
        if ids.shape[1] == 0:
            raise LowbitError("empty prompt")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        t = ids.shape[1]
        self.reserve(t + max_new_tokens)
        t0 = time.perf_counter()
        tok = last_dim_argmax(self.prefill(ids))
        prefill_s = time.perf_counter() - t0
        out = [tok]
        if on_token is not None:
            on_token(tok)
        eager0, compiled_s = self.eager_steps, 0.0
        t0 = time.perf_counter()
        for i in range(max_new_tokens - 1):
            if eos and int(tok) in eos:
                break
            t1, eager = time.perf_counter(), self.eager_steps
            tok = self.decode(tok, t + i)[1]
            if self.eager_steps == eager:
                compiled_s += time.perf_counter() - t1
            out.append(tok)
            if on_token is not None:
                on_token(tok)
        decode_s = time.perf_counter() - t0
        tokens = torch.cat(out, dim=1)[0]   # an eos token that ended generation is kept, as generate() does
        n_dec = len(out) - 1
        eager_n = self.eager_steps - eager0
        r = {"tokens": tokens, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
             "decode_tokens_per_s": n_dec / decode_s if n_dec else None, "prefill_tokens_per_s": t / prefill_s}
        if self.background:
            r["eager_tokens"] = eager_n
            r["compiled_tokens_per_s"] = (n_dec - eager_n) / compiled_s if n_dec > eager_n and compiled_s else None
        return r

    def warmup(self, prompt_len: int = 8, new_tokens: int = 4) -> float:
        """Compile (or load from inductor's cache) the step for the smallest bucket; returns seconds taken."""
        t0 = time.perf_counter()
        self.wait_compiled()
        self.generate(torch.zeros(1, prompt_len, dtype=torch.long), new_tokens)
        self.wait_compiled()
        return time.perf_counter() - t0

    @property
    def kind(self) -> str:
        """How the decode step runs now: "aot", "compiled" (torch.compile) or "eager" (after a fallback too)."""
        if not self.compile:
            return "eager"
        return "aot" if isinstance(self._step, AotStep) else "compiled"

    @property
    def cache(self) -> StaticKVCache:
        return self.decoder.cache
