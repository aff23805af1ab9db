"""Planner: sizes the prefill and decode pools from observations (pure core in `planner.core`)."""
