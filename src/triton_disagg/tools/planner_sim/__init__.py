"""The planner simulator's parts: simulated prefill/decode pools and the workloads replayed on them."""
