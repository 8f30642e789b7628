"""Automatic per-tensor formats under a size budget (`lowbit quantize --target-bpw X`).

Three steps, each callable on its own:

1. `fisher_diagonal(model, windows, names)`: how much each weight matters. Quantizing moves the weights by δ;
   the KL divergence from the original model's next-token distribution p to the quantized one's is, to second
   order around the original weights, KL ≈ ½ δᵀ F δ, with F the Fisher information of p (the expectation, over
   text positions and over tokens y drawn from p, of ∇log p(y) ∇log p(y)ᵀ; the first-order term is zero because
   the original model is the minimum of its own KL). Its diagonal is estimated by drawing one token per
   position from the model itself and squaring the gradient of Σ log p(y) over a window: the cross-position
   terms vanish in expectation, since each y is drawn independently given its (real) context. Divided by the
   number of positions, ½ Σ F ⊙ δ² predicts the mean per-token KLD.
2. `sensitivity(weight, fisher, candidates, quantize)`: that prediction for one tensor in each candidate
   format, with δ the rounding error of the quantizer that will be used. Every format quantizes rows
   independently, so it is estimated on a sample of rows drawn in proportion to their Fisher mass, each
   weighted by 1 / (its probability · the sample size): unbiased, with little variance where the mass is.
3. `allocate(table, budget)`: one format per tensor minimizing the summed prediction with the bytes at or
   under the budget. A multiple-choice knapsack: solved by Lagrangian relaxation (each tensor takes the option
   minimizing loss + λ·bytes; λ found by bisection) and then by greedy upgrades, the best loss reduction per
   byte first, within the bytes left.

The budget is total bits per parameter over the whole output: the caller says how many bytes are fixed
(metadata, norms, tensors left out of the plan) and the plan spends the rest. Predictions add across tensors
(interactions are ignored); `benchmarks/gguf_quality.py` checks them against measured KLD.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import LowbitError
from .formats import GGUF_TYPES, GGUFSpec, IntSpec, WeightFormat
from .products import model_products

KEEP = "F16"          # the option of leaving a tensor unquantized, stored as 16-bit floats
SAMPLE_ROWS = 256     # rows per tensor on which a format's error is measured


@dataclass(frozen=True)
class Option:
    """One way to store one tensor: its format (None: kept as 16-bit floats), bytes and predicted KLD."""

    label: str
    spec: WeightFormat | None
    nbytes: int
    loss: float


# --------------------------------------------------------------------------------------------------------------
# candidate formats

LOWBIT_FORMATS = tuple(IntSpec(b, g, s) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128) for s in (True, False)
                       if not (b == 8 and not s))
# two-level scales (formats.intq): groups of 32 and 16 for the price of larger ones, one super-scale per row so
# that any row length divisible by the group fits
TWO_LEVEL_FORMATS = tuple(IntSpec(b, g, s, 6, -1) for b in (2, 3, 4, 5, 6) for g in (16, 32) for s in (True, False))


def candidate_formats(formats: str | list) -> list[WeightFormat]:
    """"gguf": every GGUF block type; "lowbit": lowbit's integer formats (2..8 bits, groups of 32/64/128);
    "lowbit+two-level": those and TWO_LEVEL_FORMATS;
    or a list (or comma-separated names): GGUF type names (Q4_K) and integer format names (int4_g64_asym)."""
    if isinstance(formats, str):
        if formats == "gguf":
            return [GGUFSpec(t) for t in GGUF_TYPES]
        if formats == "lowbit":
            return list(LOWBIT_FORMATS)
        if formats == "lowbit+two-level":
            return list(LOWBIT_FORMATS + TWO_LEVEL_FORMATS)
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    out = []
    for f in formats:
        out.append(f if isinstance(f, WeightFormat) else _format_named(str(f)))
    if not out:
        raise LowbitError("no candidate formats given")
    return out


INT_NAME = re.compile(r"int(\d)_(?:g(\d+)|(pc))_(sym|asym)(?:_s(\d)(r|x\d+)?)?")   # IntSpec.name


def _format_named(name: str) -> WeightFormat:
    if name.upper() in GGUF_TYPES:
        return GGUFSpec(name.upper())
    m = INT_NAME.fullmatch(name.lower())
    if m is None:
        raise LowbitError(f"unknown format {name!r}: give a GGUF type ({', '.join(GGUF_TYPES)}) or an integer "
                          "format such as int4_g64_asym (bits, group size or pc, sym or asym) or int4_g32_sym_s6 "
                          "(6-bit two-level scales, super-blocks of 256; _s6r: one super-scale per row)")
    bits, group, pc, sym, sb, where = m.groups()
    if sb is None:
        return IntSpec(int(bits), -1 if pc else int(group), sym == "sym")
    return IntSpec(int(bits), -1 if pc else int(group), sym == "sym", int(sb),
                   256 if where is None else -1 if where == "r" else int(where[1:]))


def fits(spec: WeightFormat, shape: tuple[int, int]) -> bool:
    try:
        spec.check_shape(shape)
    except LowbitError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# 1. how much each weight matters

def fisher_diagonal(model: nn.Module, windows: torch.Tensor, names: list[str], *, seed: int = 0,
                    progress: bool = True, matmul: str = "auto") -> dict[str, torch.Tensor]:
    """Per-token Fisher diagonal of the model's next-token distribution for the weights of `names` (modules
    with a `.weight`; tied weights are one parameter and get one entry, under the first name). windows: token
    ids [n, T]. matmul: the passes' float32 products (lowbit.products; "auto": from bfloat16-rounded inputs
    where the CPU multiplies bfloat16 natively: an estimate from 8 windows does not need float32's last bits,
    and the plans it gave were as good, BENCHMARKS.md). Returns name -> float32 tensor shaped like the weight.

    Memory: each weight's gradient is squared into its sum as soon as backward has finished it, and dropped
    (not all held until the end), and the gradient at the logits is written from the probabilities the
    sampling computed anyway (what log_softmax's backward would compute from its saved output): the pass holds
    about 1 GB less on the default model. It squares with addcmul_ (no temporary the size of the tied
    embedding), backward starts from the whole [1, T, V] logits (from logits[0] it would zero-fill a copy of
    them first) and the sums are divided in place. That matters beyond the memory: on some virtual machines
    every page a process touches for the first time costs tens of microseconds (BENCHMARKS.md)."""
    params: dict[str, nn.Parameter] = {}
    for n in names:
        w = model.get_submodule(n).weight
        if all(w is not p for p in params.values()):
            params[n] = w
    was = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    acc = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}

    def squared_into(a):
        def hook(p):
            g = p.grad.float()
            a.addcmul_(g, g)   # a += g², with no g² tensor of its own
            p.grad = None
        return hook

    for p in params.values():
        p.requires_grad_(True)
    handles = [p.register_post_accumulate_grad_hook(squared_into(acc[n])) for n, p in params.items()]
    gen = torch.Generator().manual_seed(seed)
    positions = 0
    try:
        with model_products(matmul, model):
            for ids in tqdm(windows, desc="sensitivity", unit="window", disable=not progress):
                logits = model(ids[None]).logits   # [1, T, V]: backward from logits[0] would zero-fill a copy
                # d Σ log p(y) / d logits = onehot(y) − p, row by row
                grad = F.log_softmax(logits.detach()[0].float(), dim=-1).exp_()
                y = sample_tokens(grad, gen)
                grad.neg_().scatter_add_(1, y, torch.ones(y.shape, dtype=grad.dtype))
                logits.backward(grad.to(logits.dtype)[None])
                del logits, grad
                positions += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(was[n][0])
            p.grad = was[n][1]
    return {n: a.div_(positions) for n, a in acc.items()}


def sample_tokens(p: torch.Tensor, gen: torch.Generator, rows: int = 64) -> torch.Tensor:
    """One token per row of probabilities p [T, V] (rows need not sum exactly to 1), drawn by inverting the
    cumulative distribution: one uniform number per row. torch.multinomial draws an exponential number per
    vocabulary entry instead, and on a 49k vocabulary that cost a sixth of the whole Fisher pass. The
    cumulative sums are taken `rows` rows at a time (each row's alone: the same numbers, a fraction of the
    memory)."""
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=p.dtype)
    out = torch.empty(p.shape[0], 1, dtype=torch.long)
    for r in range(0, p.shape[0], rows):
        cdf = p[r:r + rows].cumsum(dim=-1)
        out[r:r + rows] = torch.searchsorted(cdf, u[r:r + rows] * cdf[:, -1:], right=True).clamp_(max=p.shape[-1] - 1)
    return out


# --------------------------------------------------------------------------------------------------------------
# 2. what each format would cost each tensor

def rtn_error(rows: torch.Tensor, spec: WeightFormat) -> torch.Tensor:
    """The default quantizer for sensitivity: round-to-nearest into `spec`; returns the rounding error."""
    return spec.quantize(rows).dequantize(torch.float32) - rows


def sensitivity(weight: torch.Tensor, fisher: torch.Tensor, candidates: list[WeightFormat], *,
                error=rtn_error, rows: int = SAMPLE_ROWS, seed: int = 0) -> dict[WeightFormat, float]:
    """Predicted per-token KLD, ½ Σ F ⊙ δ², for `weight` stored in each candidate that fits its shape; δ is
    `error(rows, spec)`. Estimated on `rows` rows drawn with probability proportional to their Fisher mass
    (all rows when there are no more)."""
    W = weight.detach().float()
    N = W.shape[0]
    if N <= rows:
        idx, w_row = torch.arange(N), torch.ones(N)
    else:
        mass = fisher.sum(dim=1).double()
        prob = (mass + 1e-3 * mass.mean() + 1e-30) / (mass + 1e-3 * mass.mean() + 1e-30).sum()
        gen = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(prob, rows, replacement=True, generator=gen)
        w_row = (1.0 / (prob[idx] * rows)).float()
    sub, fsub = W[idx], fisher[idx]
    out = {}
    for spec in candidates:
        if fits(spec, tuple(W.shape)):
            d = error(sub, spec)
            out[spec] = 0.5 * float(((fsub * d.square()).sum(dim=1) * w_row).sum())
    return out


# --------------------------------------------------------------------------------------------------------------
# 3. one option per tensor under the budget

def allocate(table: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """The option per tensor with the least total loss whose bytes sum to at most `budget`."""
    smallest = sum(min(o.nbytes for o in opts) for opts in table.values())
    if smallest > budget:
        raise LowbitError(f"the budget ({budget} bytes for the planned tensors) is below the smallest possible "
                          f"plan ({smallest} bytes)")

    def pick(lam: float) -> dict[str, Option]:
        return {n: min(opts, key=lambda o: (o.loss + lam * o.nbytes, o.nbytes)) for n, opts in table.items()}

    def size(choice) -> int:
        return sum(o.nbytes for o in choice.values())

    choice = pick(0.0)
    if size(choice) > budget:
        lo, hi = 0.0, 1.0
        while size(pick(hi)) > budget:
            hi *= 4
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if size(pick(mid)) > budget else (lo, mid)
        choice = pick(hi)
    # greedy upgrades within what is left, the best loss reduction per byte first
    left = budget - size(choice)
    while True:
        best = None
        for n, opts in table.items():
            cur = choice[n]
            for o in opts:
                extra = o.nbytes - cur.nbytes
                gain = cur.loss - o.loss
                if 0 < extra <= left and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, o)
        if best is None:
            return choice
        _, n, o = best
        left -= o.nbytes - choice[n].nbytes
        choice[n] = o


def options_for(weight: torch.Tensor, losses: dict[WeightFormat, float], keep: bool = True) -> list[Option]:
    """The options of one tensor: each measured format, and (with keep) 16-bit floats at no loss."""
    shape = tuple(weight.shape)
    opts = [Option(_label(s), s, s.nbytes(shape), loss) for s, loss in losses.items()]
    if keep:
        opts.append(Option(KEEP, None, 2 * math.prod(shape), 0.0))
    return opts


def _label(spec: WeightFormat) -> str:
    return spec.type if isinstance(spec, GGUFSpec) else spec.name


def predicted_kld(choice: dict[str, Option]) -> float:
    return sum(o.loss for o in choice.values())


# --------------------------------------------------------------------------------------------------------------
# the whole step, on a model

@dataclass
class Allocation:
    """A plan under a budget: the option chosen per tensor, and what the budget counted."""

    choice: dict[str, Option]
    params: int            # parameters of the model (tied weights once)
    fixed_bytes: int       # bytes outside the plan: metadata, norms, tensors left out
    budget_bytes: int      # total bytes allowed (target bits per parameter · params / 8)
    seconds: float         # measuring sensitivity and allocating
    aliases: dict[str, list[str]] = field(default_factory=dict)   # tensor -> modules sharing it (a tied lm_head)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + sum(o.nbytes for o in self.choice.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.params

    @property
    def predicted_kld(self) -> float:
        return predicted_kld(self.choice)

    def rules(self) -> list[dict]:
        """Recipe rules (lowbit.recipes), one per planned tensor: what `--plan-out` writes."""
        out = []
        for name, o in self.choice.items():
            for n in [name, *self.aliases.get(name, [])]:   # a tied lm_head takes the embedding's format
                if o.spec is None:
                    out.append({"match": n, "keep": True})
                elif isinstance(o.spec, GGUFSpec):
                    out.append({"match": n, "gguf_type": o.spec.type})
                else:
                    out.append({"match": n, "bits": o.spec.bits, "group_size": o.spec.group_size,
                                "symmetric": o.spec.symmetric,
                                **({"scale_bits": o.spec.scale_bits, "super_block": o.spec.super_block}
                                   if o.spec.two_level else {})})
        return out

    def summary(self) -> list[tuple[str, int, int, float]]:
        """(option, tensors, bytes, predicted KLD) per option chosen, largest bytes first."""
        rows: dict[str, list] = {}
        for o in self.choice.values():
            r = rows.setdefault(o.label, [0, 0, 0.0])
            r[0] += 1
            r[1] += o.nbytes
            r[2] += o.loss
        return sorted(((k, *v) for k, v in rows.items()), key=lambda r: -r[2])


def planned_tensors(model: nn.Module, arch) -> list[str]:
    """What the allocator chooses a format for: every Linear of the decoder blocks, the embedding (with the
    lm_head when they are tied: one tensor) and an untied lm_head."""
    names = [arch.embed]
    names += [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.startswith(arch.blocks + ".")]
    if model.get_submodule(arch.lm_head).weight is not model.get_submodule(arch.embed).weight:
        names.append(arch.lm_head)
    return names


@dataclass
class Sensitivity:
    """Every planned tensor's options (format, bytes, predicted KLD), measured once; `allocate` then plans
    for any number of budgets."""

    table: dict[str, list[Option]]
    params: int            # parameters of the model (tied weights once)
    fixed_bytes: int       # what the output spends outside the planned tensors
    seconds: float
    aliases: dict[str, list[str]] = field(default_factory=dict)

    def allocate(self, target_bpw: float) -> Allocation:
        _number_check(target_bpw)
        start = time.perf_counter()
        budget = int(target_bpw * self.params / 8)
        try:
            choice = allocate(self.table, budget - self.fixed_bytes)
        except LowbitError:
            least = self.fixed_bytes + sum(min(o.nbytes for o in opts) for opts in self.table.values())
            raise LowbitError(f"target {target_bpw} bits per weight is below the smallest this model can be "
                              f"stored in with these formats: {8 * least / self.params:.3f}") from None
        return Allocation(choice, self.params, self.fixed_bytes, budget,
                          self.seconds + time.perf_counter() - start, self.aliases)


def importance_error(importance: torch.Tensor):
    """The quantizer for sensitivity when calibration importance is known: the format's importance-weighted
    round-to-nearest (what `RTN(importance=True)` stores)."""
    def error(rows: torch.Tensor, spec: WeightFormat) -> torch.Tensor:
        return spec.quantize(rows, importance=importance).dequantize(torch.float32) - rows
    return error


def measure_sensitivity(model: nn.Module, windows: torch.Tensor, *, formats="gguf", overhead_bytes: int = 0,
                        norm_bytes: int = 4, keep: bool = True, error=rtn_error, importance=None, seed: int = 0,
                        progress: bool = True, fisher: dict[str, torch.Tensor] | None = None,
                        matmul: str = "auto") -> Sensitivity:
    """The options of every tensor of `planned_tensors`. windows: calibration token ids [n, T] for the Fisher
    estimate (8 × 512 is plenty: on the default model 16 gave plans of the same measured KLD). overhead_bytes:
    what the output spends besides tensors (a GGUF file's header, metadata and alignment); tensors outside the
    plan are counted at `norm_bytes` per value for vectors (GGUF stores norms as F32) and 2 for matrices.
    importance (lowbit.models.importance.Importance): measure each tensor's error with the importance-weighted
    quantizer (a tied embedding takes the lm_head's).
    fisher: `fisher_diagonal(model, windows, planned_tensors(...))` when already computed. matmul: the Fisher
    pass's float32 products (see `fisher_diagonal`)."""
    from .models.arch import arch_for

    start = time.perf_counter()
    arch = arch_for(model)
    names = planned_tensors(model, arch)
    params = {id(p): p for p in model.parameters()}
    planned_ids = {id(model.get_submodule(n).weight) for n in names}
    fixed = overhead_bytes + sum(p.numel() * (norm_bytes if p.dim() == 1 else 2)
                                 for k, p in params.items() if k not in planned_ids)
    candidates = candidate_formats(formats)
    if fisher is None:
        fisher = fisher_diagonal(model, windows, names, seed=seed, progress=progress, matmul=matmul)
    table = {}
    for n in tqdm(fisher, desc="formats", unit="tensor", disable=not progress):
        W = model.get_submodule(n).weight
        imp = None
        if importance is not None:
            imp = importance.get(arch.lm_head if n == arch.embed else n)
        losses = sensitivity(W, fisher[n], candidates, error=error if imp is None else importance_error(imp),
                             seed=seed)
        if not losses and not keep:
            raise LowbitError(f"{n}: none of the candidate formats can store a {tuple(W.shape)} matrix")
        table[n] = options_for(W, losses, keep)
    aliases = {}
    if arch.lm_head not in names:   # tied to the embedding: one tensor, one format
        aliases[arch.embed] = [arch.lm_head]
    return Sensitivity(table, sum(p.numel() for p in params.values()), fixed, time.perf_counter() - start,
                       aliases)


def plan_budget(model: nn.Module, windows: torch.Tensor, target_bpw: float, **kw) -> Allocation:
    """One format per planned tensor so that the whole output takes at most `target_bpw` bits per parameter
    (keywords: see `measure_sensitivity`)."""
    _number_check(target_bpw)
    return measure_sensitivity(model, windows, **kw).allocate(target_bpw)


def write_rules(path, rules: list[dict], method: str | None = None) -> None:
    """A plan's rules as a recipe file (TOML, or JSON when the name ends in .json) that `--recipe` reads back."""
    from .io.atomic import atomic_write_text

    rules = [dict(r, method=method) if method and "keep" not in r else r for r in rules]
    if str(path).endswith(".json"):
        text = json.dumps({"rules": rules}, indent=1) + "\n"
    else:
        def value(v):
            return json.dumps(v) if isinstance(v, (str, bool)) else str(v)
        text = "# one rule per tensor, chosen by lowbit's size-budget allocator; edit freely\n" + "".join(
            "\n[[rule]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in r.items()) for r in rules)
    atomic_write_text(path, text)


def _number_check(target_bpw) -> None:
    if isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float)) or not math.isfinite(target_bpw) \
            or target_bpw <= 0:
        raise LowbitError(f"target bits per weight must be a positive number, got {target_bpw!r}")


__all__ = ["Option", "KEEP", "LOWBIT_FORMATS", "TWO_LEVEL_FORMATS", "candidate_formats", "fits", "fisher_diagonal",
           "rtn_error", "sensitivity", "allocate", "options_for", "predicted_kld", "Allocation", "Sensitivity",
           "planned_tensors", "measure_sensitivity", "plan_budget", "importance_error", "write_rules"]
