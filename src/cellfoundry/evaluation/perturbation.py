"""Perturbation-response metrics: how well a predicted expression profile matches the observed one.

Profiles are mean log1p-normalised expression vectors (genes,) of a group of cells (a held-out
cell type under stimulation, cells with one knockout). Raw Pearson between predicted and
observed profiles is never reported alone: any profile correlates ~0.99 with any other because
of the genes' baseline levels, so the no-change baseline looks perfect. The figures here
compare changes against the control profile, or distances on the genes that matter:

- ``l2_top1000``: Euclidean distance on the 1,000 genes most expressed in control
  (Ahlmann-Eltze et al., Nature Methods 2025);
- ``pearson_delta``: Pearson correlation of predicted vs observed change from control, all
  genes (scGPT / GEARS's "Pearson delta");
- ``pearson_delta_de20``: the same on the 20 genes that change most (observed);
- ``mse``: mean squared error over all genes;
- ``de_direction``: share of those top-20 DE genes whose predicted change has the observed sign.

DE genes are ranked by the absolute observed change of the mean log1p profile (no test
statistic: these are group means, and the ranking is what GEARS and scGPT use for "top DE").
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_TOP_EXPRESSED = 1000
N_DE = 20
METRICS = ("l2_top1000", "pearson_delta", "pearson_delta_de20", "mse", "de_direction")
LOWER_IS_BETTER = {"l2_top1000", "mse"}


def _vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values; pass finite mean profiles.")
    return array


def top_expressed(control: np.ndarray, n: int = N_TOP_EXPRESSED) -> np.ndarray:
    """Indices of the ``n`` genes with the highest control expression (ties: lower index)."""
    control = _vector(control, "control")
    return np.sort(np.argsort(-control, kind="stable")[: min(n, control.size)])


def top_de(control: np.ndarray, observed: np.ndarray, n: int = N_DE) -> np.ndarray:
    """Indices of the ``n`` genes whose observed mean changes most from control (|delta|)."""
    delta = _vector(observed, "observed") - _vector(control, "control")
    return np.argsort(-np.abs(delta), kind="stable")[: min(n, delta.size)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (undefined, not 0)."""
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def perturbation_metrics(
    predicted: Any,
    observed: Any,
    control: Any,
    n_top_expressed: int = N_TOP_EXPRESSED,
    n_de: int = N_DE,
) -> dict[str, float]:
    """All five metrics of one predicted profile.

    Parameters
    ----------
    predicted, observed, control : array-like, (genes,)
        Mean log1p-normalised profiles: the prediction, the truth, and the unperturbed
        (control) cells of the same group, genes in the same order.
    n_top_expressed, n_de : int
        Genes for ``l2_top1000`` (by control expression) and for the DE-restricted metrics.

    Returns
    -------
    dict
        ``l2_top1000`` and ``mse`` (lower is better), ``pearson_delta``,
        ``pearson_delta_de20`` and ``de_direction`` (higher is better).
    """
    predicted = _vector(predicted, "predicted")
    observed = _vector(observed, "observed")
    control = _vector(control, "control")
    if not predicted.size == observed.size == control.size or predicted.size < 2:
        raise ValueError(
            f"predicted ({predicted.size}), observed ({observed.size}) and control "
            f"({control.size}) must be profiles over the same genes (at least 2)."
        )
    top = top_expressed(control, n_top_expressed)
    de = top_de(control, observed, n_de)
    delta_true, delta_pred = observed - control, predicted - control
    return {
        "l2_top1000": float(np.linalg.norm(predicted[top] - observed[top])),
        "pearson_delta": _pearson(delta_pred, delta_true),
        "pearson_delta_de20": _pearson(delta_pred[de], delta_true[de]),
        "mse": float(np.mean((predicted - observed) ** 2)),
        "de_direction": float(np.mean(np.sign(delta_pred[de]) == np.sign(delta_true[de]))),
    }
