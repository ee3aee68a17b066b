"""``python -m dmt.bench.arithmetic``: the shipped experiments' arithmetic, counted on a tiny teacher."""

import json

from dmt.bench.arithmetic import main
from dmt.layers.arithmetic import mlp_multiply_adds
from dmt.layers.mlp import MLPForm


def test_counts_each_experiment_at_start_and_with_full_stores(tmp_path, capsys):
    out = tmp_path / "arithmetic.json"
    assert (
        main(
            [
                "--experiments",
                "tiny_mixed",
                "quality_all_lowrank",
                "--out",
                str(out),
                "--",
                "teacher=tiny_llama",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    mixed, lowrank = report["tiny_mixed"], report["quality_all_lowrank"]
    # tiny_mixed: empty stores search and read nothing at the start, and cost more once full.
    assert mixed["at_capacity"]["total"] > mixed["total"] > 0
    # The low-rank baseline has no store: the same count either way, an MLP of its width.
    assert lowrank["at_capacity"]["total"] == lowrank["total"]
    assert 0 < lowrank["mlp_fraction"] < 1
    assert lowrank["mlp"] == len(lowrank["blocks"]) * lowrank["blocks"]["0"]["mlp"]
    assert "| tiny_mixed |" in capsys.readouterr().out


def test_mlp_count_is_the_forms():
    form = MLPForm(d_model=8, units=32, activation="silu", gated=True, key_bias=False, out_bias=False)
    assert mlp_multiply_adds(form) == 3 * 8 * 32
