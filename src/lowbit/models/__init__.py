"""Loading sources, the per-architecture table, and block-by-block calibration capture."""

from .arch import ARCHES, Arch, arch_for
from .sources import DEFAULT_MODEL, Loaded, check_finite, default_model_path, load_model

__all__ = ["ARCHES", "Arch", "arch_for", "DEFAULT_MODEL", "Loaded", "check_finite", "default_model_path", "load_model"]
