"""Typed quantization configurations: one frozen dataclass per method, validated when it is made.

A configuration says how a Linear is quantized: the method that chooses the values, the weight format they
are stored in (`spec`, a registered format from `lowbit.formats`), the kernel that runs it, and the method's
own settings. Each default is written here and nowhere else; the CLI, recipe files, `compare`, checkpoints'
metadata and the algorithms all read it from these classes.

    RTN(bits=4, group_size=64)                      round-to-nearest
    RTN(gguf_type="Q4_K", importance=True)          into a GGUF block type, weighted by calibration importance
    GPTQ(bits=4, group_size=64, act_order=True)     Hessian-based error feedback (needs calibration)
    AWQ(bits=4, group_size=64, symmetric=False)     activation-aware scaling and clipping (needs calibration)
    Learned(bits=3, init="awq", iters=20)           learned rounding and ranges per block (needs calibration)
    W8A8()                                          int8 weights and activations, static activation scale
    SmoothQuant(alpha=None)                         W8A8 with SmoothQuant's smoothing (alpha searched if None)
    LLMInt8(threshold=6.0)                          LLM.int8(): outlier input dimensions kept in high precision
    FP8(fmt="e4m3", act=None)                       FP8 weights, optionally FP8 activations

Methods named on the command line and in recipes (`rtn`, `gptq`, `awq`, `learned`, `w8a8-naive`, `w8a8-smooth`,
`llm-int8`, `fp8`, `fp8-e5m2`) map onto these classes through `config_for`, which rejects an unknown option
with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .errors import LowbitError
from .formats import FloatSpec, GGUFSpec, IntSpec, WeightFormat, fallback_type
from .formats.act import ActSpec


def _number(value, what: str, lo: float | None = None, hi: float | None = None, *, integer: bool = False,
            lo_open: bool = False, hi_open: bool = False):
    """Check a numeric setting's type and range; return it."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise LowbitError(f"{what} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and (value >= hi if hi_open else value > hi):
        if hi is None and (lo, lo_open) in ((0, True), (1, False)):
            raise LowbitError(f"{what} must be {'a positive integer' if integer else 'positive'}, got {value!r}")
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        hi_s = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        raise LowbitError(f"{what} must be in {lo_s or '(-inf'}, {hi_s or 'inf)'}, got {value!r}")
    return value


