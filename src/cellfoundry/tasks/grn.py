"""Supervised GRN: a TF -> target pair classifier on contextual gene embeddings, trained (with
LoRA or fully) on the gold-standard edges of some TFs and scored on TFs it never saw.

The head reads the encoder's token vectors (``reads_tokens``): in each cell, every pair of a
training TF's token and another universe gene's token is a candidate; its label is 1 when the
gold standard (DoRothEA A-C by default) lists the edge and 0 otherwise. Each batch samples all
positive pairs (up to ``max_pairs``) and ``negatives_per_positive`` times as many negatives; a
two-layer MLP on ``[h_tf, h_target, h_tf * h_target]`` gives the logit, trained with binary
cross-entropy. A pair's score is its mean logit over the cells whose tokens hold both genes.

Splits: cells are split by the runner (``split_strategy=random``, stratified by
``label_key``, e.g. the batch column), regulators by TF: ``heldout_fraction`` of the gold
standard's regulators (seeded by ``tf_split_seed``) never label a training pair and are the
only TFs scored at test time, on the test cells, with BEELINE's metrics
(:mod:`cellfoundry.evaluation.grn`) beside Pearson, Spearman, GENIE3 and random rankings of the
same TFs on the same cells, and beside the target-degree prior (how many training TFs regulate
each target: what a classifier can learn from the labels alone), with a paired bootstrap over
held-out TFs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional

from cellfoundry.tasks.base import Task, TaskConfig, TaskOutput, register_task

RANDOM_SEEDS = (0, 1, 2)
BOOTSTRAP_DRAWS = 300
GENIE3_TREES, GENIE3_CELLS = 50, 500  # GENIE3 in minutes on 2 CPU cores (benchmarks/grn.py too)


@dataclass
class GRNConfig(TaskConfig):
    """Pair-classifier settings (see :class:`TaskConfig` for the shared fields).

    Parameters
    ----------
    gold : str
        Gold-standard CSV (``tf,target[,confidence]``), e.g. DoRothEA.
    confidence : str or None
        Confidence levels kept (``"ABC"``); ``None`` keeps every row.
    tf_list : str
        TF list, one symbol per line (Lambert et al. 2018).
    n_genes : int
        Most variable genes in the universe (plus the TFs among the 3,000 most variable).
    heldout_fraction, tf_split_seed : float, int
        Share of the gold standard's regulators held out of training, and the split's seed.
    negatives_per_positive, max_pairs : int
        Pair sampling per batch.
    genie3_baseline : bool
        Also run GENIE3 at test time (minutes on CPU).
    max_cells_scored : int or None
        Test cells (seeded subsample) the classifier and baselines are scored on.
    genes, gene_tokens, train_tfs, heldout_tfs, train_edges
        Set by the runner: the universe (symbols and token ids, -1 when not in the
        vocabulary), the TF split and the training TFs' true edges.
    """

    task: ClassVar[str] = "grn"
    gold: str = ""
    confidence: str | None = "ABC"
    tf_list: str = ""
    n_genes: int = 1000
    heldout_fraction: float = 0.3
    tf_split_seed: int = 0
    negatives_per_positive: int = 3
    max_pairs: int = 4096
    genie3_baseline: bool = True
    max_cells_scored: int | None = 2000
    head_hidden_size: int = 128
    genes: list[str] = field(default_factory=list)
    gene_tokens: list[int] = field(default_factory=list)
    train_tfs: list[str] = field(default_factory=list)
    heldout_tfs: list[str] = field(default_factory=list)
    train_edges: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction}; use a value in (0, 1).")


class PairHead(nn.Module):
    """TF-target pair logits from two contextual gene vectors (see the module docstring)."""

    reads_tokens = True

    def __init__(self, config: GRNConfig, hidden_size: int) -> None:
        super().__init__()
        if not config.genes or not config.train_tfs or len(config.gene_tokens) != len(config.genes):
            raise ValueError(
                "The grn head needs the gene universe, its tokens and training TFs (set by the "
                "runner from gold=... and tf_list=...); none were found."
            )
        index = {g: i for i, g in enumerate(config.genes)}
        tokens = np.asarray(config.gene_tokens, dtype=np.int64)
        lookup = torch.full((int(max(tokens.max(), 0)) + 1,), -1, dtype=torch.long)
        for position, token in enumerate(tokens):
            if token >= 0:
                lookup[token] = position
        train_row = torch.full((len(config.genes),), -1, dtype=torch.long)
        for row, tf in enumerate(config.train_tfs):
            train_row[index[tf]] = row
        labels = torch.zeros((len(config.train_tfs), len(config.genes)), dtype=torch.int8)
        for tf, target in config.train_edges:
            labels[train_row[index[tf]], index[target]] = 1
        for row, tf in enumerate(config.train_tfs):
            labels[row, index[tf]] = -1  # no self-loops
        self.register_buffer("token_to_gene", lookup)
        self.register_buffer("train_row", train_row)
        self.register_buffer("labels", labels)
        self.negatives_per_positive = config.negatives_per_positive
        self.max_pairs = config.max_pairs
        self.dropout = nn.Dropout(config.head_dropout)
        width = config.head_hidden_size or hidden_size
        self.mlp = nn.Sequential(
            nn.LayerNorm(3 * hidden_size),
            nn.Linear(3 * hidden_size, width),
            nn.GELU(),
            nn.Linear(width, 1),
        )

    def gene_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """(B, L) universe position of each token, -1 for other genes, specials and padding."""
        inside = input_ids < self.token_to_gene.numel()
        positions = torch.where(
            inside, self.token_to_gene[input_ids.clamp(max=self.token_to_gene.numel() - 1)], -1
        )
        if attention_mask is not None:
            positions = positions.masked_fill(attention_mask == 0, -1)
        return positions

    def pair_logits(self, hidden: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Logits of (cell, TF position, target position) triples ``pairs`` (N, 3)."""
        source = hidden[pairs[:, 0], pairs[:, 1]]
        target = hidden[pairs[:, 0], pairs[:, 2]]
        features = torch.cat([source, target, source * target], dim=-1)
        return self.mlp(self.dropout(features.float())).squeeze(-1)

    def candidate_pairs(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(N, 3) triples: a token whose ``rows`` >= 0 and another universe gene's token."""
        length = positions.shape[1]
        different = ~torch.eye(length, dtype=torch.bool, device=positions.device)
        candidates = (rows >= 0)[:, :, None] & (positions >= 0)[:, None, :] & different
        return candidates.nonzero()

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> TaskOutput:
        positions = self.gene_positions(input_ids, attention_mask)
        rows = torch.where(positions >= 0, self.train_row[positions.clamp(min=0)], -1)
        pairs = self.candidate_pairs(positions, rows)
        labels = self.labels[
            rows[pairs[:, 0], pairs[:, 1]], positions[pairs[:, 0], pairs[:, 2]]
        ].long()
        generator = None
        if not self.training:  # validation figures comparable across evaluations
            generator = torch.Generator(device=hidden.device).manual_seed(0)
        positive, negative = pairs[labels == 1], pairs[labels == 0]
        n_positive = min(positive.shape[0], self.max_pairs // (1 + self.negatives_per_positive))
        n_negative = min(negative.shape[0], max(n_positive * self.negatives_per_positive, 16))

        def sample(chosen: torch.Tensor, count: int) -> torch.Tensor:
            order = torch.randperm(chosen.shape[0], generator=generator, device=hidden.device)
            return chosen[order[:count]]

        picked = torch.cat([sample(positive, n_positive), sample(negative, n_negative)])
        if picked.shape[0] == 0:  # no training TF in these cells: a zero loss with a graph
            return TaskOutput(loss=hidden.sum() * 0.0, logits=hidden.new_zeros(0))
        target = torch.cat([hidden.new_ones(n_positive), hidden.new_zeros(n_negative)])
        logits = self.pair_logits(hidden, picked)
        loss = functional.binary_cross_entropy_with_logits(logits, target.float())
        return TaskOutput(loss=loss, logits=logits)


@torch.no_grad()
def pair_classifier_edges(
    model: nn.Module,
    adata: Any,
    tfs: list[str] | None = None,
    max_cells: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> pd.DataFrame:
    """Edge table of a trained grn model: each (TF, gene) pair's mean logit over the cells of
    ``adata`` whose tokens hold both (default TFs: the held-out ones)."""
    from cellfoundry.embedding import _tokenizer_for
    from cellfoundry.grn.edges import GeneUniverse
    from cellfoundry.grn.model_scores import _batches, _cell_rows

    config, head = model.config, model.head
    tfs = [t.upper() for t in (tfs or config.heldout_tfs)]
    unknown = sorted(set(tfs) - set(config.genes))
    if unknown:
        raise ValueError(f"TF(s) {unknown} are not in the model's gene universe.")
    device = next(head.parameters()).device
    index = {g: i for i, g in enumerate(config.genes)}
    scored_row = torch.full((len(config.genes),), -1, dtype=torch.long, device=device)
    for row, tf in enumerate(tfs):
        scored_row[index[tf]] = row
    sums = torch.zeros((len(tfs), len(config.genes)), dtype=torch.float64, device=device)
    counts = torch.zeros_like(sums)
    tokenizer = _tokenizer_for(model.backbone, None)
    rows = _cell_rows(adata.n_obs, max_cells, seed)
    model.eval()
    batches = _batches(adata, model.backbone, tokenizer, rows, batch_size, config.max_length, {})
    for ids, mask, context in batches:
        ids, mask, context = ids.to(device), mask.to(device), context.to(device)
        hidden = model.encode_tokens(ids, mask, context)
        positions = head.gene_positions(ids, mask)
        tf_rows = torch.where(positions >= 0, scored_row[positions.clamp(min=0)], -1)
        pairs = head.candidate_pairs(positions, tf_rows)
        for start in range(0, pairs.shape[0], 65_536):
            part = pairs[start : start + 65_536]
            logits = head.pair_logits(hidden, part).double()
            which = (tf_rows[part[:, 0], part[:, 1]], positions[part[:, 0], part[:, 2]])
            sums.index_put_(which, logits, accumulate=True)
            counts.index_put_(which, torch.ones_like(logits), accumulate=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = (sums / counts).cpu().numpy()
    universe = GeneUniverse(np.arange(len(config.genes)), tuple(config.genes), tuple(tfs))
    return universe.edge_table(matrix)


def target_degree_edges(config: GRNConfig, universe: Any) -> pd.DataFrame:
    """The label-only baseline a supervised GRN method must beat: rank every TF's edges by how
    many training TFs regulate the target (some genes are targets of many TFs in DoRothEA), a
    prior learnable from the training edges without any expression."""
    degree = pd.Series([target for _, target in config.train_edges]).value_counts()
    row = np.array([float(degree.get(g, 0)) for g in universe.genes])
    return universe.edge_table(np.tile(row, (len(universe.tfs), 1)))


@register_task
class GRNTask(Task):
    name = "grn"
    config_class = GRNConfig

    @classmethod
    def build_head(cls, config: TaskConfig, hidden_size: int) -> nn.Module:
        return PairHead(config, hidden_size)

    @classmethod
    @torch.no_grad()
    def evaluate(cls, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Validation cross-entropy of training-TF pairs sampled (with a fixed seed) from the
        validation cells."""
        model.eval()
        losses = []
        for batch in loader:
            output = model(**batch)
            if output.logits.numel():
                losses.append(float(accelerator.gather_for_metrics(output.loss[None]).mean()))
        model.train()
        return {"eval_loss": float(np.mean(losses)) if losses else float("nan")}

    @classmethod
    def write_predictions(
        cls, adata: Any, config: TaskConfig, outputs: dict[str, Any]
    ) -> dict[str, Any]:
        raise ValueError(
            "A grn model predicts edges, not per-cell values: run `cellfoundry grn cells.h5ad "
            "edges.tsv --method classifier --model FOLDER` or pair_classifier_edges()."
        )

    # -- fine-tuning runner hooks ----------------------------------------------------------
    @classmethod
    def add_targets(
        cls, dataset: Any, obs: Any, config: TaskConfig, args: Any, train_obs: Any, **extra: Any
    ) -> tuple[Any, list[str]]:
        """Universe, TF split and training edges; the labels live in the head, not the cells."""
        from cellfoundry.evaluation.grn import gold_standard, read_edges, read_tf_list
        from cellfoundry.genes import resolve_genes
        from cellfoundry.grn.edges import gene_universe, universe_of_genes

        for name in ("gold", "tf_list"):
            path = getattr(config, name)
            if not path or not Path(path).is_file():
                raise ValueError(
                    f"task.{name}={path!r} is not a file; the grn task needs a gold-standard CSV "
                    "(gold=) and a TF list (tf_list=), e.g. from ../shared/data/grn/."
                )
        adata, tokenizer = extra["adata"], extra["tokenizer"]
        tfs = read_tf_list(config.tf_list)
        if not config.genes:
            universe = gene_universe(adata, tfs, n_genes=config.n_genes)
            config.genes = list(universe.genes)
            columns = universe.columns
        else:
            columns = universe_of_genes(adata, config.genes, []).columns
        tokens = tokenizer.column_tokens(resolve_genes(adata.var).ensembl_ids)
        config.gene_tokens = [int(tokens[c]) for c in columns]
        gold = gold_standard(read_edges(config.gold, config.confidence), config.genes, tfs)
        if not config.train_tfs:
            order = np.random.default_rng(config.tf_split_seed).permutation(len(gold.tfs))
            n_held = max(1, round(config.heldout_fraction * len(gold.tfs)))
            if n_held >= len(gold.tfs):
                raise ValueError(
                    f"Only {len(gold.tfs)} regulator(s) with a gold edge among the genes: too "
                    "few to hold some out; raise n_genes or use a larger gold standard."
                )
            config.heldout_tfs = sorted(gold.tfs[i] for i in order[:n_held])
            config.train_tfs = sorted(gold.tfs[i] for i in order[n_held:])
        train = set(config.train_tfs)
        config.train_edges = sorted([t, g] for t, g in gold.edges if t in train)
        return dataset, []

    @classmethod
    def fit_config(cls, config: TaskConfig, dataset: Any, train_positions: np.ndarray) -> None:
        """Nothing beyond what ``add_targets`` set."""

    @classmethod
    def score_test(
        cls, model: nn.Module, train_adata: Any, test_adata: Any, args: Any, **extra: Any
    ) -> dict[str, Any]:
        """Held-out TFs on the test cells: the classifier vs correlation, GENIE3 and random."""
        from cellfoundry.evaluation.grn import (
            GRN_METRICS,
            gold_standard,
            grn_scores,
            read_edges,
            tf_bootstrap_differences,
        )
        from cellfoundry.grn import correlation_edges, genie3_edges, random_edges
        from cellfoundry.grn.edges import universe_of_genes
        from cellfoundry.grn.model_scores import _cell_rows

        config = model.config
        gold = gold_standard(
            read_edges(config.gold, config.confidence), config.genes, config.heldout_tfs, "gold"
        )
        cells = test_adata[_cell_rows(test_adata.n_obs, config.max_cells_scored, args.seed)].copy()
        universe = universe_of_genes(cells, config.genes, list(gold.tfs))
        tables = {"model": [pair_classifier_edges(model, cells, list(gold.tfs))]}
        tables["Pearson"] = [correlation_edges(cells, universe, "pearson")]
        tables["Spearman"] = [correlation_edges(cells, universe, "spearman")]
        if config.genie3_baseline:
            tables["GENIE3"] = [
                genie3_edges(cells, universe, GENIE3_TREES, GENIE3_CELLS, seed=args.seed)
            ]
        tables["random"] = [random_edges(universe, seed=s) for s in RANDOM_SEEDS]
        tables["target degree (training edges)"] = [target_degree_edges(config, universe)]

        def mean_scores(items: list[pd.DataFrame]) -> dict[str, float]:
            each = [grn_scores(t, gold).to_dict() for t in items]
            return {k: float(np.mean([e[k] for e in each])) for k in each[0]}

        values = {name: mean_scores(items) for name, items in tables.items()}
        scores: dict[str, Any] = {
            "heldout_tfs": list(gold.tfs),
            "n_train_tfs": len(config.train_tfs),
            "n_test_cells": int(cells.n_obs),
            "model": values.pop("model"),
            "baselines": values,
            "comparison": {},
        }
        for metric in GRN_METRICS:
            best = max(values, key=lambda name: values[name][metric])
            difference = tf_bootstrap_differences(
                tables["model"], tables[best], gold, BOOTSTRAP_DRAWS, args.seed
            )[metric]
            scores["comparison"][metric] = {
                "best_baseline": best,
                "difference": difference["difference"],
                "ci95": [difference["ci_low"], difference["ci_high"]],
                "verdict": difference["verdict"],
            }
        for metric in GRN_METRICS:
            scores[metric] = scores["model"][metric]
        return scores

    @classmethod
    def card_metrics(cls, metrics: dict[str, Any], args: Any) -> dict[str, Any]:
        """Card rows: each BEELINE metric on held-out TFs beside the best baseline."""
        from cellfoundry.tasks.card import comparison_rows

        n_held = len(metrics["heldout_tfs"])
        rows = comparison_rows(f"GRN, {n_held} held-out TFs", metrics)
        training = (
            f"`{Path(args.data).name}`: pairs of {metrics['n_train_tfs']} training TFs; "
            f"{args.max_steps} steps of {args.batch_size} cells, learning rate "
            f"{args.learning_rate}. Scored on {metrics['n_test_cells']} test cells."
        )
        return {"rows": rows, "training": training}
