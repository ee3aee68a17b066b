"""Memory packs: a corpus memorised into a pack, loaded into its student, forgotten by document, merged,
resumed after an interruption, and refused for another student."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_teacher_cfg

import dmt.index
import dmt.packs.files
from dmt.errors import ConfigError
from dmt.kernel.pack_files import SHARDS, read_shard
from dmt.memory import KNNStore, trained
from dmt.model.loading import load_teacher
from dmt.model.persistence import load_pretrained, save_pretrained
from dmt.model.surgery import build_student, memory_layers, memory_protocol, resolve_layer_configs
from dmt.packs import PackError, forget_documents, memorize, merge_packs, open_pack, pack_manifest, read_pack
from dmt.packs.disk import PackStore
from dmt.packs.reading import document_entries

WINDOW, STRIDE = 32, 16
PLAN = {"blocks": [3], "type": "associative", "heads": 2, "key_dim": 8, "topk": 4, "capacity": 64}
PLAN["metric"] = "cosine"  # distances >= 0: with novelty_threshold 0 every token is novel


def student_of(plan: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    plan = {**PLAN, "novelty_threshold": 0.0, **(plan or {})}
    return build_student(teacher, resolve_layer_configs(plan, teacher.config)).eval()


def documents(count: int = 4, seed: int = 3) -> list[tuple[str, torch.Tensor]]:
    """``count`` random documents of 40-90 tokens, named ``docs/<i>``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(40, 90, (count,), generator=generator).tolist()
    return [(f"docs/{i}", torch.randint(0, 50257, (n,), generator=generator)) for i, n in enumerate(lengths)]


def make_pack(student, path: Path, docs, **kwargs):
    manifest = open_pack(path, pack_manifest(student, "tiny", WINDOW, STRIDE), False, [])
    return memorize(student, iter(docs), path, manifest, batch_size=3, **kwargs)[0]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer) -> Path:
    student = student_of()
    student(torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(9)))  # eval: no inserts
    memory_layers(student)[3].store.insert(np.ones((3, 8), np.float32), np.ones((3, 16), np.float32))
    return save_pretrained(student, gpt2_tokenizer, tmp_path_factory.mktemp("student") / "export")


def shard_arrays(pack: Path, document) -> dict[str, np.ndarray]:
    """The arrays ``document`` of ``pack`` gave the layer of block 3 (8-wide keys, 16-wide values)."""
    return read_shard(pack / SHARDS / document.shard, "3", document.entries["3"], 8, 16)


def stored(model) -> dict[str, np.ndarray]:
    """The arrays of the memory layer's store: keys, values, and per-slot LRFU state and provenance."""
    state = memory_layers(model)[3].store.state()
    slots = {name: array.copy() for name, array in state.slots.items()}
    return {"keys": state.keys.copy(), "values": state.values.copy(), **slots}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


QUERY = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(11))


def test_every_token_with_a_successor_gives_one_entry_per_head_and_the_student_is_unchanged(export, tmp_path):
    student, _ = load_pretrained(export)
    before = stored(student)
    docs = documents()
    manifest = make_pack(student, tmp_path / "pack", docs)
    after = stored(student)  # references and inserts left the store alone (its search counter moved)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert [d.name for d in manifest.documents] == [name for name, _ in docs]
    for document, (_, ids) in zip(manifest.documents, docs, strict=True):
        assert document.tokens == len(ids)
        assert document.entries == {"3": 2 * (len(ids) - 1)}  # heads x tokens that have a successor
        arrays = shard_arrays(tmp_path / "pack", document)
        offsets = np.sort(arrays["offsets"])
        assert np.array_equal(offsets, np.repeat(np.arange(len(ids) - 1), 2))
        # each entry's next token is the document's token after the one it was read at
        assert np.array_equal(arrays["tokens"], ids.numpy()[arrays["offsets"] + 1])
    assert read_pack(tmp_path / "pack") == manifest


def test_a_loaded_pack_keeps_each_entrys_next_token(export, tmp_path):
    """``use_pack`` stores the pack's entries in document order, each with the token that followed it."""
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents(2))
    manifest = read_pack(tmp_path / "pack")
    tokens = np.concatenate([shard_arrays(tmp_path / "pack", d)["tokens"] for d in manifest.documents])
    loaded, _ = load_pretrained(export, memory=tmp_path / "pack")
    store = memory_layers(loaded)[3].store
    np.testing.assert_array_equal(store.next_tokens(np.arange(len(tokens))), tokens)


