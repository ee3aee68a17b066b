"""Discrete kNN memory: an hnswlib-backed key→value store with LRFU (or FIFO, or random) eviction."""

from __future__ import annotations

from dmt.memory.base import MemoryStats
from dmt.memory.integrity import MemoryStoreError
from dmt.memory.lrfu import LRFU
from dmt.memory.metrics import METRICS, Metric
from dmt.memory.store import EVICTIONS, KNNStore

__all__ = ["EVICTIONS", "LRFU", "METRICS", "KNNStore", "MemoryStats", "MemoryStoreError", "Metric"]
