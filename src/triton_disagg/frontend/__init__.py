"""An OpenAI-compatible HTTP frontend for the `llm` model of a Triton server."""
