"""Discrete kNN memory: an hnswlib-backed key→value store with LRFU (or FIFO, or random) eviction."""

from __future__ import annotations

from dmt.memory.base import MemoryStats
from dmt.memory.eviction import EVICTIONS
from dmt.memory.integrity import MemoryStoreError
from dmt.memory.lrfu import LRFU
from dmt.memory.metrics import METRICS, Metric
from dmt.memory.provenance import ORIGIN_SPAN, token_spans
from dmt.memory.store import KNNStore

__all__ = [
    "EVICTIONS",
    "LRFU",
    "METRICS",
    "ORIGIN_SPAN",
    "KNNStore",
    "MemoryStats",
    "MemoryStoreError",
    "Metric",
    "token_spans",
]
