"""The KV plane: pool layouts, KV handles, and NIXL transfers between workers."""
