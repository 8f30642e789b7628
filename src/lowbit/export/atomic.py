"""Kept for importers of the old location: atomic publishing lives in `lowbit.io.atomic`."""

from ..io.atomic import atomic_dir, atomic_write_text

__all__ = ["atomic_dir", "atomic_write_text"]
