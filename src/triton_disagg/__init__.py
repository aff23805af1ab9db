"""triton-disagg: disaggregated LLM serving inside NVIDIA Triton Inference Server.

Everything the project installs lives under this one name:

    engine        paged-KV transformer engine (PyTorch), scheduler, block manager, KV handoff
    kv_transfer   the KV plane: pool layouts, KV handles, NIXL transfers, the agent directory
    router        block hashing, KV events, prefix index, worker selection (no Triton imports)
    planner       pool sizing: pure decision core, predictors, profiles, connectors
    serving       what the Triton models run (llm, router, prefill, decode, kv_transfer)
    model_repository  the Triton model templates (config.pbtxt + thin model.py)
    frontend      the OpenAI-compatible HTTP API over Triton gRPC
    launch        starting tritonserver and the frontend, and their command-line flags
    model_control Triton's model-control API, shared by the launcher and the planner
    cli           the `triton-disagg` command
    tools         what a developer runs by hand: benchmarks, replays, simulators, the profiler
"""

__version__ = "0.1.0"
