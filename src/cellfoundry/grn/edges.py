"""The gene universe a network is inferred over, and edge tables as TSV.

BEELINE infers networks over the most variable genes plus the TFs among them; so do we, so
every method (model or baseline) scores exactly the same candidate edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class GeneUniverse:
    """Genes of a network: ``columns`` of the data, their symbols, and which are regulators.

    Attributes
    ----------
    columns : numpy.ndarray
        Column positions in the data's var, int64.
    genes : tuple of str
        Upper-case symbols of those columns (the possible targets).
    tfs : tuple of str
        The regulators among ``genes`` (candidate sources of edges).
    """

    columns: np.ndarray
    genes: tuple[str, ...]
    tfs: tuple[str, ...]

    def tf_positions(self) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.genes)}
        return np.array([index[t] for t in self.tfs], dtype=np.int64)

    def edge_table(self, matrix: np.ndarray) -> pd.DataFrame:
        """Long table from a (len(tfs), len(genes)) score matrix; NaN and self-loops dropped,
        sorted by score (highest first)."""
        if matrix.shape != (len(self.tfs), len(self.genes)):
            raise ValueError(
                f"score matrix {matrix.shape} != (tfs, genes) = {(len(self.tfs), len(self.genes))}"
            )
        tf = np.repeat(np.asarray(self.tfs, dtype=object), len(self.genes))
        target = np.tile(np.asarray(self.genes, dtype=object), len(self.tfs))
        score = matrix.ravel()
        keep = np.isfinite(score) & (tf != target)
        table = pd.DataFrame({"tf": tf[keep], "target": target[keep], "score": score[keep]})
        return table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def gene_universe(
    adata: Any,
    tf_list: list[str],
    n_genes: int = 1000,
    tf_pool: int = 3000,
    min_fraction: float = 0.05,
) -> GeneUniverse:
    """The ``n_genes`` most variable genes, plus listed TFs among the ``tf_pool`` most variable.

    Only genes detected in at least ``min_fraction`` of the cells compete (BEELINE drops genes
    seen in under 10% of cells): dispersion alone favours genes seen in a handful of cells,
    whose regulators no method can infer. Variability is Seurat's binned dispersion on
    log1p-normalised values (the baselines' rule,
    :func:`cellfoundry.evaluation.baselines.seurat_hvg`). Duplicate symbols keep their first
    column.

    Raises
    ------
    ValueError
        When none of the listed TFs is among the variable genes (a TF list of another species
        or naming scheme).
    """
    import scipy.sparse as sp

    from cellfoundry.evaluation.baselines import log_input, log_normalize, seurat_hvg

    x, kind = log_input(adata)
    log_x = log_normalize(x, kind)
    detected = log_x > 0
    fraction = np.asarray(detected.mean(axis=0)).ravel() if sp.issparse(log_x) else detected.mean(0)
    candidates = np.flatnonzero(fraction >= min_fraction)
    if candidates.size == 0:
        raise ValueError(
            f"No gene is detected in {min_fraction:.0%} of the cells; lower min_fraction."
        )
    log_x = log_x[:, candidates]
    pool = candidates[seurat_hvg(log_x, min(tf_pool, candidates.size))]
    top = set(candidates[seurat_hvg(log_x, min(n_genes, candidates.size))].tolist())
    symbols = np.asarray(adata.var_names.astype(str).str.upper())
    listed = {t.upper() for t in tf_list}
    chosen: dict[str, int] = {}
    for column in sorted(top | {int(c) for c in pool if symbols[c] in listed}):
        chosen.setdefault(symbols[column], column)
    tfs = tuple(g for g in chosen if g in listed)
    if not tfs:
        raise ValueError(
            f"None of the {len(listed)} listed TFs is among the {tf_pool} most variable genes "
            f"(var_names look like {list(symbols[:3])}). Give a TF list of this species in the "
            "data's naming (gene symbols)."
        )
    return GeneUniverse(
        columns=np.fromiter(chosen.values(), dtype=np.int64),
        genes=tuple(chosen),
        tfs=tfs,
    )


def universe_of_genes(adata: Any, genes: list[str], tfs: list[str]) -> GeneUniverse:
    """The universe of known ``genes`` (upper-case symbols, e.g. a fine-tuned model's) in
    ``adata``'s columns; a symbol held by several columns takes the first."""
    first: dict[str, int] = {}
    for column, symbol in enumerate(adata.var_names.astype(str).str.upper()):
        first.setdefault(symbol, column)
    missing = [g for g in genes if g not in first]
    if missing:
        raise ValueError(f"Gene(s) {missing[:10]} of the universe are not in the data's var_names.")
    columns = np.array([first[g] for g in genes], dtype=np.int64)
    return GeneUniverse(columns, tuple(genes), tuple(tfs))


def universe_expression(adata: Any, universe: GeneUniverse) -> np.ndarray:
    """log1p-normalised values of the universe's genes, dense (cells, genes) float64."""
    import scipy.sparse as sp

    from cellfoundry.evaluation.baselines import log_input, log_normalize

    x, kind = log_input(adata)
    log_x = log_normalize(x, kind)[:, universe.columns]
    return log_x.toarray() if sp.issparse(log_x) else np.asarray(log_x)


def write_edges(table: pd.DataFrame, path: str | Path, top: int | None = None) -> Path:
    """Write ``tf``, ``target``, ``score`` (+ ``rank``) as TSV, atomically (no half file)."""
    from cellfoundry._io import atomic_write_text

    table = table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    if top is not None:
        table = table.head(top)
    table = table.assign(rank=np.arange(1, len(table) + 1))
    path = Path(path)
    atomic_write_text(path, table.to_csv(sep="\t", index=False))
    return path
