"""Typed settings of the layers swapped in for MLPs: one dataclass per layer type, built from the ``swap``
Hydra group and saved with checkpoints and exports.

- :class:`FeaturalConfig` and :class:`AssociativeConfig`: kNN memory layers; what their stores and searches
  share is :class:`MemoryConfig`.
- :class:`RemovedConfig` and :class:`LowRankConfig`: the dense baselines they are compared with.

The ``swap`` group nests the settings by concern (:data:`GROUPS`: ``swap.read.topk``,
``swap.store.capacity``, ...) beside ``blocks``, ``type``, ``per_block`` and the ``index`` mapping; each
field records its group once, in its metadata. The dataclasses, checkpoints and exports keep the flat form
(``topk``), which :func:`swap_settings` makes from the nested one. Settings a memory layer can take from
the MLP it replaces start as ``None`` and are filled by :func:`dmt.layers.resolve.resolve`. Every error
names the full ``swap`` key at fault (:func:`swap_key`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from dmt.errors import ConfigError
from dmt.memory.backends import IndexSettingError, check_index_settings
from dmt.memory.eviction import check_eviction
from dmt.memory.metrics import check_metric
from dmt.memory.store import VALUE_DTYPES

INITS: tuple[str, ...] = ("empty", "ffn")
WEIGHTINGS: tuple[str, ...] = ("softmax", "relu", "gelu", "gelu_tanh", "silu")
RANKINGS: tuple[str, ...] = ("score", "magnitude")
# The groups of layer settings under ``swap``: what a query reads and how it weighs it, what the store
# (or a low-rank MLP) holds and evicts and how it starts, what is written into it, and what the layer's
# output is added to.
GROUPS: tuple[str, ...] = ("read", "store", "write", "output")
# Keys of the ``swap`` group that choose blocks and layer types rather than configure layers.
SELECTION_KEYS: tuple[str, ...] = ("blocks", "type", "per_block")


def setting(group: str, default: Any) -> Any:
    """A dataclass field read from ``swap.<group>.<name>`` (``group`` one of :data:`GROUPS`)."""
    return field(default=default, metadata={"group": group})


def swap_key(name: str, prefix: str = "swap") -> str:
    """The full key of a ``swap`` setting: ``topk`` → ``swap.read.topk``; the selection keys and ``index``
    (and the backend settings below it, ``index.M``) sit at the top. ``prefix``: where the settings are
    (``swap.per_block.5``)."""
    group = SETTING_GROUPS.get(name)
    return f"{prefix}.{group}.{name}" if group else f"{prefix}.{name}"


def bad(key: str, why: str) -> ConfigError:
    """A config error naming the ``swap`` setting ``key`` (its flat name) at fault by its full key."""
    return ConfigError(f"{swap_key(key)}: {why}")


@dataclass
class LayerConfig:
    """Settings of one layer swapped in for an MLP; subclasses add their type's own."""

    type: ClassVar[str]
    has_store: ClassVar[bool] = False  # a kNN memory layer rather than a dense baseline

    @classmethod
    def setting_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

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
    :func:`dmt.layers.resolve.resolve_baseline` to the width with as many parameters as the featural
    memory the group's other settings describe."""

    type: ClassVar[str] = "lowrank"
    rank: int | None = setting("store", None)
    init: str = setting("store", "empty")

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise bad("init", f"unknown init {self.init!r}; expected one of {INITS}")
        if self.rank is not None and int(self.rank) < 1:
            raise bad("rank", f"must be >= 1 or null, got {self.rank}")


