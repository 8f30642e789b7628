"""Writers and readers: lowbit's own checkpoint (checkpoint), GGUF files for llama.cpp (gguf); more formats for
serving engines come here."""
