"""How many of its MLP's units must a token read? The unit budget of an all-MLP memory student.

``python -m benchmarks.unit_budget --out results/unit_budget [--units 768 512 384] [--rank 64]
[--ivf 64:8] [--sources sherlock_holmes bbc_news] -- [distill overrides, e.g. teacher=... data=...]``

An MLP read as a memory is ``y = Σ_u act(k_u·x + b_u) [g_u·x] v_u + b_out`` (``dmt.layers.mlp``). A memory
layer holding its units pays for the units a token reads, so the question is how few will do. Each
strategy keeps ``K`` units per token in *every* block at once (the all-MLP student before any training)
and reports held-out perplexity beside the multiply-adds per token it costs over the MLP's:

- ``gate_magnitude``: the top-K by ``|k_u·x + b_u|``, what the projection-free featural memory reads
  (``swap.read.ranking: magnitude``) after an exact search: ``U·(C+1)`` to score every key, then
  ``3C + 1`` per read unit (its key score recomputed differentiably, its gate key and its value), as
  ``dmt.layers.arithmetic`` counts the layer.
- ``contribution``: the top-K by the unit's actual contribution ``|act(k·x + b)·(g·x)|·‖v‖``. Not a
  search (it needs every unit's activation, a whole MLP's arithmetic): the bound that no choice of K units
  beats, to tell what the search loses from what the unit count does.
- ``lowrank:r``: the contribution estimated from rank-r SVDs of the key and gate matrices (a Deja Vu-style
  predictor, Liu et al. 2023), then the exact top-K: ``r·(C + 1 + U)`` per estimated matrix, ``3C + 1``
  per read unit.
- ``ivf:nlist:nprobe``: the ``gate_magnitude`` choice among the units of the ``nprobe`` lists (of ``nlist``
  spherical k-means clusters of the keys ``±k``) whose centroids are nearest the token: an inverted-file
  search, ``C + 1`` per centroid and per unit scored, then ``3C + 1`` per read unit.

Multiply-adds follow ``dmt.layers.arithmetic``: comparisons, top-k and activations are not counted. The
MLP costs ``3·C·U`` (gated) or ``2·C·U``. Perplexity is the pipeline's sliding-window perplexity
(``evaluate.window`` / ``stride``) on the held-out sources of the data config (``data=broad``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmt.layers.arithmetic import mlp_multiply_adds
from dmt.layers.mlp import FFNWeights

STRATEGIES = ("full", "gate_magnitude", "contribution", "lowrank", "ivf")
KMEANS_ITERATIONS = 20


@dataclass(frozen=True)
class Strategy:
    """Which ``units`` (K) a token reads, chosen by ``name``; ``rank`` for lowrank, ``lists`` and ``probes``
    for ivf."""

    name: str
    units: int
    rank: int = 0
    lists: int = 0
    probes: int = 0

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}; expected one of {', '.join(STRATEGIES)}")
        if self.units < 1 and self.name != "full":
            raise ValueError(f"units must be >= 1, got {self.units}")
        if self.name == "lowrank" and self.rank < 1:
            raise ValueError(f"lowrank needs a rank >= 1, got {self.rank}")
        if self.name == "ivf" and not 1 <= self.probes <= self.lists:
            raise ValueError(f"ivf needs 1 <= probes <= lists, got {self.probes} of {self.lists}")

    @property
    def label(self) -> str:
        extra = {"lowrank": f":{self.rank}", "ivf": f":{self.lists}:{self.probes}"}.get(self.name, "")
        return f"{self.name}{extra}"


def spherical_kmeans(
    vectors: torch.Tensor, clusters: int, iterations: int = KMEANS_ITERATIONS
) -> torch.Tensor:
    """``(clusters, D)`` unit-norm centroids of the directions of ``vectors (N, D)`` (fixed seed)."""
    if not 1 <= clusters <= len(vectors):
        raise ValueError(f"cannot make {clusters} clusters of {len(vectors)} vectors")
    directions = F.normalize(vectors, dim=1)
    generator = torch.Generator().manual_seed(0)
    centroids = directions[torch.randperm(len(directions), generator=generator)[:clusters]].clone()
    for _ in range(iterations):
        assign = (directions @ centroids.T).argmax(1)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, directions)
        counts = torch.bincount(assign, minlength=clusters)
        # An emptied cluster keeps its centroid rather than collapsing to zero.
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centroids)
    return centroids


class UnitBudgetMLP(nn.Module):
    """The MLP of ``ffn`` computing ``strategy.units`` of its units per token: ``(B, T, C) -> (B, T, C)``.

    ``scored`` sums, over tokens, the units whose key was scored (ivf: those in probed lists), so
    that the arithmetic of a search that scores a varying number of keys is measured, not assumed.
    """

    def __init__(self, ffn: FFNWeights, strategy: Strategy) -> None:
        super().__init__()
        self.ffn = ffn
        self.strategy = strategy
        form = ffn.form
        if strategy.units > form.units:
            raise ValueError(f"units={strategy.units} exceeds the MLP's {form.units}")
        self.value_norms = ffn.values.norm(dim=1)  # (U,)
        self.scored = 0.0  # keys scored, summed over tokens
        self.tokens = 0
        if strategy.name == "lowrank":
            self.key_factors = _low_rank(self._augmented_keys(), strategy.rank)
            self.gate_factors = None if ffn.gate_keys is None else _low_rank(ffn.gate_keys, strategy.rank)
        if strategy.name == "ivf":
            keys = self._augmented_keys()  # (U, C + 1)
            self.centroids = spherical_kmeans(torch.cat([keys, -keys]), strategy.lists)  # (L, C + 1)
            signed = F.normalize(torch.cat([keys, -keys]), dim=1) @ self.centroids.T  # (2U, L)
            lists = signed.argmax(1)
            # A unit is a candidate when the list of +k or of -k is probed: |q·k| is large either way.
            self.unit_lists = torch.stack([lists[: form.units], lists[form.units :]], 1)  # (U, 2)

    def _augmented_keys(self) -> torch.Tensor:
        """``(U, C + 1)``: ``[k_u | b_u]``, scored by ``[x | 1]``."""
        bias = (
            self.ffn.key_bias
            if self.ffn.key_bias is not None
            else self.ffn.keys.new_zeros(len(self.ffn.keys))
        )
        return torch.cat([self.ffn.keys, bias[:, None]], 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ffn, strategy = self.ffn, self.strategy
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, C)
        pre = x @ ffn.keys.T  # (N, U)
        if ffn.key_bias is not None:
            pre = pre + ffn.key_bias
        act = ffn.act_fn(pre)
        if ffn.gate_keys is not None:
            act = act * (x @ ffn.gate_keys.T)
        if strategy.name != "full":
            act = act * self._chosen(x, pre, act)
        out = act @ ffn.values  # (N, C)
        if ffn.out_bias is not None:
            out = out + ffn.out_bias
        self.tokens += len(x)
        return out.reshape(hidden_states.shape)

    def _chosen(self, x: torch.Tensor, pre: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``(N, U)`` 0/1 mask of the units each token reads."""
        strategy = self.strategy
        scored = torch.ones_like(pre, dtype=torch.bool)
        if strategy.name == "gate_magnitude":
            score = pre.abs()
        elif strategy.name == "contribution":
            score = act.abs() * self.value_norms
        elif strategy.name == "lowrank":
            queries = torch.cat([x, x.new_ones(len(x), 1)], 1)  # (N, C + 1)
            estimate = self.ffn.act_fn((queries @ self.key_factors[0]) @ self.key_factors[1].T)
            if self.gate_factors is not None:
                estimate = estimate * ((x @ self.gate_factors[0]) @ self.gate_factors[1].T)
            score = estimate.abs() * self.value_norms
        else:  # ivf
            queries = F.normalize(torch.cat([x, x.new_ones(len(x), 1)], 1), dim=1)
            probed_lists = (queries @ self.centroids.T).topk(strategy.probes, dim=1).indices  # (N, P)
            probed = torch.zeros(len(x), strategy.lists, dtype=torch.bool)
            probed.scatter_(1, probed_lists, True)
            scored = probed[:, self.unit_lists[:, 0]] | probed[:, self.unit_lists[:, 1]]  # (N, U)
            score = pre.abs().masked_fill(~scored, -1.0)
        self.scored += float(scored.sum())
        chosen = score.topk(strategy.units, dim=1).indices  # (N, K)
        mask = torch.zeros_like(act).scatter_(1, chosen, 1.0)
        return mask * scored  # ivf: fewer than K candidates read only those

    def multiply_adds(self) -> float:
        """Multiply-adds per token of the search and the read (ivf: over the tokens seen so far)."""
        form, strategy = self.ffn.form, self.strategy
        width, units, k = form.d_model, form.units, strategy.units
        mlp = float(mlp_multiply_adds(form))
        # A read unit costs its key score (recomputed differentiably, as the memory layers do), its gate
        # key and its value.
        per_read = (width + 1) + (2 if form.gated else 1) * width
        if strategy.name in ("full", "contribution"):  # contribution needs every unit's activation
            return mlp
        if strategy.name == "gate_magnitude":
            return float(units * (width + 1) + k * per_read)
        if strategy.name == "lowrank":  # estimate every unit, then score the chosen keys exactly and read
            estimated = 2 if form.gated else 1
            return float(estimated * strategy.rank * (width + 1 + units) + k * per_read)
        scored = self.scored / max(1, self.tokens)
        return float((strategy.lists + scored) * (width + 1) + k * per_read)


