"""Typed settings of one memory layer, built from the ``memory`` Hydra group and stored with exports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from dmt.memory.backends import check_index_settings
from dmt.memory.metrics import check_metric
from dmt.memory.store import VALUE_DTYPES

LayerType = Literal["featural", "associative", "removed", "lowrank"]
# Layers backed by a kNN store, and the dense baselines they are compared with (dmt/layers/baselines.py):
# the MLP deleted, or a narrower MLP of the teacher's own form.
MEMORY_TYPES: tuple[str, ...] = ("featural", "associative")
BASELINE_TYPES: tuple[str, ...] = ("removed", "lowrank")
LAYER_TYPES: tuple[str, ...] = MEMORY_TYPES + BASELINE_TYPES
INITS: tuple[str, ...] = ("empty", "ffn")
WEIGHTINGS: tuple[str, ...] = ("softmax", "relu", "gelu", "silu")


@dataclass
class MemoryLayerConfig:
    """Hyper-parameters of one layer swapped in for an MLP: ``FeaturalMemory``, ``AssociativeMemory`` or a
    dense baseline (``removed``: no MLP; ``lowrank``: a narrower MLP of the teacher's form).

    ``novelty_threshold``: an entry is inserted when its query's nearest stored key is farther than this
    (in the store's metric); ``None`` disables inserts. ``key_dim``/``value_dim`` are per head;
    ``value_dim=None`` means ``d_model // heads``. ``glu_dim > 0`` makes a featural memory gated: each
    entry also stores a ``glu_dim`` key whose dot product with a second query projection scales the entry's
    weight, as the up projection does in a SwiGLU MLP. ``value_dtype`` is the stores' storage type of
    values (``float16`` halves their memory; computation stays in float32); ``index`` holds the key index
    settings of :mod:`dmt.memory.backends` (``backend: auto | exact | hnsw | product`` and hnsw's own).

    ``two_sided`` (featural, activation weighting): the top-k by ``|q·k|`` rather than by ``q·k``. A SwiGLU
    MLP's gate scores mostly lie within ±2, where ``silu`` of a negative score is as large as of a small
    positive one, so its negative tail matters as much as its positive one (README, "Quality comparison").
    ``projections: false`` (featural, one head) drops the dense query, gate and output projections: the
    query is ``[x, 1]`` (``key_dim = d_model + 1``, the constant carrying a key bias), the gate query is
    ``x`` (``glu_dim = d_model``) and values are ``d_model`` wide with a learned output bias, so the layer's
    knowledge lives in its store alone.

    ``rank`` (``lowrank`` only) is the baseline's hidden width; ``None`` picks the width whose parameter
    count matches the featural memory layer the other settings describe (``key_dim``, ``glu_dim``, ...), so
    a run can swap ``type: featural`` for ``type: lowrank`` and compare at equal dense parameters.
    ``init: ffn`` warm-starts a ``lowrank`` layer from the teacher MLP's most important units. Store
    settings (``topk``, ``capacity``, ...) mean nothing to the baselines but are still checked.
    """

    type: LayerType = "featural"
    key_dim: int = 64
    value_dim: int | None = None
    heads: int = 1
    topk: int = 32
    temperature: float = 1.0
    metric: str = "ip"
    weighting: str = "softmax"
    glu_dim: int = 0
    capacity: int = 65536
    value_dtype: str = "float32"
    novelty_threshold: float | None = None
    init: str = "empty"
    lrfu_lambda: float = 0.5
    recombine_distance: float | None = None
    value_lr: float = 0.01
    insert_during_eval: bool = False
    index: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    two_sided: bool = False
    projections: bool = True

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"memory.{key}: {why}")

        if self.type not in LAYER_TYPES:
            raise bad("type", f"unknown layer type {self.type!r}; expected one of {LAYER_TYPES}")
        if self.init not in INITS:
            raise bad("init", f"unknown init {self.init!r}; expected one of {INITS}")
        if self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        try:
            check_metric(self.metric)
        except ValueError as err:
            raise bad("metric", str(err)) from None
        for key in ("key_dim", "heads", "topk", "capacity"):
            if int(getattr(self, key)) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.glu_dim < 0:
            raise bad("glu_dim", f"must be >= 0, got {self.glu_dim}")
        if self.glu_dim and self.type == "associative":
            raise bad("glu_dim", "gating is a featural-memory option; associative layers have none")
        if self.value_dim is not None and self.value_dim < 1:
            raise bad("value_dim", f"must be >= 1 or null, got {self.value_dim}")
        if self.topk > self.capacity:
            raise bad("topk", f"k={self.topk} is larger than the capacity ({self.capacity})")
        if self.temperature <= 0:
            raise bad("temperature", f"must be > 0, got {self.temperature}")
        if not 0.0 <= self.lrfu_lambda <= 1.0:
            raise bad("lrfu_lambda", f"must lie in [0, 1], got {self.lrfu_lambda}")
        if self.init == "ffn" and self.type == "associative":
            raise bad("init", "init=ffn seeds a featural store; associative layers start empty")
        if self.rank is not None and self.type != "lowrank":
            raise bad("rank", f"only lowrank layers have a rank; this layer is {self.type}")
        if self.rank is not None and int(self.rank) < 1:
            raise bad("rank", f"must be >= 1 or null, got {self.rank}")
        if self.type == "associative" and self.weighting != "softmax":
            raise bad("weighting", "associative layers attend with softmax")
        if self.two_sided and self.has_store:
            self._check_two_sided(bad)
        if not self.projections and self.has_store:
            self._require("projections=false", bad, type="featural", heads=1)
        if self.value_dtype not in VALUE_DTYPES:
            raise bad("value_dtype", f"must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        if self.has_store:
            self._check_index(bad)

    def _check_index(self, bad: Callable[[str, str], ValueError]) -> None:
        """The store's index settings, including what a fixed-key (product) store cannot do."""
        try:
            backend = check_index_settings(dict(self.index), self.key_dim, self.metric, self.capacity)
        except ValueError as err:
            raise bad("index", str(err)) from None
        if backend == "product":
            self._require("a product-key store", bad, type="featural", init="empty")
            self._require_null("a product-key store has fixed keys: it cannot insert or merge", bad)

    def _check_two_sided(self, bad: Callable[[str, str], ValueError]) -> None:
        """A two-sided search ranks by |similarity|: activation-weighted featural layers on ip/cosine only."""
        if self.type != "featural":
            raise bad("two_sided", f"a two-sided search is a featural-memory option, not {self.type}")
        if self.weighting == "softmax":
            raise bad("two_sided", "softmax weights favour the largest scores; use an activation weighting")
        if self.metric == "l2":
            raise bad("two_sided", "a two-sided search needs metric ip or cosine, not l2")
        self._require_null("a two-sided search orders entries by |similarity|, not distance", bad)

    def _require(self, who: str, bad: Callable[[str, str], ValueError], **wanted: Any) -> None:
        """Settings that ``who`` (an option in use) fixes: ``key=value`` each."""
        for key, value in wanted.items():
            if getattr(self, key) != value:
                raise bad(key, f"{who} needs {key}={value}, got {getattr(self, key)!r}")

    def _require_null(self, why: str, bad: Callable[[str, str], ValueError]) -> None:
        """No inserts and no merging: ``novelty_threshold`` and ``recombine_distance`` must be null."""
        for key in ("novelty_threshold", "recombine_distance"):
            if getattr(self, key) is not None:
                raise bad(key, f"{why}; set null")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MemoryLayerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"memory: unknown layer setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def has_store(self) -> bool:
        """Whether the layer is a memory layer (a kNN store) rather than a dense baseline."""
        return self.type in MEMORY_TYPES
