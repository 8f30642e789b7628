"""The ground truth: dequantize the whole weight to the activation dtype, then a dense matmul.

Slow (it rebuilds W every call) and exact by construction; tests compare every other kernel with it. For W8A8
schemes with int8/fp8 activations, the input is first rounded exactly as the W8A8 kernels round it.
"""

import torch
import torch.nn.functional as F

from ..formats import QuantizedTensor
from ..formats.act import fake_quantize_act
from .base import Kernel


class ReferenceKernel(Kernel):
    name = "reference"

    def unsupported(self, spec, shape, device, act=None):
        if act is not None and act.dtype == "int8-mixed":
            return "LLM.int8() decomposition runs in its own kernel"
        return None

    def prepare(self, qt):
        return dict(qt.tensors())

    def linear(self, x, packed, spec, shape, bias, act=None):
        w = self.restore(packed, spec, shape).dequantize(torch.float32)
        if act is not None:
            y = F.linear(fake_quantize_act(x, act, packed.get("act_scale")), w, None if bias is None else bias.float())
            return y.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def restore(self, packed, spec, shape):
        return QuantizedTensor(spec, shape, packed["qweight"], packed.get("scales"), packed.get("zeros"))
