import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dmt.distill.module import DistillationModule
from dmt.inspect import entry_use, inspect_model, main
from dmt.memory import ORIGIN_SPAN
from dmt.model.families import mlp_weights
from dmt.model.persistence import save_pretrained
from dmt.model.surgery import build_student, memory_layers, memory_protocol, resolve_layer_configs

FEATURAL, ASSOCIATIVE = 1, 2
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
SPANS = ["To be, or not to be", " that is the question", "ROMEO: But soft"]
NEXT_TOKENS = [1771, 38201, 2000]  # " whether", " Juliet", " mind": what followed each span


def seeded_student(teacher, settings: dict | None = None):
    """Block 1: a featural memory seeded from its MLP (``init: ffn``); block 2: an empty associative memory
    with two heads (the seeding, gating and ranking settings are both types', so block 2 sets its own)."""
    configs = resolve_layer_configs(
        {
            "blocks": [FEATURAL, ASSOCIATIVE],
            "type": ["featural", "associative"],
            "init": "ffn",
            "capacity": 256,
            "topk": 8,
            **(settings or {}),
            "per_block": {
                ASSOCIATIVE: {"heads": 2, "key_dim": 8, "capacity": 64, "novelty_threshold": 0.0}
                | {"init": "empty", "gate_dim": 0, "ranking": "score"}
            },
        },
        teacher.config,
    )
    return build_student(teacher, configs).eval()


def insert_spans(student, tokenizer) -> list[str]:
    """Insert one entry per span of ``SPANS`` into the associative store, its origin the span's last
    ``ORIGIN_SPAN`` tokens, its next token ``NEXT_TOKENS[row]``; then the first entry is read twice, the
    second once, the third never."""
    store = memory_layers(student)[ASSOCIATIVE].store
    generator = np.random.default_rng(0)
    tokens = np.full((len(SPANS), ORIGIN_SPAN), -1, dtype=np.int32)
    texts = []
    for row, span in enumerate(SPANS):
        ids = tokenizer(span).input_ids[-ORIGIN_SPAN:]
        tokens[row, ORIGIN_SPAN - len(ids) :] = ids
        texts.append(tokenizer.decode(ids))
    slots = store.insert(
        generator.standard_normal((len(SPANS), store.key_dim)).astype(np.float32),
        generator.standard_normal((len(SPANS), store.value_dim)).astype(np.float32),
        origin_tokens=tokens,
        next_tokens=np.array(NEXT_TOKENS[: len(SPANS)]),
    )
    store.reference(np.array([[slots[0], slots[0]], [slots[1], -1]]))
    return texts


def test_seeded_entries_name_their_unit_and_promote_what_the_unit_promotes(tiny_gpt2):
    values = mlp_weights(tiny_gpt2, FEATURAL).values  # (U, C): what unit u adds to the residual stream
    student = seeded_student(tiny_gpt2)
    report = inspect_model(student, block=FEATURAL, top=5, tokens=4, sort="slot")
    (layer,) = report["layers"]
    assert (layer["entries"], layer["seeded"], layer["inserted"]) == (len(values), len(values), 0)
    unembedding = student.get_output_embeddings().weight.detach()  # (V, C)
    for row in layer["rows"]:
        unit = row["origin"]["unit"]
        assert unit is not None and row["origin"]["token_ids"] == []
        # The seeded value through the output projection is the unit's own value vector (exact SVD).
        expected = (unembedding @ values[unit]).topk(4)
        assert [p["token_id"] for p in row["promotes"]] == expected.indices.tolist()
        assert_close(
            torch.tensor([p["logit"] for p in row["promotes"]]), expected.values, rtol=1e-4, atol=1e-4
        )
    assert [row["slot"] for row in layer["rows"]] == sorted(row["slot"] for row in layer["rows"])


