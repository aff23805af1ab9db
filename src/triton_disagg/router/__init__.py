"""KV-aware routing: block hashing, KV events, prefix index. No Triton imports."""