def _low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix (U, D) ≈ (x ↦ x @ A) @ B.T`` with ``A (D, r)``, ``B (U, r)`` from a truncated SVD."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    rank = min(rank, len(s))
    return vh[:rank].T.float(), (u[:, :rank] * s[:rank]).float()


def parse_strategies(units: list[int], ranks: list[int], ivf: list[str]) -> list[Strategy]:
    """The study's strategies: the full MLP, then per K: gate_magnitude, contribution, lowrank per rank and
    ivf per ``lists:probes``."""
    strategies = [Strategy("full", 0)]
    for k in units:
        strategies += [Strategy("gate_magnitude", k), Strategy("contribution", k)]
        strategies += [Strategy("lowrank", k, rank=r) for r in ranks]
        for spec in ivf:
            try:
                lists, probes = (int(part) for part in spec.split(":"))
            except ValueError as error:
                raise ValueError(f"--ivf {spec!r}: expected LISTS:PROBES, e.g. 64:8") from error
            strategies.append(Strategy("ivf", k, lists=lists, probes=probes))
    return strategies


def study(
    model: nn.Module,
    texts: dict[str, list[str]],
    tokenizer: Any,
    strategies: list[Strategy],
    window: int,
    stride: int,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Perplexity per source of ``model`` with every block's MLP read under each strategy, and the
    multiply-adds per token over the MLP's (mean over blocks); ``model`` is left as it was."""
    from dmt.evaluation.perplexity import perplexity
    from dmt.model.families import get_mlp, mlp_weights, num_blocks, set_mlp

    blocks = range(num_blocks(model))
    originals = {i: get_mlp(model, i) for i in blocks}
    weights = {i: mlp_weights(model, i) for i in blocks}
    rows: list[dict[str, Any]] = []
    try:
        for strategy in strategies:
            started = time.perf_counter()
            budgets = {i: UnitBudgetMLP(weights[i], strategy) for i in blocks}
            for i, module in budgets.items():
                set_mlp(model, i, module)
            with torch.no_grad():
                ppl = {
                    source: perplexity(model, tokenizer, docs, window, stride, batch_size)["perplexity"]
                    for source, docs in texts.items()
                }
            form = weights[0].form
            mlp = mlp_multiply_adds(form)
            cost = sum(module.multiply_adds() for module in budgets.values()) / len(budgets)
            rows.append(
                {
                    "strategy": strategy.label,
                    "units": strategy.units or form.units,
                    "multiply_adds_per_token": cost,
                    "mlp_fraction": cost / mlp,
                    "perplexity": ppl,
                    "seconds": time.perf_counter() - started,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for i, module in originals.items():
            set_mlp(model, i, module)
    full = rows[0]["perplexity"] if rows and strategies[0].name == "full" else None
    for row in rows:
        if full is not None:
            row["ratio"] = {source: row["perplexity"][source] / full[source] for source in full}
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per strategy, perplexity ÷ the full MLP's per source."""
    sources = list(rows[0]["perplexity"])
    lines = [
        "| strategy | units read | multiply-adds ÷ MLP | "
        + " | ".join(f"{s} ÷ full" for s in sources)
        + " |",
        "|---|---|---|" + "---|" * len(sources),
    ]
    for row in rows:
        ratios = row.get("ratio", {})
        cells = " | ".join(f"{ratios[s]:.3f}" if s in ratios else "–" for s in sources)
        lines.append(f"| {row['strategy']} | {row['units']} | {row['mlp_fraction']:.3f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.unit_budget", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for results.{md,json}")
    parser.add_argument("--units", type=int, nargs="+", default=[768, 512, 384, 256], help="K per token")
    parser.add_argument("--rank", type=int, nargs="*", default=[128], help="lowrank predictor ranks")
    parser.add_argument("--ivf", nargs="*", default=["64:16"], help="ivf LISTS:PROBES settings")
    parser.add_argument("--sources", nargs="*", default=None, help="held-out sources (default: all)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the distill config (after --)")
    args = parser.parse_args(argv)
    overrides = args.overrides

    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    import dmt.config  # noqa: F401  (registers the ${pkg:...} resolver)
    from dmt.model.loading import load_teacher, load_tokenizer

    with initialize_config_module("dmt.conf", version_base="1.3"):
        cfg = compose("distill", overrides=overrides)
    strategies = parse_strategies(args.units, args.rank, args.ivf)
    tokenizer = load_tokenizer(cfg.teacher)
    texts = instantiate(cfg.data, tokenizer=tokenizer).heldout_texts()
    if args.sources is not None:
        unknown = sorted(set(args.sources) - set(texts))
        if unknown:
            raise SystemExit(
                f"--sources: {unknown} are not held-out sources of this data config: {sorted(texts)}"
            )
        texts = {source: texts[source] for source in args.sources}
    if not texts:
        raise SystemExit("the data config has no held-out sources: use data=broad")
    model = load_teacher(cfg.teacher)
    rows = study(
        model, texts, tokenizer, strategies, cfg.evaluate.window, cfg.evaluate.stride, cfg.evaluate.batch_size
    )
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.unit_budget " + " ".join(argv)
    tokens = {source: sum(len(tokenizer(doc)["input_ids"]) for doc in docs) for source, docs in texts.items()}
    (args.out / "results.json").write_text(
        json.dumps({"command": command, "overrides": overrides, "tokens": tokens, "rows": rows}, indent=2)
        + "\n"
    )
    table = format_table(rows)
    (args.out / "results.md").write_text(f"`{command}`\n\nHeld-out tokens: {tokens}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