@pytest.mark.parametrize("dense_weights", [True, False])
def test_gated_entries_lens_only_the_value_part(tiny_llama, dense_weights):
    """Llama MLPs are gated: an entry is [value | gate key], and only the value reaches the stream."""
    c = tiny_llama.config.hidden_size
    values = mlp_weights(tiny_llama, FEATURAL).values
    settings = {"gate_dim": c} if dense_weights else {"dense_weights": False, "ranking": "magnitude"}
    student = seeded_student(tiny_llama, {"key_dim": c + 1, **settings})
    layer = memory_layers(student)[FEATURAL]
    assert layer.entry_dim == layer.value_dim + c
    (report,) = inspect_model(student, block=FEATURAL, top=3, tokens=3)["layers"]
    unembedding = student.get_output_embeddings().weight.detach()
    for row in report["rows"]:
        expected = (unembedding @ values[row["origin"]["unit"]]).topk(3).indices
        assert [p["token_id"] for p in row["promotes"]] == expected.tolist()


def test_heads_lens_is_the_mean_of_the_per_head_lenses_or_one_head(tiny_gpt2, gpt2_tokenizer):
    student = seeded_student(tiny_gpt2)
    insert_spans(student, gpt2_tokenizer)
    layer = memory_layers(student)[ASSOCIATIVE]
    unembedding = student.get_output_embeddings().weight.detach()  # (V, C)
    dv = layer.value_dim
    per_head = [layer.out_proj.weight.detach()[:, h * dv : (h + 1) * dv] for h in range(2)]  # (C, Dv) each
    for head, weight in [(None, (per_head[0] + per_head[1]) / 2), (0, per_head[0]), (1, per_head[1])]:
        (report,) = inspect_model(student, block=ASSOCIATIVE, tokens=3, head=head)["layers"]
        for row in report["rows"]:
            _, entry = layer.store.get(np.array([row["slot"]]))
            expected = (unembedding @ weight @ torch.from_numpy(entry[0])).topk(3).indices
            assert [p["token_id"] for p in row["promotes"]] == expected.tolist(), head
    with pytest.raises(ValueError, match="--head 2: block 2 has 2 head"):
        inspect_model(student, block=ASSOCIATIVE, head=2)


def test_entry_use_counts_reads_and_tells_inserted_from_seeded(tiny_gpt2, gpt2_tokenizer):
    student = seeded_student(tiny_gpt2)
    insert_spans(student, gpt2_tokenizer)
    use = entry_use(memory_layers(student)[ASSOCIATIVE].store)
    assert len(use.slots) == len(SPANS) and not use.seeded.any()
    assert sorted(use.reads.tolist()) == [0, 1, 2]
    (report,) = inspect_model(student, gpt2_tokenizer, block=ASSOCIATIVE, sort="reads")["layers"]
    assert [row["read_count"] for row in report["rows"]] == [2, 1, 0]
    assert report["never_read_share"] == pytest.approx(1 / 3)
    assert (report["seeded"], report["inserted"], report["capacity"]) == (0, 3, 64)


