"""Spatial niche tasks (Nicheformer's, on any backbone): region / niche classification,
neighbourhood cell-type composition and neighbour density, from a cell's own tokens, optionally
with its neighbourhood's context.

Targets come from :mod:`cellfoundry.data.spatial` on a radius graph built within each section
(``section_key``): ``region`` is an obs label (cross-entropy, macro-F1); ``composition`` the
fractions of each cell type among the neighbours within the radius (softmax head trained with
cross-entropy against the fractions, scored by MSE and per-type Pearson); ``density`` the
neighbours within the radius (regression on log1p of the count, scored by MSE on that scale;
written as neighbours per unit area, or volume for 3-D coordinates).

``neighbor_context``: the head also reads the mean pooled vector of the cell's spatial
neighbours, taken from the frozen *base* encoder (mean pooling), both in training and at
prediction, so the context does not depend on which cells share a batch. Measured with and
without it (``benchmarks/finetune_niche.py``).

Splits: the runner's ``holdout`` split with ``batch_key`` = the section column holds out whole
sections (train on some sections, test on another). Baselines fitted on the training cells in
the same run: logistic / ridge regression on PCA of each cell's own expression, the same on
PCA of neighbourhood-averaged expression (the classic spatial baseline), kNN on PCA, and the
majority class / training mean. A region label from the cell's own tokens is the one target
that needs no coordinates (dissociated cells with inferred zones, e.g. intestinal villus zones);
the neighbourhood baseline and context are then absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from cellfoundry.data.spatial import SPATIAL_KEY
from cellfoundry.tasks.base import Task, TaskConfig, TaskOutput, register_task
from cellfoundry.tasks.heads import FixedWhitening

TARGETS = ("region", "composition", "density")
PREDICTION_KEY = "cellfoundry_niche"
BOOTSTRAP_DRAWS = 300


@dataclass
class NicheConfig(TaskConfig):
    """Niche head settings (see :class:`TaskConfig` for the shared fields).

    Parameters
    ----------
    target : {"region", "composition", "density"}
        What the head predicts (see the module docstring).
    label_key : str
        obs column of region labels (``region``) or of cell types (``composition``).
    section_key : str or None
        obs column of sections: graphs never join cells of different sections.
    radius : float or None
        Neighbourhood radius in coordinate units; ``None``: the median distance to the 10th
        nearest neighbour (set by the runner and saved).
    dimensions : int
        2 or 3: the coordinates' dimensions (set by the runner; density is per area or volume).
    neighbor_context : bool
        Add the frozen base encoder's mean neighbour vector to the head's input.
    labels : list of str
        Region classes or cell types (set from the training cells).
    """

    task: ClassVar[str] = "niche"
    target: str = "region"
    label_key: str = "region"
    section_key: str | None = "section"
    radius: float | None = None
    dimensions: int = 2
    neighbor_context: bool = False
    labels: list[str] = field(default_factory=list)
    head_hidden_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r}; use one of {TARGETS}.")

    @property
    def n_outputs(self) -> int:
        return 1 if self.target == "density" else len(self.labels)


class NicheHead(nn.Module):
    """Whitened cell vector (+ whitened neighbour vector) -> MLP -> class logits, composition
    logits or log1p of the neighbour count."""

    def __init__(self, config: NicheConfig, hidden_size: int) -> None:
        super().__init__()
        if config.target != "density" and len(config.labels) < 2:
            raise ValueError(
                f"The {config.target} head needs at least 2 labels, got {config.labels}; check "
                "label_key and the split."
            )
        self.target = config.target
        self.whitening = FixedWhitening(hidden_size)
        self.neighbor_whitening = FixedWhitening(hidden_size) if config.neighbor_context else None
        inputs = hidden_size * (2 if config.neighbor_context else 1)
        width = config.head_hidden_size or hidden_size
        self.dropout = nn.Dropout(config.head_dropout)
        self.mlp = nn.Sequential(
            nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, config.n_outputs)
        )

    def forward(
        self,
        vectors: torch.Tensor,
        labels: torch.Tensor | None = None,
        niche_target: torch.Tensor | None = None,
        neighbor_vector: torch.Tensor | None = None,
        **_: Any,
    ) -> TaskOutput:
        features = self.whitening(vectors)
        if self.neighbor_whitening is not None:
            if neighbor_vector is None:
                raise ValueError("This niche model reads neighbour vectors; none were given.")
            features = torch.cat([features, self.neighbor_whitening(neighbor_vector)], dim=-1)
        logits = self.mlp(self.dropout(features)).float()
        loss = None
        if self.target == "region" and labels is not None:
            loss = functional.cross_entropy(logits, labels)
        elif self.target == "composition" and niche_target is not None:
            loss = -(niche_target * functional.log_softmax(logits, dim=-1)).sum(-1).mean()
        elif self.target == "density" and niche_target is not None:
            loss = functional.mse_loss(logits[:, 0], niche_target[:, 0])
        return TaskOutput(loss=loss, logits=logits, embeddings=vectors)


def uses_graph(adata: Any, config: NicheConfig) -> bool:
    """Whether targets and baselines build the spatial graph: always when there are
    coordinates, and required for every target but a region label from the cell's own tokens
    (which can do without ``obsm["spatial"]``, e.g. villus zones inferred for dissociated
    cells; without coordinates, ``spatial_targets`` raises the clear error)."""
    needed = config.target != "region" or bool(config.neighbor_context)
    return needed or SPATIAL_KEY in adata.obsm


def spatial_graph(adata: Any, config: NicheConfig) -> tuple[Any, float]:
    """The radius graph within sections, and the radius (the config's, or the default)."""
    from cellfoundry.data.spatial import default_radius, neighbor_graph

    radius = config.radius or default_radius(adata, section_key=config.section_key)
    return neighbor_graph(adata, "radius", radius=radius, section_key=config.section_key), radius


def spatial_targets(adata: Any, config: NicheConfig) -> dict[str, Any]:
    """Graph, radius and per-cell targets of ``adata`` (every cell, every section)."""
    from cellfoundry.data.spatial import neighbor_counts, neighborhood_composition

    graph, radius = spatial_graph(adata, config)
    out: dict[str, Any] = {"graph": graph, "radius": radius}
    if config.target == "composition":
        composition = neighborhood_composition(graph, adata.obs[config.label_key])
        if config.labels:  # the training types' order; others dropped
            index = {t: i for i, t in enumerate(composition.types)}
            columns = [index.get(t, -1) for t in config.labels]
            fractions = np.zeros((adata.n_obs, len(config.labels)), dtype=np.float32)
            for j, c in enumerate(columns):
                if c >= 0:
                    fractions[:, j] = composition.fractions[:, c]
            out["values"], out["types"] = fractions, list(config.labels)
        else:
            out["values"], out["types"] = composition.fractions, composition.types
        out["usable"] = composition.has_neighbors
    elif config.target == "density":
        out["values"] = np.log1p(neighbor_counts(graph))[:, None].astype(np.float32)
        out["usable"] = np.ones(adata.n_obs, dtype=bool)
    return out


def neighbor_vectors(adata: Any, config: NicheConfig, graph: Any, **options: Any) -> np.ndarray:
    """Mean base-encoder vector (mean pooling) of each cell's neighbours (zeros: none)."""
    from cellfoundry.data.spatial import neighborhood_average
    from cellfoundry.embedding import embed

    vectors = embed(
        adata, config.base_model, pooling="mean", key_added=None, progress=False, **options
    )
    vectors = np.nan_to_num(vectors)
    return np.asarray(neighborhood_average(graph, vectors, include_self=False), np.float32)


def _pearson_per_type(predicted: np.ndarray, observed: np.ndarray) -> list[float]:
    values = []
    for j in range(observed.shape[1]):
        a, b = predicted[:, j], observed[:, j]
        with np.errstate(invalid="ignore", divide="ignore"):  # constant column: NaN
            values.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else np.nan)
    return values


