"""Standard baselines that every benchmark script runs beside the models, in the same process.

DESIGN 9: a model figure stands beside baselines on the same cells and split. These are the
representations and classifiers a single-cell analyst would use without any foundation model:

- :func:`seurat_hvg` / :func:`pca_baseline`: ``log1p(normalize_total(1e4))`` -> Seurat HVGs ->
  PCA, the zero-shot embedding baseline (scanpy's recipe, reimplemented here because scanpy is
  not a dependency);
- :func:`logistic_regression_hvg`: L2 logistic regression on standardised log-normalised HVGs,
  the strong linear annotation baseline;
- :func:`knn_on_pca`: k-nearest-neighbour label transfer on PCA, what reference mapping by
  clustering amounts to;
- :func:`harmony_embedding`: Harmony (``harmonypy``) on PCA scores, the usual integration
  baseline.

Supervised baselines choose HVGs and fit PCA / scaling on the training cells only: test cells
must not shape the features (no leakage), exactly as a fine-tuned model never sees them.

They live in the package (not in ``benchmarks/``) so the fine-tuning runner can score the
same baselines on its test split and put them on the model card. numpy, scipy, pandas and
scikit-learn only; ``harmonypy`` (a ``dev`` extra) is imported when Harmony is asked for.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from importlib import metadata
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

TARGET_SUM = 1e4  # scanpy / Seurat normalize_total target: counts per 10,000


class Prediction(NamedTuple):
    """Predictions of a supervised baseline for the test cells.

    ``labels`` (n_test,), ``probabilities`` (n_test, n_classes) with columns in the order of
    ``classes``, and ``details`` (JSON-able: genes, components, convergence) for the report.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    classes: np.ndarray
    details: dict[str, Any]

    @classmethod
    def of(cls, classifier: Any, x_test: Any, details: dict[str, Any]) -> Prediction:
        """Labels, probabilities and class order of a fitted scikit-learn classifier."""
        return cls(
            labels=classifier.predict(x_test),
            probabilities=classifier.predict_proba(x_test),
            classes=classifier.classes_,
            details=details,
        )


# -- normalisation and gene selection ---------------------------------------------------------
def log_normalize(x: Any, x_kind: str) -> np.ndarray | sp.csr_matrix:
    """``log1p(x / total * 1e4)`` per cell for counts; log-normalised input passes through.

    Parameters
    ----------
    x : scipy.sparse matrix or array-like, (cells, genes)
        Expression matrix.
    x_kind : {"counts", "lognorm"}
        ``uns['x_kind']`` of the file. Other kinds (z-scores, volume-normalised values) are
        refused: log1p of them is no standard recipe, so a baseline on them would be ad hoc.

    Returns
    -------
    scipy.sparse.csr_matrix or numpy.ndarray
        float64, always a new object: CSR when ``x`` is sparse (zeros stay zeros, so
        sparsity is kept), a dense ndarray otherwise. Cells with no counts stay all zero.

    Notes
    -----
    Depth normalisation uses each cell's own total only, so normalising train and test cells
    separately is the same as normalising them together (no leakage).
    """
    if x_kind not in ("counts", "lognorm"):
        raise ValueError(
            f"x_kind={x_kind!r}: log_normalize takes 'counts' or 'lognorm' values; transform "
            "the data yourself and pass x_kind='lognorm' to use it as given."
        )
    if sp.issparse(x):
        out = sp.csr_matrix(x, dtype=np.float64, copy=True)
        out.sum_duplicates()  # one stored value per entry, so log1p applies once
        if x_kind == "counts":
            totals = np.asarray(out.sum(axis=1)).ravel()
            scale = np.repeat(np.maximum(totals, 1e-12), np.diff(out.indptr))
            out.data = np.log1p(out.data / scale * TARGET_SUM)
        return out
    out = np.array(x, dtype=np.float64, copy=True)
    if x_kind == "counts":
        totals = out.sum(axis=1, keepdims=True)
        out = np.log1p(out / np.maximum(totals, 1e-12) * TARGET_SUM)
    return out


