"""The documentation cannot drift from the code: docs/config.md's tables of ``swap`` settings match the layer
config dataclasses (their groups too) and the index backends, and every relative link in README.md and
docs/ resolves."""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from dmt.layers.config import CONFIG_CLASSES, SELECTION_KEYS, swap_key
from dmt.memory.backends import BACKEND_PARAMS, INDEX_PARAMS
from dmt.memory.faiss_ivf import FaissIndex
from dmt.memory.hnsw import HnswIndex
from dmt.memory.scann_index import ScannIndex

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "config.md"
SETTINGS_HEADER = ["setting", "type", "default", "layer types", "meaning"]
INDEX_HEADER = ["setting", "default", "backends", "meaning"]


def cells(line: str) -> list[str]:
    """The cells of a markdown table row, split at unescaped pipes, ``\\|`` read as ``|``."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def table(text: str, header: list[str]) -> dict[str, dict[str, str]]:
    """The rows of the one table in ``text`` whose header is ``header``, by their first cell (a name in
    backticks)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and cells(line) == header]
    assert len(starts) == 1, f"expected one table with header {header}, found {len(starts)}"
    rows: dict[str, dict[str, str]] = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        row = cells(line)
        assert len(row) == len(header), f"{len(row)} cells, expected {len(header)}: {line}"
        name = re.fullmatch(r"`([^`]+)`", row[0])
        assert name, f"the first cell must be one setting name in backticks: {row[0]!r}"
        assert name.group(1) not in rows, f"{name.group(1)} is listed twice"
        rows[name.group(1)] = dict(zip(header, row, strict=True))
    return rows


def code(cell: str) -> str:
    """The text of a cell that must be exactly one backticked value."""
    match = re.fullmatch(r"`([^`]*)`", cell.strip())
    assert match, f"expected one value in backticks, got {cell!r}"
    return match.group(1)


def same(written: str, value: Any) -> bool:
    """Whether a default written as YAML is ``value``: equal and of the same type (``1`` is not ``1.0``
    nor ``true``)."""
    parsed = yaml.safe_load(written)
    return parsed == value and type(parsed) is type(value)


def field_defaults(name: str) -> dict[str, Any]:
    """The default of setting ``name`` in each layer type whose config class has it."""
    defaults = {}
    for layer_type, cls in CONFIG_CLASSES.items():
        for f in fields(cls):
            if f.name == name:
                assert f.default_factory is not MISSING or f.default is not MISSING, name
                defaults[layer_type] = f.default_factory() if f.default is MISSING else f.default
    return defaults


def field_types(name: str) -> set[str]:
    return {str(f.type) for cls in CONFIG_CLASSES.values() for f in fields(cls) if f.name == name}


@pytest.fixture(scope="module")
def settings() -> dict[str, dict[str, str]]:
    """The table's rows by flat setting name (``read.topk`` → ``topk``), each written under its group."""
    rows = table(CONFIG_DOC.read_text(encoding="utf-8"), SETTINGS_HEADER)
    by_name = {key.rsplit(".", 1)[-1]: row for key, row in rows.items()}
    assert len(by_name) == len(rows), "a setting is listed twice"
    return by_name


def test_each_setting_is_written_as_its_key_under_swap() -> None:
    rows = table(CONFIG_DOC.read_text(encoding="utf-8"), SETTINGS_HEADER)
    for key in rows:
        assert swap_key(key.rsplit(".", 1)[-1]) == f"swap.{key}", f"{key}: the field's group differs"


def test_the_table_lists_every_swap_setting_and_no_other(settings: dict[str, dict[str, str]]) -> None:
    names = set().union(*(cls.setting_names() for cls in CONFIG_CLASSES.values())) | set(SELECTION_KEYS)
    assert sorted(set(settings) - names) == [], "documented settings that no config class has"
    assert sorted(names - set(settings)) == [], "settings missing from docs/config.md"


def test_layer_types_are_the_classes_that_have_the_setting(settings: dict[str, dict[str, str]]) -> None:
    for name, row in settings.items():
        written = {part.strip() for part in row["layer types"].split(",")}
        if name in SELECTION_KEYS:  # chosen per block before any layer config: every type reads them
            expected = set(CONFIG_CLASSES)
        else:
            expected = {t for t, cls in CONFIG_CLASSES.items() if name in cls.setting_names()}
        assert written == expected, f"{name}: layer types {sorted(written)}, dataclasses {sorted(expected)}"


def test_types_are_the_field_annotations(settings: dict[str, dict[str, str]]) -> None:
    for name, row in settings.items():
        if name not in SELECTION_KEYS:
            assert {code(row["type"])} == field_types(name), name


def test_defaults_are_the_dataclass_defaults(settings: dict[str, dict[str, str]]) -> None:
    """A single backticked YAML value where every layer type has the same default, else
    ``type `value`; type `value` `` for each layer type that has the setting."""
    for name, row in settings.items():
        if name in SELECTION_KEYS:
            continue
        defaults = field_defaults(name)
        cell = row["default"]
        distinct = {repr(value) for value in defaults.values()}
        if len(distinct) == 1:
            value = next(iter(defaults.values()))
            assert same(code(cell), value), f"{name}: default {cell}, the dataclasses say {value!r}"
            continue
        written = {}
        for part in cell.split(";"):
            match = re.fullmatch(r"\s*(\w+) `([^`]*)`\s*", part)
            assert match, f"{name}: expected 'type `value`; ...', got {cell!r}"
            written[match.group(1)] = match.group(2)
        assert set(written) == set(defaults), f"{name}: defaults given for {sorted(written)}"
        for layer_type, value in defaults.items():
            written_value = written[layer_type]
            assert same(written_value, value), f"{name} ({layer_type}): {written_value} != {value!r}"


def test_index_table_matches_the_backends() -> None:
    rows = table(CONFIG_DOC.read_text(encoding="utf-8"), INDEX_HEADER)
    assert set(rows) == {"backend", *INDEX_PARAMS}
    assert same(code(rows["backend"]["default"]), field_defaults("index")["featural"]["backend"])
    for name in INDEX_PARAMS:
        backends = {b.strip() for b in rows[name]["backends"].split(",")}
        assert backends == {b for b, own in BACKEND_PARAMS.items() if name in own}, name
    for cls in (HnswIndex, FaissIndex, ScannIndex):
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name in INDEX_PARAMS:
                assert same(code(rows[name]["default"]), parameter.default), name


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            found.add(slug(match.group(1)))
    return found


def links(path: Path) -> list[str]:
    """Targets of the markdown links in ``path`` outside code blocks and code spans."""
    targets: list[str] = []
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            prose = re.sub(r"`[^`]*`", "", line)
            targets += re.findall(r"\]\(([^)\s]+)\)", prose)
    return targets


@pytest.mark.parametrize(
    "doc",
    [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
    ids=lambda p: str(Path(p).relative_to(ROOT)),
)
def test_relative_links_resolve(doc: Path) -> None:
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        assert resolved.exists(), f"{doc.name}: {target} points to a missing file"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{doc.name}: {target}: no such heading"
