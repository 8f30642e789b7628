"""Writers and readers: lowbit's own checkpoint (more formats for serving engines come here)."""
