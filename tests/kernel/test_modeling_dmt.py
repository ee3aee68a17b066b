"""An export loads with plain ``transformers`` (``trust_remote_code=True``), in a process without dmt."""

import json
import os
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
from conftest import tiny_student
from torch.testing import assert_close

from dmt.kernel.store_files import StoreFileError, read_store
from dmt.model.persistence import load_pretrained, save_pretrained
from dmt.model.surgery import build_student, memory_layers, memory_protocol, resolve_layer_configs

TOKENS = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))

# Runs in a fresh interpreter: imports transformers and torch only (importing dmt raises), loads the
# export, compares its logits with load_pretrained's, loads the tokenizer as any other (recording any
# question asked), generates, runs a pipeline, and checks that loading without trust_remote_code fails.
LOADER = textwrap.dedent(
    """
    import builtins, json, sys
    sys.modules["dmt"] = None  # any `import dmt` now raises ImportError
    asked = []  # what transformers asks on stdin (whether to trust remote code), answered "no"
    builtins.input = lambda prompt="": asked.append(prompt) or "n"
    import torch
    from torch.testing import assert_close
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    export, expected_path, report_path = sys.argv[1], sys.argv[2], sys.argv[3]
    expected = torch.load(expected_path, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    with torch.no_grad():
        assert_close(model(expected["tokens"]).logits, expected["logits"])
    tokenizer = AutoTokenizer.from_pretrained(export)  # as any model's: no trust_remote_code, no question
    tokenizer_asked = list(asked)
    prompt = tokenizer("To be, or not to be", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    generator = pipeline("text-generation", model=export, trust_remote_code=True)
    text = generator("To be", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    try:
        AutoModelForCausalLM.from_pretrained(export)
        refused = None
    except Exception as error:  # the base class finds no model.safetensors (the weights are a variant)
        refused = f"{type(error).__name__}: {error}"
    open(report_path, "w").write(json.dumps({
        "class": type(model).__name__,
        "generated": generated.shape[1] - prompt.input_ids.shape[1],
        "pipeline_text": text,
        "refused": refused,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_asked": tokenizer_asked,
        "dmt_imported": any(name == "dmt" or name.startswith("dmt.") for name, m in sys.modules.items() if m),
    }))
    """
)


def load_in_plain_transformers(export, expected_logits, tmp_path) -> dict:
    """Run :data:`LOADER` on ``export`` in a subprocess; its JSON report."""
    expected = tmp_path / "expected.pt"
    torch.save({"tokens": TOKENS, "logits": expected_logits}, expected)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(export), str(expected), str(tmp_path / "report.json")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((tmp_path / "report.json").read_text())


def mixed_student(teacher, backend: str = "auto"):
    """Featural (filled by inserts), associative, low-rank and removed blocks, trained one step."""
    configs = resolve_layer_configs(
        {
            "index": {"backend": backend},
            "blocks": [0, 1, 2, 3],
            "type": ["featural", "associative", "lowrank", "removed"],
            "capacity": 256,
            "topk": 4,
            "key_dim": 8,
            "novelty_threshold": 0.0,
            "init": "empty",
            "per_block": {2: {"init": "ffn"}},
        },
        teacher.config,
    )
    student = build_student(teacher, configs).train()
    student(TOKENS, labels=TOKENS).loss.backward()
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    for layer in memory_layers(student).values():
        layer.apply_value_updates(lr=0.1)
    return student.eval()


def cache_student(teacher):
    """Associative memories beside the kept MLPs of blocks 1 and 2, caching next tokens, trained one step."""
    settings = {"blocks": [1, 2], "type": "associative", "heads": 2, "key_dim": 8, "topk": 4}
    settings |= {"capacity": 256, "novelty_threshold": 0.0, "inserted_values": "next_token", "keep_mlp": True}
    student = build_student(teacher, resolve_layer_configs(settings, teacher.config)).train()
    protocol = memory_protocol(student)
    for _ in range(2):  # the first step fills the stores, the second reads them
        student.zero_grad()
        with protocol.forward(TOKENS):
            student(TOKENS, labels=TOKENS).loss.backward()
        torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1).step()
    for layer in protocol.layers.values():
        assert layer.out_proj.weight.abs().sum() > 0
    return student.eval()


