"""Annotation metrics: accuracy, macro/per-class F1, and paired bootstrap differences.

Annotation benchmarks compare predictors on the *same* cells, so the uncertainty that matters
for "A beats B" is that of the difference, not of each score alone. :func:`paired_bootstrap`
resamples cells with replacement once per draw and scores both predictors on that same
resample: how hard the drawn cells are is shared and cancels, so the interval is much tighter
than two separate intervals would suggest, and honest about it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

Metric = Callable[[np.ndarray, np.ndarray], float]

_CHUNK_VALUES = 2**22  # resampled cell indices held at once; bounds memory, not results


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Fraction of cells whose predicted label equals the true one."""
    return float(accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


def macro_f1(
    y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any] | None = None
) -> float:
    """Unweighted mean of per-class F1, so rare cell types count as much as common ones.

    Parameters
    ----------
    y_true, y_pred : sequence
        True and predicted labels, one per cell.
    labels : sequence, optional
        Classes averaged over; default (scikit-learn's) is every class seen in either
        ``y_true`` or ``y_pred``. A class never predicted nor present scores 0.
    """
    return float(
        f1_score(
            np.asarray(y_true), np.asarray(y_pred), labels=labels, average="macro", zero_division=0
        )
    )


def per_class_f1(
    y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any] | None = None
) -> dict[Any, float]:
    """F1 of each class, keyed by label (sorted; default: classes of ``y_true`` or ``y_pred``)."""
    y_true_arr, y_pred_arr = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(np.concatenate([y_true_arr, y_pred_arr])) if labels is None else labels
    scores = f1_score(y_true_arr, y_pred_arr, labels=classes, average=None, zero_division=0)
    return {_plain(label): float(score) for label, score in zip(classes, scores, strict=True)}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so reports serialise to JSON as they are."""
    return value.item() if isinstance(value, np.generic) else value


class PairedDifference(NamedTuple):
    """``metric(a) - metric(b)`` on all cells and its 95% percentile bootstrap interval.

    Unpacks as ``value, (low, high) = paired_bootstrap(...)``.
    """

    value: float
    ci95: tuple[float, float]


def _resamples(n_cells: int, draws: int, seed: int) -> Iterator[np.ndarray]:
    """(chunk, n_cells) cell indices drawn with replacement; same seed, same draws."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_VALUES // max(n_cells, 1))
    for start in range(0, draws, chunk):
        yield rng.integers(0, n_cells, size=(min(chunk, draws - start), n_cells))


def _counts(codes: np.ndarray, picks: np.ndarray, n_classes: int) -> np.ndarray:
    """(draws, n_classes) occurrences of each class code among each draw's picked cells."""
    rows = np.repeat(np.arange(len(picks)), picks.shape[1]) * n_classes
    flat = rows + codes[picks].ravel()
    return np.bincount(flat, minlength=len(picks) * n_classes).reshape(len(picks), n_classes)


def _fast_scores(
    name: str, truth: np.ndarray, pred: np.ndarray, picks: np.ndarray, n_classes: int
) -> np.ndarray:
    """Accuracy or macro-F1 of every draw at once, from per-class counts.

    Macro-F1 matches scikit-learn's default on each resample: classes present in the
    resample's truth or predictions, F1 = 2 TP / (2 TP + FP + FN).
    """
    correct = truth == pred
    if name == "accuracy":
        return correct[picks].mean(axis=1)
    hit_codes = np.where(correct, truth, n_classes)  # misses go to a spare column
    true_positives = _counts(hit_codes, picks, n_classes + 1)[:, :n_classes]
    support = _counts(truth, picks, n_classes) + _counts(pred, picks, n_classes)
    present = support > 0
    f1 = np.divide(2 * true_positives, support, out=np.zeros(support.shape), where=present)
    return f1.sum(axis=1) / present.sum(axis=1)


def paired_bootstrap(
    y_true: Sequence[Any],
    pred_a: Sequence[Any],
    pred_b: Sequence[Any],
    metric: str | Metric = "macro_f1",
    draws: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """Difference ``metric(a) - metric(b)`` with a paired bootstrap 95% interval over cells.

    Parameters
    ----------
    y_true, pred_a, pred_b : sequence
        True labels and the two predictors' labels for the same cells, in the same order.
    metric : {"macro_f1", "accuracy"} or callable
        Named metrics are computed for all draws at once from class counts; a callable
        ``metric(y_true, y_pred) -> float`` is called twice per draw (slower).
    draws, seed : int
        Number of resamples of the cells, and the seed that fixes them.

    Returns
    -------
    PairedDifference
        ``value`` on all cells and ``ci95`` = (2.5th, 97.5th) percentiles of the resampled
        differences; exactly (0, 0) when the two predictors agree on every cell.
    """
    truth = np.asarray(y_true)
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if not len(truth) == len(a) == len(b) or len(truth) == 0:
        raise ValueError(
            f"y_true, pred_a and pred_b must be non-empty and equally long, got "
            f"{len(truth)}, {len(a)}, {len(b)}."
        )
    if isinstance(metric, str):
        named = {"macro_f1": macro_f1, "accuracy": accuracy}
        if metric not in named:
            raise ValueError(
                f"Unknown metric {metric!r}; use one of {sorted(named)} or a callable."
            )
        value = named[metric](truth, a) - named[metric](truth, b)
        classes, codes = np.unique(np.concatenate([truth, a, b]), return_inverse=True)
        truth_c, a_c, b_c = np.split(codes.ravel(), 3)
        differences = np.concatenate(
            [
                _fast_scores(metric, truth_c, a_c, picks, len(classes))
                - _fast_scores(metric, truth_c, b_c, picks, len(classes))
                for picks in _resamples(len(truth), draws, seed)
            ]
        )
    else:
        value = metric(truth, a) - metric(truth, b)
        differences = np.array(
            [
                metric(truth[pick], a[pick]) - metric(truth[pick], b[pick])
                for picks in _resamples(len(truth), draws, seed)
                for pick in picks
            ]
        )
    low, high = np.percentile(differences, [2.5, 97.5])
    return PairedDifference(float(value), (float(low), float(high)))


def verdict(low: float, high: float, lower_is_better: bool = False) -> str:
    """ "better" / "worse" / "no difference" for an interval of ``ours - baseline``."""
    if lower_is_better:
        low, high = -high, -low
    return "better" if low > 0 else "worse" if high < 0 else "no difference"
