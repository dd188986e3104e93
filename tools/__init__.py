"""Tools that are not stages: the benchmark (python -m tools.bench), the memory plan
(python -m tools.memory_plan), the README/docs blocks make demo writes (python -m tools.docs_blocks) and
the conformance check against the official code's numbers (python -m tools.audit). Run them from the
repository root."""
