"""lowbit: quantize causal language models, measure the trade-offs, run them fast.

    import lowbit
    loaded = lowbit.load("default")                                   # HF directory, GGUF file or checkpoint
    lowbit.quantize(loaded, lowbit.GPTQ(bits=4, group_size=64))       # calibrates on the default text
    lowbit.save(loaded, "out/gptq-w4")
    print(lowbit.evaluate("out/gptq-w4"))                             # against the recorded base model
"""

__version__ = "0.1.0"

from .errors import LowbitError  # noqa: E402
from .formats import FloatSpec, IntSpec, QuantizedTensor  # noqa: E402
from .config import AWQ, FP8, GPTQ, RTN, Learned, W8A8, LLMInt8, QuantConfig, SmoothQuant, config_for  # noqa: E402
from .recipes import Recipe, Rule  # noqa: E402
from .models import Loaded, load_model  # noqa: E402
from .quantize import quantize  # noqa: E402
from .export.checkpoint import save_checkpoint, load_checkpoint  # noqa: E402
from .eval import evaluate, generate  # noqa: E402
from .comparison import compare  # noqa: E402
from .offload.load import load_with_budget  # noqa: E402
from . import engine  # noqa: E402



def load(source="default", *, max_memory: int | str | None = None, offload_dir=None, kernel: str = "auto") -> Loaded:
    """Load a model: "default", a Hugging Face directory, a GGUF file or a lowbit checkpoint. With `max_memory`
    (bytes or "300MB"), decoder blocks beyond the budget stream from disk or host RAM while it runs (see
    lowbit.offload; the plan is `model.lowbit_streaming.plan`)."""
    return load_with_budget(source, max_memory, offload_dir, kernel)[0]


def save(model, out, tokenizer=None, *, base: str | None = None, overwrite: bool = False):
    """Write a lowbit checkpoint of a quantized model (a torch model with `tokenizer`, or a `Loaded`, whose
    source is recorded as the base unless `base` is given). Returns the directory."""
    if isinstance(model, Loaded):
        from .models.sources import source_name
        model, tokenizer, base = model.model, tokenizer or model.tokenizer, base or source_name(model.source)
    if tokenizer is None:
        raise LowbitError("save needs the model's tokenizer (pass tokenizer=, or a Loaded)")
    return save_checkpoint(model, tokenizer, out, base=base, overwrite=overwrite)


__all__ = [
    "LowbitError", "IntSpec", "FloatSpec", "QuantizedTensor", "QuantConfig", "RTN", "GPTQ", "AWQ", "Learned", "W8A8",
    "SmoothQuant", "LLMInt8", "FP8", "config_for", "Recipe", "Rule", "Loaded", "load", "load_model", "quantize",
    "save", "save_checkpoint", "load_checkpoint", "evaluate", "generate", "compare", "engine", "__version__",
]