def test_an_entry_is_what_the_layer_inserts_reading_the_token_in_its_window(export):
    """The pack's entries equal what the layer itself stores when the window that scores the token's
    successor is read inserting (first window: all; here a single window holds the document)."""
    student, _ = load_pretrained(export)
    ids = documents(1)[0][1][:WINDOW]
    arrays = document_entries(student, ids, WINDOW, STRIDE, 1)["3"]
    layer = memory_layers(student)[3]
    layer.use_store(layer.empty_store())

    with memory_protocol(student).forward(ids[None], insert=True):
        student(input_ids=ids[None])
    keys, values = layer.store.get(layer.store.live_ids())  # (2·32, ·): the layer stores the last token too
    assert len(arrays["keys"]) == 2 * (WINDOW - 1)  # the pack, only the tokens with a successor
    assert np.array_equal(keys[: 2 * (WINDOW - 1)], arrays["keys"])
    assert np.array_equal(values[: 2 * (WINDOW - 1)], arrays["values"])


def test_a_loaded_pack_replaces_the_memory_and_changes_the_reading(export, tmp_path):
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents())
    plain, _ = load_pretrained(export)
    packed, _ = load_pretrained(export, memory=tmp_path / "pack")
    store = memory_layers(packed)[3].store
    manifest = read_pack(tmp_path / "pack")
    assert len(store) == manifest.entries()["3"]
    assert store.capacity == manifest.entries()["3"] + 64  # room for the layer's own capacity
    first = shard_arrays(tmp_path / "pack", manifest.documents[0])
    keys, _ = store.get(np.arange(len(first["keys"])))
    assert np.array_equal(keys, first["keys"])
    assert not torch.allclose(logits(plain, QUERY), logits(packed, QUERY))


def test_a_pack_read_on_a_faiss_index_probing_every_list_reads_as_on_the_exact_one(
    export, tmp_path, monkeypatch
):
    monkeypatch.setattr(trained, "TRAIN_MIN", 100)  # the pack's entries train faiss's lists
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents())
    exact, _ = load_pretrained(export, memory=tmp_path / "pack")
    on_faiss, _ = load_pretrained(
        export, memory=tmp_path / "pack", memory_index={"backend": "faiss", "nlist": 4, "nprobe": 4}
    )
    store = memory_layers(on_faiss)[3].store
    assert store.index_backend == "faiss" and store.index_state["trained"]
    torch.testing.assert_close(logits(on_faiss, QUERY), logits(exact, QUERY))


def test_a_pack_searched_on_disk_probing_every_list_reads_as_in_memory(export, tmp_path, capsys):
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents())
    dmt.index.main([str(tmp_path / "pack"), "--nlist", "4"])
    assert "indexed block 3" in capsys.readouterr().out
    exact, _ = load_pretrained(export, memory=tmp_path / "pack")
    on_disk, _ = load_pretrained(
        export, memory=tmp_path / "pack", memory_index={"backend": "disk", "nprobe": 4, "codes": "float32"}
    )
    store = memory_layers(on_disk)[3].store
    assert isinstance(store, PackStore) and len(store) == read_pack(tmp_path / "pack").entries()["3"]
    torch.testing.assert_close(logits(on_disk, QUERY), logits(exact, QUERY))
    assert store.stats.reads > 0
    with pytest.raises(ValueError, match="read-only"):
        store.insert(np.ones((1, 8), np.float32), np.ones((1, 16), np.float32))


def test_a_pack_on_disk_must_be_indexed_and_takes_only_its_settings(export, tmp_path):
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents())
    with pytest.raises(PackError, match="not indexed .*run dmt-index"):
        load_pretrained(export, memory=tmp_path / "pack", memory_index={"backend": "disk"})
    with pytest.raises(ConfigError, match="memory_index: backend disk takes nprobe and codes"):
        load_pretrained(export, memory=tmp_path / "pack", memory_index={"backend": "disk", "nlist": 4})
    dmt.index.main([str(tmp_path / "pack"), "--nlist", "4"])
    with pytest.raises(ConfigError, match="memory_index: codes: expected float32 or float16, got 'int8'"):
        load_pretrained(export, memory=tmp_path / "pack", memory_index={"backend": "disk", "codes": "int8"})


