"""The resident layout of triton-w4a16 weights: `repack` builds it from lowbit's 4-bit storage tensors and
`unpack` inverts it exactly (what saving a model stores).

K is cut into chunks of CHUNK = 128 input columns; chunk c covers columns [128·c, 128·c + 128) and is stored as
ROWS = 16 rows of 32-bit words:
    qweight  int32 [K / 8, N]  K-major: row 16·c + r, column n is one word holding the 4-bit codes of
                               W[n, 128·c + 16·i + r] for i = 0..7, code i in bits [4·i, 4·i + 4) (nibble 0
                               lowest). Adjacent words along a row belong to adjacent output features, so a
                               program that loads a [16, BLOCK_N] tile reads BLOCK_N·4 contiguous bytes per row
                               (16-byte vectors, 4 output features per thread), and nibble i of that tile is the
                               [16, BLOCK_N] block of input columns 128·c + 16·i .. 128·c + 16·i + 15 — contiguous
                               in x, so no shuffle is needed before the tensor-core dot.
    scales   float16 [G, N]    the storage scales transposed (row g = group g), G = K / group_size.
    zeros    float16 [G, N]    asymmetric only: the storage zero points z (integers 0..15, exact in float16),
                               transposed. Symmetric weights use the implicit z = 8 and store no zeros.
"""

from __future__ import annotations

import torch

from ...formats import IntSpec, QuantizedTensor
from ...formats.packing import unpack_nibbles

CHUNK = 128         # input columns per packed chunk
ROWS = CHUNK // 8   # int32 rows per chunk


def group_ok(group: int) -> bool:
    """Group sizes the kernels handle: several groups per chunk (16, 32, 64) or whole chunks per group."""
    return group in (16, 32, 64) or group % CHUNK == 0


def repack(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """lowbit's 4-bit storage tensors -> this kernel's resident tensors (see the module docstring)."""
    n, k = qt.shape
    if not isinstance(qt.spec, IntSpec) or qt.spec.bits != 4 or k % CHUNK:
        raise ValueError(f"triton-w4a16 needs 4-bit integer weights with K divisible by {CHUNK}")
    codes = unpack_nibbles(qt.qweight)                             # uint8 [N, K]
    c = codes.reshape(n, k // CHUNK, 8, ROWS).permute(1, 3, 0, 2)  # [chunk, r, n, i]
    words = torch.zeros(k // CHUNK, ROWS, n, dtype=torch.int64, device=codes.device)
    for i in range(8):
        words |= c[..., i].to(torch.int64) << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words)
    out = {"qweight": words.reshape(k // 8, n).to(torch.int32).contiguous(),
           "scales": qt.scales.t().contiguous()}
    if qt.zeros is not None:
        out["zeros"] = qt.zeros.t().to(torch.float16).contiguous()
    return out


def unpack(packed: dict[str, torch.Tensor], spec, shape: tuple[int, int]) -> QuantizedTensor:
    """The exact inverse of `repack`."""
    n, k = shape
    words = packed["qweight"].to(torch.int64) & 0xFFFFFFFF          # [K/8, N]
    nib = torch.stack([(words >> (4 * i)) & 15 for i in range(8)])  # [i, K/8, N]
    codes = nib.reshape(8, k // CHUNK, ROWS, n).permute(3, 1, 0, 2).reshape(n, k).to(torch.uint8)
    zeros = packed.get("zeros")
    zeros = None if zeros is None else zeros.t().to(torch.uint8).contiguous()
    return QuantizedTensor.from_codes(codes, packed["scales"].t().contiguous(), zeros, spec)
