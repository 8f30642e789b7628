"""Modules that hold packed weights and call a kernel (qlinear), a quantized token embedding (qembedding),
fusing them (fuse), and editing a model's submodules and tensors in place (surgery)."""

from .qembedding import QuantEmbedding
from .qlinear import QuantLinear
from .surgery import module_tensors, set_submodule, set_tensors

__all__ = ["QuantEmbedding", "QuantLinear", "module_tensors", "set_submodule", "set_tensors"]
