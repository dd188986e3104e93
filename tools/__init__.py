"""Tools that are not stages: the benchmark (python -m tools.bench) and the memory plan
(python -m tools.memory_plan). Run them from the repository root."""