def test_forgetting_documents_equals_a_pack_never_fed_them(export, tmp_path):
    student, _ = load_pretrained(export)
    docs = documents(5)
    make_pack(student, tmp_path / "all", docs)
    make_pack(student, tmp_path / "without", [docs[0], docs[2], docs[4]])
    removed = forget_documents(tmp_path / "all", ["docs/1", "docs/[3]"])
    assert [d.name for d in removed] == ["docs/1", "docs/3"]
    assert len(list((tmp_path / "all" / SHARDS).iterdir())) == 3  # the shards went too
    forgot, _ = load_pretrained(export, memory=tmp_path / "all")
    never, _ = load_pretrained(export, memory=tmp_path / "without")
    torch.testing.assert_close(logits(forgot, QUERY), logits(never, QUERY), rtol=0, atol=0)
    a, b = memory_layers(forgot)[3].store, memory_layers(never)[3].store
    assert np.array_equal(a.get(a.live_ids())[0], b.get(b.live_ids())[0])


def test_an_interrupted_run_resumes_where_it_stopped(export, tmp_path):
    student, _ = load_pretrained(export)
    docs = documents(4)
    reference = make_pack(student, tmp_path / "reference", docs)

    def interrupted():
        yield from docs[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_pack(student, tmp_path / "pack", interrupted())
    assert [d.name for d in read_pack(tmp_path / "pack").documents] == ["docs/0", "docs/1"]
    (tmp_path / "pack" / SHARDS / "000007").mkdir()  # a shard whose write was cut short
    manifest = make_pack(student, tmp_path / "pack", docs)
    assert not (tmp_path / "pack" / SHARDS / "000007").exists()
    assert [replace(d, shard="") for d in manifest.documents] == [
        replace(d, shard="") for d in reference.documents
    ]
    for ours, theirs in zip(manifest.documents, reference.documents, strict=True):
        a = shard_arrays(tmp_path / "pack", ours)
        b = shard_arrays(tmp_path / "reference", theirs)
        assert all(np.array_equal(a[name], b[name]) for name in a)


def test_merged_packs_hold_every_document_once(export, tmp_path):
    student, _ = load_pretrained(export)
    docs = documents(4)
    make_pack(student, tmp_path / "a", docs[:3])
    make_pack(student, tmp_path / "b", docs[2:])
    make_pack(student, tmp_path / "all", docs)
    merged = merge_packs([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert [d.name for d in merged.documents] == [name for name, _ in docs]
    one, _ = load_pretrained(export, memory=tmp_path / "merged")
    two, _ = load_pretrained(export, memory=tmp_path / "all")
    torch.testing.assert_close(logits(one, QUERY), logits(two, QUERY), rtol=0, atol=0)


def test_a_pack_of_another_student_or_other_settings_is_refused_naming_both(export, tmp_path):
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents(2))
    other = student_of(seed=1)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_pretrained(other, None, tmp_path / "other")
    with pytest.raises(PackError, match=r"made for student tiny \(weights [0-9a-f]{12}\).*other"):
        load_pretrained(tmp_path / "other", memory=tmp_path / "pack")
    student, _ = load_pretrained(export)
    layer = memory_layers(student)[3]
    layer.cfg = replace(layer.cfg, novelty_threshold=0.5)
    make_pack(student, tmp_path / "novel", documents(2))
    with pytest.raises(PackError, match=r"3.novelty_threshold: 0.5 vs 0.0"):
        merge_packs([tmp_path / "novel", tmp_path / "pack"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_reading_settings_do_not_tie_a_pack_to_its_maker(export, tmp_path):
    """topk, temperature and null_distance weigh what a layer reads, not what it stores: a pack made
    under some values reads under others, in dmt and in plain transformers alike."""
    from transformers import AutoModelForCausalLM

    student, _ = load_pretrained(export)
    layer = memory_layers(student)[3]
    layer.cfg = replace(layer.cfg, topk=2, temperature=0.5, null_distance=0.3)
    docs = documents(4)
    make_pack(student, tmp_path / "pack", docs[:2])
    make_pack(load_pretrained(export)[0], tmp_path / "plain", docs[2:])
    merge_packs([tmp_path / "pack", tmp_path / "plain"], tmp_path / "merged")
    load_pretrained(export, memory=tmp_path / "merged")
    AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dmt_memory=tmp_path / "pack")


def test_a_changed_shard_is_refused_by_name(export, tmp_path):
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents(2))
    keys = next((tmp_path / "pack" / SHARDS / "000001").glob("*.keys.npy"))
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0xFF
    keys.write_bytes(bytes(data))
    with pytest.raises(PackError, match=r"000001/layer_03.keys.npy: checksum mismatch.*'docs/1'"):
        load_pretrained(export, memory=tmp_path / "pack")
    (tmp_path / "pack" / "pack.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(PackError, match="pack format 99"):
        read_pack(tmp_path / "pack")
    (tmp_path / "pack" / "pack.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(PackError, match="format 1 packs lack their entries' next tokens: run dmt-memorize"):
        read_pack(tmp_path / "pack")


def test_a_student_without_an_inserting_layer_names_the_experiment_that_makes_one(tmp_path):
    student = student_of({"novelty_threshold": None})
    with pytest.raises(ConfigError, match="experiment=associative_cache"):
        pack_manifest(student, "tiny", WINDOW, STRIDE)


def test_the_same_name_with_other_text_is_refused(export, tmp_path):
    student, _ = load_pretrained(export)
    docs = documents(2)
    make_pack(student, tmp_path / "pack", docs)
    with pytest.raises(PackError, match="holds a document 'docs/1' with other text"):
        make_pack(student, tmp_path / "pack", [docs[0], ("docs/1", docs[0][1])])


def test_a_pack_store_round_trips_through_a_saved_store(export, tmp_path):
    """A student with a pack in place exports as any other: the pack's entries become its memory."""
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents(2))
    packed, tokenizer = load_pretrained(export, memory=tmp_path / "pack")
    save_pretrained(packed, tokenizer, tmp_path / "export")
    again, _ = load_pretrained(tmp_path / "export")
    assert isinstance(memory_layers(again)[3].store, KNNStore)
    torch.testing.assert_close(logits(again, QUERY), logits(packed, QUERY), rtol=0, atol=0)


def test_a_full_disk_leaves_the_pack_as_it_was(export, tmp_path, monkeypatch):
    student, _ = load_pretrained(export)
    docs = documents(3)
    make_pack(student, tmp_path / "pack", docs[:1])

    def full(path, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dmt.packs.files, "write_array", full)
    with pytest.raises(OSError, match=r"saving to .*pack/shards/000001 failed: No space left on device"):
        make_pack(student, tmp_path / "pack", docs)
    monkeypatch.undo()
    assert [d.name for d in read_pack(tmp_path / "pack").documents] == ["docs/0"]
    assert sorted(p.name for p in (tmp_path / "pack" / SHARDS).iterdir()) == ["000000"]
    load_pretrained(export, memory=tmp_path / "pack")  # still loads


@pytest.mark.parametrize(
    "reading", [{"topk": 1, "temperature": 0.5}, {"max_distance": -1e9}, {"residual_distance_scale": 1e-3}]
)
def test_plain_transformers_reads_under_other_reading_settings_as_dmt_does(export, tmp_path, reading):
    """``from_pretrained(..., dmt_memory_read=...)`` is dmt's ``memory_read``: the same logits with a pack,
    and a save keeps the settings; a setting that is not a reading one is refused, naming it."""
    from transformers import AutoModelForCausalLM

    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents(3))
    remote = AutoModelForCausalLM.from_pretrained(
        export, trust_remote_code=True, dmt_memory=tmp_path / "pack", dmt_memory_read=dict(reading)
    )
    ours, _ = load_pretrained(export, memory=tmp_path / "pack", memory_read=reading)
    saved, _ = load_pretrained(export, memory=tmp_path / "pack")
    torch.testing.assert_close(logits(remote.eval(), QUERY), logits(ours, QUERY))
    assert not torch.equal(logits(ours, QUERY), logits(saved, QUERY))
    assert remote.config.dmt["layers"]["3"].items() >= reading.items()
    with pytest.raises(ValueError, match=r"dmt_memory_read\.key_dim: not a reading setting"):
        AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dmt_memory_read={"key_dim": 4})
    with pytest.raises(ValueError, match=r"dmt_memory_read\.topk: must be an integer >= 1, got 0"):
        AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dmt_memory_read={"topk": 0})


