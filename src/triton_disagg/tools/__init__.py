"""What a developer runs by hand: benchmarks, trace replays, the planner simulator, the profiler.

Runtime code (launcher, model control, CLI, frontend) lives elsewhere; nothing
outside `tools` and `cli` imports from here.
"""
