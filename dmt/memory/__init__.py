"""Discrete kNN memory: an hnswlib-backed key→value store with LRFU eviction."""

from __future__ import annotations

from dmt.memory.base import MemoryStats
from dmt.memory.integrity import MemoryStoreError
from dmt.memory.lrfu import LRFU
from dmt.memory.metrics import METRICS, Metric
from dmt.memory.store import KNNStore

__all__ = ["LRFU", "METRICS", "KNNStore", "MemoryStats", "MemoryStoreError", "Metric"]
