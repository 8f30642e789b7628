"""Running what does not fit: decoder blocks streamed from RAM or disk under a memory budget with the next
block prefetched, and activation offloading for training."""

from .activations import OffloadStats, offload_activations
from .store import DiskStore, RamStore
from .stream import OffloadPlan, StreamedModel, install_streaming, offload_blocks, parse_size, plan_offload, \
    streaming_of
from .lazy import SafetensorsStore, open_streamed
from .quantize_streamed import quantize_streamed

__all__ = ["offload_activations", "OffloadStats", "offload_blocks", "plan_offload", "parse_size", "OffloadPlan",
           "StreamedModel", "DiskStore", "RamStore", "SafetensorsStore", "open_streamed", "install_streaming", "streaming_of",
           "quantize_streamed"]
