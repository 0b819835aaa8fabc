"""Spatial neighbourhoods: graphs from ``obsm["spatial"]`` and the niche targets built on them.

Graphs are built within each section (slice, sample) only: two cells of different sections are
never neighbours, whatever their coordinates. Targets, as in Nicheformer's spatial tasks:

- **region / niche label**: an obs column (e.g. DLPFC cortical layers, seqFISH domains);
- **composition**: the fraction of each cell type among a cell's neighbours within radius r
  (the cell itself excluded; a cell without neighbours has an all-zero row and is flagged);
- **density**: the number of neighbours within radius r per unit area (cells / (pi r^2)).

Every function takes an AnnData and returns plain numpy / scipy objects, so tasks, baselines
and users share one definition. Built on scikit-learn's neighbour search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

SPATIAL_KEY = "spatial"


def coordinates(adata: Any, key: str = SPATIAL_KEY) -> np.ndarray:
    """(cells, 2 or 3) float coordinates, with a clear error when there are none."""
    if key not in adata.obsm:
        raise ValueError(
            f"No obsm[{key!r}] coordinates (obsm keys: {list(adata.obsm.keys())}); spatial "
            "tasks need each cell's position, e.g. adata.obsm['spatial'] = xy array."
        )
    xy = np.asarray(adata.obsm[key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] not in (2, 3) or xy.shape[0] != adata.n_obs:
        raise ValueError(f"obsm[{key!r}] has shape {xy.shape}; expected (cells, 2) or (cells, 3).")
    if not np.isfinite(xy).all():
        raise ValueError(f"obsm[{key!r}] holds NaN or infinite coordinates; drop those cells.")
    return xy


def sections_of(adata: Any, section_key: str | None) -> np.ndarray:
    """Section of each cell (one section when ``section_key`` is None)."""
    if section_key is None:
        return np.zeros(adata.n_obs, dtype=object)
    if section_key not in adata.obs.columns:
        raise ValueError(
            f"No obs column {section_key!r} for sections (columns: {list(adata.obs.columns)})."
        )
    return adata.obs[section_key].astype(str).to_numpy()


def neighbor_graph(
    adata: Any,
    method: str = "radius",
    radius: float | None = None,
    k: int = 6,
    section_key: str | None = None,
    key: str = SPATIAL_KEY,
) -> sp.csr_matrix:
    """Binary (cells x cells) neighbour graph within each section, self excluded.

    Parameters
    ----------
    method : {"radius", "knn"}
        Every cell within ``radius``, or the ``k`` nearest (the kNN graph is directed:
        row i lists i's neighbours).
    radius : float
        In the coordinates' units (required for ``"radius"``).
    """
    from sklearn.neighbors import NearestNeighbors

    if method not in ("radius", "knn"):
        raise ValueError(f"method={method!r}; use 'radius' or 'knn'.")
    if method == "radius" and (radius is None or radius <= 0):
        raise ValueError("A radius graph needs radius > 0 (in the coordinates' units).")
    xy = coordinates(adata, key)
    sections = sections_of(adata, section_key)
    rows, cols = [], []
    for section in np.unique(sections):
        members = np.flatnonzero(sections == section)
        if method == "radius":
            search = NearestNeighbors(radius=radius).fit(xy[members])
            graph = search.radius_neighbors_graph(xy[members], mode="connectivity")
        else:
            n = min(k + 1, members.size)
            search = NearestNeighbors(n_neighbors=n).fit(xy[members])
            graph = search.kneighbors_graph(xy[members], mode="connectivity")
        graph = sp.coo_matrix(graph)
        off = graph.row != graph.col
        rows.append(members[graph.row[off]])
        cols.append(members[graph.col[off]])
    row, col = np.concatenate(rows), np.concatenate(cols)
    data = np.ones(row.size, dtype=np.float32)
    return sp.csr_matrix((data, (row, col)), shape=(adata.n_obs, adata.n_obs))


def default_radius(adata: Any, k: int = 10, section_key: str | None = None) -> float:
    """Median distance to the ``k``-th nearest neighbour: a radius holding ~k cells."""
    from sklearn.neighbors import NearestNeighbors

    xy = coordinates(adata)
    sections = sections_of(adata, section_key)
    distances = []
    for section in np.unique(sections):
        members = xy[sections == section]
        n = min(k + 1, members.shape[0])
        distances.append(NearestNeighbors(n_neighbors=n).fit(members).kneighbors(members)[0][:, -1])
    return float(np.median(np.concatenate(distances)))


@dataclass(frozen=True)
class Composition:
    """Neighbourhood cell-type fractions (cells x types) and which cells had neighbours."""

    fractions: np.ndarray
    types: list[str]
    has_neighbors: np.ndarray


def neighborhood_composition(graph: sp.csr_matrix, labels: Any) -> Composition:
    """Fraction of each label among each cell's neighbours (rows sum to 1 or are all 0)."""
    labels = np.asarray(labels).astype(str)
    types, codes = np.unique(labels, return_inverse=True)
    onehot = sp.csr_matrix(
        (np.ones(labels.size), (np.arange(labels.size), codes)), shape=(labels.size, types.size)
    )
    counts = np.asarray((graph @ onehot).todense(), dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return Composition(fractions.astype(np.float32), types.tolist(), totals.ravel() > 0)


def neighborhood_size(radius: float, dimensions: int = 2) -> float:
    """Area (2-D: pi r^2) or volume (3-D: 4/3 pi r^3) of a neighbourhood of ``radius``."""
    return np.pi * radius**2 if dimensions == 2 else 4 / 3 * np.pi * radius**3


def neighbor_counts(graph: sp.csr_matrix) -> np.ndarray:
    """Neighbours of each cell (row sums of the graph)."""
    return np.asarray(graph.sum(axis=1)).ravel()


def neighbor_density(graph: sp.csr_matrix, radius: float, dimensions: int = 2) -> np.ndarray:
    """Neighbours per unit area (2-D) or volume (3-D): counts / :func:`neighborhood_size`."""
    return (neighbor_counts(graph) / neighborhood_size(radius, dimensions)).astype(np.float64)


def neighborhood_average(graph: sp.csr_matrix, values: Any, include_self: bool = True) -> Any:
    """Mean of ``values`` rows over each cell's neighbours (and itself, by default).

    The classic spatial baseline's features: a cell described by its neighbourhood.
    """
    if include_self:
        graph = graph + sp.identity(graph.shape[0], format="csr", dtype=graph.dtype)
    degree = np.asarray(graph.sum(axis=1)).ravel()
    scale = sp.diags(1.0 / np.maximum(degree, 1))
    averaged = scale @ graph @ values
    return averaged
