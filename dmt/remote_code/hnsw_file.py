"""The vectors of an hnswlib index file, read with numpy alone (no hnswlib needed).

A store whose hnsw graph holds its keys exactly (``ip`` and ``l2``; hnswlib normalises ``cosine`` vectors)
saves them only there, so an export keeps its keys once; this reads them back for dmt and for the exported
model's code. The layout is hnswlib's ``saveIndex`` (0.7, 0.8): a 96-byte header, then one level-0 record
per stored element, ``[links | vector | label]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# hnswlib's saveIndex header, in order (size_t fields are uint64, maxlevel int32, enterpoint uint32).
HEADER = np.dtype(
    [
        ("offset_level0", "<u8"),
        ("max_elements", "<u8"),
        ("element_count", "<u8"),
        ("size_per_element", "<u8"),
        ("label_offset", "<u8"),
        ("data_offset", "<u8"),
        ("max_level", "<i4"),
        ("enter_point", "<u4"),
        ("max_m", "<u8"),
        ("max_m0", "<u8"),
        ("m", "<u8"),
        ("mult", "<f8"),
        ("ef_construction", "<u8"),
    ]
)


def read_hnsw_vectors(path: str | Path | np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(E,)`` int64 and float32 vectors ``(E, dim)`` of every element stored in the hnswlib index
    file ``path`` (or its bytes, a ``uint8`` array); deleted ones included, their deletion mark is not
    read. ``ValueError`` naming ``path`` when it is not such an index of ``dim``-wide vectors."""
    data = path if isinstance(path, np.ndarray) else np.fromfile(path, dtype=np.uint8)
    path = "index bytes" if isinstance(path, np.ndarray) else path
    if len(data) < HEADER.itemsize:
        raise ValueError(f"{path}: too short for an hnswlib index")
    header = data[: HEADER.itemsize].view(HEADER)[0]
    count, size = int(header["element_count"]), int(header["size_per_element"])
    data_offset, label_offset = int(header["data_offset"]), int(header["label_offset"])
    body = data[HEADER.itemsize : HEADER.itemsize + count * size]
    if len(body) != count * size or label_offset + 8 > size or data_offset + 4 * dim > label_offset:
        raise ValueError(
            f"{path}: not an hnswlib index of {dim}-wide vectors ({count} records of {size} bytes)"
        )
    records = body.reshape(count, size)
    vectors = records[:, data_offset : data_offset + 4 * dim].copy().view("<f4")  # (E, dim)
    labels = records[:, label_offset : label_offset + 8].copy().view("<u8")[:, 0].astype(np.int64)  # (E,)
    return labels, vectors
