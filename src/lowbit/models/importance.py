"""Importance of each Linear's input channels (the idea of llama.cpp's imatrix): the mean of x² per input
channel over the calibration tokens, captured from the float model, and its files.

For a Linear y = W·x the squared output error of a weight change ΔW is Σ_t (ΔW·x_t)²; keeping only the diagonal
of Σ_t x_t x_tᵀ, the error of weight W[r, j] counts with weight E[x_j²]. Formats use that vector to weight
their scale and rounding search (`spec.quantize(w, importance=...)`).

Files
    lowbit (safetensors): one float32 tensor [in_features] per Linear, named by the module's full name (e.g.
        "model.layers.0.self_attn.q_proj"), holding mean x²; metadata {"format": "lowbit-imatrix",
        "tokens": the number of calibration tokens}.
    llama.cpp's imatrix GGUF (read only): tensors "<gguf name>.in_sum2" (Σx², float32 [in_features]) and
        "<gguf name>.counts" (tokens, [1]); the mean is in_sum2 / counts. GGUF names of the Llama-family layout
        ("blk.3.attn_q.weight", "output.weight") are mapped to the Hugging Face module names.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError

_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


@dataclass
class Importance:
    """Mean x² per input channel of each Linear (module name -> float32 [in_features]) and the number of
    calibration tokens it was measured on."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    def get(self, name: str) -> torch.Tensor | None:
        return self.values.get(name)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the lowbit imatrix file (safetensors) through a temporary file renamed onto `path`."""
        from safetensors.torch import save_file
        path = Path(path)
        tensors = {k: v.detach().float().contiguous() for k, v in self.values.items()}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            save_file(tensors, tmp, metadata={"format": "lowbit-imatrix", "tokens": str(self.tokens)})
            os.replace(tmp, path)
        except OSError as e:
            raise LowbitError(f"cannot write {path}: {e.strerror or e}") from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        return path


def load_importance(path: str | os.PathLike) -> Importance:
    """Read a lowbit imatrix file (safetensors) or llama.cpp's imatrix GGUF."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"imatrix file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _load_gguf(path) if magic == b"GGUF" else _load_safetensors(path)
    except LowbitError:
        raise
    except Exception as e:   # a damaged file: one clear line, whatever the parser tripped on
        raise LowbitError(f"{path} is not a readable imatrix file: {e}") from None


def _check(name: str, v: torch.Tensor, path: Path) -> torch.Tensor:
    v = v.float().reshape(-1)
    if not torch.isfinite(v).all() or bool((v < 0).any()):
        raise LowbitError(f"{path}: importance of {name} must be finite and non-negative")
    return v


def _load_safetensors(path: Path) -> Importance:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "lowbit-imatrix":
            raise LowbitError(f"{path} is not a lowbit imatrix file (no format=lowbit-imatrix metadata)")
        values = {k: _check(k, f.get_tensor(k), path) for k in f.keys()}
    return Importance(values, int(meta.get("tokens", 0)))


def gguf_module_name(name: str) -> str:
    """llama.cpp's tensor name -> the Hugging Face module name (Llama-family layout); unknown names stay."""
    name = name.removesuffix(".weight")
    if name == "output":
        return "lm_head"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", name)
    if m and m.group(2) in _GGUF_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}"
    return name


def _load_gguf(path: Path) -> Importance:
    from ..io.gguf_reader import open_reader
    reader = open_reader(str(path))
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    values, tokens = {}, 0
    for key, sum2 in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        base = key.removesuffix(".in_sum2")
        counts = tensors.get(base + ".counts")
        if counts is None or counts.numel() != 1:
            raise LowbitError(f"{path}: {base} needs one token count (per-expert matrices are not supported)")
        n = float(counts.reshape(-1)[0])
        name = gguf_module_name(base)
        values[name] = _check(name, sum2, path) / max(n, 1.0)
        tokens = max(tokens, int(n))
    if not values:
        raise LowbitError(f"{path}: no '<name>.in_sum2' tensors (not an imatrix GGUF)")
    return Importance(values, tokens)


class ImportanceHooks:
    """Accumulates mean x² per input channel of each Linear (or the named ones) over every forward pass run
    inside `with hooks:` (with or without gradients; entered any number of times), then `.importance()`.
    Lets a pass that runs the model anyway (the Fisher pass of `lowbit.plan`) count its windows too."""

    def __init__(self, model: nn.Module, names: list[str] | None = None):
        self.mods = {n: m for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and (names is None or n in names)}
        self.sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in self.mods.items()}
        self.counts = dict.fromkeys(self.mods, 0)
        self._handles: list = []
        # (input, its version, its Σx², its rows) of the last input seen: q/k/v and gate/up share one tensor
        self._last: tuple | None = None

    def _hook_for(self, name):
        def hook(module, args):
            x = args[0]
            if self._last is None or self._last[0] is not x or self._last[1] != x._version:
                flat = x.detach().reshape(-1, x.shape[-1]).double()
                self._last = (x, x._version, flat.pow(2).sum(0).cpu(), flat.shape[0])
            self.sums[name] += self._last[2]
            self.counts[name] += self._last[3]
        return hook

    def __enter__(self) -> "ImportanceHooks":
        self._handles = [m.register_forward_pre_hook(self._hook_for(n)) for n, m in self.mods.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def importance(self) -> Importance:
        values = {n: (self.sums[n] / self.counts[n]).float() for n in self.mods if self.counts[n]}
        return Importance(values, max(self.counts.values(), default=0))   # rows seen: tokens


@contextlib.contextmanager
def output_layer_skipped(model: nn.Module):
    """Inside, the model's output layer (`get_output_embeddings`, the lm_head) returns one column instead of
    the vocabulary's logits: passes that only need the layers' inputs skip its product, a fifth of a small
    model's work. Its forward pre-hooks still see its input."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    head.forward = lambda x, *args, **kwargs: x[..., :1]
    try:
        yield
    finally:
        del head.forward


@torch.no_grad()
def collect_importance(model: nn.Module, samples: torch.Tensor, names: list[str] | None = None,
                       into: ImportanceHooks | None = None, progress: bool = False, matmul: str = "auto") -> Importance:
    """Run the (float) model on token windows (LongTensor [n, T]) and accumulate, for each Linear (or the
    named ones), mean x² per input channel. into: add to what these hooks already hold (their `names` apply).
    matmul: the pass's float32 products (lowbit.products; "auto": from bfloat16-rounded inputs where the CPU
    multiplies bfloat16 natively; on the default model that moved a channel's mean x² by 1e-5 relative at most
    over 16 windows, BENCHMARKS.md)."""
    from tqdm.auto import tqdm

    from ..products import model_products
    hooks = into or ImportanceHooks(model, names)
    with hooks, output_layer_skipped(model), model_products(matmul, model):
        for ids in tqdm(samples, desc="importance", unit="window", disable=not progress):
            model(ids.unsqueeze(0), use_cache=False)
    return hooks.importance()