def test_plain_transformers_gives_each_layer_of_a_mixed_student_the_reading_settings_it_has(
    tmp_path, gpt2_tokenizer
):
    """A featural layer below the cache (a smaller student with a pack): as in dmt, each layer takes the
    reading settings it has, the featural layer's saved config gains none it lacks, and a setting no
    layer has is refused naming the layers."""
    from transformers import AutoModelForCausalLM

    mixed = student_of({"blocks": [2, 3], "type": ["featural", "associative"], "novelty_threshold": None})
    export = save_pretrained(mixed, gpt2_tokenizer, tmp_path / "mixed")
    reading = {"topk": 2, "max_distance": -1e9}
    remote = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dmt_memory_read=reading)
    ours, _ = load_pretrained(export, memory_read=reading)
    torch.testing.assert_close(logits(remote.eval(), QUERY), logits(ours, QUERY))
    assert (
        remote.config.dmt["layers"]["2"]["topk"] == 2
        and "max_distance" not in remote.config.dmt["layers"]["2"]
    )
    assert remote.config.dmt["layers"]["3"].items() >= reading.items()

    featural = save_pretrained(
        student_of({"type": "featural", "novelty_threshold": None}), None, tmp_path / "f"
    )
    with pytest.raises(
        ValueError, match=r"dmt_memory_read\.max_distance: no memory layer .* \(featural at block 3\)"
    ):
        AutoModelForCausalLM.from_pretrained(
            featural, trust_remote_code=True, dmt_memory_read={"max_distance": 0.1}
        )


