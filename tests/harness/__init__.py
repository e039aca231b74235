"""Test harnesses that production never runs: the single-process reference (reference.py),
fault injection as an engine observer (faults.py, fault_worker.py), and builders for the
pieces tests assemble by hand (builders.py)."""