def log_input(adata: Any) -> tuple[Any, str]:
    """``adata.X`` and the ``x_kind`` :func:`log_normalize` should read it as.

    Values that are neither counts nor log-normalised (``uns["x_kind"]``, e.g. MERFISH's
    volume-normalised values) are log1p-transformed and used as log-normalised input: the one
    rule every baseline applies to such data. z-scores tokenized as ``exp(z)``
    (:mod:`cellfoundry.tokenization.zscores`) go back to ``z``.
    """
    from cellfoundry.tokenization.zscores import X_KIND as EXP_Z

    x_kind = str(adata.uns.get("x_kind", "counts"))
    if x_kind in ("counts", "lognorm"):
        return adata.X, x_kind
    if x_kind == EXP_Z:  # z-scores stored as exp(z) for the tokenizer: baselines read z itself
        return np.log(adata.X), "lognorm"
    return np.log1p(adata.X), "lognorm"


def _expm1_mean_var(log_x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and variance (ddof=1) of ``expm1(log_x)``, dense or sparse input."""
    if not sp.issparse(log_x):
        x = np.expm1(log_x.astype(np.float64))
        return x.mean(axis=0), x.var(axis=0, ddof=1)
    # sparse: expm1(0) = 0, so the moments come from the stored values without densifying
    x = sp.csr_matrix(log_x, dtype=np.float64, copy=True)
    x.data = np.expm1(x.data)
    n = x.shape[0]
    mean = np.asarray(x.sum(axis=0)).ravel() / n
    squares = np.asarray(x.multiply(x).sum(axis=0)).ravel()
    var = (squares - n * mean**2) / max(n - 1, 1)
    return mean, np.maximum(var, 0.0)


def seurat_hvg(log_x: Any, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Indices of the top genes by Seurat's binned normalised dispersion (scanpy "seurat").

    Means and dispersions are computed on ``expm1`` of log-normalised data, the log dispersion
    is z-scored within 20 equal-width bins of log1p(mean), and the ``n_top`` highest are kept
    (all genes when there are at most ``n_top``). Dense input gives exactly the figures of
    the original zero-shot benchmark; sparse input the same genes up to float rounding,
    without densifying a large matrix.
    """
    import pandas as pd

    if log_x.shape[1] <= n_top:
        return np.arange(log_x.shape[1])
    mean, var = _expm1_mean_var(log_x)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    frame = pd.DataFrame({"mean": np.log1p(mean), "dispersion": dispersion})
    frame["bin"] = pd.cut(frame["mean"], bins=n_bins)
    grouped = frame.groupby("bin", observed=False)["dispersion"]
    bin_mean, bin_std = grouped.mean(), grouped.std(ddof=1)
    single = bin_std.isnull()  # a bin with one gene: as scanpy, z = (d - 0) / d
    bin_std[single], bin_mean[single] = bin_mean[single], 0
    norm = (frame["dispersion"] - bin_mean[frame["bin"]].to_numpy()) / bin_std[
        frame["bin"]
    ].to_numpy()
    score = np.nan_to_num(norm.to_numpy(dtype=np.float64), nan=-np.inf)
    return np.sort(np.argsort(-score, kind="stable")[:n_top])


def pca_baseline(adata, x_kind: str, n_hvg: int, n_comps: int, seed: int) -> tuple:
    """log1p(normalize_total 1e4) -> HVG -> PCA on the same cells; returns (X, details)."""
    from sklearn.decomposition import PCA

    x = adata.X.toarray().astype(np.float64)
    if x_kind == "counts":
        totals = x.sum(axis=1, keepdims=True)
        x = np.log1p(x / np.maximum(totals, 1e-12) * 1e4)
        steps = "normalize_total(1e4) -> log1p"
    else:
        steps = "X as given (already log1p(normalize_total))"
    genes = seurat_hvg(x, n_hvg)
    n = min(n_comps, len(genes), x.shape[0] - 1)
    pca = PCA(n_components=n, svd_solver="full", random_state=seed)
    scores = pca.fit_transform(x[:, genes])
    details = {
        "steps": f"{steps} -> Seurat HVG ({len(genes)} genes) -> PCA({n}), centred, not scaled",
        "n_hvg": int(len(genes)),
        "n_components": int(n),
        "explained_variance_ratio_sum": round(float(pca.explained_variance_ratio_.sum()), 4),
    }
    return scores.astype(np.float32), details


# -- supervised annotation baselines -----------------------------------------------------------
def _train_features(
    x_train: Any, x_test: Any, x_kind: str, n_hvg: int
) -> tuple[Any, Any, np.ndarray]:
    """Log-normalised HVG columns of train and test; HVGs chosen on the training cells only."""
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"x_train has {x_train.shape[1]} genes but x_test {x_test.shape[1]}; both must "
            "hold the same genes in the same order."
        )
    log_train = log_normalize(x_train, x_kind)
    genes = seurat_hvg(log_train, n_hvg)  # train cells only: the test set must not pick genes
    log_test = log_normalize(x_test, x_kind)
    return log_train[:, genes], log_test[:, genes], genes


