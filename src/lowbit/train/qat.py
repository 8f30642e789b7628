"""Quantization-aware training by distillation: the quantized model (started from a post-training method) learns
to match the float model's next-token distributions, with its Linears fake-quantized (lowbit.train.fakequant).

The loss is KL(p_float ‖ p_quantized) per token, averaged, so no labels are needed. Training text is the
calibration text (windows of `seqlen` tokens at seeded offsets) and, optionally, `generated` windows the float
model samples itself from the beginning-of-sequence token (data-free QAT, as LLM-QAT). What trains: every
quantized Linear's weights and its group scales (Adam); embeddings, norms and the head stay as they are.

Memory: activation checkpointing (on by default) recomputes each decoder block in the backward pass instead of
keeping its intermediate activations, so only block inputs stay alive; `offload=True` additionally moves what
autograd saves to host memory (lowbit.offload.activations; a GPU saving, a no-op on a CPU).

Resume: the step's windows depend only on (seed, step), and every `save_every` steps the trainable tensors,
the optimizer's state, the step and the losses so far are written atomically to `state` (a .pt file). A run
restarted with resume=True continues from there and reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import IntWeightConfig, QuantConfig, config_for
from ..data import CALIB_SAMPLES, calibration_ids
from ..errors import LowbitError
from ..models import Loaded, load_model
from ..offload.activations import offload_activations
from ..models.sources import is_lowbit_checkpoint, source_name
from ..nn import QuantLinear
from ..quantize import cast_unquantized, quantize
from .fakequant import LORA_RANK, TRAINABLE, FakeQuantLinear, convert, prepare

INITS = ("rtn", "gptq", "awq", "learned")
# Adam's peak learning rate by what trains. Measured on the default model, W3 g64 from GPTQ, 60 steps of one
# 256-token window (KLD of the start 0.292 on 8 held-out windows): scales 1e-5 -> 0.257, 3e-5 0.240, 1e-4 0.227,
# 3e-4 0.246; latent weights 1e-5 -> 0.269 (0.247 with the range factors at 1e-3).
DEFAULT_LR = {"scales": 1e-4, "weights": 1e-5, "lora": 1e-4}
# The range factors (in [0.5, 1], relative) learn at this multiple of the rate (1e-3 at the defaults): at the
# weights' own rate they move ~1e-5 per step, far slower than a group scale trained directly.
RANGE_LR_FACTOR = {"scales": 1.0, "weights": 100.0, "lora": 10.0}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over tokens (float32)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def generated_windows(model, tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """n windows of seqlen tokens sampled from the model itself, starting at its BOS token: LongTensor [n, seqlen]."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(torch.full((n, 1), start, dtype=torch.long), do_sample=True, top_k=50,
                             max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, pad_token_id=start)
    return out[:, :seqlen]


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise LowbitError(f"cannot write the training state {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _check_same_model(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """The start checkpoint must quantize the teacher: the same Linears with the same shapes."""
    def shapes(m):
        return {n: (x.out_features, x.in_features) for n, x in m.named_modules()
                if isinstance(x, (torch.nn.Linear, QuantLinear))}
    a, b = shapes(teacher), shapes(student)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[0][0]
        raise LowbitError(f"the QAT start is not a quantization of this model: its Linear {diff} differs")


def qat(model="default", config: QuantConfig | None = None, *, init="rtn", steps: int = 100,
        lr: float | None = None, batch: int = 1, seqlen: int = 256, text=None, windows: int = CALIB_SAMPLES,
        generated: int = 0, calibration=None, tokenizer=None, seed: int = 0, checkpointing: bool = True,
        offload: bool = False, learn_scales: bool = True, train: str = "scales", rank: int = LORA_RANK,
        state: str | os.PathLike | None = None, save_every: int = 25, resume: bool = False, kernel: str = "auto",
        progress: bool = True,
        callback: Callable[[int, float], None] | None = None) -> Loaded:
    """Quantization-aware training; returns a `Loaded` whose model holds packed QuantLinear modules (save it with
    lowbit.save). `lowbit.train.qat("default", lowbit.RTN(bits=3, group_size=64, symmetric=False), steps=200)`.

    config: the integer format (an integer-weight configuration: its bits, group size, symmetry; default RTN
    INT4 g64); init: the post-training method that gives the start (rtn, gptq, awq, learned — with their
    defaults, calibrated on `calibration`), or a quantized checkpoint of the same model (a lowbit checkpoint's
    path or a `Loaded`; its integer-format Linears train, `config` is not used, and its latent weights start on
    the grid, since the float weights it was rounded from are not in it). text: the training text (as
    lowbit.data.calibration_ids: None = the default text's calibration half), cut into `windows` windows of `seqlen` tokens; generated: extra windows sampled
    from the float model. Each step trains on `batch` windows; lr: Adam's learning rate at the first step
    (None: DEFAULT_LR for what trains), decaying linearly to 0. calibration: what the start's method calibrates
    on (anything lowbit.quantize takes; None: the training windows). callback(step, loss) runs after every step.
    train: "scales" (the start's codes frozen, group scales trained: better at a given number of steps on the
    default model), "weights" (full fine-tuning of latent weights starting where the start was rounded from,
    and range factors when learn_scales) or "lora" (low-rank adapters of rank `rank` on frozen latent weights,
    merged before rounding); see lowbit.train.fakequant.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LowbitError(f"QAT steps must be a positive integer, got {steps!r}")
    from_checkpoint = isinstance(init, Loaded) or isinstance(init, (str, os.PathLike)) and str(init) not in INITS
    if from_checkpoint and not isinstance(init, Loaded) and not is_lowbit_checkpoint(Path(init)):
        raise LowbitError(f"QAT init must be one of {', '.join(INITS)} or a lowbit checkpoint, got {str(init)!r}")
    if not from_checkpoint and init not in INITS:
        raise LowbitError(f"QAT init must be one of {', '.join(INITS)} or a lowbit checkpoint, got {init!r}")
    for v, what in ((batch, "batch"), (seqlen, "sequence length"), (save_every, "save_every")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LowbitError(f"QAT {what} must be a positive integer, got {v!r}")
    if isinstance(generated, bool) or not isinstance(generated, int) or generated < 0:
        raise LowbitError(f"QAT generated windows must be a non-negative integer, got {generated!r}")
    if train not in TRAINABLE:
        raise LowbitError(f"QAT trains one of {', '.join(TRAINABLE)}, got {train!r}")
    lr = DEFAULT_LR[train] if lr is None else lr
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr > 0):
        raise LowbitError(f"QAT lr must be positive, got {lr!r}")
    config = config or config_for("rtn")
    if not isinstance(config, IntWeightConfig):
        raise LowbitError(f"QAT trains integer formats (int2..int8); {config.name} is not one")
    if resume and state is None:
        raise LowbitError("resume needs the training state's path (state=)")

    loaded = model if isinstance(model, Loaded) else load_model(model)
    tokenizer = tokenizer or loaded.tokenizer
    teacher = loaded.model.float().eval()
    data = calibration_ids(text, tokenizer, windows, seqlen, seed)
    if generated:
        data = torch.cat([data, generated_windows(teacher, tokenizer, generated, data.shape[1], seed)])

    starts: dict = {}
    if from_checkpoint:
        student = (init if isinstance(init, Loaded) else load_model(init, kernel=kernel)).model
        _check_same_model(teacher, student)
        cast_unquantized(student, torch.float32)
    else:
        student = copy.deepcopy(teacher)
        quantize(student, config_for(init, config.spec), calibration=data if calibration is None else calibration,
                 tokenizer=tokenizer, dtype=torch.float32, progress=progress, float_weights=starts)
    record = dict(student.lowbit)
    names = prepare(student, learn_scales, starts, train, rank)
    del starts
    if not names:
        raise LowbitError("the start has no Linear in an integer format with float16 group scales to train")
    trainable = [p for n in names for k, p in student.get_submodule(n).named_parameters()
                 if p.requires_grad and k != "bias"]
    for p in student.parameters():   # embeddings, norms and the head stay as they are
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    ranges = {id(p) for n in names for k, p in student.get_submodule(n).q.named_parameters()
              if k in ("a_lo", "a_hi")}
    opt = torch.optim.Adam([{"params": [p for p in trainable if id(p) not in ranges], "lr": lr},
                            {"params": [p for p in trainable if id(p) in ranges],
                             "lr": lr * RANGE_LR_FACTOR[train]}])
    peak = [g["lr"] for g in opt.param_groups]
    if checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()

    start, losses = 0, []
    state = None if state is None else Path(state)
    if resume and state.exists():
        saved = torch.load(state, weights_only=True)
        with torch.no_grad():
            for p, t in zip(trainable, saved["params"]):
                p.copy_(t)
        opt.load_state_dict(saved["optimizer"])
        start, losses = saved["step"], list(saved["losses"])

    n = data.shape[0]
    bar = tqdm(total=steps, initial=start, desc="qat", unit="step", disable=not progress)
    t0, tokens = time.perf_counter(), 0
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)   # this step's windows, whatever came before
        ids = data[torch.randint(0, n, (batch,), generator=g)]
        with torch.no_grad():
            target = teacher(ids, use_cache=False).logits
        with offload_activations() if offload else contextlib.nullcontext():
            loss = distillation_loss(student(ids, use_cache=False).logits, target)
            opt.zero_grad()
            loss.backward()
        for group, top in zip(opt.param_groups, peak):   # linear decay to 0, a function of the step (resumable)
            group["lr"] = top * (1 - step / steps)
        opt.step()
        for m in student.modules():
            if isinstance(m, FakeQuantLinear):
                m.q.project()
        losses.append(loss.item())
        tokens += ids.numel()
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if state is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            _save_state(state, {"step": step + 1, "losses": losses, "optimizer": opt.state_dict(),
                                "params": [p.detach().clone() for p in trainable]})
        if callback is not None:
            callback(step, losses[-1])
    bar.close()

    if checkpointing:
        student.gradient_checkpointing_disable()
    student.eval()
    convert(student, kernel)
    for p in student.parameters():
        p.requires_grad_(False)
    if from_checkpoint:
        init = source_name(init.source if isinstance(init, Loaded) else init)
    record["qat"] = {"init": init, "steps": steps, "lr": lr, "batch": batch, "seqlen": int(data.shape[1]),
                     "windows": n, "generated": generated, "learn_scales": learn_scales, "train": train,
                     **({"rank": rank} if train == "lora" else {}), "seed": seed,
                     "losses": [round(x, 6) for x in losses]}
    student.lowbit = record
    return Loaded(student, tokenizer, loaded.source)
