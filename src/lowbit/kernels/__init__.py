"""How a quantized matmul runs. `select_kernel` picks the fastest kernel that supports a format on a device,
falling back to the reference kernel (which supports everything). A kernel with an `auto_devices` attribute is
picked automatically only on those device types (it can still be asked for by name elsewhere)."""

from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats import IntSpec
from .base import Kernel
from .cpu import CpuInt4Kernel, CpuInt8Kernel
from .native_int4 import NativeInt4Kernel
from .native_int8 import NativeInt8Kernel
from .reference import ReferenceKernel
from .triton_w4a16 import TritonW4A16Kernel
from .w8a8 import Fp8Kernel, Int8ActKernel, LlmInt8Kernel

KERNELS: dict[str, Kernel] = {k.name: k for k in (ReferenceKernel(), CpuInt8Kernel(), CpuInt4Kernel(),
                                                  NativeInt4Kernel(), NativeInt8Kernel(), Int8ActKernel(),
                                                  LlmInt8Kernel(), Fp8Kernel(), TritonW4A16Kernel())}
# tried in this order by "auto"; the reference kernel is the last resort
# (native-* only where lowbit's native library is built: scripts/setup.sh)
# (native-int4 before native-int8: codes that fit 4 bits are read at 4 bits)
_AUTO_ORDER = ("triton-w4a16", "native-int4", "native-int8", "cpu-int8", "cpu-int4", "w8a8-int8", "llm-int8", "fp8",
               "reference")


def select_kernel(spec: IntSpec, shape: tuple[int, int], device: torch.device | str = "cpu",
                  prefer: str = "auto", act=None) -> Kernel:
    device = torch.device(device)
    if prefer == "auto":
        for name in _AUTO_ORDER:
            only_on = getattr(KERNELS[name], "auto_devices", None)
            if only_on is not None and device.type not in only_on:
                continue
            if KERNELS[name].unsupported(spec, shape, device, act) is None:
                return KERNELS[name]
        raise LowbitError(f"no kernel runs {spec.name} with activations {act}")
    if prefer not in KERNELS:
        raise LowbitError(f"unknown kernel '{prefer}'; choose from auto, {', '.join(KERNELS)}")
    reason = KERNELS[prefer].unsupported(spec, shape, device, act)
    if reason:
        raise LowbitError(f"kernel '{prefer}' cannot run {spec.name} {shape[0]}x{shape[1]}: {reason}")
    return KERNELS[prefer]


__all__ = ["KERNELS", "Kernel", "select_kernel"]
