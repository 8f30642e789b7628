"""The decode step compiled ahead of time (AOTInductor) instead of by torch.compile at the first call.

Why: a torch.compile'd step pays Python work per call in proportion to its inputs, and every weight, scale and
cache tensor of the model is an input (about 500 for the default model: dynamo's code fetches each from the
module tree and inductor's wrapper converts each to a handle, about 1.5 ms per token on a 2-core AMD EPYC).
An AOTInductor package holds them as constants instead, given once (`load_constants(..., user_managed=True)`:
the engine's own tensors, nothing copied, so cache writes land in the engine's cache and prefill, which runs
eagerly, and the compiled step share it), and a call passes only the token, its position and the visible range.

The step is exported (`torch.export`, strict, the visible length a dynamic dimension; the engine may do it in a
background thread while it decodes eagerly) for the cache's current size and
compiled with the same inductor settings as the torch.compile path (ATen's mean, precision casts emulated): its
tokens and logits equal the eager step's (tests/test_engine_aot.py). The compiled package does not depend on
the weights' values, only on the graph, the tensors' shapes and dtypes, torch, the native kernels' build and
the thread count; it is kept under that key in `$LOWBIT_AOT_DIR` (default `~/.cache/lowbit/aot`), so a second
engine of the same architecture and format loads it in about a second after exporting (seconds) instead of
compiling (minutes on 2 cores).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from ..kernels import native
from .reduction import aten_reductions

MIN_VISIBLE = 2   # a decoded token sees its prompt's token(s) and itself; 0 and 1 would be specialized by export


class DecodeStep(nn.Module):
    """One decode step as a module: logits of the new token and the greedy next token."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, token, pos, visible):
        logits = self.decoder(token, pos, visible)
        return logits, logits.argmax(-1, keepdim=True)


def aot_dir() -> Path:
    return Path(os.environ.get("LOWBIT_AOT_DIR") or Path.home() / ".cache" / "lowbit" / "aot")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return state


def package_key(ep, options: dict) -> str:
    """What the compiled code depends on: the graph, its inputs' and constants' shapes, dtypes and strides, the
    compile settings, torch, the native kernels' build (their schemas), the CPU's vector ISA and the threads."""
    h = hashlib.sha256()
    for part in (ep.graph_module.code, str(ep.graph_signature), sorted(options.items()), torch.__version__,
                 native.build_tag(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()):
        h.update(repr(part).encode())
    for name, t in sorted(ep.state_dict.items()) + sorted(ep.constants.items()):
        if isinstance(t, torch.Tensor):
            h.update(repr((name, tuple(t.shape), tuple(t.stride()), t.dtype)).encode())
    return h.hexdigest()[:32]


class AotStep:
    """(token [1, 1], pos [1], visible [n]) -> (logits [1, vocab], next token [1, 1]) for a Decoder, through one
    AOTInductor package per cache size, bound to the decoder's current tensors (re-bound after a resize, which
    replaces the cache and rotary tables)."""

    def __init__(self, decoder: nn.Module, options: dict):
        self.step = DecodeStep(decoder)
        self.options = {k: v for k, v in options.items() if isinstance(v, (bool, int, float, str))}
        self.runners: dict[int, object] = {}
        self.bound: dict[int, torch.Tensor] = {}   # size -> the rotary table the runner's constants came from
        self.compiled_from_scratch = 0             # packages built here rather than loaded from aot_dir()

    def __call__(self, token, pos, visible):
        decoder = self.step.decoder
        size = decoder.max_len
        if visible.shape[0] >= size:   # the cache's last slot (generate never decodes there): eager, same values
            return self.step(token, pos, visible)
        runner = self.runners.get(size)
        if runner is None:
            runner = self.runners[size] = self._package(token, pos, visible)
        if self.bound.get(size) is not decoder.cos:
            state = _state(self.step)
            runner.load_constants({k: state[k] for k in runner.get_constant_fqns()}, check_full_update=True,
                                  user_managed=True)
            self.bound[size] = decoder.cos
        return tuple(runner(token, pos, visible))

    def _package(self, token, pos, visible):
        size = self.step.decoder.max_len
        # at most size − 1: a length equal to the cache's would be traced as the same symbol and fixed to it
        dims = (None, None, {0: torch.export.Dim("visible", min=MIN_VISIBLE, max=size - 1)})
        with torch.no_grad(), aten_reductions():
            # strict: traced by dynamo, which leaves the modules alone (non-strict export swaps their tensors
            # for fake ones while it traces, which eager decoding beside a background compilation would read)
            ep = torch.export.export(self.step, (token, pos, visible), dynamic_shapes=dims, strict=True)
            path = aot_dir() / f"step-{package_key(ep, self.options)}.pt2"
            if not path.exists():
                self._compile(ep, path)
        return torch._inductor.aoti_load_package(str(path))

    def _compile(self, ep, path: Path) -> None:
        """Compile into a temporary directory beside the cache entry and rename it in: a concurrent or killed
        compilation never leaves a half-written package under the final name."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".aot-", dir=path.parent))
        except OSError as e:
            raise LowbitError(f"cannot write the compiled decode step under {path.parent}: {e.strerror or e}") from None
        try:
            configs = {**self.options, "aot_inductor.package_constants_in_so": False}
            built = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / "step.pt2"),
                                                             inductor_configs=configs)
            os.replace(built, path)
            self.compiled_from_scratch += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
