"""The ground truth: dequantize the whole weight to the activation dtype, then a dense matmul.

Slow (it rebuilds W every call) and exact by construction; tests compare every other kernel with it.
"""

import torch
import torch.nn.functional as F

from ..formats import QuantizedTensor
from .base import Kernel


class ReferenceKernel(Kernel):
    name = "reference"

    def unsupported(self, spec, shape, device):
        return None

    def prepare(self, qt):
        return dict(qt.tensors())

    def restore(self, packed, spec, shape):
        return QuantizedTensor(spec, shape, packed["qweight"], packed["scales"], packed.get("zeros"))

    def linear(self, x, packed, spec, shape, bias):
        w = self.restore(packed, spec, shape).dequantize(torch.float32).to(x.dtype)
        return F.linear(x, w, bias)