def _choice(value, what: str, choices: tuple):
    if value not in choices:
        raise LowbitError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise LowbitError(f"{what} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What every configuration has: a method name, a weight format and a kernel ("auto": the fastest that
    runs the format on the device, see lowbit.kernels)."""

    method: ClassVar[str]
    calibrates: ClassVar[bool] = False   # whether the method needs calibration inputs
    format_fields: ClassVar[tuple[str, ...]] = ()
    kernel: str = "auto"

    def __post_init__(self):
        if not isinstance(self.kernel, str):
            raise LowbitError(f"kernel must be a name, got {self.kernel!r}")
        self.spec  # noqa: B018  (builds the format, which validates the format fields)

    @property
    def spec(self) -> WeightFormat:
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        return self.calibrates

    @property
    def needs_block_inputs(self) -> bool:
        """Whether the method reads each block's calibration inputs (not only statistics gathered beforehand)."""
        return self.needs_calibration

    def options(self) -> dict:
        """The method's own settings (everything but the format and the kernel)."""
        skip = set(self.format_fields) | {"kernel"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    @property
    def name(self) -> str:
        return f"{self.method}-{self.spec.name}"

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """What checkpoints and reports record: {"method", the format's fields, "kernel", "options"}."""
        return {"method": self.method, **self.spec.to_dict(), "kernel": self.kernel, "options": self.options()}

    @staticmethod
    def from_dict(d: dict) -> "QuantConfig":
        from .formats import spec_from_dict
        return config_for(d.get("method", "rtn"), spec_from_dict(d), d.get("kernel", "auto"), d.get("options") or {})


@dataclass(frozen=True, kw_only=True)
class IntWeightConfig(QuantConfig):
    """Methods whose integer weight format the user chooses: lowbit's own (bits, group_size, symmetric, and
    scale_bits / super_block for two-level scales, see formats.intq) or, with `gguf_type` (e.g. "Q4_K"), a GGUF
    block type (then bits, group size and symmetry do not apply)."""

    format_fields: ClassVar[tuple[str, ...]] = ("bits", "group_size", "symmetric", "scale_bits", "super_block",
                                                "gguf_type")
    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    gguf_type: str | None = None
    scale_bits: int | None = None
    super_block: int = 256

    def __post_init__(self):
        if self.gguf_type is not None:
            if not isinstance(self.gguf_type, str):
                raise LowbitError(f"gguf_type must be a GGUF type name, got {self.gguf_type!r}")
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            own = {f: getattr(self, f) for f in ("bits", "group_size", "symmetric", "scale_bits", "super_block")}
            if any(v != defaults[f] for f, v in own.items()):
                raise LowbitError(f"gguf_type={self.gguf_type} fixes the format; bits, group_size and symmetric "
                                  f"do not apply (got {own})")
        super().__post_init__()

    @property
    def spec(self) -> IntSpec | GGUFSpec:
        if self.gguf_type is not None:
            return GGUFSpec(self.gguf_type)
        return IntSpec(self.bits, self.group_size, self.symmetric, self.scale_bits, self.super_block)

    def fit_shape(self, shape: tuple[int, int]) -> "IntWeightConfig | None":
        """This configuration for an [N, K] weight: a GGUF type whose block does not divide K becomes the type
        llama.cpp stores instead (formats.gguf.fallback_type; None: the tensor stays 16-bit)."""
        if self.gguf_type is None:
            return self
        fb = fallback_type(self.gguf_type, shape[1])
        if fb == self.gguf_type:
            return self
        return None if fb == "F16" else self.replace(gguf_type=fb)


MATMUL_CHOICES = ("auto", "float32", "bfloat16")   # GPTQ.matmul, AWQ.matmul: lowbit.products


@dataclass(frozen=True, kw_only=True)
class RTN(IntWeightConfig):
    """Round-to-nearest with min/max scales per group. importance=True: the format's importance-weighted
    search, each Linear weighted by the mean x² of its inputs over the calibration text (lowbit.models.
    importance; from an imatrix file when one is given), which makes RTN a calibrating method."""

    method: ClassVar[str] = "rtn"
    importance: bool = False

    def __post_init__(self):
        super().__post_init__()
        _flag(self.importance, "RTN importance")

    @property
    def needs_calibration(self) -> bool:
        return self.importance

    @property
    def needs_block_inputs(self) -> bool:   # importance is collected in one pass before the blocks are rounded
        return False


@dataclass(frozen=True, kw_only=True)
class GPTQ(IntWeightConfig):
    """GPTQ (lowbit.algorithms.gptq): columns quantized in order, each one's error pushed onto the rest."""

    method: ClassVar[str] = "gptq"
    calibrates: ClassVar[bool] = True
    block_size: int = 128          # columns per lazy batch update
    damp: float = 0.01             # added to the Hessian's diagonal, as a fraction of its mean
    # columns by decreasing Hessian diagonal, with static groups; and each group's grid fitted weighting its
    # columns by that diagonal. Both on by default: on the first 4 blocks of the default model (W4 g64 sym,
    # 16 calibration windows) they take KLD from 0.061 to 0.039, level with llm-compressor 0.14, whose GPTQ
    # orders columns the same way by default (benchmarks/four_blocks.py)
    act_order: bool = True
    true_sequential: bool = True   # each group's Hessian from inputs of the already-quantized groups
    weighted_grid: bool = True     # fit each group's grid weighting its columns by the Hessian's diagonal
    # the calibration forwards' and the Hessians' float32 products (lowbit.products): auto = from bfloat16-rounded
    # inputs on CPUs that multiply bfloat16 natively (GPTQ 1.6x faster on a 2-core AMD EPYC with AVX512-BF16,
    # the same quality over three calibration draws: BENCHMARKS.md; there without AMX oneDNN computes them
    # exactly in float32, faster than MKL: lowbit.products), else exact; float32; bfloat16. GPTQ's own
    # factorization and updates are exact always.
    matmul: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        _flag(self.weighted_grid, "GPTQ weighted_grid")
        _choice(self.matmul, "GPTQ matmul", MATMUL_CHOICES)
        _number(self.block_size, "GPTQ block_size", 1, integer=True)
        _number(self.damp, "GPTQ damp", 0, 1, hi_open=True)
        _flag(self.act_order, "GPTQ act_order")
        _flag(self.true_sequential, "GPTQ true_sequential")


@dataclass(frozen=True, kw_only=True)
class AWQ(IntWeightConfig):
    """AWQ (lowbit.algorithms.awq): per-channel scales searched and folded into the producer, then clipping."""

    method: ClassVar[str] = "awq"
    calibrates: ClassVar[bool] = True
    n_grid: int = 20               # grid points of the scale search and of the clip search
    search_samples: int = 4        # calibration windows used to score the scale search
    search_dtype: str = "auto"     # the scale search's forwards: auto (float16 where native, else bfloat16 where
                                   # the products are bfloat16 on AMX, else float32: blockwise.search_dtype), float32,
                                   # float16 or bfloat16 (llm-awq and AutoAWQ search in the model's half precision)
    clip: bool = True              # search a clipping range per group after scaling
    # the capture pass's and the scale search's float32 products (lowbit.products), as GPTQ.matmul (1.5x faster
    # AWQ on that AMD EPYC, KLD within 0.1% over three draws: BENCHMARKS.md); the clip search and rounding are exact
    matmul: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        _number(self.n_grid, "AWQ n_grid", 1, integer=True)
        _number(self.search_samples, "AWQ search_samples", 1, integer=True)
        _choice(self.search_dtype, "AWQ search_dtype", ("auto", "float32", "bfloat16", "float16"))
        _flag(self.clip, "AWQ clip")
        _choice(self.matmul, "AWQ matmul", MATMUL_CHOICES)


@dataclass(frozen=True, kw_only=True)
class Learned(IntWeightConfig):
    """Learned rounding (lowbit.algorithms.learned): per-weight rounding offsets and per-group ranges trained on
    each block's output error, starting from the `init` method's result."""

    method: ClassVar[str] = "learned"
    calibrates: ClassVar[bool] = True
    init: str = "rtn"              # start from: rtn, gptq or awq (each with its default settings)
    iters: int = 20                # update steps per block
    batch: int = 2                 # calibration windows per step
    lr: float | None = None        # None: 1 / iters (a signed step of that size, decaying linearly to 0)
    optimizer: str = "sign"        # sign: signed gradient (AutoRound); adam
    learn_range: bool = True       # also train each group's range (clipping); False: offsets only
    range_lr_factor: float = 1.0   # the ranges' learning rate relative to lr

    def __post_init__(self):
        super().__post_init__()
        _choice(self.init, "learned init", ("rtn", "gptq", "awq"))
        _number(self.iters, "learned iters", 1, integer=True)
        _number(self.batch, "learned batch", 1, integer=True)
        if self.lr is not None:
            _number(self.lr, "learned lr", 0, lo_open=True)
        _choice(self.optimizer, "learned optimizer", ("sign", "adam"))
        _flag(self.learn_range, "learned learn_range")
        _number(self.range_lr_factor, "learned range_lr_factor", 0, lo_open=True)


W8_SPEC = IntSpec(8, -1, True)   # the weight format of the W8A8 family: symmetric int8 per output channel


@dataclass(frozen=True, kw_only=True)
class Int8WeightConfig(QuantConfig):
    """The 8-bit family: symmetric int8 weights per output channel, a format the method fixes."""

    @property
    def spec(self) -> IntSpec:
        return W8_SPEC


@dataclass(frozen=True, kw_only=True)
class W8A8(Int8WeightConfig):
    """int8 weights per channel and int8 activations with one static scale from calibration; no smoothing."""

    method: ClassVar[str] = "w8a8-naive"
    calibrates: ClassVar[bool] = True
    act_granularity: ClassVar[str] = "tensor"


@dataclass(frozen=True, kw_only=True)
class SmoothQuant(Int8WeightConfig):
    """W8A8 after SmoothQuant's smoothing: activation outliers moved into the weights by per-channel factors."""

    method: ClassVar[str] = "w8a8-smooth"
    calibrates: ClassVar[bool] = True
    alpha: float | None = None          # migration strength; None: searched per layer group
    act_granularity: str = "token"      # token: per-token dynamic activation scales; tensor: one static scale
    search_samples: int = 4             # calibration windows used to score the alpha search

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None:
            _number(self.alpha, "SmoothQuant alpha", 0, 1)
        _choice(self.act_granularity, "activation granularity", ("token", "tensor"))
        _number(self.search_samples, "SmoothQuant search_samples", 1, integer=True)


@dataclass(frozen=True, kw_only=True)
class LLMInt8(Int8WeightConfig):
    """LLM.int8(): int8 weights per channel; input dimensions holding outliers run in high precision."""

    method: ClassVar[str] = "llm-int8"
    threshold: float = ActSpec.threshold   # an input dimension with |x| above this is an outlier (at run time)
    outlier_fraction: float | None = None  # instead: fix the outliers from calibration, this top fraction of dims

    def __post_init__(self):
        super().__post_init__()
        _number(self.threshold, "outlier threshold", 0, lo_open=True)
        if self.outlier_fraction is not None:
            _number(self.outlier_fraction, "outlier fraction", 0, 1, lo_open=True, hi_open=True)

    @property
    def needs_calibration(self) -> bool:
        return self.outlier_fraction is not None


@dataclass(frozen=True, kw_only=True)
class FP8(QuantConfig):
    """FP8 weights with a scale per output channel; with act="fp8", FP8 activations scaled per token."""

    format_fields: ClassVar[tuple[str, ...]] = ("fmt",)
    fmt: str = "e4m3"
    act: str | None = None

    def __post_init__(self):
        super().__post_init__()
        _choice(self.act, "FP8 act", (None, "fp8"))

    @property
    def method(self) -> str:   # the e5m2 variant has a method name of its own on the command line
        return "fp8" if self.fmt == "e4m3" else f"fp8-{self.fmt}"

    @property
    def spec(self) -> FloatSpec:
        return FloatSpec(self.fmt)


# method name -> (configuration class, the fields that name fixes)
METHODS: dict[str, tuple[type[QuantConfig], dict]] = {
    "rtn": (RTN, {}),
    "gptq": (GPTQ, {}),
    "awq": (AWQ, {}),
    "learned": (Learned, {}),
    "w8a8-naive": (W8A8, {}),
    "w8a8-smooth": (SmoothQuant, {}),
    "llm-int8": (LLMInt8, {}),
    "fp8": (FP8, {"fmt": "e4m3"}),
    "fp8-e5m2": (FP8, {"fmt": "e5m2"}),
}


def fixes_format(method: str) -> bool:
    """Whether the method defines its own weight format (so bits and group size do not apply)."""
    return not issubclass(_class_of(method), IntWeightConfig)


def option_names(method: str) -> list[str]:
    cls, fixed = METHODS[method]
    return [f.name for f in dataclasses.fields(cls) if f.name not in cls.format_fields + ("kernel",)
            and f.name not in fixed]


def _class_of(method: str) -> type[QuantConfig]:
    if method not in METHODS:
        raise LowbitError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method][0]