@dataclass
class MemoryConfig(LayerConfig):
    """Store and search settings shared by the memory layers.

    ``key_dim``/``value_dim`` are per head (``value_dim`` defaults to ``d_model // heads``); heads share the
    layer's one store. ``novelty_threshold``: an entry is inserted when its query's nearest stored key is
    farther than this (in the store's metric); ``None`` disables inserts. A full store makes room by evicting
    (``eviction``: ``lrfu`` with ``lrfu_lambda``, ``fifo`` or ``random``). ``value_dtype`` is the stores'
    storage type of values (computation stays float32); ``index`` the key index settings of
    :mod:`dmt.memory.backends` (``backend: auto | exact | hnsw | product | faiss`` and each backend's
    own).
    ``value_lr``: the write-back SGD rate of the stored values returned in training.

    How a layer weights what it read: ``weighting`` turns an entry's score into its weight (``softmax``
    over the k, or an MLP activation of each score); ``gate_dim > 0``: each entry also stores a gate key
    whose dot product with a second query scales its weight, as the up projection does in a SwiGLU MLP.
    ``ranking``: which entries a query reads, the top-k by score ``q·k`` or by its magnitude ``|q·k|`` (a
    SwiGLU MLP's gate scores mostly lie within ±2, where ``silu`` of a negative score is as large as of a
    small positive one); a query is novel when none of the entries it read is within the threshold.
    ``init: ffn`` seeds the store from the replaced MLP, one entry per unit (see :mod:`dmt.layers.resolve`).
    """

    has_store: ClassVar[bool] = True
    key_dim: int | None = setting("read", None)
    value_dim: int | None = setting("read", None)
    heads: int = setting("read", 1)
    topk: int = setting("read", 32)
    temperature: float | None = setting("read", None)
    metric: str | None = setting("read", None)
    capacity: int | None = setting("store", None)
    value_dtype: str = setting("store", "float32")
    novelty_threshold: float | None = setting("write", None)
    eviction: str = setting("store", "lrfu")
    lrfu_lambda: float = setting("store", 0.0)
    recombine_distance: float | None = setting("write", None)
    insert_during_eval: bool = setting("write", False)
    # The mapping swap.index itself: the Hydra group conf/swap/index/ (a backend and its own settings).
    index: dict[str, Any] = field(default_factory=lambda: {"backend": "auto"}, metadata={"group": None})
    value_lr: float = setting("write", 0.01)
    weighting: str | None = setting("read", None)
    gate_dim: int | None = setting("read", None)
    ranking: str = setting("read", "score")
    init: str = setting("store", "empty")

    def __post_init__(self) -> None:
        if self.ranking not in RANKINGS:
            raise bad("ranking", f"unknown ranking {self.ranking!r}; expected one of {RANKINGS}")
        if self.ranking == "magnitude":
            if self.weighting == "softmax":
                raise bad("ranking", "softmax weights favour the largest scores; use an activation weighting")
            if self.metric == "l2":
                raise bad("ranking", "ranking by |q·k| needs metric ip or cosine, not l2")
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
            except IndexSettingError as err:
                raise bad(f"index.{err.key}", err.why) from None
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


