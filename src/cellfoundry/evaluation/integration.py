"""scIB-style integration metrics of an embedding: biology kept, batch effects removed.

Follows Luecken et al. (2022, scIB) as re-implemented in ``scib-metrics``, in numpy, scipy and
scikit-learn only (``scib-metrics`` needs jax; scanpy, igraph and leidenalg are not
dependencies). All scores lie in [0, 1], higher is better:

- bio: NMI and ARI of KMeans clusters (k = number of labels, as scib-metrics' default,
  instead of scIB's Leiden-resolution sweep), label silhouette ``(asw + 1) / 2``, and cLISI;
- batch: per-label batch silhouette ``1 - |s|``, iLISI, and graph connectivity;
- ``bio`` and ``batch`` are the means of their metrics; ``total = 0.6 bio + 0.4 batch``.

LISI (Korsunsky et al. 2019, Harmony) is the inverse Simpson index of the labels among a
cell's ``3 * perplexity`` nearest neighbours, weighted by a Gaussian kernel on Euclidean
distance whose bandwidth is found per cell by binary search so that the weights have the
given perplexity: the effective number of distinct labels in a cell's neighbourhood.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples
from sklearn.neighbors import NearestNeighbors

BIO_WEIGHT = 0.6  # scIB's overall score: 0.6 bio conservation + 0.4 batch correction
GRAPH_NEIGHBORS = 15  # kNN graph of graph connectivity, as scIB / scib-metrics
PERPLEXITY = 30.0  # LISI's effective neighbourhood size (Harmony, scIB); 3x as many neighbours
_LISI_TOL = 1e-5  # |entropy - log(perplexity)| at which the bandwidth search stops (Harmony)
_LISI_MAX_ITER = 50  # bandwidth search steps per cell (Harmony)


@dataclass(frozen=True)
class IntegrationScores:
    """The seven scIB-style metrics, each in [0, 1] (higher is better), and their aggregates."""

    nmi: float
    ari: float
    label_asw: float
    clisi: float
    batch_asw: float
    ilisi: float
    graph_connectivity: float

    @property
    def bio(self) -> float:
        """Biological conservation: mean of NMI, ARI, label ASW and cLISI."""
        return float(np.mean([self.nmi, self.ari, self.label_asw, self.clisi]))

    @property
    def batch(self) -> float:
        """Batch correction: mean of batch ASW, iLISI and graph connectivity."""
        return float(np.mean([self.batch_asw, self.ilisi, self.graph_connectivity]))

    @property
    def total(self) -> float:
        """scIB's overall score, ``0.6 * bio + 0.4 * batch``."""
        return BIO_WEIGHT * self.bio + (1 - BIO_WEIGHT) * self.batch

    def as_dict(self) -> dict[str, float]:
        """All metrics plus ``bio``, ``batch`` and ``total``, for JSON reports."""
        return {**asdict(self), "bio": self.bio, "batch": self.batch, "total": self.total}


def _codes(values: Sequence[Any], name: str, n_cells: int) -> tuple[np.ndarray, int]:
    """Integer codes 0..k-1 of a label vector, and k; checks its length."""
    array = np.asarray(values)
    if array.shape != (n_cells,):
        raise ValueError(f"{name} must have one entry per cell ({n_cells}), got {array.shape}.")
    _, codes = np.unique(array, return_inverse=True)
    return codes.ravel(), int(codes.max()) + 1


