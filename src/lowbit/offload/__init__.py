"""Running what does not fit: activation offloading for training (and, to come, weight streaming and KV-cache
placement)."""

from .activations import OffloadStats, offload_activations

__all__ = ["offload_activations", "OffloadStats"]
