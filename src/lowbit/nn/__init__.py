"""Modules that hold packed weights and call a kernel, and swapping them into a model."""

from .qlinear import QuantLinear, set_submodule

__all__ = ["QuantLinear", "set_submodule"]
