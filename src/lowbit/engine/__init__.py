"""Fast generation: a lean decoder over a static KV cache with a compiled decode step."""

from .cache import StaticKVCache
from .decoder import Decoder
from .generate import Engine

__all__ = ["Engine", "Decoder", "StaticKVCache"]
