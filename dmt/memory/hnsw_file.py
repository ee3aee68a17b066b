"""A structural check of an hnswlib index file, made before hnswlib parses it.

hnswlib's ``load_index`` trusts its file: a link to an element that does not exist, a link list longer than
the graph's degree, or an element linked at a level it does not reach makes the first search read outside
its buffers, and the process dies with a segmentation fault instead of an error. A store can come from
anywhere (an export someone shared, a checkpoint), and its manifest's checksums prove only that the file
is the one written beside them, so every graph is checked against the layout of hnswlib 0.8's
``saveIndex`` first (:data:`dmt.kernel.store_files.HEADER`, then one level-0 record per element
``[link count | maxM0 links | vector | label]``, then each element's upper-level link lists, level by
level ``[link count | maxM links]``): the header matches the store's width and degree, every count and
link is in range, every link at level ``l`` points to an element that reaches level ``l``, and the file
ends where its last list does.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from dmt.kernel.store_files import HEADER

LINK = 4  # bytes of a link (hnswlib's tableint) and of a link count (linklistsizeint)
LABEL = 8  # bytes of a label (hnswlib's labeltype)


def check_hnsw_file(source: str | Path | np.ndarray, dim: int, capacity: int, M: int | None = None) -> None:
    """Refuse an hnswlib index file (or its bytes, a ``uint8`` array) that hnswlib could not read safely as
    a graph of ``dim``-wide vectors with labels below ``capacity`` (and degree ``M``, where known).

    Raises:
        ValueError: naming the first inconsistency found.
    """
    where = "index bytes" if isinstance(source, np.ndarray) else str(source)
    data = source if isinstance(source, np.ndarray) else np.memmap(source, dtype=np.uint8, mode="r")
    if len(data) < HEADER.itemsize:
        raise ValueError(f"{where}: too short for an hnswlib index")
    header = data[: HEADER.itemsize].view(HEADER)[0]

    # Header
    count, max_m, max_m0 = int(header["element_count"]), int(header["max_m"]), int(header["max_m0"])
    links0 = LINK + LINK * max_m0  # bytes of a level-0 link list
    expected = {
        "offset_level0": 0,
        "max_m": max_m if M is None else M,
        "max_m0": 2 * max_m,
        "m": max_m,
        "data_offset": links0,
        "label_offset": links0 + 4 * dim,
        "size_per_element": links0 + 4 * dim + LABEL,
    }
    for name, value in expected.items():
        if int(header[name]) != value:
            raise ValueError(f"{where}: header field {name} is {int(header[name])}, expected {value}")
    if not 0 < max_m <= 2**16 or count > min(capacity, int(header["max_elements"])):
        raise ValueError(
            f"{where}: {count} elements of degree {max_m} do not fit a graph of capacity {capacity}"
        )
    if not (np.isfinite(header["mult"]) and header["mult"] > 0 and header["ef_construction"] >= 1):
        raise ValueError(f"{where}: header fields mult and ef_construction are out of range")
    max_level, enter_point = int(header["max_level"]), int(header["enter_point"])
    if count and not (0 <= max_level < 256 and enter_point < count):
        raise ValueError(f"{where}: entry point {enter_point} at level {max_level} is not an element")
    size = int(header["size_per_element"])
    end0 = HEADER.itemsize + count * size
    if len(data) < end0:
        raise ValueError(f"{where}: {len(data)} bytes cannot hold {count} elements of {size} bytes")

    # Level 0
    records = np.asarray(data[HEADER.itemsize : end0]).reshape(count, size)
    counts = records[:, :2].copy().view("<u2")[:, 0].astype(np.int64)  # (count,)
    links = records[:, LINK:links0].copy().view("<u4").astype(np.int64)  # (count, maxM0)
    _check_links(where, 0, counts, links, max_m0, count)
    labels = records[:, size - LABEL :].copy().view("<u8")[:, 0]  # (count,)
    if (labels >= capacity).any() or len(np.unique(labels)) != count:
        raise ValueError(f"{where}: labels must be distinct and below the capacity {capacity}")

    # Upper levels
    block = LINK + LINK * max_m  # bytes of one upper-level link list
    levels = np.zeros(count, dtype=np.int64)
    starts: list[list[int]] = []  # per level l >= 1, the byte offsets of the level-l lists
    position, view = end0, memoryview(data)
    for element in range(count):
        if position + LINK > len(data):
            raise ValueError(f"{where}: ends inside the link lists of element {element}")
        (length,) = struct.unpack_from("<I", view, position)
        position += LINK
        if length % block or position + length > len(data) or length // block > max_level:
            raise ValueError(f"{where}: element {element} has an upper link list of {length} bytes")
        levels[element] = length // block
        for level in range(levels[element]):
            if level == len(starts):
                starts.append([])
            starts[level].append(position + level * block)
        position += length
    if position != len(data):
        raise ValueError(f"{where}: {len(data) - position} bytes after the last link list")
    if count and levels[enter_point] != max_level:
        raise ValueError(f"{where}: the entry point reaches level {levels[enter_point]}, not {max_level}")
    for level, offsets in enumerate(starts, start=1):
        lists = np.asarray(data)[np.asarray(offsets)[:, None] + np.arange(block)]  # (n, block)
        counts = lists[:, :2].copy().view("<u2")[:, 0].astype(np.int64)
        links = lists[:, LINK:].copy().view("<u4").astype(np.int64)
        _check_links(where, level, counts, links, max_m, count)
        inside = np.arange(max_m) < counts[:, None]
        if (levels[links[inside]] < level).any():
            raise ValueError(f"{where}: a level-{level} link points to an element below that level")


def _check_links(
    where: str, level: int, counts: np.ndarray, links: np.ndarray, most: int, count: int
) -> None:
    """Link counts ``(n,)`` at most ``most``, and the ``(n, most)`` links they cover naming elements."""
    if (counts > most).any():
        raise ValueError(f"{where}: a level-{level} link list holds more than {most} links")
    inside = np.arange(most) < counts[:, None]
    if (links[inside] >= count).any():
        raise ValueError(f"{where}: a level-{level} link points past the {count} elements")