def _labels(y_train: Sequence[Any], n_train: int) -> np.ndarray:
    y = np.asarray(y_train)
    if y.shape != (n_train,):
        raise ValueError(f"y_train has shape {y.shape}; expected one label per training cell.")
    if np.unique(y).size < 2:
        raise ValueError("y_train holds a single label; a classifier needs at least two.")
    return y


def logistic_regression_hvg(
    x_train: Any,
    y_train: Sequence[Any],
    x_test: Any,
    x_kind: str,
    n_hvg: int = 2000,
    C: float = 1.0,
    seed: int = 0,
    class_weight: str | dict | None = None,
    max_iter: int = 1000,
) -> Prediction:
    """L2 logistic regression on standardised log-normalised HVGs (the linear baseline).

    Parameters
    ----------
    x_train, x_test : scipy.sparse matrix or array, (cells, genes)
        Same genes, same order.
    y_train : sequence, (n_train,)
        Training labels.
    x_kind : {"counts", "lognorm"}
        See :func:`log_normalize`.
    n_hvg : int
        Seurat HVGs chosen on the training cells only, so the test cells cannot leak into the
        features; all genes when there are fewer.
    C : float
        Inverse L2 strength (scikit-learn's; 1.0 is its default and scanpy tutorials').
    seed : int
        ``random_state`` of the classifier (lbfgs is deterministic; kept for uniformity).
    class_weight : "balanced", dict or None
        ``"balanced"`` weighs rare cell types up, which helps macro F1.
    max_iter : int
        lbfgs iterations; 1,000 converges on standardised features of the shared datasets.
        Non-convergence is logged and reported in ``details["converged"]``.

    Returns
    -------
    Prediction
        Test labels, class probabilities (n_test, n_classes), class order, details.

    Notes
    -----
    The scaler is fitted on the training cells. With sparse input it only divides by the
    standard deviation (``with_mean=False``), which keeps the matrix sparse; centring would
    only move the unpenalised intercept, so the optimum is the same either way.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y = _labels(y_train, x_train.shape[0])
    train, test, genes = _train_features(x_train, x_test, x_kind, n_hvg)
    scaler = StandardScaler(with_mean=not sp.issparse(train)).fit(train)
    # L2 is the default penalty in every scikit-learn version (``penalty`` is deprecated in 1.8)
    model = LogisticRegression(
        C=C, solver="lbfgs", max_iter=max_iter, class_weight=class_weight, random_state=seed
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(scaler.transform(train), y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        logger.warning("logistic regression did not converge in %d iterations", max_iter)
    test_scaled = scaler.transform(test)
    details = {
        "steps": "log1p(normalize_total 1e4) -> Seurat HVG (train cells) -> standardise "
        "(train) -> L2 logistic regression (lbfgs)",
        "n_hvg": int(len(genes)),
        "genes": genes.tolist(),  # column indices of the HVGs, for the report
        "C": float(C),
        "class_weight": class_weight,
        "n_iter": int(np.max(model.n_iter_)),
        "converged": converged,
    }
    return Prediction.of(model, test_scaled, details)


def pca_projection(
    x_train: Any, x_test: Any, x_kind: str, n_hvg: int = 2000, n_comps: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """PCA of log-normalised HVGs fitted on the training cells; the test cells projected.

    Returns (train scores, test scores, HVG column indices, components). A test set must not
    shape the space it is scored in, just as a reference atlas is fixed before queries arrive.
    """
    from sklearn.decomposition import PCA

    train, test, genes = _train_features(x_train, x_test, x_kind, n_hvg)
    if sp.issparse(train):  # PCA centres the data, which a sparse matrix cannot hold anyway
        train, test = train.toarray(), test.toarray()
    n = min(n_comps, len(genes), train.shape[0] - 1)
    pca = PCA(n_components=n, svd_solver="full", random_state=seed).fit(train)
    return pca.transform(train), pca.transform(test), genes, n


def knn_on_pca(
    x_train: Any,
    y_train: Sequence[Any],
    x_test: Any,
    x_kind: str,
    n_hvg: int = 2000,
    n_comps: int = 50,
    k: int = 15,
    seed: int = 0,
) -> Prediction:
    """k-nearest-neighbour label transfer in a PCA space fitted on the training cells.

    Parameters
    ----------
    x_train, x_test, y_train, x_kind, n_hvg
        As :func:`logistic_regression_hvg`; HVGs from the training cells only.
    n_comps : int
        PCA components (fewer when genes or training cells limit it). PCA is fitted on the
        training cells and the test cells are projected: a test set must not shape the space
        it is classified in, just as a reference atlas is fixed before queries arrive.
    k : int
        Neighbours (Euclidean), 15 as scanpy's and the zero-shot benchmark's default.
    seed : int
        PCA ``random_state`` (the full SVD is deterministic; kept for uniformity).

    Returns
    -------
    Prediction
        Majority label of the ``k`` training neighbours; probabilities are neighbour fractions.
    """
    from sklearn.neighbors import KNeighborsClassifier

    y = _labels(y_train, x_train.shape[0])
    train_pcs, test_pcs, genes, n = pca_projection(x_train, x_test, x_kind, n_hvg, n_comps, seed)
    n_neighbors = min(k, train_pcs.shape[0])
    knn = KNeighborsClassifier(n_neighbors=n_neighbors, metric="euclidean")
    knn.fit(train_pcs, y)
    details = {
        "steps": "log1p(normalize_total 1e4) -> Seurat HVG (train cells) -> PCA (train cells; "
        f"test projected) -> kNN (k={n_neighbors}, Euclidean)",
        "n_hvg": int(len(genes)),
        "genes": genes.tolist(),
        "n_components": int(n),
        "k": int(n_neighbors),
    }
    return Prediction.of(knn, test_pcs, details)


# -- integration baseline ---------------------------------------------------------------------
def harmony_embedding(
    pca_scores: np.ndarray,
    batch_labels: Sequence[Any],
    seed: int = 0,
    theta: float = 2.0,
    n_threads: int = 1,
) -> np.ndarray:
    """Harmony-corrected PCA scores (Korsunsky et al. 2019) via ``harmonypy``.

    Parameters
    ----------
    pca_scores : numpy.ndarray, (cells, comps)
        E.g. :func:`pca_baseline`'s scores. Harmony corrects an existing embedding; it does
        not change the genes, so it is the integration baseline a model embedding is compared
        with, next to uncorrected PCA.
    batch_labels : sequence, (cells,)
        Batch / slice / donor of each cell.
    seed : int
        harmonypy's ``random_state`` (its k-means initialisation).
    theta : float
        Diversity penalty, harmonypy's and R Harmony's default 2.
    n_threads : int
        harmonypy 2.x threads (its default takes every physical core; results do not depend
        on it).

    Returns
    -------
    numpy.ndarray
        float32 (cells, comps), cells in the input order.

    Notes
    -----
    harmonypy 2.x (C++ backend) returns ``Z_corr`` as (cells, comps); 0.0.x returned
    (comps, cells). The input is passed as (comps, cells), which both read unambiguously, and
    the output is turned to (cells, comps) by its shape (by the version when square).
    """
    import harmonypy
    import pandas as pd

    scores = np.asarray(pca_scores, dtype=np.float64)
    batches = np.asarray(batch_labels).astype(str)
    if scores.ndim != 2 or batches.shape != (scores.shape[0],):
        raise ValueError(
            f"pca_scores has shape {scores.shape} and batch_labels {batches.shape}; pass a "
            "(cells, comps) matrix and one batch label per cell."
        )
    if np.unique(batches).size < 2:
        raise ValueError("batch_labels holds a single batch: there is nothing to integrate.")
    n_cells, n_comps = scores.shape
    options: dict[str, Any] = {"max_iter_harmony": 10, "verbose": False, "random_state": seed}
    major = int(metadata.version("harmonypy").split(".")[0])
    if major >= 2:
        options["ncores"] = n_threads
    result = harmonypy.run_harmony(
        np.ascontiguousarray(scores.T),
        pd.DataFrame({"batch": batches}),
        ["batch"],
        theta=theta,
        **options,
    )
    corrected = np.asarray(result.Z_corr)
    if corrected.shape == (n_comps, n_cells) and (n_cells != n_comps or major < 2):
        corrected = corrected.T
    return np.ascontiguousarray(corrected, dtype=np.float32)