def units_student(teacher):
    """Associative memories seeded from the units of the MLPs of blocks 1 and 2, trained two steps with
    every token inserting its own gated entry."""
    settings = {"blocks": [1, 2], "type": "associative", "init": "ffn", "weighting": None, "gate_dim": None}
    settings |= {"topk": 16, "capacity": 512, "novelty_threshold": -1.0}
    student = build_student(teacher, resolve_layer_configs(settings, teacher.config)).train()
    for _ in range(2):  # the first step inserts with the zero key projection, the second with a trained one
        student.zero_grad()
        student(TOKENS, labels=TOKENS).loss.backward()
        torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1).step()
    for layer in memory_layers(student).values():
        assert len(layer.store) == teacher.config.intermediate_size + 2 * TOKENS.numel()
        assert layer.key_proj.weight.abs().sum() > 0
    return student.eval()


def seeded_llama_student(teacher):
    """Every MLP a featural memory holding that MLP's own gated rows, read by |gate score| (all-MLP form)."""
    c = teacher.config.hidden_size
    settings = {"blocks": "all", "init": "ffn", "key_dim": c + 1, "gate_dim": c, "weighting": "silu"}
    settings |= {"metric": "ip", "topk": 8, "dense_weights": False, "ranking": "magnitude"}
    settings |= {"value_dtype": "float16"}
    return build_student(teacher, resolve_layer_configs(settings, teacher.config)).eval()


@pytest.mark.parametrize(
    ("fixture", "make"),
    [
        ("tiny_gpt2", mixed_student),
        ("tiny_gpt2", partial(mixed_student, backend="hnsw")),
        ("tiny_gpt2", partial(mixed_student, backend="faiss")),
        ("tiny_llama", seeded_llama_student),
        ("tiny_llama", cache_student),
        ("tiny_llama", units_student),
        ("tiny_llama", None),
    ],
    ids=[
        "gpt2-mixed",
        "gpt2-mixed-hnsw",
        "gpt2-mixed-faiss",
        "llama-seeded-fp16",
        "llama-cache-beside-mlp",
        "llama-associative-units",
        "llama-featural-associative",
    ],
)
def test_export_loads_in_plain_transformers(fixture, make, request, tmp_path, gpt2_tokenizer):
    teacher = request.getfixturevalue(fixture)
    student = make(teacher) if make else tiny_student(teacher, TOKENS)
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    for index, layer in memory_layers(student).items():  # keys once: an ip/l2 hnsw graph holds them
        in_graph = layer.store.index_backend == "hnsw" and layer.store.metric != "cosine"
        assert (tmp_path / "export" / "memory" / f"layer_{index:02d}" / "keys.npy").exists() != in_graph
    loaded, _ = load_pretrained(tmp_path / "export")
    with torch.no_grad():
        logits = loaded(TOKENS).logits
    report = load_in_plain_transformers(tmp_path / "export", logits, tmp_path)
    assert report["class"] == f"DMT{type(student).__name__}"
    assert report["generated"] == 4
    assert report["pipeline_text"].startswith("To be")
    assert report["refused"] is not None and "model.safetensors" in report["refused"]
    assert report["tokenizer_asked"] == [] and report["tokenizer_class"] == type(gpt2_tokenizer).__name__
    assert not report["dmt_imported"]


def test_remote_code_reads_what_dmt_reads(tiny_llama, tmp_path, gpt2_tokenizer):
    """In-process: the remote class's memory matches the store's live rows, and a corrupted store file is
    refused with an error naming it."""
    student = seeded_llama_student(tiny_llama)
    save_pretrained(student, gpt2_tokenizer, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    block, settings = config["dmt"]["blocks"]["0"], config["dmt"]["layers"]["0"]
    widths = settings["key_dim"], settings["value_dim"] + settings["gate_dim"]
    keys, entries, live = read_store(tmp_path / "export" / block["store"], *widths, settings["metric"])
    store = memory_layers(student)[0].store
    stored_keys, stored_values = store.get(store.live_ids())
    assert_close(keys[live], torch.from_numpy(stored_keys))
    assert_close(entries[live].float(), torch.from_numpy(stored_values))
    assert entries.dtype == torch.float16  # value_dtype carries into the export
    values_file = tmp_path / "export" / block["store"] / "values.npy"
    data = bytearray(values_file.read_bytes())
    data[-1] ^= 0xFF
    values_file.write_bytes(bytes(data))
    with pytest.raises(StoreFileError, match="values.npy"):
        read_store(tmp_path / "export" / block["store"], *widths, settings["metric"])