@dataclass
class FeaturalConfig(MemoryConfig):
    """Featural memory: a learned query reads the top-k of fixed feature keys with learnable values.

    ``dense_weights: false``
    (one head) drops the dense query, gate and output projections: the query is ``[x, 1]``
    (``key_dim = d_model + 1``), the gate query ``x`` and values ``d_model`` wide, so the layer's knowledge
    lives in its store alone.
    """

    type: ClassVar[str] = "featural"

    dense_weights: bool = setting("read", True)

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

    ``null_distance``: the softmax also weighs a null entry (zero value) at this distance from every query
    (an attention sink), so a query whose neighbours all lie well beyond it reads almost nothing: a memory
    of one domain stays quiet on text of another. ``null``: no null entry, the weights sum to 1.
    ``max_distance``: neighbours farther than this are not read (a radius search's bound); a query with
    none within it reads nothing; below 0 no neighbour is read (the ``next_token_weight`` mix alone reads the
    memory, as kNN-LM's does). ``null``: all k are read. ``residual_distance_scale`` (s > 0): the read's
    weights fall as ``exp(-d / s)`` with the distance ``d`` of the query's nearest neighbour, a soft radius:
    text far from every entry reads little. ``null``: they do not.

    ``next_token_weight`` (λ, in [0, 1)): in evaluation, the tokens that followed the
    ``next_token_topk`` nearest entries (their provenance; ``null``: ``topk``), weighted by a softmax of
    ``-distance / next_token_temperature`` (``null``: ``temperature``), also form a distribution that is
    mixed into the model's output probabilities, ``(1 - λ) p_model + λ p_memory``, as kNN-LM mixes its
    neighbours' next tokens (:mod:`dmt.layers.next_tokens`). 0: off. ``next_token_distance_scale`` (s > 0):
    a query's λ falls as ``λ exp(-d / s)`` with the distance ``d`` of its nearest neighbour of known next
    token, so text far from every entry (another domain) mixes little; ``null``: a fixed λ. The mix reads
    its neighbours whatever ``max_distance``, which bounds the residual read alone. These are reading
    settings: any pack of the student reads under them.
    """

    type: ClassVar[str] = "associative"
    INSERTED_VALUES: ClassVar[tuple[str, ...]] = ("projected", "mlp_output", "next_token")

    inserted_values: str = setting("write", "projected")
    keep_mlp: bool = setting("output", False)
    output_gain: float | None = setting("output", None)
    weighting: str | None = setting("read", "softmax")
    gate_dim: int | None = setting("read", 0)
    null_distance: float | None = setting("read", None)
    max_distance: float | None = setting("read", None)
    residual_distance_scale: float | None = setting("read", None)
    next_token_weight: float = setting("read", 0.0)
    next_token_topk: int | None = setting("read", None)
    next_token_temperature: float | None = setting("read", None)
    next_token_distance_scale: float | None = setting("read", None)

    def __post_init__(self) -> None:
        if not 0.0 <= self.next_token_weight < 1.0:
            raise bad("next_token_weight", f"must lie in [0, 1), got {self.next_token_weight}")
        if self.next_token_topk is not None and int(self.next_token_topk) < 1:
            raise bad("next_token_topk", f"must be >= 1 or null, got {self.next_token_topk}")
        if self.next_token_temperature is not None and self.next_token_temperature <= 0:
            raise bad("next_token_temperature", f"must be > 0 or null, got {self.next_token_temperature}")
        if self.next_token_distance_scale is not None and self.next_token_distance_scale <= 0:
            raise bad(
                "next_token_distance_scale", f"must be > 0 or null, got {self.next_token_distance_scale}"
            )
        if self.residual_distance_scale is not None and self.residual_distance_scale <= 0:
            raise bad("residual_distance_scale", f"must be > 0 or null, got {self.residual_distance_scale}")
        if self.next_token_weight > 0 and self.ranking == "magnitude":
            raise bad("next_token_weight", "the next tokens of the nearest entries need ranking=score")
        if self.null_distance is not None and self.weighting != "softmax":
            raise bad(
                "null_distance", f"a null entry takes weight in a softmax; weighting is {self.weighting}"
            )
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


CONFIG_CLASSES: dict[str, type[LayerConfig]] = {
    cls.type: cls for cls in (FeaturalConfig, AssociativeConfig, RemovedConfig, LowRankConfig)
}
LAYER_TYPES: tuple[str, ...] = tuple(CONFIG_CLASSES)


def config_class(layer_type: str) -> type[LayerConfig]:
    if layer_type not in CONFIG_CLASSES:
        raise bad("type", f"unknown layer type {layer_type!r}; expected one of {LAYER_TYPES}")
    return CONFIG_CLASSES[layer_type]


def settings_of(cls: type[LayerConfig]) -> str:
    """The settings of a layer type, by group as they are written under ``swap`` (``read.topk, ...``)."""
    return ", ".join(sorted(swap_key(f.name, prefix="").lstrip(".") for f in fields(cls)))


def layer_config(settings: Mapping[str, Any]) -> LayerConfig:
    """The config of ``settings['type']`` (default ``featural``) from its settings; any setting that type
    does not have is refused, naming it."""
    settings = dict(settings)
    cls = config_class(settings.pop("type", "featural"))
    unknown = sorted(set(settings) - cls.setting_names())
    if unknown:
        raise bad(unknown[0], f"not a setting of {cls.type} layers; they have {settings_of(cls)}")
    return cls(**settings)


def _setting_groups() -> dict[str, str | None]:
    """Each setting's group, from its fields' metadata; a name that two classes place in different
    groups could not be translated from the nested form, so it is a programming error."""
    groups: dict[str, str | None] = {}
    for cls in CONFIG_CLASSES.values():
        for f in fields(cls):
            group = f.metadata["group"]
            if groups.setdefault(f.name, group) != group:
                raise TypeError(f"{f.name} is in swap.{groups[f.name]} and in swap.{group}")
    return groups


# ``swap.<group>.<name>`` of each layer setting (None: ``index``, the mapping at the top of ``swap``).
SETTING_GROUPS: dict[str, str | None] = _setting_groups()
