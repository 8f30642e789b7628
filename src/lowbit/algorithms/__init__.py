"""How quantized values are chosen. Functions here map float weights (and, for the methods that calibrate,
statistics of their inputs) to quantized values; none of them touches files or knows a model family.
`lowbit.blockwise` runs them over a model's decoder blocks."""

from .awq import apply_clip, search_clip, search_scale
from .gptq import Factor, Hessian, factor_hessian, gptq_quantize, gptq_quantize_updated
from .llm_int8 import top_fraction_dims
from .rtn import fake_quantize, quantize_rtn
from .smoothquant import ALPHA_GRID, search_alpha, smoothing_factors

__all__ = ["quantize_rtn", "fake_quantize", "Hessian", "Factor", "factor_hessian", "gptq_quantize", "gptq_quantize_updated", "search_scale", "search_clip", "apply_clip",
           "ALPHA_GRID", "search_alpha", "smoothing_factors", "top_fraction_dims"]
