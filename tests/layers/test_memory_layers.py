import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dmt.kernel.ops import mix_values, neighbour_distances, neighbour_weights, null_score, search_distances
from dmt.layers import (
    AssociativeMemory,
    FeaturalConfig,
    FeaturalMemory,
    FFNWeights,
    MemoryProtocol,
    layer_config,
)
from dmt.layers.resolve import resolve


def make(layer_cls, d_model=16, **overrides):
    settings = {
        "type": "associative" if layer_cls is AssociativeMemory else "featural",
        "key_dim": 8,
        "heads": 2,
        "topk": 4,
        "capacity": 256,
        "novelty_threshold": 0.0,
    }
    cfg = resolve(layer_config({**settings, **overrides}), d_model)
    torch.manual_seed(0)
    return layer_cls(d_model, cfg)


@pytest.mark.parametrize("layer_cls", [FeaturalMemory, AssociativeMemory])
def test_drop_in_shape_and_cold_start(layer_cls):
    layer = make(layer_cls).train()
    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert out.shape == x.shape
    # Empty store: no neighbours, the layer outputs its output bias only.
    assert_close(out, layer.out_proj.bias.expand_as(out))
    # Every query was novel, so every token (× heads) was inserted.
    assert len(layer.store) == 2 * 5 * 2
    assert layer.memory_stats()["inserts"] == 20


def test_associative_projections_receive_straight_through_gradients():
    layer = make(AssociativeMemory).train()
    x = torch.randn(2, 5, 16)
    layer(x)  # fill the store
    out = layer(torch.randn(2, 5, 16))
    out.pow(2).sum().backward()
    for proj in (layer.query_proj, layer.key_proj, layer.value_proj, layer.out_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_featural_values_learn_by_write_back(value_dtype):
    layer = make(FeaturalMemory, value_dtype=value_dtype).train()
    assert layer.store.value_dtype == value_dtype
    x = torch.randn(2, 5, 16)
    target = torch.randn(2, 5, 16)
    layer(x)  # inserts the queries as keys with zero values
    loss_before = (layer(x) - target).pow(2).mean()
    loss_before.backward()
    layer.apply_value_updates(lr=0.5)
    # The stored values moved along their gradient: the same input now fits the target better.
    with torch.no_grad():
        loss_after = (layer(x) - target).pow(2).mean()
    assert loss_after < loss_before
    # Once values are non-zero the output depends on the query, so the query projection learns too.
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    assert layer.query_proj.weight.grad.abs().sum() > 0


PRODUCT = {"metric": "ip", "temperature": 1.0, "novelty_threshold": None, "index": {"backend": "product"}}


def test_product_key_featural_layer_is_full_and_learns_by_write_back():
    layer = make(FeaturalMemory, **PRODUCT).train()  # capacity 256 = 16²
    assert len(layer.store) == 256
    x, target = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    loss_before = (layer(x) - target).pow(2).mean()
    loss_before.backward()
    layer.apply_value_updates(lr=0.5)
    with torch.no_grad():
        assert (layer(x) - target).pow(2).mean() < loss_before
    assert len(layer.store) == 256 and layer.memory_stats()["inserts"] == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"capacity": 250}, r"swap\.index: a product-key index needs capacity = n²"),
        ({"metric": "cosine"}, r"swap\.index: a product-key index needs metric ip or l2"),
        ({"novelty_threshold": 0.1}, r"swap\.write\.novelty_threshold: a product-key store has fixed keys"),
        ({"init": "ffn"}, r"swap\.store\.init: a product-key store has fixed keys: it needs init=empty"),
        ({"index": {"backend": "usearch"}}, r"swap\.index: unknown index backend 'usearch'"),
        (
            {"index": {"backend": "exact", "ef": 3}},
            r"swap\.index\.ef: not a setting of the exact backend; it has none",
        ),
        ({"value_dtype": "bfloat16"}, r"swap\.store\.value_dtype: must be one of"),
    ],
)
def test_index_settings_are_checked_with_the_layer(overrides, message):
    with pytest.raises(ValueError, match=message):
        FeaturalConfig(**{**PRODUCT, "key_dim": 64, "capacity": 256, **overrides})


def test_eval_does_not_insert():
    layer = make(FeaturalMemory).eval()
    layer(torch.randn(1, 3, 16))
    assert len(layer.store) == 0