def nearest_neighbors(embedding: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean (distances, indices) of each cell's ``n_neighbors`` nearest other cells.

    Rows are sorted by distance; a cell is never its own neighbour (duplicates of it may be).
    ``n_neighbors`` is capped at ``n_cells - 1``.
    """
    k = min(int(n_neighbors), len(embedding) - 1)
    if k < 1:
        raise ValueError("Need at least two cells to find neighbours.")
    return NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors()


def _neighbor_weights(distances: np.ndarray, perplexity: float) -> np.ndarray:
    """Gaussian-kernel weights over each row's neighbours with the given perplexity.

    Harmony's search, vectorised over cells: ``P ~ exp(-beta * d)`` starting at ``beta = 1``,
    doubling/halving until bracketed, then bisecting, until the entropy of ``P`` is within
    ``1e-5`` of ``log(perplexity)`` or 50 steps. Distances are shifted by each row's minimum
    first: ``P`` and its entropy are unchanged, but ``exp`` cannot underflow to all zeros.
    """
    shifted = distances - distances.min(axis=1, keepdims=True)
    target = np.log(perplexity)

    def weights(rows: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kernel = np.exp(-shifted[rows] * beta[:, None])
        total = kernel.sum(axis=1)
        entropy = np.log(total) + beta * (shifted[rows] * kernel).sum(axis=1) / total
        return entropy, kernel / total[:, None]

    n_cells = len(distances)
    beta = np.ones(n_cells)
    beta_low, beta_high = np.full(n_cells, -np.inf), np.full(n_cells, np.inf)
    entropy, probabilities = weights(np.arange(n_cells), beta)
    for _ in range(_LISI_MAX_ITER):
        rows = np.flatnonzero(np.abs(entropy - target) > _LISI_TOL)
        if len(rows) == 0:
            break
        too_flat = entropy[rows] > target  # too many effective neighbours: sharpen
        b, low, high = beta[rows], beta_low[rows], beta_high[rows]
        beta_low[rows] = np.where(too_flat, b, low)
        beta_high[rows] = np.where(too_flat, high, b)
        beta[rows] = np.where(
            too_flat,
            np.where(np.isinf(high), b * 2, (b + high) / 2),
            np.where(np.isinf(low), b / 2, (b + low) / 2),
        )
        entropy[rows], probabilities[rows] = weights(rows, beta[rows])
    return probabilities


def lisi_from_neighbors(
    distances: np.ndarray,
    indices: np.ndarray,
    labels: Sequence[Any],
    perplexity: float = PERPLEXITY,
) -> np.ndarray:
    """Per-cell LISI: ``1 / sum_label (kernel weight of neighbours with that label)^2``.

    Parameters
    ----------
    distances, indices : numpy.ndarray
        (n_cells, k) Euclidean distances to, and indices of, each cell's nearest neighbours,
        the cell itself excluded (as :func:`nearest_neighbors` returns them).
    labels : sequence
        Label (batch or cell type) of every cell.
    perplexity : float
        Effective number of neighbours of the kernel; should be at most ``k / 3``.

    Returns
    -------
    numpy.ndarray
        (n_cells,) values between 1 (one label around the cell) and the number of labels.
    """
    distances, indices = np.asarray(distances, dtype=np.float64), np.asarray(indices)
    codes, n_labels = _codes(labels, "labels", len(distances))
    probabilities = _neighbor_weights(distances, perplexity)
    rows = np.repeat(np.arange(len(distances)), distances.shape[1]) * n_labels
    per_label = np.bincount(
        rows + codes[indices].ravel(),
        weights=probabilities.ravel(),
        minlength=len(distances) * n_labels,
    ).reshape(len(distances), n_labels)
    return 1.0 / (per_label**2).sum(axis=1)


def _lisi_neighbors(
    embedding: np.ndarray, perplexity: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Neighbours for LISI (``3 * perplexity``, capped by the cells) and the perplexity used."""
    distances, indices = nearest_neighbors(embedding, int(np.ceil(3 * perplexity)))
    return distances, indices, min(perplexity, distances.shape[1] / 3)


def _scaled_ilisi(lisi: np.ndarray, n_batches: int) -> float:
    """Median iLISI mapped to [0, 1]: 0 = one batch per neighbourhood, 1 = all batches."""
    return float((np.nanmedian(lisi) - 1) / (n_batches - 1))


def _scaled_clisi(lisi: np.ndarray, n_labels: int) -> float:
    """Median cLISI mapped to [0, 1]: 1 = one label per neighbourhood, 0 = all labels."""
    return float((n_labels - np.nanmedian(lisi)) / (n_labels - 1))


def ilisi(embedding: np.ndarray, batches: Sequence[Any], perplexity: float = PERPLEXITY) -> float:
    """Batch mixing: scaled median iLISI, ``(lisi - 1) / (n_batches - 1)`` (scib-metrics)."""
    distances, indices, perplexity = _lisi_neighbors(np.asarray(embedding), perplexity)
    lisi = lisi_from_neighbors(distances, indices, batches, perplexity)
    return _scaled_ilisi(lisi, len(np.unique(np.asarray(batches))))


def clisi(embedding: np.ndarray, labels: Sequence[Any], perplexity: float = PERPLEXITY) -> float:
    """Label purity: scaled median cLISI, ``(n_labels - lisi) / (n_labels - 1)`` (scib-metrics)."""
    distances, indices, perplexity = _lisi_neighbors(np.asarray(embedding), perplexity)
    lisi = lisi_from_neighbors(distances, indices, labels, perplexity)
    return _scaled_clisi(lisi, len(np.unique(np.asarray(labels))))


def label_silhouette(embedding: np.ndarray, labels: Sequence[Any]) -> float:
    """Label ASW rescaled to [0, 1], ``(mean silhouette + 1) / 2`` (Euclidean)."""
    return float((silhouette_samples(embedding, np.asarray(labels)).mean() + 1) / 2)


def batch_silhouette(embedding: np.ndarray, labels: Sequence[Any], batches: Sequence[Any]) -> float:
    """scIB's batch ASW: within each label, mean of ``1 - |silhouette by batch|``, then mean.

    Labels found in a single batch (or with one cell per batch) are skipped, as in scIB; NaN
    when every label is skipped. 1 = batches indistinguishable within every label.
    """
    embedding, labels_arr, batches_arr = (
        np.asarray(embedding),
        np.asarray(labels),
        np.asarray(batches),
    )
    per_label = []
    for label in np.unique(labels_arr):
        mask = labels_arr == label
        n_batches = len(np.unique(batches_arr[mask]))
        if n_batches == 1 or n_batches == mask.sum():
            continue
        scores = silhouette_samples(embedding[mask], batches_arr[mask])
        per_label.append(np.mean(1 - np.abs(scores)))
    return float(np.mean(per_label)) if per_label else float("nan")


def _graph_connectivity(indices: np.ndarray, codes: np.ndarray) -> float:
    """Mean over labels of the largest connected fraction of the label's kNN subgraph."""
    n_cells, k = indices.shape
    graph = sp.csr_matrix(
        (np.ones(n_cells * k), (np.repeat(np.arange(n_cells), k), indices.ravel())),
        shape=(n_cells, n_cells),
    )
    fractions = []
    for code in range(int(codes.max()) + 1):
        members = np.flatnonzero(codes == code)
        _, components = connected_components(graph[members][:, members], directed=False)
        fractions.append(np.bincount(components).max() / len(members))
    return float(np.mean(fractions))


def graph_connectivity(
    embedding: np.ndarray, labels: Sequence[Any], n_neighbors: int = GRAPH_NEIGHBORS
) -> float:
    """scIB's graph connectivity on the undirected kNN graph.

    For each label, keep only that label's cells and the kNN edges between them, and take
    the fraction of those cells in the largest connected component; average over labels.
    1 = every label is one connected piece. Edges count in either direction, as in scIB's
    symmetric scanpy graph (scib-metrics asks for strong connectivity of the directed graph).
    """
    embedding = np.asarray(embedding)
    codes, _ = _codes(labels, "labels", len(embedding))
    _, indices = nearest_neighbors(embedding, n_neighbors)
    return _graph_connectivity(indices, codes)


def nmi_ari(embedding: np.ndarray, labels: Sequence[Any], seed: int = 0) -> tuple[float, float]:
    """NMI (arithmetic) and ARI between labels and KMeans clusters, k = number of labels.

    scIB optimises Leiden's resolution for NMI; scib-metrics' default, kept here, is KMeans
    with as many clusters as labels: no graph-clustering dependency, and no score inflated by
    choosing the best of many clusterings. ``n_init=10`` restarts, seeded.
    """
    labels_arr = np.asarray(labels)
    clusters = kmeans_clusters(embedding, len(np.unique(labels_arr)), seed)
    nmi = normalized_mutual_info_score(labels_arr, clusters, average_method="arithmetic")
    return float(nmi), float(adjusted_rand_score(labels_arr, clusters))


def kmeans_clusters(embedding: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """The KMeans clustering :func:`nmi_ari` scores (``n_init=10``, seeded), per cell."""
    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(embedding)


def integration_scores(
    embedding: np.ndarray,
    labels: Sequence[Any],
    batches: Sequence[Any],
    seed: int = 0,
    n_neighbors: int = GRAPH_NEIGHBORS,
    perplexity: float = PERPLEXITY,
) -> IntegrationScores:
    """All seven scIB-style metrics of ``embedding`` (cells x dims) in one pass.

    Parameters
    ----------
    embedding : numpy.ndarray
        (n_cells, n_dims) integrated representation (e.g. PCA or a model's embedding).
    labels, batches : sequence
        Cell type (biology to keep) and batch (technical effect to remove) of every cell;
        at least two of each.
    seed : int
        Seed of the KMeans clustering behind NMI/ARI (the only random step).
    n_neighbors : int
        Neighbours of the graph-connectivity kNN graph.
    perplexity : float
        LISI perplexity; ``3 * perplexity`` neighbours are searched (capped by the cells).

    Notes
    -----
    Silhouettes need all pairwise distances (O(n_cells^2) time): subsample very large data.
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.ndim != 2:
        raise ValueError(f"embedding must be (n_cells, n_dims), got shape {embedding.shape}.")
    label_codes, n_labels = _codes(labels, "labels", len(embedding))
    batch_codes, n_batches = _codes(batches, "batches", len(embedding))
    if n_labels < 2 or n_batches < 2:
        raise ValueError(
            f"Integration metrics need at least two labels and two batches, got {n_labels} "
            f"label(s) and {n_batches} batch(es)."
        )
    k_lisi = int(np.ceil(3 * perplexity))
    distances, indices = nearest_neighbors(embedding, max(k_lisi, n_neighbors))
    perplexity = min(perplexity, min(k_lisi, distances.shape[1]) / 3)
    lisi_d, lisi_i = distances[:, :k_lisi], indices[:, :k_lisi]
    nmi, ari = nmi_ari(embedding, label_codes, seed=seed)
    return IntegrationScores(
        nmi=nmi,
        ari=ari,
        label_asw=label_silhouette(embedding, label_codes),
        clisi=_scaled_clisi(lisi_from_neighbors(lisi_d, lisi_i, label_codes, perplexity), n_labels),
        batch_asw=batch_silhouette(embedding, label_codes, batch_codes),
        ilisi=_scaled_ilisi(
            lisi_from_neighbors(lisi_d, lisi_i, batch_codes, perplexity), n_batches
        ),
        graph_connectivity=_graph_connectivity(indices[:, :n_neighbors], label_codes),
    )


AGGREGATES = ("total", "bio", "batch")


def paired_half_sample_differences(
    embedding_a: np.ndarray,
    embedding_b: np.ndarray,
    labels: Sequence[Any],
    batches: Sequence[Any],
    draws: int = 30,
    seed: int = 0,
) -> dict[str, Any]:
    """``score(a) - score(b)`` for ``total``, ``bio`` and ``batch``, with a paired 95% interval.

    The cell bootstrap used for annotation does not suit these metrics: resampling with
    replacement puts copies of a cell at distance 0 from each other, which inflates LISI,
    silhouettes and graph connectivity. Instead each draw takes half of the cells without
    replacement (the delete-d jackknife with d = n/2, Shao & Wu 1989) and scores both
    embeddings on the same half. For a mean-like statistic the spread of half-sample values
    equals the full sample's standard error, so the interval is
    ``value + quantile(half - mean(half), [0.025, 0.975])``. Only the spread is used, not the
    location: halving the cells thins every neighbourhood, which shifts kNN metrics (iLISI,
    graph connectivity) systematically, and on STARmap that shift did not cancel in the
    difference (an interval built around the half-sample location missed the full-sample
    value). Neighbourhood metrics are not means, so the interval is approximate.

    Parameters
    ----------
    embedding_a, embedding_b : numpy.ndarray
        (cells, dims) embeddings of the same cells in the same order (dims may differ).
    labels, batches : sequence
        Cell labels and batches.
    draws, seed : int
        Half-samples and the seed that fixes them.

    Returns
    -------
    dict
        ``{"a": IntegrationScores, "b": IntegrationScores, "total": PairedDifference, ...}``.
    """
    from cellfoundry.evaluation.classification import PairedDifference

    labels_arr, batches_arr = np.asarray(labels), np.asarray(batches)
    n_cells = len(labels_arr)
    if not len(embedding_a) == len(embedding_b) == n_cells == len(batches_arr):
        raise ValueError(
            f"embedding_a ({len(embedding_a)}), embedding_b ({len(embedding_b)}), labels "
            f"({n_cells}) and batches ({len(batches_arr)}) must describe the same cells."
        )
    full_a = integration_scores(embedding_a, labels_arr, batches_arr, seed=seed)
    full_b = integration_scores(embedding_b, labels_arr, batches_arr, seed=seed)
    values = {name: getattr(full_a, name) - getattr(full_b, name) for name in AGGREGATES}
    rng = np.random.default_rng(seed)
    halves: dict[str, list[float]] = {name: [] for name in AGGREGATES}
    for _ in range(draws):
        pick = np.sort(rng.choice(n_cells, n_cells // 2, replace=False))
        if np.unique(labels_arr[pick]).size < 2 or np.unique(batches_arr[pick]).size < 2:
            continue
        a = integration_scores(embedding_a[pick], labels_arr[pick], batches_arr[pick], seed=seed)
        b = integration_scores(embedding_b[pick], labels_arr[pick], batches_arr[pick], seed=seed)
        for name in AGGREGATES:
            halves[name].append(getattr(a, name) - getattr(b, name))
    result: dict[str, Any] = {"a": full_a, "b": full_b}
    for name, value in values.items():
        spread = np.asarray(halves[name])
        if spread.size == 0:
            raise ValueError("No half-sample kept two labels and two batches; add cells.")
        lower, upper = np.quantile(spread - spread.mean(), [0.025, 0.975])
        result[name] = PairedDifference(float(value), (float(value + lower), float(value + upper)))
    return result
