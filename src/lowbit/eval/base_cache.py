"""The base model's pass over the evaluation windows, kept between runs.

Every evaluation against a base runs the base over every window, and that pass is the same each time the same
base meets the same text: half of `lowbit eval`'s work, repeated for every quantized file compared. What is kept,
per window: the input of the base's output layer (its last hidden state, float32 [T, hidden]; 1.2 MB per
512-token window of the default model, against 100 MB of logits). The output layer and whatever follows it in the
model's forward (a softcap, say) run again on it, so the logits the comparison sees are computed as before, bit
for bit, for a fifth of the pass.

How it is trusted: window 0 is always run in full. Its last hidden state must equal the kept one bit for bit, and
the logits rebuilt from it must equal the full pass's; otherwise (another machine, another library build, a model
whose forward the replay does not reproduce) every window runs in full and the file is rewritten. The file is named
by a hash of the base's parameters and configuration, the token windows, torch's version, the thread count and the
library of the float32 products (lowbit.products.float32_gemm).

Where: `cache_dir()` (default ~/.cache/lowbit/eval), one safetensors file per base and text, written
through a temporary file (a killed run leaves none behind). LOWBIT_EVAL_CACHE=0 turns the cache off; bases whose
hidden states would take more than 2 GiB are not kept, and beyond 8 GiB in all the least recently used files are
removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..io.lru import touch, trim

MAX_BYTES = 2 << 30          # a base whose states would take more is not kept
MAX_TOTAL_BYTES = 8 << 30    # the directory: the least recently used files go first beyond this


def cache_dir() -> Path:
    """$LOWBIT_EVAL_CACHE_DIR, else eval/ under lowbit's cache ($LOWBIT_CACHE, default ~/.cache/lowbit)."""
    if os.environ.get("LOWBIT_EVAL_CACHE_DIR"):
        return Path(os.environ["LOWBIT_EVAL_CACHE_DIR"])
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit") / "eval"


def _parts(model: nn.Module):
    """(output layer, decoder body) of a Hugging Face causal LM, or None when the model has no such split."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, nn.Module) or not isinstance(body, nn.Module) or body is model:
        return None
    return head, body


def _key(model: nn.Module, windows: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    h.update(type(model).__name__.encode())
    h.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().data)
    h.update(windows.contiguous().numpy().tobytes())
    from ..products import float32_gemm   # here: lowbit.products reads the CPU's features from this package
    h.update(f"{torch.__version__}/{torch.get_num_threads()}/{float32_gemm()}".encode())
    return h.hexdigest()


class BaseCache:
    """The base's last hidden state per window: `logits(i, ids)` gives window i's logits, from the kept state
    when it can be trusted (see the module docstring) and from a full pass otherwise; `close()` writes the file
    when something new was computed."""

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model, self.windows = model, windows
        self.parts = _parts(model)
        self.kept: dict[int, torch.Tensor] = {}
        self.new: dict[int, torch.Tensor] = {}
        self.path = None
        self.trusted = False
        self.dtype = None      # the head input's dtype (kept as float32: exact for 16-bit models too)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        size = windows.numel() * 4 * (hidden or 0)
        if self.parts is None or not hidden or size > MAX_BYTES or not _enabled():
            self.parts = None
            return
        self.path = cache_dir() / f"{_key(model, windows)}.safetensors"
        if self.path.exists():
            with contextlib.suppress(Exception):   # an unreadable file is recomputed and replaced
                from safetensors.torch import load_file
                kept = load_file(str(self.path))
                n, T = windows.shape
                if sorted(kept) == sorted(f"w{i}" for i in range(n)) and all(
                        v.dtype == torch.float32 and tuple(v.shape) == (T, hidden) for v in kept.values()):
                    self.kept = {int(k[1:]): v for k, v in kept.items()}

    @torch.no_grad()
    def _full(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, head input) of one full pass."""
        seen = []
        handle = self.parts[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        try:
            logits = self.model(ids, use_cache=False).logits
        finally:
            handle.remove()
        return logits, seen[0][0]

    @torch.no_grad()
    def _replay(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The model's forward with its decoder body returning `hidden` instead of running."""
        from transformers.modeling_outputs import BaseModelOutputWithPast
        body = self.parts[1]
        body.forward = lambda *a, **kw: BaseModelOutputWithPast(last_hidden_state=hidden[None])
        try:
            return self.model(ids, use_cache=False).logits
        finally:
            del body.forward

    def logits(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, T, V] of window i (ids [1, T]) as the base computes them."""
        if self.parts is None:
            with torch.no_grad():
                return self.model(ids, use_cache=False).logits
        if i == 0 or not self.trusted:
            logits, hidden = self._full(ids)
            if i == 0:
                self.dtype = hidden.dtype
                kept = self.kept.get(0)
                self.trusted = (kept is not None and kept.shape == hidden.shape and
                                torch.equal(kept.view(torch.int32), hidden.float().view(torch.int32)) and
                                torch.equal(self._replay(ids, kept.to(hidden.dtype)), logits))
                if not self.trusted:
                    self.kept = {}
                else:
                    touch(self.path)   # recently used: the last to be removed
            self.new[i] = hidden.float()
            return logits
        return self._replay(ids, self.kept[i].to(self.dtype))   # trusted: every window is kept (checked on load)

    @property
    def state(self) -> str:
        """"reused" (the kept pass, checked on window 0), "kept" (computed now and kept for the next run),
        "off" (not kept: turned off, too large, or a model the replay does not cover)."""
        if self.parts is None:
            return "off"
        return "reused" if self.trusted else "kept"

    def close(self) -> None:
        """Write the states computed now when they are new (not the kept ones) and cover every window."""
        if self.parts is None or self.trusted or len(self.new) != self.windows.shape[0]:
            return
        with contextlib.suppress(Exception):   # a cache that cannot be written is only slower next time
            from safetensors.torch import save_file

            from ..io.atomic import atomic_file
            with atomic_file(self.path, overwrite=True) as tmp:
                save_file({f"w{i}": t.contiguous() for i, t in self.new.items()}, str(tmp))
            trim(self.path.parent, MAX_TOTAL_BYTES, keep=self.path)


def _enabled() -> bool:
    return os.environ.get("LOWBIT_EVAL_CACHE", "1").strip() not in ("0", "")
