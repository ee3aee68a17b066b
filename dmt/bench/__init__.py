"""Benchmark harness: memory layers vs the dense MLPs they replace (``python -m dmt.bench``)."""
