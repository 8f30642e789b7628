"""File plumbing below everything that reads or writes models: the safetensors layout (headers, dtypes, shard
indexes), reading GGUF files (gguf-py's reader, faster and shared within a load) and publishing files and
directories atomically. Depends on nothing else in lowbit but its errors."""
