"""Supervised perturbation response: predict how a group of cells' expression changes under a
perturbation from its control cells (the scGen setting: a cell type or cluster whose perturbed
state was never seen).

The head reads a control cell's pooled vector and a learned perturbation vector and predicts the
change of mean log1p-normalised expression, over the response genes, that the cell's group
shows under that perturbation. Targets are group-level (perturbed and control cells are not
paired in scRNA-seq): every training control cell of group ``g`` learns
``mean(perturbed cells of g) - mean(control cells of g)``. The held-out group's prediction is
its control mean plus the mean predicted change of its control cells.

Splits: the runner's ``holdout`` split with ``label_key`` = the condition column,
``drop_labels`` = the perturbed conditions and ``batch_key`` = the group column: training and
validation are the control cells of the other groups, test the held-out group's control cells.
Its perturbed cells are read only by ``score_test``, as the truth.

Scores (:func:`cellfoundry.evaluation.perturbation_metrics`) stand beside the baselines of
:mod:`cellfoundry.evaluation.response_baselines`, fitted on the training groups in the same run,
with a paired bootstrap over the held-out group's cells.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from cellfoundry.tasks.base import Task, TaskConfig, TaskOutput, register_task
from cellfoundry.tasks.heads import FixedWhitening

RESPONSE_KEY = "cellfoundry_response"
GENES_KEY = "cellfoundry_response_genes"
BOOTSTRAP_DRAWS = 200


@dataclass
class PerturbationConfig(TaskConfig):
    """Response head settings (see :class:`TaskConfig` for the shared fields).

    Parameters
    ----------
    condition_key, control_value : str
        ``obs`` column of each cell's condition and the value of control cells.
    group_key : str
        ``obs`` column of the groups (cell types / clusters) whose responses are learned.
    perturbations, genes, groups : list of str
        Perturbed conditions, response genes (var names) and training groups; set from the
        training groups by the runner.
    n_genes : int
        Response genes: the most variable (Seurat HVG) in the training groups' cells.
    head_hidden_size : int
        Width of the two-layer response MLP.
    perturbation_source : {"learned", "gene_token"}
        A learned vector per perturbation (cytokines, drugs), or, for genetic perturbations,
        the pretrained encoder's token embedding of the targeted gene through a learned
        linear map: the only kind that can predict a perturbation never seen in training.
    heldout_perturbations : list of str
        Perturbations no training cell learns (the unseen-perturbation split, with
        ``perturbation_source="gene_token"``); scored at test time on the test control cells.
    perturbation_tokens : list of int
        Token of each perturbation's target gene (set by the runner for ``gene_token``).
    """

    task: ClassVar[str] = "perturbation"
    condition_key: str = "perturbation"
    control_value: str = "control"
    group_key: str = "cluster"
    perturbations: list[str] = field(default_factory=list)
    genes: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    n_genes: int = 2000
    head_hidden_size: int = 256
    perturbation_source: str = "learned"
    heldout_perturbations: list[str] = field(default_factory=list)
    perturbation_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.perturbation_source not in ("learned", "gene_token"):
            raise ValueError(
                f"perturbation_source={self.perturbation_source!r}; use 'learned' or 'gene_token'."
            )
        if self.heldout_perturbations and self.perturbation_source != "gene_token":
            raise ValueError(
                "Held-out (unseen) perturbations need perturbation_source='gene_token': a "
                "learned vector of a perturbation never trained on is meaningless."
            )


class ResponseHead(nn.Module):
    """Whiten the cell vector, add a perturbation vector (learned, or the target gene's token
    embedding through a learned linear map), MLP -> change per gene.

    Without ``perturbation_ids`` it predicts every perturbation: (B, P, G).
    """

    def __init__(self, config: PerturbationConfig, hidden_size: int) -> None:
        super().__init__()
        if not config.perturbations or not config.genes:
            raise ValueError(
                "The perturbation head needs perturbations and response genes (set by the "
                "runner from the training groups); none were found."
            )
        self.whitening = FixedWhitening(hidden_size)
        self.dropout = nn.Dropout(config.head_dropout)
        self.gene_token = config.perturbation_source == "gene_token"
        if self.gene_token:
            # filled from the encoder's input embedding by PerturbationTask.prepare_head
            self.register_buffer(
                "token_vectors", torch.zeros(len(config.perturbations), hidden_size)
            )
            self.token_norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
            self.perturbation_projection = nn.Linear(hidden_size, hidden_size)
        else:
            self.perturbation_vectors = nn.Embedding(len(config.perturbations), hidden_size)
        width = config.head_hidden_size or hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, width), nn.GELU(), nn.Linear(width, len(config.genes))
        )

    @property
    def n_perturbations(self) -> int:
        if self.gene_token:
            return self.token_vectors.shape[0]
        return self.perturbation_vectors.num_embeddings

    def perturbation_vector(self, ids: torch.Tensor) -> torch.Tensor:
        if self.gene_token:
            return self.perturbation_projection(self.token_norm(self.token_vectors[ids]))
        return self.perturbation_vectors(ids)

    def forward(
        self,
        vectors: torch.Tensor,
        perturbation_ids: torch.Tensor | None = None,
        response: torch.Tensor | None = None,
        **_: Any,
    ) -> TaskOutput:
        cells = self.dropout(self.whitening(vectors))  # (B, D)
        if perturbation_ids is None:
            n_cells, n_perturbations = cells.shape[0], self.n_perturbations
            ids = torch.arange(n_perturbations, device=cells.device).repeat(n_cells)
            cells = cells.repeat_interleave(n_perturbations, dim=0)
        else:
            ids, n_cells, n_perturbations = perturbation_ids, cells.shape[0], 1
        inputs = torch.cat([cells, self.perturbation_vector(ids)], dim=-1)
        predicted = self.mlp(inputs).view(n_cells, n_perturbations, -1)
        loss = None
        if response is not None and perturbation_ids is not None:
            loss = functional.mse_loss(predicted[:, 0].float(), response)
        return TaskOutput(loss=loss, predictions=predicted)


def _log_expression(adata: Any):
    """log1p(normalize_total 1e4) of ``adata`` (log1p of non-count values), sparse if X is."""
    from cellfoundry.evaluation.baselines import log_input, log_normalize

    return log_normalize(*log_input(adata))


def _log_normalized(adata: Any, genes: list[str]) -> np.ndarray:
    """Dense :func:`_log_expression` of the response ``genes`` only."""
    logged = _log_expression(adata)[:, adata.var_names.get_indexer(genes)]
    return np.asarray(logged.toarray() if hasattr(logged, "toarray") else logged)


def _condition_masks(adata: Any, config: PerturbationConfig) -> tuple[np.ndarray, np.ndarray]:
    from cellfoundry.data.perturbation import _conditions

    control = _conditions(adata.obs, config.condition_key, config.control_value)
    return control, adata.obs[config.group_key].astype(str).to_numpy()


def group_means(adata: Any, config: PerturbationConfig, groups: list[str]) -> dict[str, Any]:
    """Mean log1p profiles (response genes) of each group's control and perturbed cells."""
    control, group_of = _condition_masks(adata, config)
    condition = adata.obs[config.condition_key].astype(str).to_numpy()
    logged = _log_normalized(adata, config.genes)
    means: dict[str, Any] = {"control": {}, "perturbed": {}}
    for group in groups:
        in_group = group_of == group
        means["control"][group] = logged[in_group & control].mean(axis=0)
        for name in config.perturbations:
            cells = in_group & (condition == name)
            if cells.any():
                means["perturbed"][(group, name)] = logged[cells].mean(axis=0)
    return means


