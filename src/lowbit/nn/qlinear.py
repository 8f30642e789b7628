"""QuantLinear: a drop-in for torch.nn.Linear that holds a quantized weight and calls a kernel.

A QuantLinear may carry a per-input-channel scale s ([in_features], float32, `input_scale`): it then computes
(x / s) Ŵᵀ + b, its weight having been multiplied by s before quantization. That is how AWQ and SmoothQuant
scale a group of Linears whose input comes from no module a scale folds into exactly (a post-norm between
producer and consumer, a residual stream, an activation): the division runs here, before the kernel, so every
kernel and the engine run it unchanged. `divide_input` is the one definition of that rounding (x / s in float32,
cast back), shared with `scale_inputs`, which gives a float Linear the same behaviour during calibration.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantizedTensor
from ..formats.act import ActSpec
from ..kernels import select_kernel

INPUT_SCALE = "input_scale"
ACT_STATE_KEYS = ("act_scale", "outlier_idx", INPUT_SCALE)


def divide_input(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x / s over the last dimension, computed in float32 and cast back to x's dtype."""
    return (x.float() / s).to(x.dtype)


def _divide_hook(module: nn.Module, args):
    return (divide_input(args[0], module.input_scale),) + tuple(args[1:])


def scale_inputs(linear: nn.Linear, s: torch.Tensor) -> None:
    """Make a float Linear, whose weight the caller multiplied by s per input channel, compute (x / s) Wᵀ + b:
    the function is unchanged, and quantizing the scaled weight then carries s into the QuantLinear (see
    `input_scale_of`). Scaling again composes (the scales multiply)."""
    old = input_scale_of(linear)
    if old is None:
        linear.register_forward_pre_hook(_divide_hook)
    linear.register_buffer(INPUT_SCALE, (s.float() if old is None else old * s.float()).clone(), persistent=False)


def input_scale_of(module: nn.Module) -> torch.Tensor | None:
    """The per-input-channel scale a Linear or QuantLinear divides its input by, or None."""
    return module._buffers.get(INPUT_SCALE)


class QuantLinear(nn.Module):
    """y = x Ŵᵀ + b, with Ŵ stored in a lowbit format and multiplied by the chosen kernel.

    The kernel's resident tensors are registered as non-persistent buffers (so `.to(device)` moves them);
    `quantized_tensor()` gives back the exact storage tensors for saving. Moving the model to another dtype
    never touches these buffers: scales and codes keep their dtypes (only `bias` follows the model).
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, kernel: str = "auto",
                 act: ActSpec | None = None, act_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.spec = qt.spec
        self.act = act
        self.kernel = select_kernel(qt.spec, qt.shape, qt.qweight.device, kernel, act)
        state = {k: v for k, v in (act_state or {}).items() if v is not None}
        unknown = set(state) - set(ACT_STATE_KEYS)
        if unknown:
            raise ValueError(f"unknown activation state {sorted(unknown)}")
        for key, t in {**self.kernel.prepare(qt), **state}.items():
            self.register_buffer(key, t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def _packed(self) -> dict[str, torch.Tensor]:
        return dict(self._buffers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._buffers.get(INPUT_SCALE)
        if s is not None:
            x = divide_input(x, s)
        return self.kernel.linear(x, self._packed, self.spec, (self.out_features, self.in_features), self.bias,
                                  self.act)

    def quantized_tensor(self) -> QuantizedTensor:
        return self.kernel.restore(self._packed, self.spec, (self.out_features, self.in_features))

    def act_state(self) -> dict[str, torch.Tensor]:
        """The activation tensors a checkpoint stores besides the weight (see formats.act), and the input scale."""
        return {k: self._buffers[k] for k in ACT_STATE_KEYS if self._buffers.get(k) is not None}

    def high_precision_fraction(self) -> dict | None:
        """LLM.int8(): of the input dimensions this layer saw so far (summed over rows), how many ran in high
        precision; each costs out_features multiply-adds, as every other dimension does."""
        c = self._buffers.get("hp_counts")
        if c is None or int(c[2]) == 0:
            return None
        return {"rows": int(c[0]), "fraction": float(c[1]) / float(c[2]), "dims_high": int(c[1]),
                "dims": int(c[2]), "macs_high": int(c[1]) * self.out_features, "macs": int(c[2]) * self.out_features}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_tensor().dequantize(dtype)

    @property
    def resident_bytes(self) -> int:
        ts = list(self._buffers.values()) + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def _apply(self, fn, recurse=True):
        # keep the buffers' dtypes: a model-wide .to(bfloat16) must not round float16 scales or cast codes
        for key, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self

    def extra_repr(self) -> str:
        act = "" if self.act is None else f", act={self.act.dtype}/{self.act.granularity}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.spec.name}{act}, kernel={self.kernel.name}")
