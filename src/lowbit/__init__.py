"""lowbit: quantize causal language models, measure the trade-offs, run them fast."""

__version__ = "0.1.0"

from .errors import LowbitError  # noqa: E402
from .formats import IntSpec, QuantizedTensor  # noqa: E402
from .recipes import Recipe, Rule, Scheme  # noqa: E402
from .models import load_model  # noqa: E402
from .quantize import quantize  # noqa: E402
from .export.checkpoint import save_checkpoint, load_checkpoint  # noqa: E402
from .eval import evaluate, generate  # noqa: E402
from . import engine  # noqa: E402

__all__ = [
    "LowbitError", "IntSpec", "QuantizedTensor", "Recipe", "Rule", "Scheme", "load_model", "quantize",
    "save_checkpoint", "load_checkpoint", "evaluate", "generate", "engine", "__version__",
]