@register_task
class PerturbationTask(Task):
    name = "perturbation"
    config_class = PerturbationConfig

    @classmethod
    def build_head(cls, config: TaskConfig, hidden_size: int) -> nn.Module:
        return ResponseHead(config, hidden_size)

    @classmethod
    @torch.no_grad()
    def evaluate(cls, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Validation MSE of the predicted change (cells of the training groups)."""
        model.eval()
        total, count = 0.0, 0
        for batch in loader:
            output = model(**batch)
            errors = accelerator.gather_for_metrics(
                ((output.predictions[:, 0].float() - batch["response"]) ** 2).mean(dim=1)
            )
            total += float(errors.sum())
            count += len(errors)
        model.train()
        return {"eval_mse": total / max(count, 1), "eval_cells": count}

    @classmethod
    def write_predictions(
        cls, adata: Any, config: TaskConfig, outputs: dict[str, Any]
    ) -> dict[str, Any]:
        """``obsm["cellfoundry_response_<perturbation>"]``: predicted change (cells, genes) per
        perturbation, NaN rows for cells not tokenized; ``uns`` names the genes."""
        valid, predicted = outputs["valid"], outputs["predictions"]
        written = {}
        for index, name in enumerate(config.perturbations):
            change = np.full((valid.size, len(config.genes)), np.nan, dtype=np.float32)
            change[valid] = predicted[:, index]
            written[name] = change
            if hasattr(adata, "obsm"):
                adata.obsm[f"{RESPONSE_KEY}_{name}"] = change
        if hasattr(adata, "uns"):
            adata.uns[GENES_KEY] = list(config.genes)
        return {"response": written, "genes": list(config.genes)}

    # -- fine-tuning runner hooks ----------------------------------------------------------
    @classmethod
    def add_targets(
        cls, dataset: Any, obs: Any, config: TaskConfig, args: Any, train_obs: Any, **extra: Any
    ) -> tuple[Any, list[str]]:
        """Response genes, perturbations and per-cell targets from the training groups.

        Training control cells each learn one perturbation: with several, cell ``i`` learns
        the ``i mod P``-th trained perturbation (every one gets the same share of cells; held-out
        perturbations are never learned).
        """
        from cellfoundry.evaluation.baselines import seurat_hvg

        adata = extra["adata"]
        control, group_of = _condition_masks(adata, config)
        config.groups = config.groups or sorted(train_obs[config.group_key].astype(str).unique())
        in_training = np.isin(group_of, config.groups)
        condition = adata.obs[config.condition_key].astype(str).to_numpy()
        if not config.perturbations:
            config.perturbations = sorted(set(condition[in_training & ~control]))
        if not config.perturbations:
            raise ValueError("The training groups hold no perturbed cells to learn from.")
        unknown = sorted(set(config.heldout_perturbations) - set(config.perturbations))
        if unknown:
            raise ValueError(
                f"Held-out perturbation(s) {unknown} are not among the perturbations "
                f"{config.perturbations}."
            )
        trained = [p for p in config.perturbations if p not in config.heldout_perturbations]
        if not trained:
            raise ValueError("Every perturbation is held out: none is left to train on.")
        if config.perturbation_source == "gene_token" and not config.perturbation_tokens:
            config.perturbation_tokens = target_tokens(config.perturbations, extra["tokenizer"])
        if not config.genes:
            # sparse when X is: seurat_hvg never densifies every gene of every training cell
            chosen = seurat_hvg(_log_expression(adata[in_training]), config.n_genes)
            config.genes = [str(g) for g in adata.var_names[chosen]]
        means = group_means(adata, config, config.groups)
        group_values = obs[config.group_key].astype(str).to_numpy()
        order = [config.perturbations.index(p) for p in trained]
        perturbation_ids = np.asarray(order)[np.arange(len(obs)) % len(trained)]
        zeros = np.zeros(len(config.genes), dtype=np.float32)
        response = []
        for group, index in zip(group_values, perturbation_ids, strict=True):
            key = (group, config.perturbations[index])
            if key in means["perturbed"]:
                response.append(
                    (means["perturbed"][key] - means["control"][group]).astype(np.float32)
                )
            else:
                response.append(zeros)
        dataset = dataset.add_column("perturbation_ids", perturbation_ids.tolist())
        dataset = dataset.add_column("response", [r.tolist() for r in response])
        return dataset, ["perturbation_ids", "response"]

    @classmethod
    def fit_config(cls, config: TaskConfig, dataset: Any, train_positions: np.ndarray) -> None:
        """Nothing beyond what ``add_targets`` set."""

    @classmethod
    @torch.no_grad()
    def prepare_head(cls, model: nn.Module, loader: Any) -> None:
        """Whitening from the training cells; for ``gene_token``, copy each target gene's input
        embedding from the starting encoder (fixed from then on, a buffer saved with the head)."""
        super().prepare_head(model, loader)
        head = model.head
        if head.gene_token:
            embedding = model.backbone.get_input_embeddings().weight
            tokens = torch.tensor(model.config.perturbation_tokens, device=embedding.device)
            head.token_vectors.copy_(embedding[tokens].to(head.token_vectors))

    @classmethod
    def score_test(
        cls, model: nn.Module, train_adata: Any, test_adata: Any, args: Any, **extra: Any
    ) -> dict[str, Any]:
        """Predicted vs observed response of the held-out group, beside the five baselines."""
        from cellfoundry.evaluation.perturbation import METRICS
        from cellfoundry.tasks.predict import predict

        config, adata = model.config, extra["adata"]
        if config.heldout_perturbations:
            return score_unseen_perturbations(model, test_adata, args, adata)
        held = sorted(set(test_adata.obs[config.group_key].astype(str)))
        if len(held) != 1:
            raise ValueError(f"The test cells span groups {held}; hold out exactly one group.")
        control, group_of = _condition_masks(adata, config)
        condition = adata.obs[config.condition_key].astype(str).to_numpy()
        written = predict(
            test_adata, model, progress=False, allow_normalized=args.allow_normalized
        )["response"]
        if (test_adata.obs[config.condition_key].astype(str) != config.control_value).any():
            raise ValueError(
                "The test cells must be the held-out group's control cells; drop the perturbed "
                f"conditions from the split (drop_labels) and use label_key={config.condition_key}."
            )
        logged = _log_normalized(adata, config.genes)
        first_name = config.perturbations[0]
        valid = ~np.isnan(written[first_name]).any(axis=1)
        held_control = _log_normalized(test_adata, config.genes)[valid]
        scores: dict[str, Any] = {"heldout_group": held[0], "perturbations": {}}
        for name in config.perturbations:
            observed_cells = logged[(group_of == held[0]) & (condition == name)]
            if observed_cells.shape[0] == 0:
                continue
            change = written[name][valid]
            train_groups = [g for g in config.groups if g != held[0]]
            predictors = response_predictors(
                logged, group_of, condition, control, train_groups, name
            )
            entry = compare_responses(predictors, held_control, observed_cells, change, args.seed)
            scores["perturbations"][name] = entry
        first = next(iter(scores["perturbations"].values()))
        for metric in METRICS:
            scores[metric] = first["model"][metric]
        return scores

    @classmethod
    def card_metrics(cls, metrics: dict[str, Any], args: Any) -> dict[str, Any]:
        """Card rows: each metric of each perturbation beside its best baseline."""
        from cellfoundry.tasks.card import comparison_rows

        held = metrics.get("heldout_group")
        where = f"held-out group {held}" if held else "unseen perturbation"
        rows = [
            row
            for name, entry in metrics["perturbations"].items()
            for row in comparison_rows(f"response to {name}, {where}", entry)
        ]
        training = (
            f"`{Path(args.data).name}`, condition `{args.label_key}`, "
            + (f"groups `{args.batch_key}` (held out: {held}); " if held else "")
            + f"{args.max_steps} steps of {args.batch_size} cells, learning rate "
            f"{args.learning_rate}."
        )
        return {"rows": rows, "training": training}


def response_predictors(
    logged: np.ndarray,
    group_of: np.ndarray,
    condition: np.ndarray,
    control: np.ndarray,
    train_groups: list[str],
    perturbation: str,
) -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """Each method as ``f(held-out control mean, mean predicted change) -> profile``, fitted on
    the training groups that hold both conditions (the model ignores nothing: its profile is
    the control mean plus its own predicted change)."""
    from cellfoundry.evaluation.response_baselines import (
        additive_shift,
        latent_arithmetic_predictor,
        linear_on_pca,
        train_mean,
    )

    treated = condition == perturbation
    usable = [g for g in train_groups if ((group_of == g) & treated).any()]
    if not usable:
        raise ValueError(f"No training group has {perturbation!r} cells to learn a response.")
    train_control = np.array([logged[(group_of == g) & control].mean(0) for g in usable])
    train_perturbed = np.array([logged[(group_of == g) & treated].mean(0) for g in usable])
    in_train = np.isin(group_of, usable)
    latent = latent_arithmetic_predictor(logged[in_train & control], logged[in_train & treated])
    fixed_mean = train_mean(train_perturbed)
    return {
        "model": lambda m, change: m + change,
        "no change": lambda m, change: m,
        "train mean": lambda m, change: fixed_mean,
        "additive": lambda m, change: additive_shift(m[None], train_control, train_perturbed),
        "linear on PCA": lambda m, change: linear_on_pca(train_control, train_perturbed, m),
        "latent arithmetic (PCA)": lambda m, change: latent(m),
    }


def compare_responses(
    predictors: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]],
    held_control: np.ndarray,
    observed_cells: np.ndarray,
    change: np.ndarray,
    seed: int = 0,
    draws: int = BOOTSTRAP_DRAWS,
) -> dict[str, Any]:
    """Metrics of every method, and the model minus the best baseline with a paired bootstrap.

    ``change`` holds the model's predicted change for each held-out control cell (same rows as
    ``held_control``). Each draw resamples the held-out control cells (with their predicted
    changes) and its perturbed cells, and recomputes every profile and the truth from them.
    """
    from cellfoundry.evaluation.classification import verdict
    from cellfoundry.evaluation.perturbation import LOWER_IS_BETTER, METRICS, perturbation_metrics

    def profiles(control_cells: np.ndarray, changes: np.ndarray) -> dict[str, np.ndarray]:
        mean = control_cells.mean(0)
        return {name: f(mean, changes.mean(0)) for name, f in predictors.items()}

    def scored(control_cells, changes, perturbed_cells) -> dict[str, dict[str, float]]:
        control_mean, observed = control_cells.mean(0), perturbed_cells.mean(0)
        return {
            name: perturbation_metrics(profile, observed, control_mean)
            for name, profile in profiles(control_cells, changes).items()
        }

    values = scored(held_control, change, observed_cells)
    entry: dict[str, Any] = {
        "n_control": int(held_control.shape[0]),
        "n_perturbed": int(observed_cells.shape[0]),
        "model": values.pop("model"),
        "baselines": values,
        "comparison": {},
    }
    best = {}
    for metric in METRICS:
        sign = -1 if metric in LOWER_IS_BETTER else 1
        finite = {k: v[metric] for k, v in values.items() if np.isfinite(v[metric])}
        best[metric] = max(finite, key=lambda k: sign * finite[k])
    rng = np.random.default_rng(seed)
    differences: dict[str, list[float]] = {metric: [] for metric in METRICS}
    for _ in range(draws):
        pick_c = rng.integers(0, held_control.shape[0], held_control.shape[0])
        pick_p = rng.integers(0, observed_cells.shape[0], observed_cells.shape[0])
        draw = scored(held_control[pick_c], change[pick_c], observed_cells[pick_p])
        for metric in METRICS:
            differences[metric].append(draw["model"][metric] - draw[best[metric]][metric])
    for metric in METRICS:
        value = entry["model"][metric] - values[best[metric]][metric]
        low, high = np.nanpercentile(differences[metric], [2.5, 97.5])
        entry["comparison"][metric] = {
            "best_baseline": best[metric],
            "difference": float(value),
            "ci95": [float(low), float(high)],
            "verdict": verdict(low, high, lower_is_better=metric in LOWER_IS_BETTER),
        }
    return entry


def target_tokens(perturbations: list[str], tokenizer: Any) -> list[int]:
    """Token id of each perturbation's target gene (perturbations named by gene symbol or
    Ensembl id); a target outside the vocabulary is a clear error."""
    import pandas as pd

    from cellfoundry.genes import resolve_genes

    resolution = resolve_genes(pd.DataFrame(index=pd.Index(perturbations, dtype=str)))
    tokens = tokenizer.column_tokens(resolution.ensembl_ids)
    unknown = [p for p, t in zip(perturbations, tokens, strict=True) if t < 0]
    if unknown:
        raise ValueError(
            f"Unknown perturbation gene(s) {unknown}: not gene symbols or Ensembl ids in the "
            f"{tokenizer.name} vocabulary. perturbation_source='gene_token' needs each "
            "perturbation named by its target gene; use 'learned' for non-genetic ones."
        )
    return [int(t) for t in tokens]


def gene_pca_predictor(
    all_genes: np.ndarray,
    gene_names: list[str],
    control: np.ndarray,
    train_changes: dict[str, np.ndarray],
    n_comps: int = 10,
    alpha: float = 1.0,
) -> Callable[[str], np.ndarray | None]:
    """Ahlmann-Eltze et al.'s linear baseline for unseen genetic perturbations: a ridge map
    from the target gene's PCA embedding (its loadings on the principal components of the
    control cells' log1p values over every measured gene, ``all_genes``) to the mean change,
    fitted on the training perturbations whose target is measured. Returns ``f(target)``: the
    predicted change, or ``None`` for a target the data do not measure."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    index = {g.upper(): i for i, g in enumerate(gene_names)}
    pca = PCA(n_components=min(n_comps, all_genes.shape[1] - 1), random_state=0)
    loadings = pca.fit(all_genes[control]).components_.T  # (genes, k)
    known = [p for p in train_changes if p.upper() in index]
    if len(known) < 2:
        return lambda target: None
    x = np.array([loadings[index[p.upper()]] for p in known])
    model = Ridge(alpha=alpha).fit(x, np.array([train_changes[p] for p in known]))

    def predict(target: str) -> np.ndarray | None:
        row = index.get(target.upper())
        return None if row is None else model.predict(loadings[row][None])[0]

    return predict


