import itertools

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from dmt.evaluation.evaluate import ablate_mlps
from dmt.layers import (
    SWAPPED_CLASSES,
    AssociativeConfig,
    AssociativeMemory,
    FeaturalConfig,
    FeaturalMemory,
    LowRankConfig,
    LowRankMLP,
    RemovedConfig,
    RemovedMLP,
    matched_rank,
)
from dmt.layers.resolve import resolve
from dmt.model.families import final_norm, get_mlp, mlp_form
from dmt.model.surgery import (
    build_student,
    count_parameters,
    memory_layers,
    resolve_block_indices,
    resolve_layer_configs,
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
        {"blocks": [1, 3], "type": ["featural", "associative"], "capacity": 512, "topk": 4, "key_dim": 8},
        teacher.config,
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


@pytest.fixture(params=["gpt2", "llama", "mistral", "qwen2"])
def family_teacher(request):
    """A tiny random teacher of each supported family: the shared GPT-2 and Llama fixtures, and Mistral and
    Qwen2 models shaped like the Llama one (4 blocks, 32 wide, 64 MLP units) with a 128-token vocabulary."""
    if request.param in ("gpt2", "llama"):
        return request.getfixturevalue(f"tiny_{request.param}")
    config = AutoConfig.for_model(
        request.param,
        num_hidden_layers=4,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=128,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


@pytest.mark.parametrize("layer_cls", [FeaturalMemory, AssociativeMemory])
def test_ffn_init_with_every_unit_reproduces_the_mlp_of_each_family(family_teacher, layer_cls):
    # init: ffn derives every other setting (exact widths, ip at temperature 1, the MLP's activation,
    # a gate for SwiGLU MLPs, one entry per unit); with k = every unit the memory layer is the MLP.
    config = family_teacher.config
    form = mlp_form(config)
    c, units = form.d_model, form.units
    # The store is small enough for `backend: auto` to pick the exact index, but a config without `index`
    # gets hnsw: searching as widely as there are units returns every unit.
    settings = {"blocks": [1], "init": "ffn", "topk": units, "index": {"ef_search": units}}
    if layer_cls is AssociativeMemory:  # unset what the associative group sets (softmax, ungated)
        settings |= {"type": "associative", "weighting": None, "gate_dim": None}
    configs = resolve_layer_configs(settings, config)
    # The derived settings are the exact ones, which may also be spelled out.
    exact = {"key_dim": c + 1, "value_dim": c, "gate_dim": c if form.gated else 0, "capacity": units}
    exact |= {"weighting": "silu" if form.gated else "gelu_tanh", "metric": "ip", "temperature": 1.0}
    assert configs == resolve_layer_configs({**settings, **exact}, config)
    student = build_student(family_teacher, configs).eval()
    layer, mlp = get_mlp(student, 1), get_mlp(family_teacher, 1)
    assert isinstance(layer, layer_cls) and len(layer.store) == units
    # Hidden states of std 10 give the tiny random MLP (weights of std 0.02) pre-activations of order 1,
    # where the activations differ: GPT-2's gelu_new (tanh GELU) and the erf GELU differ beyond the
    # default tolerances there, so this also checks that the weighting is gelu_tanh.
    x = 10 * torch.randn(2, 3, c)
    with torch.no_grad():
        assert_close(layer(x), mlp(x))


def test_truncated_ffn_init_on_llama_nears_the_mlp_as_widths_grow(tiny_llama):
    c, units = tiny_llama.config.hidden_size, tiny_llama.config.intermediate_size
    configs = resolve_layer_configs(
        {"blocks": "-2:", "init": "ffn", "key_dim": 16, "topk": 8, "capacity": 128, "weighting": "silu"},
        tiny_llama.config,
    )
    student = build_student(tiny_llama, configs)
    assert sorted(memory_layers(student)) == [2, 3]
    assert len(memory_layers(student)[3].store) == units
    assert torch.isfinite(student(TOKENS).logits).all()
    # Every unit read, keys, gate keys and values truncated to `width` singular directions: the layer's
    # error shrinks as the width grows, and vanishes at full width.
    x = 10 * torch.randn(4, 16, c)
    errors = []
    for width in (4, 8, 16, 24, c):
        settings = {"blocks": [3], "init": "ffn", "key_dim": width + 1, "gate_dim": width, "value_dim": width}
        settings |= {"topk": units, "index": {"ef_search": units}}
        student = build_student(tiny_llama, resolve_layer_configs(settings, tiny_llama.config)).eval()
        with torch.no_grad():
            out, expected = get_mlp(student, 3)(x), get_mlp(tiny_llama, 3)(x)
        errors.append((out - expected).pow(2).mean().item())
    assert all(wider < narrower for narrower, wider in itertools.pairwise(errors)), errors
    assert errors[0] > 1e-3  # the narrowest seeding is visibly not the MLP
    assert_close(out, expected)


@pytest.mark.parametrize(
    ("fixture", "setting", "message"),
    [
        (
            "tiny_llama",
            {"weighting": "gelu"},
            r"swap\.read\.weighting: the silu MLP .* needs 'silu', got 'gelu'",
        ),
        ("tiny_llama", {"gate_dim": 0}, r"swap\.read\.gate_dim: 0 would drop the MLP's up projection"),
        ("tiny_gpt2", {"gate_dim": 8}, r"swap\.read\.gate_dim: 8 has no gate to seed from"),
        ("tiny_llama", {"metric": "cosine"}, r"swap\.read\.metric: .* needs 'ip', got 'cosine'"),
        ("tiny_gpt2", {"temperature": 0.1}, r"swap\.read\.temperature: .* needs 1\.0, got 0\.1"),
        ("tiny_llama", {"capacity": 63}, r"swap\.store\.capacity: 63 cannot hold the MLP's 64 units"),
        ("tiny_llama", {"key_dim": 34}, r"swap\.read\.key_dim: at most 33 for this MLP \(exact\), got 34"),
        ("tiny_gpt2", {"value_dim": 33}, r"swap\.read\.value_dim: at most 32 for this MLP \(exact\), got 33"),
        ("tiny_llama", {"gate_dim": 33}, r"swap\.read\.gate_dim: at most 32 for this MLP \(exact\), got 33"),
        ("tiny_llama", {"heads": 2}, r"swap\.read\.heads: init=ffn seeds one head"),
    ],
)
def test_ffn_init_refuses_settings_that_contradict_the_mlp(fixture, setting, message, request):
    config = request.getfixturevalue(fixture).config
    with pytest.raises(ValueError, match=message):
        resolve_layer_configs({"blocks": [0], "init": "ffn", **setting}, config)


def test_ffn_init_derives_the_settings_from_the_mlp(tiny_llama, tiny_gpt2):
    llama = resolve_layer_configs({"blocks": [0], "init": "ffn"}, tiny_llama.config)[0]
    c = tiny_llama.config.hidden_size
    assert (llama.key_dim, llama.value_dim, llama.gate_dim) == (c + 1, c, c)
    assert (llama.weighting, llama.metric, llama.temperature) == ("silu", "ip", 1.0)
    assert llama.capacity == tiny_llama.config.intermediate_size
    gpt2 = resolve_layer_configs({"blocks": [0], "init": "ffn"}, tiny_gpt2.config)[0]
    c = tiny_gpt2.config.n_embd
    assert (gpt2.key_dim, gpt2.value_dim, gpt2.gate_dim) == (c + 1, c, 0)
    assert (gpt2.weighting, gpt2.metric, gpt2.temperature) == ("gelu_tanh", "ip", 1.0)
    assert gpt2.capacity == 4 * c


def test_block_selection(tiny_gpt2):
    assert resolve_block_indices("all", 4) == [0, 1, 2, 3]
    assert resolve_block_indices("-2:", 6) == [4, 5]
    assert resolve_block_indices([0, -1], 6) == [0, 5]
    assert resolve_block_indices("none", 6) == []
    with pytest.raises(ValueError, match=r"swap\.blocks: block 7 does not exist; the teacher has 6 blocks"):
        resolve_block_indices([7], 6)
    model_config = tiny_gpt2.config
    mixed = {"blocks": "all", "type": "mixed", "capacity": 64, "topk": 4}
    configs = resolve_layer_configs(mixed, model_config)
    assert [c.type for c in configs.values()] == ["featural", "featural", "associative", "associative"]
    with pytest.raises(ValueError, match=r"swap\.per_block: blocks \[2\] are not among swap\.blocks \[0\]"):
        resolve_layer_configs({"blocks": [0], "per_block": {2: {"topk": 2}}}, model_config)
    with pytest.raises(ValueError, match="unknown layer setting"):
        resolve_layer_configs({"blocks": [0], "topkk": 2}, model_config)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_the_final_norm_is_what_stands_between_the_last_block_and_the_head(fixture, request):
    model = request.getfixturevalue(fixture).eval()
    norm = final_norm(model)
    inputs = []
    hook = norm.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        logits = model(TOKENS).logits  # (B, T, V)
        hook.remove()
        (last,) = inputs  # the last block's output, (B, T, C)
        assert_close(model.get_output_embeddings()(norm(last)), logits)


def test_unsupported_family_is_named(tiny_gpt2):
    tiny_gpt2.config.model_type = "bloom"
    with pytest.raises(ValueError, match="bloom"):
        build_student(tiny_gpt2, {0: FeaturalConfig(capacity=64, topk=4)})


@pytest.mark.parametrize("topk", [None, 20])  # None: every unit
def test_dense_weight_free_layer_is_the_swiglu_mlp_on_its_top_k_by_gate_magnitude(tiny_llama, topk):
    c, units = tiny_llama.config.hidden_size, tiny_llama.config.intermediate_size
    topk = topk or units
    settings = {"init": "ffn", "key_dim": c + 1, "gate_dim": c, "weighting": "silu", "metric": "ip"}
    settings |= {"blocks": [1], "topk": topk, "capacity": units}
    settings |= {"dense_weights": False, "ranking": "magnitude"}
    student = build_student(tiny_llama, resolve_layer_configs(settings, tiny_llama.config)).eval()
    layer, mlp = get_mlp(student, 1), get_mlp(tiny_llama, 1)
    assert count_parameters(layer) == c  # the output bias; the MLP's weights are all in the store
    x = torch.randn(2, 3, c)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # (B, T, U)
        kept = torch.zeros_like(gate).scatter_(-1, gate.abs().topk(topk, dim=-1).indices, 1.0)
        expected = mlp.down_proj(torch.nn.functional.silu(gate) * up * kept)
        assert_close(layer(x), expected)


def test_dense_weight_free_layer_needs_the_hidden_width(tiny_llama):
    settings = {"blocks": [1], "key_dim": 16, "capacity": 64, "topk": 4, "dense_weights": False}
    with pytest.raises(
        ValueError, match=r"swap\.read\.key_dim: dense_weights=false needs key_dim=33 \(d_model="
    ):
        build_student(tiny_llama, resolve_layer_configs(settings, tiny_llama.config))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_baselines_swap_only_the_chosen_blocks(fixture, request):
    teacher = request.getfixturevalue(fixture)
    configs = resolve_layer_configs(
        {
            "blocks": [0, 2, 3],
            "type": ["lowrank", "removed", "featural"],
            "capacity": 64,
            "topk": 4,
            "key_dim": 8,
        },
        teacher.config,
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
    configs = resolve_layer_configs({"blocks": "all", "type": "removed"}, teacher.config)
    student = build_student(teacher, configs).eval()
    with torch.no_grad():
        assert_close(student(TOKENS).logits, ablate_mlps(teacher, range(4))(TOKENS).logits)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"type": "featural", "rank": 8}, r"swap\.store\.rank: not a setting of featural layers"),
        (
            {"type": "associative", "dense_weights": False},
            r"swap\.read\.dense_weights: not a setting of associative layers",
        ),
        # A per-block setting is the block's own: another type of the plan having it does not excuse it.
        (
            {"type": ["featural", "lowrank"], "blocks": [0, 1], "per_block": {0: {"rank": 4}}},
            r"swap\.store\.rank: not a setting of featural layers",
        ),
        ({"type": "removed", "metric": "manhattan"}, r"swap\.read\.metric: unknown metric 'manhattan'"),
        (
            {"type": "lowrank", "ranking": "magnitude", "weighting": "softmax"},
            r"swap\.read\.ranking: softmax weights",
        ),
        (
            {"type": "removed", "per_block": {0: {"bogus": 1}}},
            r"swap\.bogus: not a setting of removed layers or of the memory layers they stand against",
        ),
    ],
)
def test_a_plan_refuses_settings_its_layer_types_do_not_have(settings, message, tiny_gpt2):
    with pytest.raises(ValueError, match=message):
        resolve_layer_configs({"blocks": [0], **settings}, tiny_gpt2.config)


