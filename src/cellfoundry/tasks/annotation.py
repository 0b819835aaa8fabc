"""Cell-type annotation: a classification head on pooled cell vectors, cross-entropy loss.

Scored by macro-F1 first (every type counts the same, so rare types are not drowned by
common ones), then accuracy and per-class F1: ``cellfoundry.evaluation``'s definitions, shared
with the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from cellfoundry.tasks.base import Task, TaskConfig, TaskOutput, register_task
from cellfoundry.tasks.heads import FixedWhitening

PREDICTION_KEY = "cellfoundry_prediction"
CONFIDENCE_KEY = "cellfoundry_confidence"
PROBABILITIES_KEY = "cellfoundry_probabilities"
CLASSES_KEY = "cellfoundry_classes"


@dataclass
class AnnotationConfig(TaskConfig):
    """Annotation head settings (see :class:`TaskConfig` for the shared fields).

    Parameters
    ----------
    labels : list of str
        Class names in output order (set from the training cells by the runner).
    label_key : str
        ``obs`` column the labels came from (``cellfoundry predict`` writes beside it).
    class_weights : list of float or None
        Per-class loss weights in ``labels`` order; ``None`` weighs every cell the same.
        The runner sets balanced weights (``n / (K * count)``) with ``balance_classes``.
    balance_classes : bool
        Compute balanced ``class_weights`` from the training cells.
    """

    task: ClassVar[str] = "annotation"
    labels: list[str] = field(default_factory=list)
    label_key: str = "cell_type"
    class_weights: list[float] | None = None
    balance_classes: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.class_weights is not None and len(self.class_weights) != len(self.labels):
            raise ValueError(
                f"class_weights has {len(self.class_weights)} entries for {len(self.labels)} "
                "labels; give one weight per label, in labels order, or null."
            )


class ClassificationHead(nn.Module):
    """Whiten (:class:`~cellfoundry.tasks.heads.FixedWhitening`, fitted on the training cells
    before training), dropout, then a linear layer (or a two-layer MLP); cross-entropy loss.

    Caveat: whitening was chosen looking at STARmap's held-out slice (see
    :mod:`cellfoundry.tasks.heads`), so STARmap figures are not clean of that choice.
    """

    def __init__(self, config: AnnotationConfig, hidden_size: int) -> None:
        super().__init__()
        if len(config.labels) < 2:
            raise ValueError(
                f"Annotation needs at least 2 labels, got {config.labels}; check the label "
                "column and the split."
            )
        n_classes = len(config.labels)
        self.whitening = FixedWhitening(hidden_size)
        self.dropout = nn.Dropout(config.head_dropout)
        if config.head_hidden_size:
            width = config.head_hidden_size
            self.classifier = nn.Sequential(
                nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, n_classes)
            )
        else:
            self.classifier = nn.Linear(hidden_size, n_classes)
        weights = None
        if config.class_weights is not None:
            weights = torch.tensor(config.class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(
        self, vectors: torch.Tensor, labels: torch.Tensor | None = None, **_: Any
    ) -> TaskOutput:
        """(B, D) cell vectors -> (B, K) logits; loss when ``labels`` (B,) are given."""
        logits = self.classifier(self.dropout(self.whitening(vectors)))
        loss = None
        if labels is not None:
            loss = functional.cross_entropy(logits.float(), labels, weight=self.class_weights)
        return TaskOutput(loss=loss, logits=logits, embeddings=vectors)


def balanced_class_weights(label_codes: np.ndarray, n_classes: int) -> list[float]:
    """``n / (K * count_k)`` (scikit-learn's "balanced"); a class absent from training gets 0."""
    counts = np.bincount(label_codes, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return [round(float(w), 6) for w in weights]


@register_task
class AnnotationTask(Task):
    name = "annotation"
    config_class = AnnotationConfig

    @classmethod
    def build_head(cls, config: TaskConfig, hidden_size: int) -> nn.Module:
        return ClassificationHead(config, hidden_size)

    @classmethod
    @torch.no_grad()
    def evaluate(cls, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Cross-entropy (unweighted), accuracy and macro-F1 over the validation cells."""
        from cellfoundry.evaluation import accuracy, macro_f1

        model.eval()
        logits, labels = [], []
        for batch in loader:
            output = model(**batch)
            gathered = accelerator.gather_for_metrics((output.logits.float(), batch["labels"]))
            logits.append(gathered[0].cpu())
            labels.append(gathered[1].cpu())
        model.train()
        all_logits, all_labels = torch.cat(logits), torch.cat(labels)
        predicted = all_logits.argmax(dim=1).numpy()
        truth = all_labels.numpy()
        return {
            "eval_loss": float(functional.cross_entropy(all_logits, all_labels)),
            "eval_accuracy": accuracy(truth, predicted),
            "eval_macro_f1": macro_f1(truth, predicted),
            "eval_cells": int(truth.size),
        }

    @classmethod
    def write_predictions(
        cls, adata: Any, config: TaskConfig, outputs: dict[str, Any]
    ) -> dict[str, Any]:
        """``obs["cellfoundry_prediction"]`` (categorical, NaN where a cell could not be
        tokenized), ``obs["cellfoundry_confidence"]`` (top probability),
        ``obsm["cellfoundry_probabilities"]`` (cells, K) and ``uns["cellfoundry_classes"]``."""
        import pandas as pd

        valid, logits = outputs["valid"], outputs["logits"]
        classes = list(config.labels)
        probabilities = np.full((valid.size, len(classes)), np.nan, dtype=np.float32)
        probabilities[valid] = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        codes = np.full(valid.size, -1, dtype=np.int64)
        codes[valid] = logits.argmax(axis=1)
        labels = pd.Categorical.from_codes(codes, categories=classes)
        confidence = np.where(valid, np.nan_to_num(probabilities).max(axis=1), np.nan)
        if hasattr(adata, "obs"):
            adata.obs[PREDICTION_KEY] = labels
            adata.obs[CONFIDENCE_KEY] = confidence.astype(np.float32)
            adata.obsm[PROBABILITIES_KEY] = probabilities
            adata.uns[CLASSES_KEY] = classes
        return {"labels": labels, "probabilities": probabilities, "classes": classes}

    @classmethod
    def check_score_labels(cls, adata: Any, config: TaskConfig, label_key: str) -> None:
        """The column exists and holds no label the model was not trained on."""
        super().check_score_labels(adata, config, label_key)
        present = set(adata.obs[label_key].dropna().astype(str))
        unseen = sorted(present - set(config.labels))
        if unseen:
            raise ValueError(
                f"obs[{label_key!r}] holds label(s) the model was not trained on: {unseen}; it "
                f"can only predict {config.labels}. Score only cells of those labels (subset "
                "the AnnData), or fine-tune a model that includes them."
            )

    @classmethod
    def score_predictions(
        cls, adata: Any, config: TaskConfig, written: dict[str, Any], label_key: str
    ) -> dict[str, float]:
        """Macro-F1 and accuracy over the cells that were predicted and have a label."""
        from cellfoundry.evaluation import accuracy, macro_f1

        truth = adata.obs[label_key].astype(object).to_numpy()
        predicted = np.asarray(written["labels"].astype(object))
        keep = ~(adata.obs[label_key].isna().to_numpy() | written["labels"].isna())
        truth, predicted = truth[keep].astype(str), predicted[keep].astype(str)
        return {
            "macro_f1": macro_f1(truth, predicted),
            "accuracy": accuracy(truth, predicted),
            "n_cells": int(keep.sum()),
        }

    # -- fine-tuning runner hooks ----------------------------------------------------------
    @classmethod
    def add_targets(
        cls, dataset: Any, obs: Any, config: TaskConfig, args: Any, train_obs: Any, **_: Any
    ) -> tuple[Any, list[str]]:
        """Set ``config.labels`` from the training cells; add each cell's class code.

        ``obs`` holds the tokenized cells' rows in dataset order, ``train_obs`` the training
        split's. Cells whose label is not a training label (unlabelled, dropped, unseen in
        training) get code -1; the split never puts them in the training part.
        """
        if not config.labels:
            config.labels = sorted(train_obs[args.label_key].astype(str).unique())
        config.label_key = args.label_key
        lookup = {label: code for code, label in enumerate(config.labels)}
        values = obs[args.label_key].astype(str).to_numpy()
        codes = np.array([lookup.get(value, -1) for value in values], dtype=np.int64)
        return dataset.add_column("labels", codes), ["labels"]

    @classmethod
    def fit_config(cls, config: TaskConfig, dataset: Any, train_positions: np.ndarray) -> None:
        """Balanced class weights from the training cells, when asked for."""
        if config.balance_classes:
            codes = np.asarray(dataset.select(train_positions)["labels"], dtype=np.int64)
            config.class_weights = balanced_class_weights(codes, len(config.labels))

    @classmethod
    def score_test(
        cls, model: nn.Module, train_adata: Any, test_adata: Any, args: Any, **_: Any
    ) -> dict[str, Any]:
        """Test-cell scores of the model beside the baselines fitted on the same training cells.

        Baselines (``cellfoundry.evaluation.baselines``): L2 logistic regression on
        log-normalised HVGs and kNN on PCA. The model's difference to the better baseline
        (per metric) comes with a paired bootstrap 95% interval over test cells.
        """
        from cellfoundry.evaluation import accuracy, macro_f1, paired_bootstrap, per_class_f1
        from cellfoundry.evaluation.classification import verdict
        from cellfoundry.tasks.predict import predict

        predicted = predict(
            test_adata, model, progress=False, allow_normalized=args.allow_normalized
        )["labels"]
        truth = test_adata.obs[args.label_key].astype(str).to_numpy()
        ours = np.asarray(predicted.astype(str))
        baselines = annotation_baselines(train_adata, test_adata, args.label_key, args.seed)
        scores: dict[str, Any] = {"n_cells": int(truth.size), "model": {}, "baselines": {}}
        for name, labels in {"model": ours, **baselines}.items():
            entry = {
                "macro_f1": macro_f1(truth, labels),
                "accuracy": accuracy(truth, labels),
                "per_class_f1": per_class_f1(truth, labels),
            }
            if name == "model":
                scores["model"] = entry
            else:
                scores["baselines"][name] = entry
        scores["comparison"] = {}
        for metric in ("macro_f1", "accuracy"):
            best = max(baselines, key=lambda b: scores["baselines"][b][metric])
            value, (low, high) = paired_bootstrap(truth, ours, baselines[best], metric)
            scores["comparison"][metric] = {
                "best_baseline": best,
                "difference": value,
                "ci95": [low, high],
                "verdict": verdict(low, high),
            }
        scores["macro_f1"], scores["accuracy"] = (
            scores["model"]["macro_f1"],
            scores["model"]["accuracy"],
        )
        return scores

    @classmethod
    def card_metrics(cls, metrics: dict[str, Any], args: Any) -> dict[str, Any]:
        """Card facts: a row per metric beside the better baseline, and the training line."""
        from cellfoundry.tasks.card import comparison_rows

        split = metrics["split"]
        task = f"annotation ({args.label_key}), {split['test']} test cells ({split['strategy']})"
        rows = comparison_rows(task, metrics)
        training = (
            f"`{Path(args.data).name}`, label `{args.label_key}`, split "
            f"{split['strategy']}: {split['train']} training / {split['validation']} "
            f"validation / {split['test']} test cells; {args.max_steps} steps of "
            f"{args.batch_size} cells, learning rate {args.learning_rate}."
        )
        return {"rows": rows, "training": training}


def annotation_baselines(
    train_adata: Any, test_adata: Any, label_key: str, seed: int = 0
) -> dict[str, np.ndarray]:
    """Predicted test labels of the standard baselines, fitted on the training cells only.

    Values that are neither counts nor log-normalised (e.g. MERFISH volume-normalised) are
    log1p-transformed and used as log-normalised input.
    """
    from cellfoundry.evaluation.baselines import knn_on_pca, log_input, logistic_regression_hvg

    x_train, x_kind = log_input(train_adata)
    x_test, _ = log_input(test_adata)
    y_train = train_adata.obs[label_key].astype(str).to_numpy()
    return {
        "logistic regression (HVG)": logistic_regression_hvg(
            x_train, y_train, x_test, x_kind, seed=seed
        ).labels.astype(str),
        "kNN on PCA": knn_on_pca(x_train, y_train, x_test, x_kind, seed=seed).labels.astype(str),
    }