def score_unseen_perturbations(model: nn.Module, test_adata: Any, args: Any, adata: Any) -> dict:
    """Each held-out perturbation's predicted profile on the test control cells vs its observed
    cells (all groups), beside no change, train mean and the gene-PCA linear baseline."""
    from cellfoundry.evaluation.perturbation import METRICS
    from cellfoundry.tasks.predict import predict

    config = model.config
    if (test_adata.obs[config.condition_key].astype(str) != config.control_value).any():
        raise ValueError(
            "The test cells must be control cells; drop the perturbed conditions from the split."
        )
    control, _ = _condition_masks(adata, config)
    condition = adata.obs[config.condition_key].astype(str).to_numpy()
    every_gene = _log_expression(adata)  # once: the response genes and the gene-PCA baseline
    every_gene = np.asarray(every_gene.toarray() if hasattr(every_gene, "toarray") else every_gene)
    logged = every_gene[:, adata.var_names.get_indexer(config.genes)]
    written = predict(test_adata, model, progress=False, allow_normalized=args.allow_normalized)
    valid = ~np.isnan(written["response"][config.perturbations[0]]).any(axis=1)
    held_control = _log_normalized(test_adata, config.genes)[valid]
    trained = [p for p in config.perturbations if p not in config.heldout_perturbations]
    control_mean = logged[control].mean(0)
    train_changes = {p: logged[condition == p].mean(0) - control_mean for p in trained}
    train_profile = np.mean([logged[condition == p].mean(0) for p in trained], axis=0)
    linear = gene_pca_predictor(
        every_gene, list(adata.var_names.astype(str)), control, train_changes
    )
    scores: dict[str, Any] = {"setting": "unseen perturbations", "perturbations": {}}
    for name in config.heldout_perturbations:
        observed_cells = logged[condition == name]
        if observed_cells.shape[0] == 0:
            continue
        predictors: dict[str, Callable] = {
            "model": lambda m, change: m + change,
            "no change": lambda m, change: m,
            "train mean": lambda m, change: train_profile,
        }
        shift = linear(name)
        if shift is not None:
            predictors["linear (gene PCA)"] = lambda m, change, shift=shift: m + shift
        change = written["response"][name][valid]
        scores["perturbations"][name] = compare_responses(
            predictors, held_control, observed_cells, change, args.seed
        )
    entries = list(scores["perturbations"].values())
    for metric in METRICS:
        scores[metric] = float(np.nanmean([e["model"][metric] for e in entries]))
    return scores
