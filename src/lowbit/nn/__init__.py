"""Modules that hold packed weights and call a kernel (qlinear), fusing them (fuse), and editing a model's
submodules and tensors in place (surgery)."""

from .qlinear import QuantLinear
from .surgery import module_tensors, set_submodule, set_tensors

__all__ = ["QuantLinear", "module_tensors", "set_submodule", "set_tensors"]
