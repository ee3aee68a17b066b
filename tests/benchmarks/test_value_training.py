import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_teacher_cfg
from torch.testing import assert_close

from benchmarks.memorize.value_training import read_nll, write_values
from dmt.kernel.pack_files import SHARDS, read_shard
from dmt.model.families import final_norm
from dmt.model.loading import load_teacher
from dmt.model.surgery import build_student, memory_layers, resolve_layer_configs
from dmt.packs.files import PackDocument, PackManifest, read_pack, write_manifest, write_shard
from dmt.packs.reading import read_with

GATE = {"weight": 0.7, "scale": 0.5, "temperature": 0.05, "k": 12}
PLAN = {"blocks": [3], "type": "associative", "key_dim": 8, "topk": 4, "capacity": 64}
PLAN |= {"metric": "cosine", "novelty_threshold": 0.0, "temperature": 0.1, "keep_mlp": True}
PLAN |= {"inserted_values": "next_token", "output_gain": 4.0}


@pytest.mark.parametrize(
    "reading", [{}, {"max_distance": 0.9}, {"residual_distance_scale": 0.3}], ids=["plain", "radius", "scale"]
)
def test_the_training_loss_is_the_nll_of_the_students_own_read(reading):
    """The residual read of learned values and the gated next-token mix, as read_nll computes them from
    recorded features, give the NLL the student's forward gives with those entries in its store, under the
    residual read's reading settings."""
    teacher = load_teacher(tiny_teacher_cfg("llama"))
    model = build_student(teacher, resolve_layer_configs(PLAN, teacher.config)).eval()
    layer = memory_layers(model)[3]
    generator = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(12, 8, generator=generator), dim=1)
    values = torch.randn(12, 32, generator=generator) * 0.3  # learned values, not next-token embeddings
    tokens = torch.randint(0, 40, (12,), generator=generator)
    ids = torch.randint(0, 40, (2, 6), generator=generator)
    target = torch.randint(0, 40, (12,), generator=generator)
    target[:3] = tokens[:3]  # targets the memory names

    # Features: the layer's input and the last block's output, read before the store holds anything.
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, n=n: captured.update({n: args[0]}))
        for n, module in (("h", layer), ("x", final_norm(model)))
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    h, x = captured["h"].reshape(12, -1), captured["x"].reshape(12, -1)

    # The student's own read of the same entries.
    layer.store.insert(keys.numpy(), values.numpy(), next_tokens=tokens.numpy())
    read_with(
        model,
        {
            "next_token_weight": GATE["weight"],
            "next_token_topk": GATE["k"],
            "next_token_temperature": GATE["temperature"],
            "next_token_distance_scale": GATE["scale"],
            **reading,
        },
    )
    with torch.no_grad():
        built = -model(ids).logits.reshape(12, -1).gather(1, target[:, None])[:, 0]
        queries = layer.query_proj(h)
        found = torch.argsort(F.normalize(queries, dim=1) @ keys.T, dim=1, descending=True)  # (N, 12)
        nearest = 1.0 - torch.einsum("nd,nkd->nk", F.normalize(queries, dim=1), keys[found[:, :4]])
        if "max_distance" in reading:  # the radius leaves some of the topk unread, and some read
            assert (nearest > 0.9).any() and (nearest <= 0.9).any()
        ours = read_nll(
            layer,
            final_norm(model),
            model.get_output_embeddings(),
            x,
            queries,
            keys[found],
            values[found[:, :4]],
            tokens[found],
            torch.ones(12, 12, dtype=torch.bool),
            target,
            GATE,
        )
    assert_close(ours, built, rtol=1e-4, atol=1e-4)


def test_learned_values_are_written_into_a_copy_of_the_pack(tmp_path):
    pack, out = tmp_path / "pack", tmp_path / "learned"
    pack.mkdir()
    documents = []
    for number, count in enumerate([3, 2]):
        arrays = {
            "keys": np.full((count, 4), number, np.float32),
            "values": np.zeros((count, 5), np.float32),
            "offsets": np.arange(count, dtype=np.int64),
            "tokens": np.arange(count, dtype=np.int64) + 7,
        }
        write_shard(pack, f"{number:06d}", {"3": arrays})
        documents.append(PackDocument(f"doc{number}", count, "0" * 64, f"{number:06d}", {"3": count}))
    manifest = PackManifest(
        {"fingerprint": "f", "name": "s"}, {"3": {}}, {"window": 8, "stride": 4}, documents
    )
    write_manifest(pack, manifest)
    learned = np.arange(25, dtype=np.float32).reshape(5, 5)
    write_values(pack, "3", learned, out)
    assert read_pack(out) == manifest
    for document, rows in zip(manifest.documents, (slice(0, 3), slice(3, 5)), strict=True):
        written = read_shard(out / SHARDS / document.shard, "3", document.entries["3"], 4, 5)
        original = read_shard(pack / SHARDS / document.shard, "3", document.entries["3"], 4, 5)
        np.testing.assert_array_equal(written["values"], learned[rows])
        for name in ("keys", "offsets", "tokens"):
            np.testing.assert_array_equal(written[name], original[name])
