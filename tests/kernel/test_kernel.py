"""The kernel is one read implementation: torch-only, built on by dmt's layers, carried by exports as is."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from dmt.kernel import FILES
from dmt.kernel.read import MemoryRead, swapped_module
from dmt.kernel.search import search_table, table_rows
from dmt.model.families import mlp_form
from dmt.model.persistence import save_pretrained
from dmt.model.surgery import build_student, memory_layers, resolve_layer_configs, swapped_layers

KERNEL = REPO / "dmt" / "kernel"
GLUE = {"configuration_dmt", "modeling_dmt"}  # the transformers classes of an export
HUB = {"transformers", "huggingface_hub"}  # what the glue may import besides torch
TOKENS = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(5))


def imported_modules(path: Path) -> set[str]:
    """Names of the modules ``path`` imports (relative ones as ``.name``), and of ``from``-imported names as
    ``module.name``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return names


def test_kernel_files_import_only_torch_numpy_transformers_and_each_other():
    allowed = {"torch", "numpy", "__future__", *sys.stdlib_module_names}
    for path in KERNEL.glob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if name.startswith("."):
                assert name[1:].split(".")[0] in {p.stem for p in KERNEL.glob("*.py")}, (path.name, name)
            elif top in HUB:
                assert path.stem in GLUE, f"{path.name} imports {top}; only the export's classes may"
            else:
                assert top in allowed, f"{path.name} imports {name}"


def test_layers_and_memory_build_on_the_kernel_but_not_on_the_export_classes():
    used = set()
    for package in ("layers", "memory"):
        for path in (REPO / "dmt" / package).glob("*.py"):
            kernel = {name for name in imported_modules(path) if name.startswith("dmt.kernel.")}
            assert not {name.split(".")[2] for name in kernel} & (GLUE | {"read"}), path
            used |= {".".join(name.split(".")[:3]) for name in kernel}
    assert {"dmt.kernel.ops", "dmt.kernel.search", "dmt.kernel.dense", "dmt.kernel.store_files"} <= used


def test_an_export_carries_every_kernel_file_byte_identical(tiny_gpt2, tmp_path, gpt2_tokenizer):
    assert set(FILES) == {path.name for path in KERNEL.glob("*.py")} - {"__init__.py"}
    configs = resolve_layer_configs({"blocks": [0], "capacity": 64, "topk": 4}, tiny_gpt2.config)
    save_pretrained(build_student(tiny_gpt2, configs), gpt2_tokenizer, tmp_path / "export")
    for name in FILES:
        assert (tmp_path / "export" / name).read_bytes() == (KERNEL / name).read_bytes(), name


@pytest.mark.parametrize(
    ("fixture", "settings"),
    [
        ("tiny_gpt2", {"blocks": [1, 2], "type": ["featural", "associative"], "heads": 2, "key_dim": 8}),
        ("tiny_llama", {"blocks": [0, 3], "init": "ffn", "topk": 8}),
        ("tiny_llama", {"blocks": [1], "type": "lowrank", "init": "ffn", "rank": 16}),
        ("tiny_llama", {"blocks": [2], "type": "associative", "null_distance": 0.5, "max_distance": 1.0}),
        ("tiny_llama", {"blocks": [2], "type": "associative", "residual_distance_scale": 0.5}),
    ],
    ids=[
        "gpt2-featural-associative",
        "llama-seeded",
        "llama-lowrank",
        "llama-associative-null-radius",
        "llama-associative-distance-scale",
    ],
)
def test_the_exported_read_computes_what_the_layer_computes(fixture, settings, request):
    """With an exact index, a layer read back from its saved settings and entries gives the same output
    bit for bit: the same projections, search and read."""
    teacher = request.getfixturevalue(fixture)
    settings = {"capacity": 256, "novelty_threshold": 0.0, "index": {"backend": "exact"}, **settings}
    student = build_student(teacher, resolve_layer_configs(settings, teacher.config)).train()
    with torch.no_grad():
        student(TOKENS)  # fills the stores of the memory layers that insert
    student.eval()
    hidden = torch.randn(2, 16, teacher.config.hidden_size, generator=torch.Generator().manual_seed(6))
    form = mlp_form(teacher.config).__dict__
    for index, layer in swapped_layers(student).items():
        read = swapped_module(teacher.config.hidden_size, layer.cfg.to_dict(), form)
        read.load_state_dict(layer.state_dict())
        if index in memory_layers(student):
            store, ids = layer.store, torch.from_numpy(layer.store.live_ids())
            keys, values = (torch.from_numpy(array) for array in store.get(ids.numpy()))
            rows = (store.capacity, keys.shape[1]), (store.capacity, values.shape[1])
            live = torch.zeros(store.capacity, dtype=torch.bool).index_fill_(0, ids, True)
            read.load_entries(
                torch.zeros(rows[0]).index_copy_(0, ids, keys),
                torch.zeros(rows[1]).index_copy_(0, ids, values),
                live,
            )
            assert isinstance(read, MemoryRead) and read.live == len(store) > 0
        with torch.no_grad():
            assert torch.equal(read(hidden), layer(hidden)), index


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_search_table_returns_the_nearest_live_rows(metric):
    generator = torch.Generator().manual_seed(7)
    keys, queries = torch.randn(50, 6, generator=generator), torch.randn(9, 6, generator=generator)
    live = torch.rand(50, generator=generator) > 0.3
    table = table_rows(keys, metric)
    table[~live, 6] = float("inf")
    ids, distances = search_table(queries, table, 5, int(live.sum()), metric, block_elements=64)
    if metric == "cosine":
        keys, queries = (
            torch.nn.functional.normalize(keys, dim=1),
            torch.nn.functional.normalize(queries, dim=1),
        )
    exact = torch.cdist(queries, keys).pow(2) if metric == "l2" else 1.0 - queries @ keys.T
    exact = exact.masked_fill(~live, float("inf")).topk(5, largest=False)
    assert torch.equal(ids, exact.indices)
    torch.testing.assert_close(distances, exact.values, rtol=1e-5, atol=1e-5)
