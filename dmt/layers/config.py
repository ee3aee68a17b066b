"""Typed settings of the layers swapped in for MLPs: one dataclass per layer type, built from the ``swap``
Hydra group and saved with checkpoints and exports.

- :class:`FeaturalConfig` and :class:`AssociativeConfig`: kNN memory layers; what their stores and searches
  share is :class:`MemoryConfig`.
- :class:`RemovedConfig` and :class:`LowRankConfig`: the dense baselines they are compared with.

Settings a memory layer can take from the MLP it replaces start as ``None`` and are filled by
:meth:`MemoryConfig.resolved`: from the MLP's form with ``init: ffn`` (an explicit value that contradicts the
MLP is refused, naming the key), else with generic defaults. Saved configs are always resolved. Every error
names the ``swap.<key>`` at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

from dmt.errors import ConfigError
from dmt.layers.mlp import MLPForm
from dmt.memory.backends import check_index_settings
from dmt.memory.eviction import check_eviction
from dmt.memory.metrics import check_metric
from dmt.memory.store import VALUE_DTYPES

INITS: tuple[str, ...] = ("empty", "ffn")
WEIGHTINGS: tuple[str, ...] = ("softmax", "relu", "gelu", "gelu_tanh", "silu")
RANKINGS: tuple[str, ...] = ("score", "magnitude")

C = TypeVar("C", bound="LayerConfig")


def bad(key: str, why: str) -> ConfigError:
    """A config error naming the ``swap`` key at fault."""
    return ConfigError(f"swap.{key}: {why}")


@dataclass
class LayerConfig:
    """Settings of one layer swapped in for an MLP; subclasses add their type's own."""

    type: ClassVar[str]
    has_store: ClassVar[bool] = False  # a kNN memory layer rather than a dense baseline

    @classmethod
    def setting_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def resolved(self: C, d_model: int, mlp: MLPForm | None = None) -> C:
        """This config with every setting derived from the model filled in (baselines have none)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass
class RemovedConfig(LayerConfig):
    """The MLP deleted: the block's output is its residual stream alone."""

    type: ClassVar[str] = "removed"


@dataclass
class LowRankConfig(LayerConfig):
    """A dense MLP of the teacher's own form with ``rank`` hidden units; ``init: ffn`` starts it from the
    MLP's ``rank`` most important units. ``rank: null`` in the ``swap`` group is resolved by
    :func:`dmt.model.surgery.resolve_layer_configs` to the width with as many parameters as the featural
    memory the group's other settings describe."""

    type: ClassVar[str] = "lowrank"
    rank: int | None = None
    init: str = "empty"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise bad("init", f"unknown init {self.init!r}; expected one of {INITS}")
        if self.rank is not None and int(self.rank) < 1:
            raise bad("rank", f"must be >= 1 or null, got {self.rank}")

    def resolved(self, d_model: int, mlp: MLPForm | None = None) -> LowRankConfig:
        if self.rank is None:
            raise bad("rank", "null is resolved with the memory settings it matches (resolve_layer_configs)")
        return self


