"""How quantized values are chosen. Functions here map float weights (and, for the methods that calibrate,
statistics of their inputs) to quantized values; none of them touches files or knows a model family.
`lowbit.blockwise` runs them over a model's decoder blocks."""

from ..formats import FloatSpec, IntSpec
from .awq import apply_clip, search_clip, search_scale
from .gptq import Hessian, gptq_quantize
from .llm_int8 import top_fraction_dims
from .rtn import fake_quantize, quantize_rtn
from .smoothquant import ALPHA_GRID, search_alpha, smoothing_factors

# method name -> whether it needs calibration data, given the scheme's options
METHODS = {
    "rtn": lambda o: False,
    "gptq": lambda o: True,
    "awq": lambda o: True,
    "w8a8-naive": lambda o: True,            # the static activation scale comes from calibration
    "w8a8-smooth": lambda o: True,           # smoothing factors come from calibration
    "llm-int8": lambda o: o.get("outlier_fraction") is not None,
    "fp8": lambda o: False,
    "fp8-e5m2": lambda o: False,
}

# methods whose weight format is part of the method
FIXED_SPECS = {
    "w8a8-naive": IntSpec(8, -1, True),
    "w8a8-smooth": IntSpec(8, -1, True),
    "llm-int8": IntSpec(8, -1, True),
    "fp8": FloatSpec("e4m3"),
    "fp8-e5m2": FloatSpec("e5m2"),
}


def needs_calibration(scheme) -> bool:
    return METHODS[scheme.method](scheme.options)


def check_options(method: str, options: dict) -> None:
    """Reject option values that cannot work, naming the option."""
    from ..errors import LowbitError
    o = options
    if o.get("threshold") is not None and not float(o["threshold"]) > 0:
        raise LowbitError(f"{method}: outlier threshold must be positive, got {o['threshold']}")
    if o.get("outlier_fraction") is not None and not 0 < float(o["outlier_fraction"]) < 1:
        raise LowbitError(f"{method}: outlier fraction must be in (0, 1), got {o['outlier_fraction']}")
    if o.get("alpha") is not None and not 0 <= float(o["alpha"]) <= 1:
        raise LowbitError(f"{method}: SmoothQuant alpha must be in [0, 1], got {o['alpha']}")
    if o.get("act_granularity", "token") not in ("token", "tensor"):
        raise LowbitError(f"{method}: activation granularity must be token or tensor, got {o['act_granularity']}")
    if o.get("act") not in (None, "fp8"):
        raise LowbitError(f"{method}: act must be fp8 or absent, got {o['act']}")
    if o.get("damp") is not None and not 0 <= float(o["damp"]) < 1:
        raise LowbitError(f"{method}: damp must be in [0, 1), got {o['damp']}")


__all__ = ["METHODS", "FIXED_SPECS", "needs_calibration", "check_options", "quantize_rtn", "fake_quantize", "Hessian",
           "gptq_quantize", "search_scale", "search_clip", "apply_clip", "ALPHA_GRID", "search_alpha",
           "smoothing_factors", "top_fraction_dims"]
