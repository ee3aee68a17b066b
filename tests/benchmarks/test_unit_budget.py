"""The unit-budget study: MLPs computing K of their units, and what each choice costs."""

import pytest
import torch

from benchmarks.unit_budget import (
    Strategy,
    UnitBudgetMLP,
    format_table,
    parse_strategies,
    spherical_kmeans,
    study,
)
from dmt.model.families import get_mlp, mlp_weights


@pytest.mark.parametrize("teacher", ["tiny_gpt2", "tiny_llama"])
def test_every_unit_computes_the_mlp(teacher, request):
    model = request.getfixturevalue(teacher)
    ffn = mlp_weights(model, 0)
    hidden = torch.randn(2, 5, ffn.form.d_model)
    expected = get_mlp(model, 0)(hidden)
    for strategy in (Strategy("full", 0), Strategy("gate_magnitude", ffn.form.units)):
        torch.testing.assert_close(UnitBudgetMLP(ffn, strategy)(hidden), expected)


def test_ivf_probing_every_list_is_the_exact_magnitude_choice(tiny_llama):
    ffn = mlp_weights(tiny_llama, 1)
    hidden = torch.randn(3, 4, ffn.form.d_model)
    k = ffn.form.units // 4
    exact = UnitBudgetMLP(ffn, Strategy("gate_magnitude", k))(hidden)
    everything = UnitBudgetMLP(ffn, Strategy("ivf", k, lists=8, probes=8))
    torch.testing.assert_close(everything(hidden), exact)
    assert everything.scored == 12 * ffn.form.units  # every key of every token scored
    few = UnitBudgetMLP(ffn, Strategy("ivf", k, lists=8, probes=1))
    few(hidden)
    assert few.scored < everything.scored


def test_contribution_keeps_the_largest_unit(tiny_llama):
    ffn = mlp_weights(tiny_llama, 0)
    x = torch.randn(1, ffn.form.d_model)
    contributions = ffn.act_fn(x @ ffn.keys.T) * (x @ ffn.gate_keys.T)  # (1, U)
    best = (contributions.abs() * ffn.values.norm(dim=1)).argmax()
    expected = contributions[0, best] * ffn.values[best]
    torch.testing.assert_close(UnitBudgetMLP(ffn, Strategy("contribution", 1))(x)[0], expected)


def test_multiply_adds_per_strategy(tiny_llama):
    ffn = mlp_weights(tiny_llama, 0)
    c, u = ffn.form.d_model, ffn.form.units
    cost = UnitBudgetMLP(ffn, Strategy("gate_magnitude", 8)).multiply_adds()
    assert cost == u * (c + 1) + 8 * (3 * c + 1)
    assert UnitBudgetMLP(ffn, Strategy("contribution", 8)).multiply_adds() == 3 * c * u
    lowrank = UnitBudgetMLP(ffn, Strategy("lowrank", 8, rank=4)).multiply_adds()
    assert lowrank == 2 * 4 * (c + 1 + u) + 8 * (3 * c + 1)


def test_spherical_kmeans_finds_separated_directions():
    centres = torch.eye(4)
    points = torch.cat([centres + 0.01 * torch.randn(4, 4) for _ in range(10)])
    found = spherical_kmeans(points, 4)
    assert (found @ centres.T).max(1).values.min() > 0.99
    with pytest.raises(ValueError, match="clusters"):
        spherical_kmeans(points, 41)


def test_bad_strategies_are_named():
    with pytest.raises(ValueError, match="unknown strategy"):
        Strategy("random", 4)
    with pytest.raises(ValueError, match="probes"):
        Strategy("ivf", 4, lists=4, probes=5)
    with pytest.raises(ValueError, match="LISTS:PROBES"):
        parse_strategies([4], [], ["8"])


def test_study_compares_with_the_full_mlp_and_restores_the_model(tiny_llama, gpt2_tokenizer):
    texts = {"a": ["The quick brown fox jumps over the lazy dog. " * 6], "b": ["Hello world, again. " * 8]}
    before = [get_mlp(tiny_llama, i) for i in range(2)]
    strategies = parse_strategies([4], [2], ["4:2"])
    rows = study(tiny_llama, texts, gpt2_tokenizer, strategies, window=16, stride=8, batch_size=2)
    assert [row["strategy"] for row in rows] == [
        "full",
        "gate_magnitude",
        "contribution",
        "lowrank:2",
        "ivf:4:2",
    ]
    assert rows[0]["ratio"] == {"a": 1.0, "b": 1.0} and rows[0]["mlp_fraction"] == 1.0
    assert all(row["ratio"]["a"] != 1.0 for row in rows[1:])
    assert rows[1]["mlp_fraction"] < 1.0
    assert [get_mlp(tiny_llama, i) for i in range(2)] == before
    assert "| ivf:4:2 | 4 |" in format_table(rows)