def regression_scores(predicted: np.ndarray, observed: np.ndarray) -> dict[str, Any]:
    """MSE (mean over outputs) and, for several outputs, per-output and mean Pearson."""
    scores: dict[str, Any] = {"mse": float(np.mean((predicted - observed) ** 2))}
    if observed.shape[1] > 1:
        per_type = _pearson_per_type(predicted, observed)
        scores["per_type_pearson"] = per_type
        scores["mean_pearson"] = float(np.nanmean(per_type)) if np.isfinite(per_type).any() else 0.0
    return scores


@register_task
class NicheTask(Task):
    name = "niche"
    config_class = NicheConfig

    @classmethod
    def build_head(cls, config: TaskConfig, hidden_size: int) -> nn.Module:
        return NicheHead(config, hidden_size)

    @classmethod
    @torch.no_grad()
    def prepare_head(cls, model: nn.Module, loader: Any) -> None:
        """Whitening of the cell vectors (and of the neighbour vectors) from training cells."""
        super().prepare_head(model, loader)
        if model.head.neighbor_whitening is not None:
            vectors = torch.cat([batch["neighbor_vector"] for batch in loader])
            model.head.neighbor_whitening.fit(vectors, ridge=model.config.whitening_ridge)

    @classmethod
    @torch.no_grad()
    def evaluate(cls, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Validation loss (and macro-F1 for regions)."""
        from cellfoundry.evaluation import macro_f1

        model.eval()
        losses, predicted, truth = [], [], []
        for batch in loader:
            output = model(**batch)
            losses.append(float(accelerator.gather_for_metrics(output.loss[None]).mean()))
            if "labels" in batch:
                predicted.append(output.logits.argmax(1).cpu().numpy())
                truth.append(batch["labels"].cpu().numpy())
        model.train()
        figures = {"eval_loss": float(np.mean(losses))}
        if truth:
            figures["eval_macro_f1"] = macro_f1(np.concatenate(truth), np.concatenate(predicted))
        return figures

    @classmethod
    def head_inputs(cls, adata: Any, model: Any, **options: Any) -> dict[str, np.ndarray]:
        """Neighbour vectors of every cell of ``adata`` when the head reads them."""
        config = model.config
        if not config.neighbor_context:
            return {}
        graph, _ = spatial_graph(adata, config)  # needs coordinates only, not the labels
        return {"neighbor_vector": neighbor_vectors(adata, config, graph, **options)}

    @classmethod
    def write_predictions(
        cls, adata: Any, config: TaskConfig, outputs: dict[str, Any]
    ) -> dict[str, Any]:
        """Regions: ``obs["cellfoundry_niche"]``; composition: ``obsm`` fractions (cells, T);
        density: ``obs`` neighbours per unit area (volume in 3-D). NaN where a cell was not
        tokenized."""
        import pandas as pd

        valid, logits = outputs["valid"], outputs["logits"]
        if config.target == "region":
            codes = np.full(valid.size, -1, dtype=np.int64)
            codes[valid] = logits.argmax(axis=1)
            labels = pd.Categorical.from_codes(codes, categories=list(config.labels))
            if hasattr(adata, "obs"):
                adata.obs[PREDICTION_KEY] = labels
            return {"labels": labels}
        if config.target == "composition":
            fractions = np.full((valid.size, len(config.labels)), np.nan, dtype=np.float32)
            fractions[valid] = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
            if hasattr(adata, "obsm"):
                adata.obsm[f"{PREDICTION_KEY}_composition"] = fractions
                adata.uns[f"{PREDICTION_KEY}_types"] = list(config.labels)
            return {"composition": fractions}
        from cellfoundry.data.spatial import neighborhood_size

        neighbors = np.full(valid.size, np.nan, dtype=np.float32)
        neighbors[valid] = np.expm1(logits[:, 0])
        density = neighbors / neighborhood_size(config.radius, config.dimensions)
        if hasattr(adata, "obs"):
            adata.obs[f"{PREDICTION_KEY}_density"] = density
        return {"density": density, "neighbors": neighbors}

    # -- fine-tuning runner hooks ----------------------------------------------------------
    @classmethod
    def add_targets(
        cls, dataset: Any, obs: Any, config: TaskConfig, args: Any, train_obs: Any, **extra: Any
    ) -> tuple[Any, list[str]]:
        """Labels / composition / density of every cell, and neighbour vectors if asked."""
        adata = extra["adata"]
        if config.label_key not in adata.obs.columns:
            raise ValueError(
                f"No obs column {config.label_key!r} (columns: {list(adata.obs.columns)}); "
                "set task.label_key to the region labels or cell types."
            )
        if not config.labels and config.target != "density":
            config.labels = sorted(train_obs[config.label_key].astype(str).unique())
        targets: dict[str, Any] = {}
        if uses_graph(adata, config):
            targets = spatial_targets(adata, config)
            config.radius = float(targets["radius"])
            config.dimensions = int(adata.obsm[SPATIAL_KEY].shape[1])
        rows = np.asarray(dataset["row"], dtype=np.int64)
        columns: list[str] = []
        if config.target == "region":
            lookup = {label: code for code, label in enumerate(config.labels)}
            values = obs[config.label_key].astype(str).to_numpy()
            codes = np.array([lookup.get(v, -1) for v in values], dtype=np.int64)
            dataset, columns = dataset.add_column("labels", codes), ["labels"]
        else:
            values = targets["values"][rows]
            dataset = dataset.add_column("niche_target", values.tolist())
            columns = ["niche_target"]
        if config.neighbor_context:
            vectors = neighbor_vectors(
                adata, config, targets["graph"], allow_normalized=args.allow_normalized
            )
            dataset = dataset.add_column("neighbor_vector", vectors[rows].tolist())
            columns.append("neighbor_vector")
        return dataset, columns

    @classmethod
    def fit_config(cls, config: TaskConfig, dataset: Any, train_positions: np.ndarray) -> None:
        """Nothing beyond what ``add_targets`` set."""

    @classmethod
    def score_test(
        cls, model: nn.Module, train_adata: Any, test_adata: Any, args: Any, **extra: Any
    ) -> dict[str, Any]:
        """Test cells (held-out section) beside the baselines fitted on the training cells."""
        from cellfoundry.tasks.predict import predict

        config, adata = model.config, extra["adata"]
        written = predict(test_adata, model, progress=False, allow_normalized=args.allow_normalized)
        baselines = niche_baselines(adata, train_adata, test_adata, config, args.seed)
        if config.target == "region":
            truth = test_adata.obs[config.label_key].astype(str).to_numpy()
            ours = np.asarray(written["labels"].astype(str))
            return classification_comparison(truth, ours, baselines["predictions"], args.seed)
        observed = baselines["observed"]
        if config.target == "density":  # compare on the log1p(count) scale trained on
            ours = np.log1p(written["neighbors"])[:, None]
        else:
            ours = written["composition"]
        return regression_comparison(
            observed, ours, baselines["predictions"], baselines["usable"], args.seed
        )

    @classmethod
    def card_metrics(cls, metrics: dict[str, Any], args: Any) -> dict[str, Any]:
        from cellfoundry.tasks.card import comparison_rows

        split = metrics["split"]
        rows = comparison_rows(f"niche, {split['test']} test cells ({split['strategy']})", metrics)
        training = (
            f"`{Path(args.data).name}`, split {split['strategy']} by `{args.batch_key}`: "
            f"{split['train']} training / {split['test']} test cells; {args.max_steps} steps "
            f"of {args.batch_size} cells, learning rate {args.learning_rate}."
        )
        return {"rows": rows, "training": training}


def niche_baselines(
    adata: Any, train_adata: Any, test_adata: Any, config: NicheConfig, seed: int = 0
) -> dict[str, Any]:
    """Baseline predictions for the test cells, fitted on the training cells only.

    Features: PCA (fitted on training cells) of log1p-normalised HVGs of each cell, and of the
    same values averaged over the cell and its neighbours (graph on all cells, within
    sections). Models: logistic regression (classes) / ridge (targets), kNN, and the majority
    class / training mean.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

    from cellfoundry.data.spatial import neighborhood_average
    from cellfoundry.evaluation.baselines import log_input, log_normalize, seurat_hvg

    spatial = uses_graph(adata, config)
    targets = spatial_targets(adata, config) if spatial else {}
    index = {name: i for i, name in enumerate(adata.obs_names)}
    train = np.array([index[n] for n in train_adata.obs_names])
    test = np.array([index[n] for n in test_adata.obs_names])
    logged = log_normalize(*log_input(adata))
    genes = seurat_hvg(logged[train], 2000)
    own = logged[:, genes]
    own = own.toarray() if hasattr(own, "toarray") else np.asarray(own)
    inputs = {"own": own}
    if spatial:  # without coordinates there is no neighbourhood to average over
        inputs["neighbourhood"] = np.asarray(neighborhood_average(targets["graph"], own))
    features = {}
    for name, values in inputs.items():
        pca = PCA(n_components=min(50, len(genes), train.size - 1), random_state=seed)
        pca.fit(values[train])
        features[name] = (pca.transform(values[train]), pca.transform(values[test]))
    out: dict[str, Any] = {"predictions": {}}
    if config.target == "region":
        y = adata.obs[config.label_key].astype(str).to_numpy()
        for name, (x_train, x_test) in features.items():
            model = LogisticRegression(max_iter=2000, C=1.0)
            out["predictions"][f"logistic regression (PCA, {name})"] = model.fit(
                x_train, y[train]
            ).predict(x_test)
        knn = KNeighborsClassifier(n_neighbors=15).fit(features["own"][0], y[train])
        out["predictions"]["kNN (PCA, own)"] = knn.predict(features["own"][1])
        values, counts = np.unique(y[train], return_counts=True)
        out["predictions"]["majority class"] = np.full(test.size, values[counts.argmax()])
        return out
    y = targets["values"]
    usable = targets["usable"]
    fit = train[usable[train]]
    position = {row: i for i, row in enumerate(train)}
    fit_rows = np.array([position[r] for r in fit])
    for name, (x_train, x_test) in features.items():
        ridge = Ridge(alpha=1.0).fit(x_train[fit_rows], y[fit])
        out["predictions"][f"ridge (PCA, {name})"] = ridge.predict(x_test)
    knn = KNeighborsRegressor(n_neighbors=15).fit(features["own"][0][fit_rows], y[fit])
    out["predictions"]["kNN (PCA, own)"] = knn.predict(features["own"][1])
    out["predictions"]["training mean"] = np.repeat(y[fit].mean(0, keepdims=True), test.size, 0)
    out["observed"], out["usable"] = y[test], usable[test]
    return out


def classification_comparison(
    truth: np.ndarray, ours: np.ndarray, baselines: dict[str, np.ndarray], seed: int
) -> dict[str, Any]:
    """Macro-F1 / accuracy of the model and the baselines, and the model minus the best with
    a paired bootstrap over test cells."""
    from cellfoundry.evaluation import accuracy, macro_f1, paired_bootstrap, per_class_f1
    from cellfoundry.evaluation.classification import verdict

    def entry(labels):
        return {
            "macro_f1": macro_f1(truth, labels),
            "accuracy": accuracy(truth, labels),
            "per_class_f1": per_class_f1(truth, labels),
        }

    scores: dict[str, Any] = {
        "n_cells": int(truth.size),
        "model": entry(ours),
        "baselines": {name: entry(labels) for name, labels in baselines.items()},
        "comparison": {},
    }
    for metric in ("macro_f1", "accuracy"):
        best = max(baselines, key=lambda b: scores["baselines"][b][metric])
        value, (low, high) = paired_bootstrap(truth, ours, baselines[best], metric, seed=seed)
        scores["comparison"][metric] = {
            "best_baseline": best,
            "difference": value,
            "ci95": [low, high],
            "verdict": verdict(low, high),
        }
        scores[metric] = scores["model"][metric]
    return scores


def regression_comparison(
    observed: np.ndarray,
    ours: np.ndarray,
    baselines: dict[str, np.ndarray],
    usable: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """MSE (and mean per-type Pearson) over the usable test cells, with a paired bootstrap
    over cells of the model minus the best baseline."""
    from cellfoundry.evaluation.classification import verdict

    observed, ours = observed[usable], ours[usable]
    baselines = {name: values[usable] for name, values in baselines.items()}
    scores: dict[str, Any] = {
        "n_cells": int(usable.sum()),
        "model": regression_scores(ours, observed),
        "baselines": {name: regression_scores(p, observed) for name, p in baselines.items()},
        "comparison": {},
    }
    metrics = ["mse"] + (["mean_pearson"] if observed.shape[1] > 1 else [])
    rng = np.random.default_rng(seed)
    for metric in metrics:
        lower = metric == "mse"
        sign = -1 if lower else 1
        best = max(baselines, key=lambda b: sign * scores["baselines"][b][metric])
        draws = []
        for _ in range(BOOTSTRAP_DRAWS):
            rows = rng.integers(0, observed.shape[0], observed.shape[0])
            a = regression_scores(ours[rows], observed[rows])[metric]
            b = regression_scores(baselines[best][rows], observed[rows])[metric]
            draws.append(a - b)
        low, high = np.nanpercentile(draws, [2.5, 97.5])
        scores["comparison"][metric] = {
            "best_baseline": best,
            "difference": scores["model"][metric] - scores["baselines"][best][metric],
            "ci95": [float(low), float(high)],
            "verdict": verdict(float(low), float(high), lower_is_better=lower),
        }
        scores[metric] = scores["model"][metric]
    return scores
