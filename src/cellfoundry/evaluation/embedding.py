"""Zero-shot embedding check: how well a cell's nearest neighbours predict its label.

A kNN classifier has no parameters to fit, so its cross-validated accuracy measures the
embedding itself: cells of a type should sit among cells of the same type. Out-of-fold
predictions are returned too, so two embeddings can be compared on the same cells with
:func:`cellfoundry.evaluation.paired_bootstrap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

KNN_NEIGHBORS = 15


def knn_predictions(
    embedding: np.ndarray,
    labels: Sequence[Any],
    n_neighbors: int = KNN_NEIGHBORS,
    n_splits: int = 5,
    seed: int = 0,
    metric: str = "euclidean",
) -> np.ndarray:
    """Out-of-fold kNN label predictions, one per cell (stratified, shuffled k-fold).

    Parameters
    ----------
    embedding : numpy.ndarray
        (n_cells, n_dims) cell embedding.
    labels : sequence
        Label of every cell; each label should have at least ``n_splits`` cells.
    n_neighbors : int
        Neighbours voting (uniform weights; capped by the training fold's size).
    n_splits, seed : int
        Folds, and the seed of their shuffle.
    metric : str
        Distance of the neighbour search (``"cosine"`` suits unnormalised model embeddings).
    """
    embedding, labels_arr = np.asarray(embedding), np.asarray(labels)
    if len(embedding) != len(labels_arr):
        raise ValueError(f"{len(embedding)} embeddings but {len(labels_arr)} labels.")
    predictions = np.empty_like(labels_arr)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in folds.split(embedding, labels_arr):
        knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(train)), metric=metric)
        predictions[test] = knn.fit(embedding[train], labels_arr[train]).predict(embedding[test])
    return predictions


def knn_accuracy(
    embedding: np.ndarray,
    labels: Sequence[Any],
    n_neighbors: int = KNN_NEIGHBORS,
    n_splits: int = 5,
    seed: int = 0,
    metric: str = "euclidean",
) -> float:
    """Fraction of cells whose out-of-fold kNN prediction is their label (see
    :func:`knn_predictions`)."""
    predictions = knn_predictions(embedding, labels, n_neighbors, n_splits, seed, metric)
    return float(np.mean(predictions == np.asarray(labels)))