def best_rank(matrix, rank):
    """The best rank-``rank`` approximation of ``matrix`` (truncated SVD, Eckart–Young), in float64."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize(
    ("key_dim", "value_dim"),
    [(13, 12), (6, 6), (3, 12), (13, 4)],  # exact (d_model + 1, d_model), then truncated keys and/or values
)
def test_ffn_init_reproduces_the_mlp_on_its_top_k(key_dim, value_dim):
    torch.manual_seed(0)
    d_model, units = 12, 48
    keys, key_bias = torch.randn(units, d_model), torch.randn(units)
    values, out_bias = torch.randn(units, d_model), torch.randn(d_model)
    ffn = FFNWeights(keys, key_bias, values, out_bias, "relu", torch.relu)
    cfg = FeaturalConfig(key_dim=key_dim, value_dim=value_dim, topk=units, init="ffn")
    layer = FeaturalMemory(d_model, resolve(cfg, d_model, ffn.form))
    layer.init_from_ffn(ffn)
    x = torch.randn(3, 4, d_model)
    with torch.no_grad():
        out = layer.eval()(x)
    # Every unit is retrieved (k = units): the layer is the MLP whose [keys | bias] and values are their
    # rank-key_dim and rank-value_dim truncated SVDs (exact at full width).
    x1 = torch.cat([x, torch.ones(3, 4, 1)], dim=-1).double()
    augmented = torch.cat([keys, key_bias[:, None]], dim=1)
    truncated_mlp = torch.relu(x1 @ best_rank(augmented, key_dim).T) @ best_rank(values, value_dim) + out_bias
    assert_close(out, truncated_mlp.float())
    mlp = torch.relu(x @ keys.T + key_bias) @ values + out_bias
    if (key_dim, value_dim) == (d_model + 1, d_model):
        assert_close(out, mlp)
    else:  # the truncation is visible: the comparison above is not the exact MLP again
        assert (out - mlp).abs().max() > 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"type": "associative", "weighting": "softmax"}, r"swap\.read\.ranking: softmax weights"),
        ({"weighting": "softmax"}, r"swap\.read\.ranking: softmax weights"),
        ({"metric": "l2"}, r"swap\.read\.ranking: .*needs metric ip or cosine"),
        ({"type": "associative", "metric": "l2"}, r"swap\.read\.ranking: .*needs metric ip or cosine"),
        (
            {"novelty_threshold": 0.5},
            r"swap\.write\.novelty_threshold: a featural insert's key is its own query",
        ),
        ({"recombine_distance": 0.1}, r"swap\.write\.recombine_distance: ranking by \|q·k\|"),
        (
            {"ranking": "score", "dense_weights": False, "heads": 2},
            r"swap\.read\.heads: dense_weights=false needs",
        ),
    ],
)
def test_magnitude_ranking_and_dense_weight_free_settings_are_checked(overrides, message):
    settings = {"ranking": "magnitude", "weighting": "silu", "metric": "ip", "capacity": 64, "topk": 4}
    with pytest.raises(ValueError, match=message):
        layer_config({**settings, **overrides})


def test_dense_weight_free_layer_learns_its_values_and_gate_keys_by_write_back():
    d_model = 16
    settings = {"key_dim": 17, "gate_dim": 16, "topk": 4, "capacity": 32, "weighting": "silu", "metric": "ip"}
    cfg = resolve(FeaturalConfig(**settings, ranking="magnitude", dense_weights=False), d_model)
    layer = FeaturalMemory(d_model, cfg).train()
    torch.manual_seed(0)
    layer.store.insert(0.3 * torch.randn(32, 17).numpy(), 0.3 * torch.randn(32, 32).numpy())
    x, target = torch.randn(2, 5, d_model), torch.randn(2, 5, d_model)
    before = layer.store.get(list(range(32)))[1].copy()
    loss_before = (layer(x) - target).pow(2).mean()
    loss_before.backward()
    layer.apply_value_updates(lr=0.01)
    after = layer.store.get(list(range(32)))[1]
    changed = (after != before).any(axis=0)
    assert changed[:d_model].any() and changed[d_model:].any()  # values and gate keys both moved
    with torch.no_grad():
        assert (layer(x) - target).pow(2).mean() < loss_before


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="swap.read.topk"):
        FeaturalConfig(topk=10, capacity=5)
    with pytest.raises(ValueError, match="swap.read.metric"):
        FeaturalConfig(metric="manhattan")
    with pytest.raises(ValueError, match="swap.type"):
        layer_config({"type": "dense"})


# Each metric's distance of a query (N, 1, D) to its neighbours (N, K, D), in dmt.memory.metrics' conventions.
METRIC_DISTANCES = {
    "l2": lambda q, n: (q - n).pow(2).sum(-1),
    "ip": lambda q, n: 1.0 - (q * n).sum(-1),
    "cosine": lambda q, n: 1.0 - torch.nn.functional.cosine_similarity(q, n, dim=-1),
}


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("table_rows", [6, 400])  # scored densely (few rows) and by gather (many)
def test_neighbour_distances_match_the_metric_on_both_paths(metric, table_rows):
    torch.manual_seed(0)
    queries = torch.randn(7, 5, dtype=torch.double, requires_grad=True)
    table = torch.randn(table_rows, 5, dtype=torch.double)
    rows = torch.randint(0, table_rows, (7, 3))
    got = neighbour_distances(queries, table, rows, metric)
    expected = METRIC_DISTANCES[metric](queries[:, None], table[rows])
    assert_close(got, expected)
    assert_close(*(torch.autograd.grad(d.sum(), queries)[0] for d in (got, expected)))


def test_mix_values_equals_the_weighted_gather():
    torch.manual_seed(0)
    table = torch.randn(9, 4, requires_grad=True)
    rows = torch.randint(0, 9, (6, 3))
    weights = torch.rand(6, 3, requires_grad=True)
    got = mix_values(weights, rows, table)
    expected = torch.einsum("nk,nkd->nd", weights, table[rows])
    assert_close(got, expected)
    upstream = torch.randn(6, 4)
    for a, b in zip(
        torch.autograd.grad((got * upstream).sum(), (weights, table)),
        torch.autograd.grad((expected * upstream).sum(), (weights, table)),
        strict=True,
    ):
        assert_close(a, b)


def test_a_null_entry_takes_weight_from_far_neighbours_only():
    """The softmax with a null entry is the softmax over the neighbours and one more score whose value is
    zero: near neighbours keep most of their weight, a query whose neighbours all lie far reads ~nothing."""
    scores = torch.tensor([[10.0, 9.0, 8.0], [-5.0, -6.0, -7.0], [3.0, 2.0, 1.0]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    null = null_score(0.5, "cosine", 0.1)  # (1 - 0.5) / 0.1 = 5
    got = neighbour_weights(scores, valid, "softmax", null_score=null)
    logits = torch.cat([scores.masked_fill(~valid, -torch.inf), torch.full((3, 1), 5.0)], dim=1)
    assert_close(got, logits.softmax(dim=1)[:, :3])
    assert got[0].sum() > 0.99 and got[1].sum() < 1e-4 and got[2, 2] == 0
    assert_close(
        neighbour_weights(scores, valid, "softmax", null_score=-1e4),
        scores.masked_fill(~valid, -torch.inf).softmax(dim=1),
    )
    assert null_score(None, "cosine", 0.1) is None and null_score(2.0, "l2", 0.5) == -4.0


def filled_cache(x: torch.Tensor) -> AssociativeMemory:
    """An associative layer (cosine) in eval mode whose store holds the entries ``x`` inserted."""
    layer = make(AssociativeMemory, metric="cosine").train()
    with torch.no_grad():
        layer(x)
    return layer.eval()


def reading_as(layer: AssociativeMemory, **reading) -> AssociativeMemory:
    """A layer with ``layer``'s weights and store, read with other reading settings."""
    other = make(AssociativeMemory, metric="cosine", **reading).eval()
    other.load_state_dict(layer.state_dict())
    other.store = layer.store
    return other