def test_a_mixed_plan_accepts_the_settings_of_any_of_its_types(tiny_gpt2):
    shared = {"capacity": 64, "topk": 4, "key_dim": 8}
    # mixed: featural below, associative above; the dense weights are a featural setting, the ranking and
    # the weighting both's.
    configs = resolve_layer_configs(
        {"blocks": "all", "type": "mixed", "dense_weights": True, "ranking": "magnitude", "weighting": "relu"}
        | shared,
        tiny_gpt2.config,
    )
    assert [type(c) for c in configs.values()] == [FeaturalConfig] * 2 + [AssociativeConfig] * 2
    assert all((c.weighting, c.ranking) == ("relu", "magnitude") for c in configs.values())
    assert all(c.dense_weights for c in configs.values() if c.type == "featural")
    # A list of types: the featural layer lets through the rank, which sizes the low-rank layer.
    configs = resolve_layer_configs(
        {"blocks": [0, 1], "type": ["featural", "lowrank"], "rank": 5, **shared}, tiny_gpt2.config
    )
    assert type(configs[0]) is FeaturalConfig and configs[1] == LowRankConfig(rank=5)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_baseline_plans_accept_the_memory_settings_and_size_lowrank_by_them(fixture, request):
    config = request.getfixturevalue(fixture).config
    memory = {"key_dim": 8, "value_dim": 16, "gate_dim": 4, "topk": 4, "capacity": 64}
    memory |= {"novelty_threshold": 0.1, "weighting": "relu", "metric": "cosine", "temperature": 0.5}
    memory |= {"index": {"backend": "exact"}}
    configs = resolve_layer_configs({"blocks": [0, 1], "type": ["removed", "lowrank"], **memory}, config)
    form = mlp_form(config)
    featural = resolve(FeaturalConfig(**memory), form.d_model, form)
    assert configs == {0: RemovedConfig(), 1: LowRankConfig(rank=matched_rank(featural, form))}
    # Narrower memory settings give a narrower low-rank MLP.
    narrow = resolve_layer_configs({"blocks": [1], "type": "lowrank", **memory, "key_dim": 2}, config)
    assert narrow[1].rank < configs[1].rank
