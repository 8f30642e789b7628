"""Bit packing of unsigned integer codes along the last axis.

Layout (lowbit's storage format, on disk and in memory for the reference kernel): the codes of a row form one
little-endian bit stream — code j occupies bits [j·b, (j+1)·b) counted from the least significant bit of byte 0.
    b = 4: uint8 [..., K // 2];     byte j = code 2j (low nibble) | code 2j+1 << 4
    b = 2: uint8 [..., K // 4];     byte j = codes 4j..4j+3, lowest bits first
    b = 3: uint8 [..., 3 K // 8];   every 3 bytes hold 8 codes
K · b must be a multiple of 8. The packed axis is the last one (a Linear's in_features), so a row of a
weight matrix stays contiguous. `pack_nibbles` / `unpack_nibbles` are the 4-bit layout without checks, for
callers whose codes are in range by construction (the KV cache packs every decoded token; a range check would
synchronise with the device at each step).
"""

import torch

from ..errors import LowbitError


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if codes.dtype != torch.uint8:
        raise LowbitError(f"pack_bits expects uint8 codes, got {codes.dtype}")
    k = codes.shape[-1]
    if (k * bits) % 8:
        raise LowbitError(f"{bits}-bit packing needs {8 // _gcd8(bits)} | last dimension, got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise LowbitError(f"pack_bits: a code exceeds {(1 << bits) - 1}")
    if bits == 8:
        return codes.clone()
    if bits == 4:  # fast path, same layout as the general one
        return pack_nibbles(codes)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*codes.shape[:-1], k * bits // 8, 8)
    weights = (1 << torch.arange(8, device=codes.device)).to(torch.uint8)
    return (stream * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise LowbitError(f"unpack_bits expects uint8, got {packed.dtype}")
    if bits == 8:
        return packed.clone()
    if bits == 4:
        return unpack_nibbles(packed)
    n = packed.shape[-1] * 8 // bits
    stream = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = stream.reshape(*packed.shape[:-1], n, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (stream * weights).sum(-1, dtype=torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], [..., K] with K even -> uint8 [..., K / 2]: code 2j in the low nibble of byte j,
    2j+1 in the high one. Unchecked: codes above 15 corrupt their neighbour."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: uint8 [..., K / 2] -> uint8 codes [..., K]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def _gcd8(bits: int) -> int:
    import math
    return math.gcd(8, bits)