def config_for(method: str, spec: WeightFormat | None = None, kernel: str = "auto",
               options: dict | None = None) -> QuantConfig:
    """The configuration for a method given by name, e.g. config_for("gptq", IntSpec(4, 64), options={"damp": 0.02}).

    `spec` sets the format of methods whose format is the user's choice (it is not used by methods that fix
    their own); unknown options raise an error that lists the valid ones."""
    cls, fixed = METHODS[method] if method in METHODS else (_class_of(method), {})
    options = dict(options or {})
    if not all(isinstance(k, str) for k in options):
        raise LowbitError(f"{method}: option names must be strings, got {list(options)}")
    valid = option_names(method)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise LowbitError(f"{method}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}")
    fields = {**fixed, **options, "kernel": kernel}
    if issubclass(cls, IntWeightConfig) and isinstance(spec, GGUFSpec):
        fields.update(gguf_type=spec.type)
    elif issubclass(cls, IntWeightConfig) and spec is not None:
        if not isinstance(spec, IntSpec):
            raise LowbitError(f"{method} stores integer weights (or a GGUF type), not {spec.name}")
        fields.update(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                      scale_bits=spec.scale_bits, super_block=spec.super_block)
    try:
        return cls(**fields)
    except TypeError as e:  # a dataclass refusing a field we did not list: a programming error upstream
        raise LowbitError(f"{method}: {e}") from None


__all__ = ["QuantConfig", "IntWeightConfig", "Int8WeightConfig", "RTN", "GPTQ", "AWQ", "Learned", "W8A8", "SmoothQuant", "LLMInt8", "FP8",
           "METHODS", "W8_SPEC", "config_for", "fixes_format", "option_names"]
