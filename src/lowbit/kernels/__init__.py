"""How a quantized matmul runs. `select_kernel` picks the fastest kernel that supports a format on a device,
falling back to the reference kernel (which supports everything)."""

from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats import IntSpec
from .base import Kernel
from .cpu import CpuInt4Kernel, CpuInt8Kernel
from .reference import ReferenceKernel

KERNELS: dict[str, Kernel] = {k.name: k for k in (ReferenceKernel(), CpuInt8Kernel(), CpuInt4Kernel())}
# tried in this order by "auto"
_AUTO_ORDER = ("cpu-int8", "cpu-int4")


def select_kernel(spec: IntSpec, shape: tuple[int, int], device: torch.device | str = "cpu",
                  prefer: str = "auto") -> Kernel:
    device = torch.device(device)
    if prefer == "auto":
        for name in _AUTO_ORDER:
            if KERNELS[name].unsupported(spec, shape, device) is None:
                return KERNELS[name]
        return KERNELS["reference"]
    if prefer not in KERNELS:
        raise LowbitError(f"unknown kernel '{prefer}'; choose from auto, {', '.join(KERNELS)}")
    reason = KERNELS[prefer].unsupported(spec, shape, device)
    if reason:
        raise LowbitError(f"kernel '{prefer}' cannot run {spec.name} {shape[0]}x{shape[1]}: {reason}")
    return KERNELS[prefer]


__all__ = ["KERNELS", "Kernel", "select_kernel"]