@dataclass
class MemoryConfig(LayerConfig):
    """Store and search settings shared by the memory layers.

    ``key_dim``/``value_dim`` are per head (``value_dim`` defaults to ``d_model // heads``); heads share the
    layer's one store. ``novelty_threshold``: an entry is inserted when its query's nearest stored key is
    farther than this (in the store's metric); ``None`` disables inserts. A full store makes room by evicting
    (``eviction``: ``lrfu`` with ``lrfu_lambda``, ``fifo`` or ``random``). ``value_dtype`` is the stores'
    storage type of values (computation stays float32); ``index`` the key index settings of
    :mod:`dmt.memory.backends` (``backend: auto | exact | hnsw | product | cells`` and each backend's own).
    ``value_lr``: the write-back SGD rate of the stored values returned in training.

    How a layer weights what it read: ``weighting`` turns an entry's score into its weight (``softmax``
    over the k, or an MLP activation of each score); ``gate_dim > 0``: each entry also stores a gate key
    whose dot product with a second query scales its weight, as the up projection does in a SwiGLU MLP.
    ``ranking``: which entries a query reads, the top-k by score ``q·k`` or by its magnitude ``|q·k|`` (a
    SwiGLU MLP's gate scores mostly lie within ±2, where ``silu`` of a negative score is as large as of a
    small positive one); a query is novel when none of the entries it read is within the threshold.
    ``init: ffn`` seeds the store from the replaced MLP, one entry per unit (see :meth:`derived`).
    """

    has_store: ClassVar[bool] = True
    # Settings that resolve() derives when they are None, and their values when nothing is derived.
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "key_dim": 64,
        "temperature": 1.0,
        "metric": "ip",
        "capacity": 65536,
    }

    key_dim: int | None = None
    value_dim: int | None = None
    heads: int = 1
    topk: int = 32
    temperature: float | None = None
    metric: str | None = None
    capacity: int | None = None
    value_dtype: str = "float32"
    novelty_threshold: float | None = None
    eviction: str = "lrfu"
    lrfu_lambda: float = 0.0
    recombine_distance: float | None = None
    insert_during_eval: bool = False
    index: dict[str, Any] = field(default_factory=lambda: {"backend": "auto"})
    value_lr: float = 0.01
    weighting: str | None = None
    gate_dim: int | None = None
    ranking: str = "score"
    init: str = "empty"

    def __post_init__(self) -> None:
        if self.ranking not in RANKINGS:
            raise bad("ranking", f"unknown ranking {self.ranking!r}; expected one of {RANKINGS}")
        if self.ranking == "magnitude":
            if self.weighting == "softmax":
                raise bad("ranking", "softmax weights favour the largest scores; use an activation weighting")
            if self.metric == "l2":
                raise bad("ranking", "ranking by |q·k| needs metric ip or cosine, not l2")
            if self.index.get("backend") == "cells":
                raise bad(
                    "ranking", "a cells index ranks by q·k only; ranking by |q·k| needs another backend"
                )
            if self.recombine_distance is not None:
                raise bad("recombine_distance", "ranking by |q·k| returns entries out of distance order")
        if self.weighting is not None and self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        if self.gate_dim is not None and self.gate_dim < 0:
            raise bad("gate_dim", f"must be >= 0, got {self.gate_dim}")
        if self.init not in INITS:
            raise bad("init", f"unknown init {self.init!r}; expected one of {INITS}")
        if self.metric is not None:
            try:
                check_metric(self.metric)
            except ValueError as err:
                raise bad("metric", str(err)) from None
        for key in ("key_dim", "value_dim", "heads", "topk", "capacity"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise bad(key, f"must be >= 1, got {value}")
        if self.capacity is not None and self.topk > self.capacity:
            raise bad("topk", f"k={self.topk} is larger than the capacity ({self.capacity})")
        if self.temperature is not None and self.temperature <= 0:
            raise bad("temperature", f"must be > 0, got {self.temperature}")
        try:
            check_eviction(self.eviction)
        except ValueError as err:
            raise bad("eviction", str(err)) from None
        if not 0.0 <= self.lrfu_lambda <= 1.0:
            raise bad("lrfu_lambda", f"must lie in [0, 1], got {self.lrfu_lambda}")
        if self.value_dtype not in VALUE_DTYPES:
            raise bad("value_dtype", f"must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        if None not in (self.key_dim, self.metric, self.capacity):
            try:
                backend = check_index_settings(dict(self.index), self.key_dim, self.metric, self.capacity)
            except ValueError as err:
                raise bad("index", str(err)) from None
            if backend == "product":
                self._check_fixed_keys()

    def _check_fixed_keys(self) -> None:
        """What a product-key store, full from the start with fixed keys, rules out."""
        raise bad("index", f"a product-key store is a featural-memory option, not {self.type}")

    def refuse_writes(self, why: str) -> None:
        """No inserts and no merging: ``novelty_threshold`` and ``recombine_distance`` must be null."""
        for key in ("novelty_threshold", "recombine_distance"):
            if getattr(self, key) is not None:
                raise bad(key, f"{why}; set null")

    @property
    def gate_width(self) -> int:
        """Width of the gate key a store entry holds after its value (0: entries are values only)."""
        return self.gate_dim or 0

    @property
    def dense(self) -> bool:
        """Whether the layer has dense query and output projections."""
        return True

    def derived(self, d_model: int, mlp: MLPForm | None) -> dict[str, Any]:
        """Generic defaults, or with ``init: ffn`` the settings under which the layer starts as its MLP.

        Seeded from an MLP of ``U`` units, the store holds every unit (``capacity >= U``), read by inner
        product at temperature 1 and weighted by the MLP's activation, with exact widths: keys
        ``d_model + 1`` (the unit's input weights and bias), values ``d_model`` and, for a gated MLP, gate
        keys ``d_model``. Smaller widths are allowed (the store then holds a truncated SVD of the MLP);
        settings that would compute something else than the MLP are refused.
        """
        if self.init != "ffn":
            generic = {"value_dim": d_model // self.heads, "weighting": "softmax", "gate_dim": 0}
            return {**self.DEFAULTS, **generic}
        if mlp is None:
            raise bad("init", "init=ffn derives the layer from the MLP it replaces, and none was given")
        if mlp.d_model != d_model:
            raise bad("init", f"the MLP reads width {mlp.d_model}, the model is {d_model} wide")
        exact = {
            "key_dim": d_model + 1,
            "value_dim": d_model,
            "temperature": 1.0,
            "metric": "ip",
            "capacity": mlp.units,
            "weighting": mlp.activation,
            "gate_dim": d_model if mlp.gated else 0,
        }
        self._check_against_mlp(exact, mlp)
        return exact

    def _check_against_mlp(self, exact: dict[str, Any], mlp: MLPForm) -> None:
        """Refuse explicit settings under which a layer seeded from ``mlp`` would not compute it."""
        if self.heads != 1:
            raise bad("heads", f"init=ffn seeds one head from the MLP, got heads={self.heads}")
        for key in ("weighting", "metric", "temperature"):
            if getattr(self, key) not in (None, exact[key]):
                raise bad(
                    key,
                    f"the {mlp.activation} MLP that init=ffn seeds from needs {exact[key]!r}, got "
                    f"{getattr(self, key)!r}; leave it unset to derive it",
                )
        if self.gate_dim is not None and (self.gate_dim > 0) != mlp.gated:
            why = "would drop the MLP's up projection" if mlp.gated else "has no gate to seed from"
            raise bad("gate_dim", f"{self.gate_dim} {why}; leave it unset to derive it")
        for key in ("key_dim", "value_dim", "gate_dim"):
            if getattr(self, key) is not None and getattr(self, key) > exact[key]:
                raise bad(key, f"at most {exact[key]} for this MLP (exact), got {getattr(self, key)}")
        if self.capacity is not None and self.capacity < mlp.units:
            raise bad("capacity", f"{self.capacity} cannot hold the MLP's {mlp.units} units")

    def resolved(self: C, d_model: int, mlp: MLPForm | None = None) -> C:
        derived = self.derived(d_model, mlp)  # type: ignore[attr-defined]
        return replace(self, **{key: value for key, value in derived.items() if getattr(self, key) is None})


@dataclass
class FeaturalConfig(MemoryConfig):
    """Featural memory: a learned query reads the top-k of fixed feature keys with learnable values.

    ``dense_weights: false``
    (one head) drops the dense query, gate and output projections: the query is ``[x, 1]``
    (``key_dim = d_model + 1``), the gate query ``x`` and values ``d_model`` wide, so the layer's knowledge
    lives in its store alone.
    """

    type: ClassVar[str] = "featural"

    dense_weights: bool = True

    def __post_init__(self) -> None:
        if self.ranking == "magnitude" and self.novelty_threshold is not None:
            raise bad(
                "novelty_threshold",
                "a featural insert's key is its own query, which ranking by |q·k| would put before every "
                "stored key; set null",
            )
        if not self.dense_weights and self.heads != 1:
            raise bad("heads", f"dense_weights=false needs heads=1, got {self.heads}")
        super().__post_init__()

    def _check_fixed_keys(self) -> None:
        if self.init != "empty":
            raise bad("init", f"a product-key store has fixed keys: it needs init=empty, got {self.init!r}")
        self.refuse_writes("a product-key store has fixed keys: it cannot insert or merge")

    @property
    def dense(self) -> bool:
        return self.dense_weights

    def resolved(self, d_model: int, mlp: MLPForm | None = None) -> FeaturalConfig:
        config = super().resolved(d_model, mlp)
        if not config.dense_weights:  # queries and values are the hidden states themselves (plus a 1)
            widths = {"key_dim": d_model + 1, "value_dim": d_model}
            if config.gate_dim:
                widths["gate_dim"] = d_model
            for key, wanted in widths.items():
                if getattr(config, key) != wanted:
                    raise bad(
                        key,
                        f"dense_weights=false needs {key}={wanted} (d_model={d_model}), "
                        f"got {getattr(config, key)}",
                    )
        return config


@dataclass
class AssociativeConfig(MemoryConfig):
    """Associative memory: tokens insert their own key-value pairs and attend (softmax) over the nearest
    stored ones; the store starts empty.

    ``init: ffn`` instead seeds the store from the replaced MLP's units as a featural memory is seeded, and
    reads them with the MLP's activation (and gate) as the attention weights, so the layer starts as the
    MLP restricted to its top-k units; the tokens' own entries (projected values) add to them. Without it
    the weighting is ``softmax`` and entries are ungated (the defaults below, which a checkpoint without
    these settings also reads as).

    ``inserted_values``: what a training token stores as its value. ``projected``: its value projection.
    ``mlp_output``: the output of the teacher MLP this layer replaces, at that token (distillation by
    insertion: the value a query should retrieve is known exactly); the value space is then the residual
    stream (``heads · value_dim = d_model``, each head storing its slice) and the output projection starts
    as the identity. Without a teacher (evaluation, ``insert_during_eval``) values are projected.
    ``next_token``: the input embedding of the token that follows it (a continuous cache, Grave et al.
    2017; kNN-LM, Khandelwal et al. 2020: what came next after a similar context), also residual-stream
    wide; a row's last token, whose successor is not in the batch, inserts nothing. It needs the input
    ids, in training and in evaluation alike.

    ``keep_mlp``: the block keeps its MLP and the memory's output is added to it (a memory beside the MLP,
    as Memorizing Transformers add kNN attention beside a block's own); by default the output projection
    starts at zero, so the student starts as the teacher, and the kept MLP does not train with the memory.

    ``output_gain``: for residual-stream values (``mlp_output``, ``next_token``), the output projection
    starts as this multiple of the identity; ``null``: 1 (the stored vectors pass through unchanged), or 0
    with ``keep_mlp``. A cache of next tokens beside the MLP that starts above 0 reads a document usefully
    before any training: what followed the nearest earlier contexts is added to the residual stream, which
    the tied output embedding reads.
    """

    type: ClassVar[str] = "associative"
    INSERTED_VALUES: ClassVar[tuple[str, ...]] = ("projected", "mlp_output", "next_token")

    inserted_values: str = "projected"
    keep_mlp: bool = False
    output_gain: float | None = None
    weighting: str | None = "softmax"
    gate_dim: int | None = 0

    def __post_init__(self) -> None:
        if self.init == "ffn" and self.inserted_values != "projected":
            raise bad(
                "inserted_values",
                f"init=ffn reads the MLP's units in their own value space; {self.inserted_values!r} values "
                "are residual-stream vectors: use projected",
            )
        if self.init == "ffn" and self.keep_mlp:
            raise bad("keep_mlp", "init=ffn stores the MLP's units already; keep_mlp would add the MLP twice")
        if self.inserted_values not in self.INSERTED_VALUES:
            raise bad(
                "inserted_values",
                f"unknown value source {self.inserted_values!r}; expected one of {self.INSERTED_VALUES}",
            )
        if self.output_gain is not None and self.inserted_values == "projected":
            raise bad(
                "output_gain",
                "projected values are not residual-stream vectors: their output projection starts random; "
                "set null",
            )
        if self.keep_mlp and self.inserted_values == "mlp_output":
            raise bad(
                "keep_mlp", "the kept MLP already adds its output; inserted_values=mlp_output would too"
            )
        super().__post_init__()

    def resolved(self, d_model: int, mlp: MLPForm | None = None) -> AssociativeConfig:
        config = super().resolved(d_model, mlp)
        if config.inserted_values != "projected" and config.heads * config.value_dim != d_model:
            raise bad(
                "value_dim",
                f"inserted_values={config.inserted_values} stores d_model-wide vectors: heads x value_dim "
                f"must be {d_model}, got {config.heads} x {config.value_dim}",
            )
        return config


CONFIG_CLASSES: dict[str, type[LayerConfig]] = {
    cls.type: cls for cls in (FeaturalConfig, AssociativeConfig, RemovedConfig, LowRankConfig)
}
LAYER_TYPES: tuple[str, ...] = tuple(CONFIG_CLASSES)


def config_class(layer_type: str) -> type[LayerConfig]:
    if layer_type not in CONFIG_CLASSES:
        raise bad("type", f"unknown layer type {layer_type!r}; expected one of {LAYER_TYPES}")
    return CONFIG_CLASSES[layer_type]


def layer_config(settings: Mapping[str, Any]) -> LayerConfig:
    """The config of ``settings['type']`` (default ``featural``) from its settings; any setting that type
    does not have is refused, naming it."""
    settings = dict(settings)
    cls = config_class(settings.pop("type", "featural"))
    unknown = sorted(set(settings) - cls.setting_names())
    if unknown:
        raise bad(unknown[0], f"not a setting of {cls.type} layers; they have {sorted(cls.setting_names())}")
    return cls(**settings)
