"""Gene regulatory network inference: ranked TF -> target edge tables from the pretrained
encoder (attention, contextual gene-embedding similarity, in-silico TF deletion) and from the
classic baselines (Pearson, Spearman, GENIE3, random), on one gene universe; and from a
fine-tuned pair classifier (``classifier``).

Every method returns a table with columns ``tf``, ``target``, ``score`` (higher = stronger
evidence), scored with :mod:`cellfoundry.evaluation.grn`; the supervised pair classifier is the
``grn`` task (:mod:`cellfoundry.tasks.grn`).
"""

from cellfoundry.grn.baselines import correlation_edges, genie3_edges, random_edges
from cellfoundry.grn.edges import GeneUniverse, gene_universe, write_edges
from cellfoundry.grn.model_scores import (
    attention_edges,
    deletion_edges,
    embedding_similarity_edges,
)

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


def infer_edges(adata, universe: GeneUniverse, method: str, seed: int = 0, **options):
    """Edge table of one ``method`` (see :data:`METHODS`) over ``universe``."""
    if method in ("pearson", "spearman"):
        return correlation_edges(adata, universe, method=method)
    if method == "genie3":
        return genie3_edges(adata, universe, seed=seed, **options)
    if method == "random":
        return random_edges(universe, seed=seed)
    if method == "attention":
        return attention_edges(adata, universe, seed=seed, **options)
    if method == "embedding":
        return embedding_similarity_edges(adata, universe, seed=seed, **options)
    if method == "deletion":
        return deletion_edges(adata, universe, seed=seed, **options)
    if method == "classifier":
        return _classifier_edges(adata, universe, seed=seed, **options)
    raise ValueError(f"method={method!r}; use one of {METHODS}.")


def _classifier_edges(
    adata,
    universe: GeneUniverse,
    model: str,
    seed: int = 0,
    device: str | None = None,
    **options,
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
