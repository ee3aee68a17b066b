import pytest
import torch
from torch.testing import assert_close

from dmt.evaluation.evaluate import ablate_mlps
from dmt.layers import (
    SWAPPED_CLASSES,
    AssociativeMemory,
    FeaturalMemory,
    LowRankMLP,
    MemoryLayerConfig,
    RemovedMLP,
)
from dmt.model.families import get_mlp
from dmt.model.surgery import (
    build_student,
    count_parameters,
    memory_layers,
    resolve_layer_configs,
    resolve_layer_indices,
    swapped_layers,
)

TOKENS = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_no_layer_swapped_gives_the_teacher_logits(fixture, request):
    teacher = request.getfixturevalue(fixture)
    student = build_student(teacher, {})
    with torch.no_grad():
        assert_close(student.eval()(TOKENS).logits, teacher(TOKENS).logits)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_only_chosen_mlps_are_replaced_and_teacher_untouched(fixture, request):
    teacher = request.getfixturevalue(fixture)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    configs = resolve_layer_configs(
        {"layers": [1, 3], "type": ["featural", "associative"], "capacity": 512, "topk": 4, "key_dim": 8}, 4
    )
    student = build_student(teacher, configs)
    layers = memory_layers(student)
    assert sorted(layers) == [1, 3]
    assert isinstance(layers[1], FeaturalMemory) and isinstance(layers[3], AssociativeMemory)
    for i in (0, 2):
        assert type(get_mlp(student, i)) is type(get_mlp(teacher, i))
    assert not any(isinstance(get_mlp(teacher, i), (FeaturalMemory, AssociativeMemory)) for i in range(4))
    # No parameter is shared, the teacher is frozen and unchanged by a student update.
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    student(TOKENS, labels=TOKENS).loss.backward()
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert count_parameters(student) != count_parameters(teacher)


def test_ffn_init_on_gpt2_reproduces_the_mlp(tiny_gpt2):
    # key_dim >= C + 1, value_dim = C, k = all units and the MLP's activation: the memory layer is the MLP.
    c = tiny_gpt2.config.n_embd
    units = 4 * c
    configs = resolve_layer_configs(
        {
            "layers": [2],
            "init": "ffn",
            "key_dim": c + 1,
            "topk": units,
            "capacity": units,
            "weighting": "gelu",
            "metric": "ip",
            "index": {"ef_search": units},
        },
        4,
    )
    student = build_student(tiny_gpt2, configs).eval()
    x = torch.randn(2, 3, c)
    with torch.no_grad():
        # GPT-2 uses the tanh approximation of GELU; the memory layer the exact one: close, not equal.
        assert_close(get_mlp(student, 2)(x), get_mlp(tiny_gpt2, 2)(x), atol=2e-2, rtol=2e-2)
    assert len(memory_layers(student)[2].store) == units


def test_ffn_init_on_llama(tiny_llama):
    configs = resolve_layer_configs(
        {"layers": "-2:", "init": "ffn", "key_dim": 16, "topk": 8, "capacity": 128, "weighting": "silu"}, 4
    )
    student = build_student(tiny_llama, configs)
    assert sorted(memory_layers(student)) == [2, 3]
    assert len(memory_layers(student)[3].store) == tiny_llama.config.intermediate_size
    assert torch.isfinite(student(TOKENS).logits).all()


def test_layer_selection():
    assert resolve_layer_indices("all", 4) == [0, 1, 2, 3]
    assert resolve_layer_indices("-2:", 6) == [4, 5]
    assert resolve_layer_indices([0, -1], 6) == [0, 5]
    assert resolve_layer_indices("none", 6) == []
    with pytest.raises(ValueError, match=r"memory.layers: layer 7 does not exist"):
        resolve_layer_indices([7], 6)
    configs = resolve_layer_configs({"layers": "all", "type": "mixed", "capacity": 64, "topk": 4}, 4)
    assert [c.type for c in configs.values()] == ["featural", "featural", "associative", "associative"]
    with pytest.raises(ValueError, match="memory.per_layer"):
        resolve_layer_configs({"layers": [0], "per_layer": {2: {"topk": 2}}}, 4)
    with pytest.raises(ValueError, match="unknown layer setting"):
        resolve_layer_configs({"layers": [0], "topkk": 2}, 4)