def test_plain_transformers_refuses_the_next_token_mix_it_does_not_do(export, tmp_path):
    """The kernel does not mix next tokens: asked to, or given a student saved mixing, it refuses by name
    rather than read a different model."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"dmt_memory_read\.next_token_weight: next tokens mixed into"):
        AutoModelForCausalLM.from_pretrained(
            export, trust_remote_code=True, dmt_memory_read={"next_token_weight": 0.2}
        )
    mixing, _ = load_pretrained(export, memory_read={"next_token_weight": 0.2})
    save_pretrained(mixing, None, tmp_path / "mixing")
    assert (
        memory_layers(load_pretrained(tmp_path / "mixing")[0])[3].cfg.next_token_weight == 0.2
    )  # dmt reads it
    with pytest.raises(ValueError, match="next_token_weight: this memory mixes its next tokens"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "mixing", trust_remote_code=True)


def test_plain_transformers_reads_a_pack_as_dmt_does(export, tmp_path):
    """``from_pretrained(export, trust_remote_code=True, dmt_memory=PACK)``: the kernel reads the pack
    and gives dmt's logits; another student's pack is refused there too."""
    from transformers import AutoModelForCausalLM

    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents(3))
    remote = AutoModelForCausalLM.from_pretrained(
        export, trust_remote_code=True, dmt_memory=tmp_path / "pack"
    )
    ours, _ = load_pretrained(export, memory=tmp_path / "pack")
    torch.testing.assert_close(logits(remote.eval(), QUERY), logits(ours, QUERY))
    other = student_of(seed=1)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_pretrained(other, None, tmp_path / "other")
    with pytest.raises(ValueError, match="was made for student tiny"):  # the remote StoreFileError
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "other", trust_remote_code=True, dmt_memory=tmp_path / "pack"
        )


def test_memory_read_sets_the_reading_of_every_memory_layer(export, tmp_path):
    """``memory_read`` (dmt-eval, long_document, load_pretrained) reads a pack under other reading settings:
    a radius no neighbour is within reads nothing, as an empty memory does; other settings are refused."""
    make_pack(load_pretrained(export)[0], tmp_path / "pack", documents(3))
    nothing = {"max_distance": -1e9}  # below any distance of any metric
    with_pack, _ = load_pretrained(export, memory=tmp_path / "pack")
    radius, _ = load_pretrained(export, memory=tmp_path / "pack", memory_read=nothing)
    empty, _ = load_pretrained(export, memory_read=nothing)
    assert memory_layers(radius)[3].cfg.max_distance == -1e9
    torch.testing.assert_close(logits(radius, QUERY), logits(empty, QUERY), rtol=0, atol=0)
    assert not torch.equal(logits(radius, QUERY), logits(with_pack, QUERY))
    with pytest.raises(ConfigError, match=r"memory_read\.key_dim: not a reading setting"):
        load_pretrained(export, memory_read={"key_dim": 4})
    with pytest.raises(ConfigError, match=r"memory_read: expected reading settings"):
        load_pretrained(export, memory_read=0.05)
