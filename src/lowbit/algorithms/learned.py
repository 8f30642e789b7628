"""Learned rounding (in the spirit of AutoRound, Cheng et al. 2023, and OmniQuant's learnable clipping): instead
of rounding each weight to its nearest code, learn whether it rounds up or down, and learn each group's range.

For one Linear with start weights W0 ([N, K]) and start parameters (scale s0, zero point z0 per row and group,
from RTN, GPTQ or AWQ) the trainable state is
    v        [N, K]  rounding offset, clamped to [-0.5, 0.5]: codes are round(W0 / s + z + v), so no code moves
                     more than one step from round-to-nearest under the same (s, z)
    a_lo     [N, G]  range factors, clamped to [CLIP_MIN, 1]: the group's range [lo, hi] = [(qmin − z0)·s0,
    a_hi     [N, G]  (qmax − z0)·s0] shrinks to [a_lo·lo, a_hi·hi]; s = (a_hi·hi − a_lo·lo) / (qmax − qmin) and
                     z = round(qmin − a_lo·lo / s). Symmetric formats keep the implicit zero point and use a_hi
                     alone (s = a_hi·s0).
With v = 0 and a = 1 the codes are those of round-to-nearest under (s0, z0) — exactly the start's codes for
RTN and for GPTQ (whose W0 is its own dequantized result, already on the grid).

Rounding is differentiated with the straight-through estimator (`ste_round`: forward rounds, backward is the
identity), so gradients reach v and, through s and z, the range factors. The loss is whatever the caller
computes from `LearnedLinear.weight()` — lowbit.blockwise uses the output error of a whole decoder block
against the float block. Updates are signed gradient steps with a linearly decaying learning rate (AutoRound)
or Adam.

Scales are rounded to float16 inside the forward pass, as they are stored, so the weights trained are exactly
the weights `quantized()` packs.

Formats whose scales are themselves quantized (GGUF block types such as Q4_0 or Q4_K, two-level integer
scales) train on fixed grids instead (`GridLearnedLinear`): each block of the format's `grid_width` columns keeps
the grid its quantizer fits to W0 (formats.base.Grid: values step · (q − zero) − offset), and only the offsets v
train, with the same ±0.5 bound; the codes are packed on exactly those grids, so the result is a valid block of
the format whose dequantization equals the trained weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LowbitError
from ..formats import IntSpec, QuantizedTensor, WeightFormat

CLIP_MIN = 0.5   # a group's range may shrink to half its start, no further (AutoRound's bound)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass; the gradient passes through unchanged (straight-through estimator)."""
    return _RoundSTE.apply(x)


