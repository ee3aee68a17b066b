"""An hnswlib graph file is checked before hnswlib reads it: a malformed one is refused by name, never a
crash of the loading process."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import hnswlib
import numpy as np
import pytest

from dmt.kernel.store_files import HEADER
from dmt.memory import KNNStore, MemoryStoreError
from dmt.memory.hnsw_file import check_hnsw_file

# Loads a saved store after each of `trials` random byte mutations of its index.bin, its manifest record
# rewritten to match (so only the structure can betray it), then searches and inserts; reports each
# outcome, and the trial under way, to a JSON file, so a crash names its trial.
MUTATE_AND_LOAD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from dmt.kernel.store_files import file_record
    from dmt.memory import KNNStore, MemoryStoreError

    saved, seed, trials, report = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    original = (saved / "index.bin").read_bytes()
    manifest = json.loads((saved / "manifest.json").read_text())
    rng = np.random.default_rng(seed)
    outcomes = []
    for trial in range(trials):
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 9))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        (saved / "index.bin").write_bytes(bytes(data))
        manifest["files"]["index.bin"] = file_record(saved / "index.bin")
        (saved / "manifest.json").write_text(json.dumps(manifest))
        report.write_text(json.dumps({"trial": trial, "outcomes": outcomes}))
        try:
            store = KNNStore.load(saved)
            queries = rng.standard_normal((8, store.key_dim)).astype(np.float32)
            store.search(queries, 4)
            store.insert(queries[:2], np.zeros((2, store.value_dim), np.float32))
            store.search(queries, 4)
            outcomes.append("loaded")
        except MemoryStoreError:
            outcomes.append("refused")
    report.write_text(json.dumps({"trial": None, "outcomes": outcomes}))
    """
)


def saved_hnsw_store(directory: Path, metric: str) -> Path:
    """A full 96-entry hnsw store of degree 4 that has evicted 34 entries for newer ones, saved to
    ``directory``."""
    rng = np.random.default_rng(1)
    index = {"backend": "hnsw", "M": 4, "ef_construction": 20}
    store = KNNStore(8, 3, capacity=96, metric=metric, index=index)
    for _ in range(2):
        store.insert(rng.standard_normal((65, 8)), rng.standard_normal((65, 3)))
    store.save(directory)
    return directory


@pytest.mark.parametrize("metric", ["ip", "cosine"])  # ip: the graph alone holds the keys
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutated_graph_files_are_refused_or_load_but_never_crash(metric, seed, tmp_path):
    saved = saved_hnsw_store(tmp_path / "store", metric)
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-c", MUTATE_AND_LOAD, str(saved), str(seed), "50", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    state = json.loads(report.read_text())
    assert result.returncode == 0, (
        f"trial {state['trial']}: exit {result.returncode}\n{result.stderr[-2000:]}"
    )
    assert len(state["outcomes"]) == 50 and "refused" in state["outcomes"]


@pytest.mark.parametrize(("M", "deleted"), [(4, 0), (16, 40), (8, 200)])
def test_graphs_hnswlib_writes_pass(M, deleted, tmp_path):
    rng = np.random.default_rng(M)
    graph = hnswlib.Index(space="l2", dim=12)
    graph.init_index(max_elements=1024, M=M, ef_construction=40, allow_replace_deleted=True)
    graph.add_items(rng.standard_normal((800, 12)), np.arange(800))
    for label in range(deleted):
        graph.mark_deleted(label)
    if deleted:
        graph.add_items(
            rng.standard_normal((deleted, 12)), np.arange(800, 800 + deleted), replace_deleted=True
        )
    graph.save_index(str(tmp_path / "index.bin"))
    check_hnsw_file(tmp_path / "index.bin", 12, 1024, M)
    check_hnsw_file(np.fromfile(tmp_path / "index.bin", dtype=np.uint8), 12, 1024, M)


def _first_record_links(data: np.ndarray) -> np.ndarray:
    """The level-0 link count and links of element 0, as a writable uint32 view."""
    return data[HEADER.itemsize : HEADER.itemsize + 4 * 9].view("<u4")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda data: _first_record_links(data).__setitem__(1, 10_000), "level-0 link points past the 96"),
        (lambda data: _first_record_links(data).__setitem__(0, 9), "level-0 link list holds more than 8"),
        (lambda data: data[56:64].view("<u8").__setitem__(0, 5), "header field max_m is 5, expected 4"),
        (lambda data: np.append(data, np.uint8(0)), "1 bytes after the last link list"),
        (lambda data: data[:-3], "upper link list|ends inside"),
    ],
    ids=["link-past-the-end", "too-many-links", "degree", "trailing-byte", "truncated"],
)
def test_malformed_graphs_are_refused_naming_the_fault(mutate, message, tmp_path):
    saved = saved_hnsw_store(tmp_path / "store", "ip")
    data = np.fromfile(saved / "index.bin", dtype=np.uint8)
    mutated = mutate(data)
    with pytest.raises(ValueError, match=message):
        check_hnsw_file(data if mutated is None else mutated, 8, 96, 4)
    with pytest.raises(MemoryStoreError, match=message):
        KNNStore.from_state_dict(
            {**KNNStore.load(saved).state_dict(), "index_bytes": data if mutated is None else mutated}
        )