def test_an_associative_layer_with_a_null_entry_reads_less_from_a_far_memory():
    x = torch.randn(2, 6, 16)
    plain = filled_cache(x)
    with torch.no_grad():
        far, near = plain(-x), reading_as(plain, null_distance=0.0)(-x)
    # Cosine distances are >= 0, so the null entry at distance 0 outweighs every neighbour.
    assert near.norm() < far.norm()


def test_neighbours_beyond_the_largest_distance_are_not_read():
    x = torch.randn(2, 6, 16)
    plain = filled_cache(x)
    queries = plain.split_heads(plain.query_proj(-x), 8)
    median = float(np.median(plain.search(queries).nearest))  # about half the queries read within it
    with torch.no_grad():  # cosine distances lie in [0, 2]
        every, nothing, half = (reading_as(plain, max_distance=d)(-x) for d in (2.0, -1.0, median))
        assert torch.equal(every, plain(-x))  # every neighbour within: the plain read
    assert_close(nothing, plain.out_proj.bias.expand(2, 6, 16))  # none within: nothing read
    assert not torch.equal(half, every) and not torch.equal(half, nothing)


def test_a_residual_distance_scale_weighs_each_read_down_by_its_nearest_distance():
    """With a residual distance scale s, each query reads exp(-d / s) of its plain read, d its nearest
    neighbour's distance: a far query little, a near one almost all (the output projection is affine)."""
    x = torch.randn(2, 6, 16)
    plain = filled_cache(x)
    queries = plain.split_heads(plain.query_proj(-x), 8)
    nearest = torch.from_numpy(plain.search(queries).nearest).float().reshape(2, 6, 2)  # (B, T, heads)
    bias = plain.out_proj.bias
    with torch.no_grad():
        mixed = plain.out_proj.weight.pinverse() @ (plain(-x) - bias)[..., None]  # (B, T, H·Dv, 1)
        scaled = reading_as(plain, residual_distance_scale=0.1)(-x)
    fall = torch.exp(-nearest / 0.1).repeat_interleave(8, dim=-1)[..., None]  # (B, T, H·Dv, 1)
    assert_close(scaled, (plain.out_proj.weight @ (fall * mixed))[..., 0] + bias, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scaled, plain(-x))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"null_distance": 0.5, "weighting": "relu"}, r"swap\.read\.null_distance: a null entry .* relu"),
        ({"residual_distance_scale": 0.0}, r"swap\.read\.residual_distance_scale: must be > 0"),
    ],
)
def test_null_entry_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(AssociativeMemory, **overrides)


