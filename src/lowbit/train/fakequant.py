"""Fake-quantized Linears for quantization-aware training, and the conversions to and from packed modules.

A `FakeQuantLinear` computes y = x Ŵᵀ + b with Ŵ the dequantized value of its trainable state under its format.
Two things can train (`train=`):

- "weights": float latent weights under lowbit.algorithms.learned.LearnedLinear: Ŵ = (clamp(round(W/s + z)) − z)·s,
  rounding differentiated with the straight-through estimator, each group's scale learnable as in LSQ (Esser et
  al., 2020) as a factor in [0.5, 1] on the start scale (and, for asymmetric formats, on each end of the range).
  The latent weights start at the float weights the start was rounded from (`start=`), clamped into the rounding
  cell of the start's code: the start's codes are kept exactly, and each weight sits as far from a rounding
  boundary as its float value does. (Latents starting on the grid points themselves sit half a step from every
  boundary, so small learning rates change no code at all.)
- "scales": the integer codes stay frozen and only each group's scale trains, Ŵ = (q − z)·s (EfficientQAT's
  end-to-end stage, Chen et al. 2024): far fewer trainable values, no code can flip on a noisy gradient.
- "lora": the latent weights stay frozen and a low-rank change B·A (rank `rank`; B starts at zero) trains
  beside the range factors, Ŵ = fake-quantized(W + B·A): the adapters are merged into the weights before
  rounding, so the packed result has no adapter left, and the optimizer keeps state for r·(N + K) values per
  Linear instead of N·K.

Ŵ equals, bit for bit, what `quantized()` packs (scales are rounded to float16 in the forward pass, as stored),
so a converted model computes what the trained one did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.learned import LearnedLinear, check_trainable
from ..errors import LowbitError
from ..formats import QuantizedTensor
from ..nn import QuantLinear, set_submodule

TRAINABLE = ("weights", "scales", "lora")
LORA_RANK = 16
CELL = 0.5 - 2**-8   # how far (in steps) a latent weight may start from its code's grid point: inside its cell


def start_latent(qt: QuantizedTensor, source: torch.Tensor | None) -> torch.Tensor:
    """Float weights [N, K] that round to exactly qt's codes under qt's scales, as close to `source` as allowed."""
    w = qt.dequantize(torch.float32)
    if source is None:
        return w
    if source.shape != w.shape:
        raise LowbitError(f"start weights of shape {tuple(source.shape)} for a weight of shape {tuple(w.shape)}")
    N, K = w.shape
    s = qt.scales.float().repeat_interleave(K // qt.scales.shape[1], dim=1)
    return w + (source.float() - w).clamp(-CELL * s, CELL * s)


class FrozenCodes(nn.Module):
    """The "scales" state: frozen codes, trainable group scales (see the module docstring)."""

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        self.spec = check_trainable(qt.spec)
        N, K = qt.shape
        self.g = K // qt.scales.shape[1]
        self.register_buffer("codes", qt.codes().float().reshape(N, -1, self.g))
        z = torch.full_like(qt.scales, self.spec.implicit_zero, dtype=torch.float32) if qt.zeros is None \
            else qt.zeros.float()
        self.register_buffer("z", z)
        self.scale = nn.Parameter(qt.scales.float().clone())

    @torch.no_grad()
    def project(self) -> None:
        self.scale.clamp_(2**-24, 65504.0)   # a positive float16

    def _scale(self) -> torch.Tensor:
        s = self.scale
        return s + (s.half().float() - s).detach()   # stored precision forward, plain gradient backward

    def weight(self) -> torch.Tensor:
        w = (self.codes - self.z.unsqueeze(-1)) * self._scale().unsqueeze(-1)
        return w.reshape(w.shape[0], -1)

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        zeros = None if self.spec.symmetric else self.z.to(self.spec.code_dtype)
        return QuantizedTensor.from_codes(self.codes.reshape(self.codes.shape[0], -1).to(torch.int32),
                                          self._scale().half(), zeros, self.spec)


class FakeQuantLinear(nn.Module):
    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, learn_scales: bool = True,
                 start: torch.Tensor | None = None, train: str = "weights", rank: int = LORA_RANK):
        super().__init__()
        check_trainable(qt.spec)
        if train not in TRAINABLE:
            raise LowbitError(f"QAT trains one of {', '.join(TRAINABLE)}, got {train!r}")
        self.out_features, self.in_features = N, K = qt.shape
        self.q = FrozenCodes(qt) if train == "scales" else \
            LearnedLinear(start_latent(qt, start), qt, learn_range=learn_scales, train_weight=train == "weights")
        self.lora_a = self.lora_b = None
        if train == "lora":
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(N, K):
                raise LowbitError(f"the adapters' rank must be an integer in 1..{min(N, K)}, got {rank!r}")
            self.lora_a = nn.Parameter(torch.randn(rank, K) / K ** 0.5)   # B·A = 0 at the start: B is zero
            self.lora_b = nn.Parameter(torch.zeros(N, rank))
            self.q.v.requires_grad_(False)      # the latent weights and offsets stay; only B·A and the ranges train
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def _delta(self) -> torch.Tensor | None:
        return None if self.lora_a is None else self.lora_b @ self.lora_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        w = self.q.weight() if self.lora_a is None else self.q.weight(self._delta())
        return F.linear(x, w.to(x.dtype), b)

    def quantized(self) -> QuantizedTensor:
        """The packed result (adapters merged before rounding)."""
        with torch.no_grad():
            return self.q.quantized() if self.lora_a is None else self.q.quantized(self._delta())


def trainable(spec) -> bool:
    try:
        check_trainable(spec)
    except LowbitError:
        return False
    return True


def prepare(model: nn.Module, learn_scales: bool = True, starts: dict | None = None,
            train: str = "weights", rank: int = LORA_RANK) -> list[str]:
    """Replace every QuantLinear holding a trainable format (integers with float16 group scales) by a
    FakeQuantLinear starting from its values (and from starts[name], the float weights it was rounded from,
    where given); returns the names replaced. Other QuantLinears stay packed and frozen."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and trainable(m.spec)]
    starts = starts or {}
    for n in names:
        m = model.get_submodule(n)
        set_submodule(model, n, FakeQuantLinear(m.quantized_tensor(), m.bias, learn_scales, starts.get(n), train,
                                                rank))
    return names


def convert(model: nn.Module, kernel: str = "auto") -> None:
    """Replace every FakeQuantLinear by a QuantLinear holding its packed result."""
    for n in [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
        m = model.get_submodule(n)
        set_submodule(model, n, QuantLinear(m.quantized(), None if m.bias is None else m.bias.detach(), kernel=kernel))
