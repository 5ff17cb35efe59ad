"""Training: the pre-flight plan (every input checked before anything starts), the engine, one
step, the loop, the schedule, and memory (estimated and measured)."""
