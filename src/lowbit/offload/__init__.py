"""Running what does not fit: decoder blocks streamed from RAM or disk under a memory budget with the next
block prefetched, and activation offloading for training.

    planner            parse_size, plan_offload, OffloadPlan: which blocks stay resident under a budget
    runtime            offload_blocks, install_streaming, StreamedModel, streaming_of: the hooks and reader
    store, reader      where streamed blocks live (RAM, disk shards) and how shards are read
    lazy               open_streamed: a Hugging Face directory opened with its blocks streamed from its files
    load               load_with_budget: which of the two ways, for any model source
    quantize_streamed  quantizing a model larger than memory, block by block
"""

from .activations import OffloadStats, offload_activations
from .store import DiskStore, RamStore
from .planner import OffloadPlan, parse_size, plan_offload
from ..heap import release_freed_memory
from .runtime import StreamedModel, install_streaming, offload_blocks, streaming_of
from .lazy import SafetensorsStore, open_streamed
from .load import load_with_budget
from .quantize_streamed import quantize_streamed

__all__ = ["offload_activations", "OffloadStats", "offload_blocks", "plan_offload", "parse_size", "OffloadPlan",
           "StreamedModel", "DiskStore", "RamStore", "SafetensorsStore", "open_streamed", "install_streaming",
           "streaming_of", "release_freed_memory", "load_with_budget", "quantize_streamed"]