@pytest.mark.parametrize("layer_cls", [FeaturalMemory, AssociativeMemory])
def test_memory_layers_compute_in_float32_under_autocast(layer_cls):
    """bf16-mixed training (the GPU trainer) autocasts the block around the layer: the layer's own search
    and read still run in float32, so they return what a float32 forward returns, in the input's dtype."""
    layer = make(layer_cls).train()
    layer(torch.randn(2, 5, 16))  # fill the store
    layer.eval()
    x = torch.randn(3, 5, 16)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(x)
    assert_close(mixed, expected, rtol=0, atol=0)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_bfloat16_teacher_outputs_are_stored_as_float32_values():
    layer = make(AssociativeMemory, value_dim=8, inserted_values="mlp_output").train()
    targets = torch.randn(2, 5, 16)
    protocol = MemoryProtocol({0: layer})
    # A teacher run under bf16 autocast.
    with (
        protocol.forward(insert_targets={0: targets.bfloat16()}),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        layer(torch.randn(2, 5, 16))
    _, values = layer.store.get(layer.store.live_ids())
    stored = torch.as_tensor(values)  # (20, 8): every token's 2 heads were novel
    assert stored.dtype == torch.float32
    assert_close(stored.sort(dim=0).values, targets.bfloat16().float().reshape(-1, 8).sort(dim=0).values)


@pytest.mark.parametrize("backend", ["exact", "hnsw", "faiss", "scann"])
def test_a_read_without_gradients_takes_the_distances_the_index_reported(backend, small_training):
    """Every index reports the exact distances of the keys it returns, so a forward without gradients
    reads what a forward with them reads, without gathering the returned keys again."""
    layer = make(AssociativeMemory, metric="cosine", capacity=1024, index={"backend": backend}).train()
    x = torch.randn(4, 64, 16)
    with torch.no_grad():
        layer(x)  # 512 entries: the partitioned indexes train at 400
    layer.eval()
    queries = layer.split_heads(layer.query_proj(-x), 8).detach()
    found = layer.search(queries)
    assert found.valid.all()
    assert_close(found.searched, neighbour_distances(queries, found.keys, found.rows, "cosine"))
    with torch.no_grad():
        searched = layer(-x)
    recomputed = layer(-x)  # the queries need gradients: the distances are computed again
    assert recomputed.requires_grad and not searched.requires_grad
    assert_close(searched, recomputed.detach())


def test_search_distances_are_taken_as_reported_only_when_no_gradient_reaches_the_queries():
    queries, keys = torch.randn(5, 4, requires_grad=True), torch.randn(20, 4)
    rows, reported = torch.randint(0, 20, (5, 3)), torch.rand(5, 3)
    with torch.no_grad():
        assert torch.equal(search_distances(queries, keys, rows, "l2", reported), reported)
    recomputed = search_distances(queries, keys, rows, "l2", reported)
    assert_close(recomputed, neighbour_distances(queries, keys, rows, "l2"))
    assert recomputed.requires_grad
