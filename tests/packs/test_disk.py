"""A pack searched where it lies: its keys filed by a saved inverted-file index, its values memory-mapped."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dmt.kernel.store_files import MANIFEST, StoreFileError, file_record
from dmt.memory import trained
from dmt.packs import forget_documents, merge_packs
from dmt.packs.disk import INDEX, DiskPack, index_file, index_pack
from dmt.packs.files import PackDocument, PackManifest, write_manifest, write_shard

DIM, WIDTH, LENGTHS = 8, 5, (700, 0, 900, 500)


def clustered(count: int, seed: int) -> np.ndarray:
    """``count`` keys around 24 fixed centres (keys a model makes are clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((24, DIM)).astype(np.float32)
    return (centres[rng.integers(0, 24, count)] + 0.3 * rng.standard_normal((count, DIM))).astype(np.float32)


@pytest.fixture()
def pack(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A pack of four documents (one gave no entries) for block 3, with its keys and values in order."""
    directory = tmp_path / "pack"
    (directory / "shards").mkdir(parents=True)
    documents, keys, values = [], [], []
    for i, count in enumerate(LENGTHS):
        shard = f"{i:06d}"
        k = clustered(count, seed=i + 1)
        v = np.random.default_rng(i).standard_normal((count, WIDTH)).astype(np.float16)
        arrays = {"keys": k, "values": v, "offsets": np.arange(count), "tokens": 1000 * i + np.arange(count)}
        write_shard(directory, shard, {"3": arrays})
        documents.append(PackDocument(f"docs/{i}", count, f"{i:064x}", shard, {"3": count}))
        keys.append(k)
        values.append(v)
    manifest = PackManifest(
        {"fingerprint": "f" * 64, "name": "tiny"}, {"3": {"metric": "cosine"}}, {"window": 8, "stride": 4}
    )
    write_manifest(directory, replace(manifest, documents=documents))
    return directory, np.concatenate(keys), np.concatenate(values)


def exact_top(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids ``(N, k)`` of the ``k`` keys of highest cosine similarity to each query."""
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    return np.argsort(-(queries @ unit.T), axis=1, kind="stable")[:, :k]


def test_a_pack_on_disk_returns_the_exact_neighbours_and_their_values(pack):
    directory, keys, values = pack
    index_pack(directory, 3, nlist=16)
    queries = clustered(64, seed=9)
    on_disk = DiskPack(directory, 3, codes="float32")
    assert len(on_disk) == len(keys) and on_disk.nlist == 16
    assert all(isinstance(v, np.memmap) for v in on_disk.keys + on_disk.values)  # mapped, not read
    ids, _ = on_disk.search(queries, 6, nprobe=16)  # every list visited: exact
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(exact_top(keys, queries, 6), axis=1))
    found_keys, found_values = on_disk.get(ids)  # across shards
    np.testing.assert_array_equal(found_keys, keys[ids])
    np.testing.assert_array_equal(found_values, values[ids].astype(np.float32))
    tokens = np.concatenate([1000 * i + np.arange(count) for i, count in enumerate(LENGTHS)])
    np.testing.assert_array_equal(on_disk.next_tokens(ids), tokens[ids])  # each entry's, across shards
    np.testing.assert_array_equal(on_disk.next_tokens(np.array([-1, ids[0, 0]])), [-1, tokens[ids[0, 0]]])
    # Keys ranked as float16 (the default, half the memory) find the same neighbours but for near ties.
    half, _ = DiskPack(directory, 3).search(queries, 6, nprobe=16)
    assert np.mean([len(set(a) & set(b)) / 6 for a, b in zip(half, ids, strict=True)]) >= 0.97
    in_ram = DiskPack(directory, 3, in_ram=True)
    assert not any(isinstance(v, np.memmap) for v in in_ram.keys + in_ram.values)
    np.testing.assert_array_equal(in_ram.get(ids)[1], found_values)


def test_nprobe_is_calibrated_for_recall_on_the_first_queries(pack):
    directory, keys, _ = pack
    index_pack(directory, 3, nlist=32)
    on_disk = DiskPack(directory, 3)
    queries = clustered(200, seed=11)
    ids, _ = on_disk.search(queries, 8)
    assert 1 <= on_disk.nprobe < on_disk.nlist
    assert on_disk.calibrated_recall >= trained.CALIBRATION_RECALL
    truth = exact_top(keys, queries, 8)
    assert np.mean([len(set(a) & set(b)) / 8 for a, b in zip(ids, truth, strict=True)]) >= 0.95


def test_forgetting_keeps_the_index_and_a_document_added_since_is_refused(pack, tmp_path):
    directory, keys, _ = pack
    index_pack(directory, 3, nlist=16)
    forget_documents(directory, ["docs/2"])
    kept = np.concatenate([keys[:700], keys[700 + 900 :]])  # document 1 gave no entries
    queries = clustered(32, seed=5)
    ids, _ = DiskPack(directory, 3, codes="float32").search(queries, 5, nprobe=16)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(exact_top(kept, queries, 5), axis=1))
    merged = tmp_path / "merged"
    merge_packs([directory], merged)  # shards renumbered: not what the index filed
    shutil.copytree(directory / INDEX, merged / INDEX)
    with pytest.raises(StoreFileError, match="was not indexed"):
        DiskPack(merged, 3)


def test_an_unindexed_pack_is_refused_naming_what_to_do(pack):
    with pytest.raises(StoreFileError, match="not indexed .*run dmt-index"):
        DiskPack(pack[0], 3)


@pytest.mark.parametrize("fault", ["list out of range", "wrong length", "nan centroid"])
def test_index_arrays_out_of_shape_or_range_are_refused_before_faiss_reads_them(pack, fault):
    """Even with the manifest rewritten to match (a file someone else made), faiss never sees them."""
    directory, _, _ = pack
    index_pack(directory, 3, nlist=16)
    name = index_file("3", "centroids" if fault == "nan centroid" else "lists")
    array = np.load(directory / INDEX / name)
    if fault == "list out of range":
        array[5] = 16
    elif fault == "wrong length":
        array = array[:-1]
    else:
        array[2, 1] = np.nan
    np.save(directory / INDEX / name, array)
    manifest = json.loads((directory / INDEX / MANIFEST).read_text())
    manifest["files"][name] = file_record(directory / INDEX / name)
    (directory / INDEX / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreFileError, match=name):
        DiskPack(directory, 3)


def test_a_changed_index_file_is_refused_by_its_checksum(pack):
    directory, _, _ = pack
    index_pack(directory, 3, nlist=16)
    path = directory / INDEX / index_file("3", "lists")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreFileError, match="checksum mismatch"):
        DiskPack(directory, 3)