def test_unsupported_family_is_named(tiny_gpt2):
    tiny_gpt2.config.model_type = "bloom"
    with pytest.raises(ValueError, match="bloom"):
        build_student(tiny_gpt2, {0: MemoryLayerConfig(capacity=64, topk=4)})


def test_gated_ffn_init_on_llama_reproduces_the_swiglu_mlp(tiny_llama):
    # key_dim >= C + 1, glu_dim = value_dim = C, k = every unit: the gated memory layer is the SwiGLU MLP.
    c, units = tiny_llama.config.hidden_size, tiny_llama.config.intermediate_size
    configs = resolve_layer_configs(
        {
            "layers": [1],
            "init": "ffn",
            "key_dim": c + 1,
            "glu_dim": c,
            "topk": units,
            "capacity": units,
            "weighting": "silu",
            "metric": "ip",
            "index": {"ef_search": units},
        },
        4,
    )
    student = build_student(tiny_llama, configs).eval()
    x = torch.randn(2, 3, c)
    with torch.no_grad():
        assert_close(get_mlp(student, 1)(x), get_mlp(tiny_llama, 1)(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("topk", [None, 20])  # None: every unit
def test_projection_free_two_sided_layer_is_the_swiglu_mlp_on_its_top_k_by_gate_magnitude(tiny_llama, topk):
    c, units = tiny_llama.config.hidden_size, tiny_llama.config.intermediate_size
    topk = topk or units
    settings = {"init": "ffn", "key_dim": c + 1, "glu_dim": c, "weighting": "silu", "metric": "ip"}
    settings |= {"layers": [1], "topk": topk, "capacity": units, "projections": False, "two_sided": True}
    student = build_student(tiny_llama, resolve_layer_configs(settings, 4)).eval()
    layer, mlp = get_mlp(student, 1), get_mlp(tiny_llama, 1)
    assert count_parameters(layer) == c  # the output bias; the MLP's weights are all in the store
    x = torch.randn(2, 3, c)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # (B, T, U)
        kept = torch.zeros_like(gate).scatter_(-1, gate.abs().topk(topk, dim=-1).indices, 1.0)
        expected = mlp.down_proj(torch.nn.functional.silu(gate) * up * kept)
        assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


def test_projection_free_layer_needs_the_hidden_width(tiny_llama):
    settings = {"layers": [1], "key_dim": 16, "capacity": 64, "topk": 4, "projections": False}
    with pytest.raises(ValueError, match=r"memory\.key_dim: projections=false needs key_dim=33 \(d_model="):
        build_student(tiny_llama, resolve_layer_configs(settings, 4))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_baselines_swap_only_the_chosen_blocks(fixture, request):
    teacher = request.getfixturevalue(fixture)
    configs = resolve_layer_configs(
        {
            "layers": [0, 2, 3],
            "type": ["lowrank", "removed", "featural"],
            "capacity": 64,
            "topk": 4,
            "key_dim": 8,
        },
        4,
    )
    student = build_student(teacher, configs)
    assert sorted(swapped_layers(student)) == [0, 2, 3] and sorted(memory_layers(student)) == [3]
    assert isinstance(get_mlp(student, 0), LowRankMLP) and isinstance(get_mlp(student, 2), RemovedMLP)
    assert type(get_mlp(student, 1)) is type(get_mlp(teacher, 1))
    assert not any(isinstance(get_mlp(teacher, i), SWAPPED_CLASSES) for i in range(4))
    # rank: null sizes the low-rank MLP like the featural memory these settings describe.
    c = teacher.config.hidden_size
    assert abs(count_parameters(get_mlp(student, 0)) - count_parameters(get_mlp(student, 3))) < 3 * c


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_removed_everywhere_is_the_ablated_teacher(fixture, request):
    teacher = request.getfixturevalue(fixture)
    student = build_student(teacher, resolve_layer_configs({"layers": "all", "type": "removed"}, 4)).eval()
    with torch.no_grad():
        assert_close(student(TOKENS).logits, ablate_mlps(teacher, range(4))(TOKENS).logits)
