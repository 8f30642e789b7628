"""Text for calibration and evaluation, and cutting it into token windows.

The default text is CPython's `pydoc_data.topics` (about 465 KB of English documentation prose), joined in
sorted topic order. Its first half (cut at a paragraph boundary) is the calibration set, its second half the
held-out evaluation set, so the two never share a topic. A text file or a Hugging Face dataset
("hf:NAME[:CONFIG]:SPLIT[:COLUMN]", online only) is used whole for whatever it is given to.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import LowbitError

DEFAULT_TEXT = "pydoc"
CALIB_SAMPLES = 64    # calibration windows
CALIB_SEQLEN = 512    # tokens per calibration window


def pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def pydoc_split() -> tuple[str, str]:
    text = pydoc_text()
    cut = text.find("\n\n", len(text) // 2)
    return text[:cut], text[cut + 2:]


def load_text(source: str | None = None, purpose: str = "evaluation") -> str:
    """purpose: "calibration" or "evaluation" (selects the half of the default text)."""
    if purpose not in ("calibration", "evaluation"):
        raise ValueError(purpose)
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise LowbitError(f"a text source is a file path, 'pydoc' or 'hf:...', got {type(source).__name__}")
    if source in (None, DEFAULT_TEXT):
        calib, held_out = pydoc_split()
        return calib if purpose == "calibration" else held_out
    if str(source).startswith("hf:"):
        return _hf_dataset_text(str(source)[3:])
    path = Path(source).expanduser()
    if not path.is_file():
        raise LowbitError(f"text file not found: {source}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"text file is not UTF-8: {source}") from None
    if not text.strip():
        raise LowbitError(f"text file is empty: {source}")
    return text


def _hf_dataset_text(spec: str) -> str:
    parts = spec.split(":")
    if len(parts) < 2:
        raise LowbitError("dataset text must be hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    try:
        import datasets
    except ImportError:
        raise LowbitError("hf: text sources need the `datasets` package (pip install datasets)") from None
    name, rest = parts[0], parts[1:]
    config = rest.pop(0) if len(rest) >= 2 else None
    split = rest.pop(0)
    column = rest.pop(0) if rest else "text"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise LowbitError(f"cannot load dataset {name}: {str(e).splitlines()[0]}") from None
    if column not in ds.column_names:
        raise LowbitError(f"dataset {name} has no column '{column}' (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds[column] if t)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokenizer, text: str, ctx: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ctx tokens: LongTensor [n, ctx] (the tail shorter than ctx is dropped)."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise LowbitError(f"context length must be an integer of at least 2, got {ctx!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise LowbitError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    ids = tokenize(tokenizer, text)
    n = ids.numel() // ctx
    if n == 0:
        raise LowbitError(f"text too short: {ids.numel()} tokens, need at least one window of {ctx}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * ctx].reshape(n, ctx)


def calibration_samples(tokenizer, text: str, n: int = CALIB_SAMPLES, seqlen: int = CALIB_SEQLEN, seed: int = 0) -> torch.Tensor:
    """n windows of seqlen tokens at seeded random offsets: LongTensor [n, seqlen]."""
    ids = tokenize(tokenizer, text)
    if ids.numel() <= seqlen:
        raise LowbitError(f"calibration text too short: {ids.numel()} tokens, need more than {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def calibration_ids(calibration, tokenizer=None, n: int = CALIB_SAMPLES, seqlen: int = CALIB_SEQLEN,
                    seed: int = 0) -> torch.Tensor:
    """Calibration inputs in any accepted form -> LongTensor [n, T] of token ids.

    calibration: a LongTensor [n, T] of token ids (used as given); None, "pydoc", a text file's path or
    "hf:NAME[:CONFIG]:SPLIT[:COLUMN]" (a text source, as `load_text`; its calibration half for the default
    text); a list of strings (texts, joined by blank lines); or a dataset / iterable of records with a "text"
    field. Text is cut into `n` windows of `seqlen` tokens at seeded random offsets, which needs `tokenizer`.
    """
    if torch.is_tensor(calibration):
        if calibration.dtype != torch.long or calibration.dim() != 2 or calibration.numel() == 0:
            raise LowbitError("calibration token ids must be a non-empty LongTensor [n, T], got "
                              f"{calibration.dtype} {tuple(calibration.shape)}")
        return calibration
    if calibration is None or isinstance(calibration, (str, Path)):
        text = load_text(None if calibration is None else str(calibration), "calibration")
    else:
        text = "\n\n".join(_texts(calibration))
    if tokenizer is None:
        raise LowbitError("calibration text needs a tokenizer (pass tokenizer=, or give token ids)")
    _number_check(n, "calibration samples")
    _number_check(seqlen, "calibration sequence length")
    if not text.strip():
        raise LowbitError("calibration text is empty")
    return calibration_samples(tokenizer, text, n, seqlen, seed)


def _texts(items) -> list[str]:
    out = []
    try:
        for x in items:
            t = x.get("text") if isinstance(x, dict) else x
            if not isinstance(t, str):
                raise LowbitError(f"calibration items must be strings or records with a 'text' field, got {type(x).__name__}")
            out.append(t)
    except TypeError:
        raise LowbitError("calibration must be token ids, a text source, a list of strings or a dataset, got "
                          f"{type(items).__name__}") from None
    return out


def _number_check(v, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise LowbitError(f"{what} must be a positive integer, got {v!r}")
