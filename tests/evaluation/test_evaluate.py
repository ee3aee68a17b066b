"""Evaluation: ablated teacher, teacher perplexity against the Hugging Face loop, the teacher cache,
students from export directories and checkpoints, ``python -m dmt.export`` and the Hydra entry point."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_student, tiny_teacher_cfg, write_checkpoint
from torch.testing import assert_close

import dmt.evaluation.evaluate as evaluate_module
from dmt.evaluation.evaluate import ablate_mlps, evaluate, format_table
from dmt.export import main as export_main
from dmt.layers import RemovedMLP
from dmt.model.families import get_mlp
from dmt.model.loading import load_teacher
from dmt.model.persistence import load_student, save_pretrained
from dmt.model.surgery import memory_layers

TEXTS = [
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
    "The evil that men do lives after them; the good is oft interred with their bones; so let it be "
    "with Caesar. The noble Brutus hath told you Caesar was ambitious.",
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
    "that lour'd upon our house in the deep bosom of the ocean buried.",
]
TOKENS = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
SETTINGS = {"window": 32, "stride": 16, "batch_size": 2}


def hf_docs_perplexity(model, tokenizer, texts: list[str], window: int, stride: int) -> float:
    """The loop of the Hugging Face guide "Perplexity of fixed-length models", over several texts."""
    nll_sum, n_tokens = 0.0, 0
    for text in texts:
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        seq_len = input_ids.size(1)
        prev_end_loc = 0
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + window, seq_len)
            trg_len = end_loc - prev_end_loc
            ids = input_ids[:, begin_loc:end_loc]
            target_ids = ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                neg_log_likelihood = model(ids, labels=target_ids).loss
            num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
            nll_sum += neg_log_likelihood.item() * num_loss_tokens
            n_tokens += num_loss_tokens
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_ablation_zeroes_exactly_the_named_mlps(fixture, request):
    teacher = request.getfixturevalue(fixture)
    ablated = ablate_mlps(teacher, [1, 3])
    for index in range(4):
        assert isinstance(get_mlp(ablated, index), RemovedMLP) == (index in (1, 3))
        assert not isinstance(get_mlp(teacher, index), RemovedMLP)  # the original is untouched
    # Same logits as the teacher with those two MLP outputs zeroed by hooks, and only those.
    hooks = [
        get_mlp(teacher, i).register_forward_hook(lambda _m, _in, out: torch.zeros_like(out)) for i in (1, 3)
    ]
    try:
        with torch.no_grad():
            expected = teacher(TOKENS).logits
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        assert_close(ablated(TOKENS).logits, expected)
        assert not torch.allclose(teacher(TOKENS).logits, expected)
    with pytest.raises(ValueError, match="ablate_layers"):
        ablate_mlps(teacher, [4])


def test_teacher_perplexity_matches_hf_docs_loop(tiny_llama, gpt2_tokenizer):
    result = evaluate(tiny_llama, gpt2_tokenizer, TEXTS, **SETTINGS)
    reference = hf_docs_perplexity(tiny_llama, gpt2_tokenizer, TEXTS, SETTINGS["window"], SETTINGS["stride"])
    (row,) = result["rows"]
    assert row["name"] == "teacher" and row["ratio_to_teacher"] == 1.0
    assert row["perplexity"] == pytest.approx(reference, rel=0.01)
    assert row["tokens"] == sum(len(gpt2_tokenizer(t)["input_ids"]) - 1 for t in TEXTS)


def test_teacher_perplexity_is_cached(tiny_gpt2, gpt2_tokenizer, tmp_path, monkeypatch):
    calls = []
    real = evaluate_module.perplexity

    def counting(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "perplexity", counting)
    run = {**SETTINGS, "cache_dir": tmp_path / "cache", "teacher_id": "tiny-gpt2"}
    first = evaluate(tiny_gpt2, gpt2_tokenizer, TEXTS, ablate_layers=[1], **run)
    assert len(calls) == 2 and not first["settings"]["teacher_cached"]  # teacher + ablated
    second = evaluate(tiny_gpt2, gpt2_tokenizer, TEXTS, ablate_layers=[1], **run)
    assert len(calls) == 3 and calls[-1] is not tiny_gpt2  # only the ablated teacher ran again
    assert second["settings"]["teacher_cached"]
    assert second["rows"] == first["rows"]
    # Any change to the key's parts misses the cache.
    evaluate(tiny_gpt2, gpt2_tokenizer, TEXTS[:1], **run)
    evaluate(tiny_gpt2, gpt2_tokenizer, TEXTS, **{**run, "stride": 8})
    evaluate(tiny_gpt2, gpt2_tokenizer, TEXTS, **{**run, "teacher_id": "other"})
    assert len(calls) == 6


def test_evaluate_rows_generations_and_table(tiny_gpt2, gpt2_tokenizer):
    student = tiny_student(tiny_gpt2, TOKENS)
    result = evaluate(
        tiny_gpt2,
        gpt2_tokenizer,
        TEXTS,
        student=student,
        ablate_layers=sorted(memory_layers(student)),
        generation_prompts=["To be, or not"],
        max_new_tokens=4,
        **SETTINGS,
    )
    assert [r["name"] for r in result["rows"]] == ["teacher", "student", "ablated"]
    teacher_ppl = result["rows"][0]["perplexity"]
    for row in result["rows"]:
        assert row["ratio_to_teacher"] == pytest.approx(row["perplexity"] / teacher_ppl)
    (generation,) = result["generations"]
    assert set(generation) == {"prompt", "teacher", "student", "ablated"}
    assert all(isinstance(text, str) and text for text in generation.values())
    assert result["settings"]["ablate_layers"] == [0, 2]
    json.dumps(result)  # JSON-ready
    table = format_table(result)
    assert len(table.splitlines()) == 4 and "ablated" in table


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_student_from_export_and_checkpoint_agree(fixture, request, tmp_path, gpt2_tokenizer):
    teacher = request.getfixturevalue(fixture)
    student = tiny_student(teacher, TOKENS)
    with torch.no_grad():
        expected = student(TOKENS).logits
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    write_checkpoint(student, tmp_path / "run.ckpt", tiny_teacher_cfg(fixture[5:]), teacher=teacher)

    from_export, export_tokenizer = load_student(tmp_path / "export")
    from_ckpt, ckpt_tokenizer = load_student(tmp_path / "run.ckpt")
    with torch.no_grad():
        assert_close(from_export(TOKENS).logits, expected)
        assert torch.equal(from_ckpt(TOKENS).logits, from_export(TOKENS).logits)
    assert sorted(memory_layers(from_ckpt)) == [0, 2]
    assert ckpt_tokenizer("ROMEO:")["input_ids"] == export_tokenizer("ROMEO:")["input_ids"]


def test_checkpoint_weight_mismatch_is_reported(tiny_gpt2, tmp_path):
    student = tiny_student(tiny_gpt2, TOKENS)
    write_checkpoint(student, tmp_path / "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    del checkpoint["state_dict"]["student.lm_head.weight"]
    checkpoint["state_dict"]["student.extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\].*unexpected keys \['extra"):
        load_student(tmp_path / "bad.ckpt")
    with pytest.raises(FileNotFoundError):
        load_student(tmp_path / "nope.ckpt")


def test_export_cli_writes_a_loadable_directory(tiny_gpt2, tmp_path):
    student = tiny_student(tiny_gpt2, TOKENS)
    write_checkpoint(student, tmp_path / "run.ckpt", tiny_teacher_cfg("gpt2"))
    export_main([str(tmp_path / "run.ckpt"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "modeling_dmt.py").is_file()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    loaded, tokenizer = load_student(tmp_path / "out")
    assert tokenizer is not None
    with torch.no_grad():
        assert_close(loaded(TOKENS).logits, student(TOKENS).logits)


def test_hydra_entry_point(tmp_path, text_dir, monkeypatch):
    """``conf/eval.yaml`` composes and ``run_eval`` writes the JSON that the notebook reads."""
    from hydra import compose, initialize_config_dir

    import dmt.config  # noqa: F401  (the ${pkg:...} resolver)
    from dmt.conf import CONF_DIR
    from dmt.evaluation.__main__ import run_eval

    monkeypatch.chdir(tmp_path)
    student = tiny_student(load_teacher(tiny_teacher_cfg()), TOKENS)
    save_pretrained(student, None, tmp_path / "export")
    doc = tmp_path / "doc.txt"  # short: the entry point, not the arithmetic, is under test here
    doc.write_text(sorted(text_dir.iterdir())[0].read_text()[:2000])
    overrides = [
        "teacher=tiny_gpt2",
        # The tiny_gpt2 teacher config but with the fixture's sizes, so the export matches it.
        *(f"teacher.random_init.{k}={v}" for k, v in tiny_teacher_cfg().random_init.items()),
        f"student={tmp_path / 'export'}",
        f"texts=[{doc}]",
        "window=64",
        "stride=32",
        "max_new_tokens=3",
        "prompts=[ROMEO:]",
        f"output={tmp_path / 'eval.json'}",
        f"cache_dir={tmp_path / 'cache'}",
        "seed=0",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="eval", overrides=overrides)
    run_eval(cfg)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert [r["name"] for r in written["rows"]] == ["teacher", "student", "ablated"]
    assert written["settings"]["ablate_layers"] == [0, 2]
    assert list(written["generations"][0]) == ["prompt", "teacher", "student", "ablated"]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_export_cli_casts_memory_values(tiny_gpt2, tmp_path):
    student = tiny_student(tiny_gpt2, TOKENS)
    write_checkpoint(student, tmp_path / "run.ckpt", tiny_teacher_cfg("gpt2"))
    export_main([str(tmp_path / "run.ckpt"), str(tmp_path / "fp32")])
    export_main([str(tmp_path / "run.ckpt"), str(tmp_path / "fp16"), "--value-dtype", "float16"])
    loaded, _ = load_student(tmp_path / "fp16")
    for index, layer in memory_layers(loaded).items():
        assert layer.store.value_dtype == layer.cfg.value_dtype == "float16"
        halved = (tmp_path / "fp16" / "memory" / f"layer_{index:02d}" / "values.npy").stat().st_size
        full = (tmp_path / "fp32" / "memory" / f"layer_{index:02d}" / "values.npy").stat().st_size
        assert halved < 0.6 * full
    with torch.no_grad():
        assert_close(loaded(TOKENS).logits, student(TOKENS).logits, atol=1e-2, rtol=1e-2)
