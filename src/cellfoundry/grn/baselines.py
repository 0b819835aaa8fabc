"""The GRN baselines a benchmark must beat: correlation, GENIE3 and a random ranking.

GENIE3 (Huynh-Thu et al. 2010) is written here on scikit-learn random forests because
arboreto 0.1.6, the package behind GRNBoost2/GENIE3 in pySCENIC, no longer runs with current
dask (``dask.dataframe.from_delayed`` raises "Must supply at least one delayed object");
GENIE3's defaults are kept (random forests, ``max_features="sqrt"``, impurity importances of
each TF for each target), on a seeded subsample of cells to bound the cost.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cellfoundry.grn.edges import GeneUniverse, universe_expression


def correlation_edges(adata: Any, universe: GeneUniverse, method: str = "pearson") -> pd.DataFrame:
    """|Pearson| or |Spearman| correlation of each TF with each gene over all cells.

    The absolute value: activation and repression both count as regulation, as in BEELINE.
    Genes constant over the cells correlate with nothing (score 0).
    """
    from scipy.stats import rankdata

    if method not in ("pearson", "spearman"):
        raise ValueError(f"method={method!r}; use 'pearson' or 'spearman'.")
    x = universe_expression(adata, universe)
    if method == "spearman":
        x = rankdata(x, axis=0)
    x = x - x.mean(axis=0)
    norm = np.linalg.norm(x, axis=0)
    norm[norm == 0] = np.inf
    x = x / norm
    tf = x[:, universe.tf_positions()]
    return universe.edge_table(np.abs(tf.T @ x))


def genie3_edges(
    adata: Any,
    universe: GeneUniverse,
    n_trees: int = 100,
    max_cells: int | None = 1000,
    seed: int = 0,
    n_jobs: int = -1,
) -> pd.DataFrame:
    """GENIE3: each gene regressed on the TFs (itself excluded) by a random forest; the
    forest's importance of a TF is the edge score. Targets' importances are normalised to sum
    to 1 (as GENIE3 does) so that edges of easy and hard targets compare.

    Parameters
    ----------
    n_trees : int
        Trees per target (GENIE3 default 1000; 100 keeps the benchmark in minutes).
    max_cells : int or None
        Seeded subsample of cells the forests see.
    """
    from sklearn.ensemble import RandomForestRegressor

    x = universe_expression(adata, universe)
    rng = np.random.default_rng(seed)
    if max_cells is not None and x.shape[0] > max_cells:
        x = x[np.sort(rng.choice(x.shape[0], max_cells, replace=False))]
    tf_cols = universe.tf_positions()
    scores = np.full((tf_cols.size, x.shape[1]), np.nan)
    for target in range(x.shape[1]):
        inputs = tf_cols != target
        y = x[:, target]
        if y.std() == 0 or inputs.sum() == 0:
            scores[inputs, target] = 0.0
            continue
        forest = RandomForestRegressor(
            n_estimators=n_trees,
            max_features="sqrt",
            random_state=int(rng.integers(2**31 - 1)),
            n_jobs=n_jobs,
        )
        forest.fit(x[:, tf_cols[inputs]], y)
        importance = forest.feature_importances_
        total = importance.sum()
        scores[inputs, target] = importance / total if total > 0 else 0.0
    return universe.edge_table(scores)


def random_edges(universe: GeneUniverse, seed: int = 0) -> pd.DataFrame:
    """Uniform random scores: the floor every method is compared with (EPR ~ 1)."""
    rng = np.random.default_rng(seed)
    return universe.edge_table(rng.random((len(universe.tfs), len(universe.genes))))
