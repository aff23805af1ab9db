"""What the Triton models run between the client contract and the engine.

`protocol`, `detokenizer`, `stop_strings` and `settings` are plain Python (no
Triton import) and unit-tested; `worker` and `llm` are the adapters the
`model_repository` models hand their requests to, with `triton_io` between
them and Triton's Python-backend objects.
"""
