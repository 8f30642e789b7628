"""The Hugging Face directory as lowbit reads and writes it: its config.json, the config and state dict written
back (tied weights once), and `Loaded`, what every loader returns. Loaders (`models.sources`) and writers
(`export.checkpoint`) both build on this module, never on each other's internals."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: str          # what the user named, resolved to a path


def read_config(path: Path) -> dict:
    """config.json of a model directory, checked to be a JSON object."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LowbitError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"corrupt config.json in {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise LowbitError(f"corrupt config.json in {path}: not a JSON object")
    return cfg


def hf_config_dict(model) -> dict:
    """The model's config as config.json stores it."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # a dequantized GGUF model is plain float
    return cfg


def unique_state_dict(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tensors that share storage with an earlier one (tied weights), and the aliases."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.contiguous()
    return tensors, aliases