def test_entries_inserted_by_forwards_record_the_text_that_inserted_them(tiny_gpt2, gpt2_tokenizer):
    student = seeded_student(tiny_gpt2).train()
    ids = gpt2_tokenizer(TEXT, return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad(), memory_protocol(student).forward(ids):
        for _ in range(2):
            student(ids)
    (report,) = inspect_model(student.eval(), gpt2_tokenizer, block=ASSOCIATIVE, top=64)["layers"]
    assert report["inserted"] == report["entries"] > 0 and report["seeded"] == 0
    # The span of the token at position t: the (up to) ORIGIN_SPAN tokens ending at t.
    spans = {tuple(ids[0, max(0, t - ORIGIN_SPAN + 1) : t + 1].tolist()) for t in range(ids.shape[1])}
    # Each entry's next token: the one after its span (none after the last position).
    following = {
        tuple(ids[0, max(0, t - ORIGIN_SPAN + 1) : t + 1].tolist()): ids[0, t + 1].item()
        for t in range(ids.shape[1] - 1)
    }
    for row in report["rows"]:
        assert tuple(row["origin"]["token_ids"]) in spans
        assert row["origin"]["text"] == gpt2_tokenizer.decode(row["origin"]["token_ids"])
        if row["next_token"] is not None:
            expected = following[tuple(row["origin"]["token_ids"])]
            assert row["next_token"] == {"token_id": expected, "token": gpt2_tokenizer.decode([expected])}
    assert any(row["next_token"] is not None for row in report["rows"])


def test_cli_prints_decoded_spans_and_writes_json(tiny_gpt2, gpt2_tokenizer, tmp_path, capsys):
    student = seeded_student(tiny_gpt2)
    texts = insert_spans(student, gpt2_tokenizer)
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    main([str(tmp_path / "export"), "--top", "4", "--tokens", "2", "--json", str(tmp_path / "inspect.json")])
    printed = capsys.readouterr().out
    assert "block 1 featural (1 head(s)): 128 of 256 entries" in printed
    assert "128 seeded, 0 inserted" in printed and "unit " in printed
    assert "block 2 associative (2 head(s)): 3 of 64 entries" in printed
    for text in texts:
        assert repr(text) in printed
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert [layer["block"] for layer in report["layers"]] == [FEATURAL, ASSOCIATIVE]
    featural, associative = report["layers"]
    assert len(featural["rows"]) == 4 and len(associative["rows"]) == 3
    assert all(len(row["promotes"]) == 2 for row in featural["rows"])
    scores = [row["lrfu_score"] for row in featural["rows"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(row["origin"]["text"] for row in associative["rows"]) == sorted(texts)
    assert sorted(row["next_token"]["token_id"] for row in associative["rows"]) == sorted(NEXT_TOKENS)
    assert all(row["next_token"] is None for row in featural["rows"])  # seeded: no next token
    for token in NEXT_TOKENS:
        assert repr(gpt2_tokenizer.decode([token])) in printed
    promoted = associative["rows"][0]["promotes"][0]
    assert promoted["token"] == gpt2_tokenizer.decode([promoted["token_id"]])


def test_cli_reports_an_empty_store_and_refuses_a_block_without_memory(
    tiny_gpt2, gpt2_tokenizer, tmp_path, capsys
):
    save_pretrained(seeded_student(tiny_gpt2), gpt2_tokenizer, tmp_path / "export")
    main([str(tmp_path / "export"), "--layer", "2"])
    printed = capsys.readouterr().out
    assert "block 2 associative (2 head(s)): 0 of 64 entries" in printed
    assert printed.endswith("never read: -\n\n(no entries)\n")
    with pytest.raises(SystemExit, match="2"):
        main([str(tmp_path / "export"), "--layer", "0"])
    assert "--layer 0 is not a memory layer; memory layers are at blocks 1, 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "export"), "--top", "0"])
    assert "--top must be >= 1" in capsys.readouterr().err


def test_cli_reads_a_checkpoint_without_tokenizer_and_shows_token_ids(
    tiny_gpt2, gpt2_tokenizer, tmp_path, capsys
):
    student = seeded_student(tiny_gpt2)
    insert_spans(student, gpt2_tokenizer)
    module = DistillationModule(student, alpha_ce=1.0)  # no run config: the checkpoint has no tokenizer
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    main([str(tmp_path / "last.ckpt"), "--layer", "2", "--tokens", "1", "--json", str(tmp_path / "x.json")])
    (report,) = json.loads((tmp_path / "x.json").read_text())["layers"]
    first_span = gpt2_tokenizer(SPANS[0]).input_ids[-ORIGIN_SPAN:]
    assert first_span in [row["origin"]["token_ids"] for row in report["rows"]]
    assert all(row["origin"]["text"] is None for row in report["rows"])
    assert all(row["promotes"][0]["token"] is None for row in report["rows"])
    printed = capsys.readouterr().out
    assert str(first_span) in printed
    assert str(report["rows"][0]["promotes"][0]["token_id"]) in printed
