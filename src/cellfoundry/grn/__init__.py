"""Gene regulatory network inference: ranked TF -> target edge tables from the pretrained
encoder (attention, contextual gene-embedding similarity, in-silico TF deletion) and from the
classic baselines (Pearson, Spearman, GENIE3, random), on one gene universe; and from a
fine-tuned pair classifier (``classifier``).

Every method returns a table with columns ``tf``, ``target``, ``score`` (higher = stronger
evidence), scored with :mod:`cellfoundry.evaluation.grn`; the supervised pair classifier is the
``grn`` task (:mod:`cellfoundry.tasks.grn`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellfoundry.grn.edges import GeneUniverse

# Functions load with their submodule on first use (numpy, pandas, scikit-learn, torch), so
# ``METHODS`` is cheap to import: the CLI builds ``--method`` choices from it for ``--help``.
_LAZY = {
    "correlation_edges": "cellfoundry.grn.baselines",
    "genie3_edges": "cellfoundry.grn.baselines",
    "random_edges": "cellfoundry.grn.baselines",
    "GeneUniverse": "cellfoundry.grn.edges",
    "gene_universe": "cellfoundry.grn.edges",
    "write_edges": "cellfoundry.grn.edges",
    "attention_edges": "cellfoundry.grn.model_scores",
    "deletion_edges": "cellfoundry.grn.model_scores",
    "embedding_similarity_edges": "cellfoundry.grn.model_scores",
}

METHODS = (
    "attention",
    "embedding",
    "deletion",
    "classifier",
    "pearson",
    "spearman",
    "genie3",
    "random",
)
MODEL_METHODS = ("attention", "embedding", "deletion", "classifier")


def infer_edges(adata: Any, universe: GeneUniverse, method: str, seed: int = 0, **options: Any):
    """Edge table of one ``method`` (see :data:`METHODS`) over ``universe``."""
    from cellfoundry.grn import baselines, model_scores

    if method in ("pearson", "spearman"):
        return baselines.correlation_edges(adata, universe, method=method)
    if method == "genie3":
        return baselines.genie3_edges(adata, universe, seed=seed, **options)
    if method == "random":
        return baselines.random_edges(universe, seed=seed)
    if method == "attention":
        return model_scores.attention_edges(adata, universe, seed=seed, **options)
    if method == "embedding":
        return model_scores.embedding_similarity_edges(adata, universe, seed=seed, **options)
    if method == "deletion":
        return model_scores.deletion_edges(adata, universe, seed=seed, **options)
    if method == "classifier":
        return _classifier_edges(adata, universe, seed=seed, **options)
    raise ValueError(f"method={method!r}; use one of {METHODS}.")


def _classifier_edges(
    adata: Any,
    universe: GeneUniverse,
    model: str,
    seed: int = 0,
    device: str | None = None,
    **options: Any,
):
    """Edges of a fine-tuned ``grn`` task model (a folder) for the universe's TFs it knows."""
    from cellfoundry.tasks import load_task_model, pair_classifier_edges

    task_model = load_task_model(model, device=device)
    if task_model.config.task != "grn":
        raise ValueError(
            f"{model} is a {task_model.config.task!r} model; method 'classifier' needs a model "
            "fine-tuned with --task grn."
        )
    known = set(task_model.config.genes)
    tfs = [t for t in universe.tfs if t in known]
    if not tfs:
        raise ValueError(f"None of the data's TFs are in the gene universe of {model}.")
    return pair_classifier_edges(task_model, adata, tfs, seed=seed, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellfoundry.grn' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "MODEL_METHODS",
    "GeneUniverse",
    "attention_edges",
    "correlation_edges",
    "deletion_edges",
    "embedding_similarity_edges",
    "gene_universe",
    "genie3_edges",
    "infer_edges",
    "random_edges",
    "write_edges",
]
