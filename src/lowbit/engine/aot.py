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
the weights' values, only on the code, the modules' settings, the tensors' shapes and dtypes, torch, the native
kernels' build and the thread count; it is kept under a key made of those, read from the modules without
tracing (package_key), in `$LOWBIT_AOT_DIR` (default `~/.cache/lowbit/aot`). So a second engine of the same
architecture and format loads it without exporting (an export takes up to a minute on a slow 2-core CPU, the
compilation minutes), and trusts it once its first step equals the eager step bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..argmax import last_dim_argmax
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
        return logits, last_dim_argmax(logits)


def aot_dir() -> Path:
    return Path(os.environ.get("LOWBIT_AOT_DIR") or Path.home() / ".cache" / "lowbit" / "aot")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return state


def package_key(step: nn.Module, options: dict) -> str:
    """What the compiled code depends on, read without tracing (an export alone takes about a minute on a slow
    2-core CPU): lowbit's own code, each module's type and plain settings (norm epsilons, group sizes, kernel
    choices, windows: constants of the graph), the model's configuration, every parameter's and buffer's name,
    shape, stride and dtype, lowbit's environment settings but paths, the compile settings, torch and
    transformers, the native kernels' build, the CPU's vector ISA and the threads. A package found under the
    key is still checked against the eager step before it is trusted (AotStep)."""
    import transformers
    h = hashlib.sha256()
    settings = sorted((k, v) for k, v in os.environ.items()
                      if k.startswith("LOWBIT_") and not k.endswith("_DIR") and "CACHE" not in k)
    for part in (_source_digest(), sorted(options.items()), settings, torch.__version__, transformers.__version__,
                 native.build_tag(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()):
        h.update(repr(part).encode())
    for name, module in step.named_modules(remove_duplicate=False):
        h.update(repr((name, type(module).__module__, type(module).__qualname__, _settings(module))).encode())
    for name, t in sorted(_state(step).items()):
        h.update(repr((name, tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type)).encode())
    return h.hexdigest()[:32]


def _settings(module: nn.Module) -> list:
    """A module's attributes that a traced graph bakes in as constants: plain values, and configurations."""
    out = []
    for k, v in sorted(vars(module).items()):
        if isinstance(v, (bool, int, float, str, type(None))) or (
                isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str, type(None))) for x in v)):
            out.append((k, v))
        elif hasattr(v, "to_dict") and callable(v.to_dict):   # a transformers configuration
            out.append((k, sorted((a, repr(b)) for a, b in v.to_dict().items())))
    return out


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """lowbit's Python sources: any change of code the step runs makes another key."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


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
        self.rejected = 0                          # packages found under their key that differed from eager
        self.unchecked: set[int] = set()           # sizes whose package was loaded and not yet checked

    def __call__(self, token, pos, visible):
        decoder = self.step.decoder
        size = decoder.max_len
        if visible.shape[0] >= size:   # the cache's last slot (generate never decodes there): eager, same values
            return self.step(token, pos, visible)
        runner = self.runners.get(size)
        if runner is None:
            runner = self.prepare(token, pos, visible)
        if self.bound.get(size) is not decoder.cos:
            self._bind(size, runner)
        out = tuple(runner(token, pos, visible))
        if size in self.unchecked:
            # a package found under its key is trusted once its step equals the eager step bit for bit; checked on
            # a decode step, not while preparing (in a background thread the cache changes under both calls)
            self.unchecked.discard(size)
            eager = self.step(token, pos, visible)   # after it: the cache slot ends with the eager step's keys
            if not all(torch.equal(a, b) for a, b in zip(out, eager)):
                self.rejected += 1
                self._bind(size, self._package(token, pos, visible))
                return eager
        return out

    def prepare(self, token, pos, visible):
        """This size's runner: its package loaded from aot_dir() (checked at its first step), else exported and
        compiled under its key. The example inputs give the export its shapes; nothing runs."""
        size = self.step.decoder.max_len
        path = aot_dir() / f"step-{package_key(self.step, self.options)}.pt2"
        if path.exists():
            try:
                self.runners[size] = self._bind(size, torch._inductor.aoti_load_package(str(path)))
                self.unchecked.add(size)
                return self.runners[size]
            except Exception:  # noqa: BLE001 - a package that does not fit this step is compiled again
                self.rejected += 1
        return self._bind(size, self._package(token, pos, visible))

    def _bind(self, size: int, runner):
        """Give the runner the decoder's current tensors as its constants (again after a resize)."""
        state = _state(self.step)
        runner.load_constants({k: state[k] for k in runner.get_constant_fqns()}, check_full_update=True,
                              user_managed=True)
        self.bound[size] = self.step.decoder.cos
        return runner

    def _package(self, token, pos, visible):
        size = self.step.decoder.max_len
        path = aot_dir() / f"step-{package_key(self.step, self.options)}.pt2"
        # at most size − 1: a length equal to the cache's would be traced as the same symbol and fixed to it
        dims = (None, None, {0: torch.export.Dim("visible", min=MIN_VISIBLE, max=size - 1)})
        with torch.no_grad(), aten_reductions():
            # strict: traced by dynamo, which leaves the modules alone (non-strict export swaps their tensors
            # for fake ones while it traces, which eager decoding beside a background compilation would read)
            ep = torch.export.export(self.step, (token, pos, visible), dynamic_shapes=dims, strict=True)
            self._compile(ep, path)
        self.runners[size] = torch._inductor.aoti_load_package(str(path))
        return self.runners[size]

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
