"""Reading a long document window by window, with and without memory inserts."""

import math

import pytest
import torch
from conftest import tiny_teacher_cfg

from dmt.evaluation.long_document import format_table, inserting_memory, quarter_perplexities, read_document
from dmt.evaluation.perplexity import sliding_window_nll
from dmt.layers.protocol import current
from dmt.memory import ORIGIN_SPAN
from dmt.model.loading import load_teacher
from dmt.model.surgery import build_student, memory_layers, resolve_layer_configs

IDS = torch.randint(0, 50257, (403,), generator=torch.Generator().manual_seed(5))


def student_of(teacher, novelty_threshold, capacity=4096):
    plan = {"blocks": [3], "type": "associative", "heads": 2, "key_dim": 8, "topk": 4, "capacity": capacity}
    plan["novelty_threshold"] = novelty_threshold
    return build_student(teacher, resolve_layer_configs(plan, teacher.config)).eval()


def test_quarters_split_the_sliding_window_perplexity_of_the_whole():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    reading = quarter_perplexities(teacher, IDS, window=64, stride=32)
    nll, tokens = sliding_window_nll(teacher, IDS, 64, 32)
    assert reading["whole"]["tokens"] == tokens == len(IDS) - 1
    assert reading["whole"]["nll"] == pytest.approx(nll, rel=1e-5)
    assert sum(q["tokens"] for q in reading["quarters"]) == tokens
    assert [q["tokens"] for q in reading["quarters"]] == [100, 101, 100, 101]  # position 0 is never scored
    assert sum(q["nll"] for q in reading["quarters"]) == pytest.approx(nll, rel=1e-5)
    for q in reading["quarters"]:
        assert q["perplexity"] == pytest.approx(math.exp(q["nll"] / q["tokens"]))


def test_the_inserting_reading_grows_the_memory_and_restores_the_settings():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    student = student_of(teacher, novelty_threshold=0.1)
    layer = memory_layers(student)[3]
    cfg = layer.cfg
    result = read_document(teacher, student, IDS, window=64, stride=32)
    names = [row["name"] for row in result["rows"]]
    assert names == ["teacher", "student", "student, inserting"]
    inserting = result["rows"][2]
    assert inserting["entries_inserted"] == len(layer.store) > 0  # only the inserting reading stored
    assert inserting["entries_evicted"] == 0
    assert layer.cfg is cfg and not layer.cfg.insert_during_eval
    # Later windows read what earlier ones stored, so the readings differ after the first window.
    student_q, inserting_q = result["rows"][1]["quarters"], result["rows"][2]["quarters"]
    assert student_q[-1]["perplexity"] != inserting_q[-1]["perplexity"]
    assert len(format_table(result).splitlines()) == 4


def test_a_full_store_reports_what_the_reading_inserted_and_evicted():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    student = student_of(teacher, novelty_threshold=0.1, capacity=64)
    inserting = read_document(teacher, student, IDS, window=64, stride=32)["rows"][2]
    store = memory_layers(student)[3].store
    assert len(store) == 64 < inserting["entries_inserted"]
    assert inserting["entries_evicted"] == inserting["entries_inserted"] - 64


def test_a_reading_from_empty_memory_stores_only_the_document():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    student = student_of(teacher, novelty_threshold=0.1)
    layer = memory_layers(student)[3]
    layer.store.insert(torch.randn(5, 8).numpy(), torch.randn(5, layer.entry_dim).numpy())  # held before
    result = read_document(teacher, student, IDS, window=64, stride=32, from_empty=True)
    assert [row["name"] for row in result["rows"]][2:] == [
        "student, inserting",
        "student, inserting into empty memory",
    ]
    from_empty = result["rows"][3]
    assert len(layer.store) == from_empty["entries_inserted"] > 0
    assert layer.store.stats.inserts == from_empty["entries_inserted"]  # a new store: nothing from before
    assert from_empty["quarters"][0]["perplexity"] != result["rows"][2]["quarters"][0]["perplexity"]
    assert len(format_table(result).splitlines()) == 5


def test_a_student_without_inserting_memory_is_refused():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    student = student_of(teacher, novelty_threshold=None)
    with inserting_memory(student) as layers:
        assert layers == 0
    with pytest.raises(ValueError, match="no memory layer that inserts"):
        read_document(teacher, student, IDS, window=64, stride=32)


def test_the_inserting_reading_records_the_text_of_each_entry():
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    student = student_of(teacher, novelty_threshold=0.1)
    layer = memory_layers(student)[3]
    document = IDS[:160].tolist()  # four windows
    with inserting_memory(student):
        quarter_perplexities(student, torch.tensor(document), window=64, stride=32)
    assert current().token_ids is None  # handed to each forward only
    ids = layer.store.live_ids()
    assert len(ids) > 0
    _, spans = layer.store.origins(ids)
    # The first window's first query (slot 0) is the document's first token, with nothing before it.
    assert spans[0].tolist() == [-1] * (ORIGIN_SPAN - 1) + [document[0]]
    for span in spans:  # every entry's span is a piece of the document
        tokens = span[span >= 0].tolist()
        assert tokens and any(document[i : i + len(tokens)] == tokens for i in range(len(document)))
