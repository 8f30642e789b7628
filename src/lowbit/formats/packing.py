"""Bit packing of integer codes.

uint4 layout (lowbit's storage format, on disk and in memory for the reference kernel):
    codes  : uint8 [..., K], each value in [0, 15]
    packed : uint8 [..., K // 2]; byte j holds code 2j in its low nibble and code 2j+1 in its high nibble.
K must be even. The packed axis is the last one (a Linear's in_features), so a row of a weight matrix
stays contiguous.
"""

import torch

from ..errors import LowbitError


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    if codes.dtype != torch.uint8:
        raise LowbitError(f"pack_uint4 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise LowbitError(f"pack_uint4 needs an even last dimension, got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise LowbitError("pack_uint4: a code exceeds 15")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise LowbitError(f"unpack_uint4 expects uint8, got {packed.dtype}")
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.uint8, device=packed.device)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out
