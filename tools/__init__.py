"""Command-line tools: the `triton-disagg` CLI, the Triton server launcher, benchmarks."""
