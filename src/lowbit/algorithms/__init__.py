"""How quantized values are chosen. Each method maps a float weight (plus calibration statistics, for the
methods that need them) to a QuantizedTensor; none of them touches files or knows a model family."""

from .rtn import quantize_rtn

# method name -> (needs calibration data, function(weight, spec) -> QuantizedTensor)
METHODS = {
    "rtn": (False, quantize_rtn),
}

__all__ = ["METHODS", "quantize_rtn"]
