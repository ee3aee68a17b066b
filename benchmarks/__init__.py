"""The research harness: studies that measure dmt against baselines, run from a checkout (not installed).

``python -m benchmarks.quality`` compares memory students with dense baselines under one training budget;
``python -m benchmarks.unit_budget`` measures how many of its MLP's units a token must read. Their results
are committed under ``results/``. ``dmt-bench`` (:mod:`dmt.bench`) stays in the package: it is the user's
tool for timing memory settings.
"""