def ste_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) whose gradient is zero outside [lo, hi] (a clamped code does not follow its input)."""
    return torch.clamp(x, lo, hi)


def check_trainable(spec: WeightFormat) -> IntSpec:
    """The formats whose group scales train (LearnedLinear, and quantization-aware training)."""
    if not isinstance(spec, IntSpec):
        raise LowbitError(f"learned rounding trains integer formats (int2..int8), not {spec.name}")
    if spec.two_level:
        raise LowbitError(f"learned rounding trains float16 group scales, not the two-level scales of {spec.name}")
    return spec


def has_grid(spec: WeightFormat) -> bool:
    """Whether the format exposes fixed grids (GridLearnedLinear trains on them)."""
    return type(spec).fit_grid is not WeightFormat.fit_grid


def check_learnable(spec: WeightFormat) -> None:
    """One clear error for formats learned rounding cannot train (those without a grid, such as FP8)."""
    if not (isinstance(spec, IntSpec) or has_grid(spec)):
        raise LowbitError(f"learned rounding trains integer formats (int2..int8) and GGUF types, not {spec.name}")


def learner_for(w0: torch.Tensor, start: QuantizedTensor, learn_range: bool = True) -> nn.Module:
    """The learned rounding of one Linear: group scales and offsets for one-level integer formats, offsets on
    fixed grids for formats with quantized scales."""
    check_learnable(start.spec)
    if isinstance(start.spec, IntSpec) and not start.spec.two_level:
        return LearnedLinear(w0, start, learn_range)
    return GridLearnedLinear(w0, start)


class LearnedLinear(nn.Module):
    """The trainable rounding of one weight matrix; see the module docstring."""

    def __init__(self, w0: torch.Tensor, start: QuantizedTensor, learn_range: bool = True, train_weight: bool = False):
        """train_weight: the weights W0 themselves train and the offsets v stay 0 (quantization-aware
        training, lowbit.train); otherwise W0 is fixed and v trains (learned rounding)."""
        super().__init__()
        spec = check_trainable(start.spec)
        N, K = w0.shape
        self.spec, self.g = spec, spec.group_size_for(K)
        self.w0 = nn.Parameter(w0.detach().float().reshape(N, K // self.g, self.g).clone(), requires_grad=train_weight)
        self.register_buffer("s0", start.scales.float())
        z0 = torch.full_like(self.s0, float(spec.implicit_zero)) if start.zeros is None else start.zeros.float()
        self.register_buffer("z0", z0)
        self.v = nn.Parameter(torch.zeros_like(self.w0), requires_grad=not train_weight)
        G = self.s0.shape[1]
        self.a_lo = nn.Parameter(torch.ones(N, G), requires_grad=learn_range and not spec.symmetric)
        self.a_hi = nn.Parameter(torch.ones(N, G), requires_grad=learn_range)

    @torch.no_grad()
    def project(self) -> None:
        """Back into the allowed set after an update."""
        self.v.clamp_(-0.5, 0.5)
        self.a_lo.clamp_(CLIP_MIN, 1.0)
        self.a_hi.clamp_(CLIP_MIN, 1.0)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point), float [N, G]; the scale rounded to float16 as stored, the zero point an integer."""
        spec = self.spec
        if spec.symmetric:
            s, z = self.s0 * self.a_hi, self.z0
        else:
            lo, hi = (spec.qmin - self.z0) * self.s0 * self.a_lo, (spec.qmax - self.z0) * self.s0 * self.a_hi
            s = (hi - lo) / (spec.qmax - spec.qmin)
            z = ste_clamp(ste_round(spec.qmin - lo / s.clamp(min=2**-24)), spec.qmin, spec.qmax)
        s = s.clamp(min=2**-24)
        s = s + (s.half().float() - s).detach()     # stored precision forward, plain gradient backward
        return s, z

    def _codes(self, s, z, delta: torch.Tensor | None = None) -> torch.Tensor:
        w = self.w0 if delta is None else self.w0 + delta.reshape(self.w0.shape)
        x = w / s.unsqueeze(-1) + z.unsqueeze(-1) + self.v
        return ste_clamp(ste_round(x), self.spec.qmin, self.spec.qmax)

    def weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized weight [N, K] (float32), differentiable in v, the range factors and `delta` (an
        [N, K] change of the weights before rounding: low-rank adapters, lowbit.train)."""
        s, z = self.qparams()
        w = (self._codes(s, z, delta) - z.unsqueeze(-1)) * s.unsqueeze(-1)
        return w.reshape(w.shape[0], -1)

    @torch.no_grad()
    def quantized(self, delta: torch.Tensor | None = None) -> QuantizedTensor:
        """The packed result; dequantizes to exactly `weight(delta)`."""
        s, z = self.qparams()
        codes = self._codes(s, z, delta).reshape(s.shape[0], -1).to(torch.int32)
        zeros = None if self.spec.symmetric else z.to(self.spec.code_dtype)
        return QuantizedTensor.from_codes(codes, s.half(), zeros, self.spec)


class GridLearnedLinear(nn.Module):
    """Learned rounding on the format's fixed grids (see the module docstring): only the offsets v train."""

    def __init__(self, w0: torch.Tensor, start: QuantizedTensor):
        super().__init__()
        spec = start.spec
        N, K = w0.shape
        g = spec.grid_width(K)
        self.spec = spec
        self.grids = [spec.fit_grid(w0[:, j * g:(j + 1) * g].float()) for j in range(K // g)]
        self.lo, self.hi = self.grids[0].lo, self.grids[0].hi
        self.register_buffer("step", torch.cat([gr.step for gr in self.grids], 1).float())
        self.register_buffer("zero", torch.cat([gr.zero.float().expand(N, g) for gr in self.grids], 1).contiguous())
        self.register_buffer("offset", torch.cat([gr.offset for gr in self.grids], 1).float())
        self.w0 = nn.Parameter(w0.detach().float().clone(), requires_grad=False)
        self.v = nn.Parameter(torch.zeros(N, K))
        # no range to learn: the grids are fixed (kept so that optimizers and resets treat every learner alike)
        self.a_lo = nn.Parameter(torch.ones(1), requires_grad=False)
        self.a_hi = nn.Parameter(torch.ones(1), requires_grad=False)

    @torch.no_grad()
    def project(self) -> None:
        self.v.clamp_(-0.5, 0.5)

    def _codes(self) -> torch.Tensor:
        flat = self.step == 0      # an all-zero block: its one value, −offset
        safe = torch.where(flat, torch.ones_like(self.step), self.step)
        q = ste_clamp(ste_round((self.w0 + self.offset) / safe + self.zero + self.v), self.lo, self.hi)
        return torch.where(flat, self.zero.clamp(self.lo, self.hi), q)

    def weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized weight [N, K] (float32), evaluated as the format dequantizes (Grid.values)."""
        if delta is not None:
            raise LowbitError(f"{self.spec.name}: only the rounding trains on a fixed grid")
        return self.step * (self._codes() - self.zero) - self.offset

    @torch.no_grad()
    def quantized(self, delta: torch.Tensor | None = None) -> QuantizedTensor:
        """The packed result on the grids; dequantizes to exactly `weight()`."""
        return self.spec.from_grids(self._codes().to(torch.int32), self.grids)


class SignSGD(torch.optim.Optimizer):
    """p -= lr · sign(grad) (AutoRound's update: every weight moves by the same amount, whatever its gradient's
    scale, which suits offsets that only matter where they cross a rounding boundary)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def make_optimizer(learners: list[LearnedLinear], optimizer: str, lr: float, range_lr: float, iters: int):
    """The optimizer (offsets at `lr`, range factors at `range_lr`) and a linearly decaying learning-rate
    schedule over `iters` steps."""
    groups = [{"params": [p for m in learners for p in (m.v, m.w0) if p.requires_grad], "lr": lr},
              {"params": [p for m in learners for p in (m.a_lo, m.a_hi) if p.requires_grad], "lr": range_lr}]
    groups = [g for g in groups if g["params"]]
    opt = SignSGD(groups, lr) if optimizer == "sign" else torch.optim.Adam(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / iters))
    return opt, sched
