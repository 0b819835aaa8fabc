"""Gene regulatory network scores with BEELINE's definitions (Pratapa et al., Nat Methods 2020).

A method gives a ranked table of TF -> target edges. It is scored against a gold standard
(DoRothEA A-C, TRRUST) restricted to what the data can show: regulators are the TFs that are
in the TF list, measured, and regulate at least one measured gene in the gold standard
(BEELINE's "TF edges"); candidate edges are every such TF to every other measured gene
(self-loops excluded). Edges a method did not score rank below every scored edge, as ties.

- **EPR** (early precision ratio): precision of the top-k edges, k = number of true edges,
  divided by the edge density (the precision of a random ranking). As in BEELINE, edges tied
  with the k-th score are all kept, and unscored edges never count as predictions.
- **AUPRC ratio**: average precision divided by the density.
- **AUROC**.

numpy, pandas and scikit-learn only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

GRN_METRICS = ("epr", "auprc_ratio", "auroc")


@dataclass(frozen=True)
class GoldStandard:
    """True TF -> target edges over a gene universe, and the candidate regulators.

    Attributes
    ----------
    name : str
        E.g. ``"dorothea_AC"``.
    genes : tuple of str
        Measured genes (upper-case symbols): the possible targets.
    tfs : tuple of str
        Regulators scored: TF list ∩ genes ∩ gold-standard regulators with >= 1 true edge.
    edges : frozenset of (str, str)
        True (tf, target) pairs with both ends in the universe, no self-loops.
    """

    name: str
    genes: tuple[str, ...]
    tfs: tuple[str, ...]
    edges: frozenset

    @property
    def n_possible(self) -> int:
        return len(self.tfs) * (len(self.genes) - 1)

    @property
    def density(self) -> float:
        return len(self.edges) / self.n_possible

    def restrict_tfs(self, tfs: Iterable[str]) -> GoldStandard:
        """The same universe scored on a subset of regulators (e.g. held-out TFs)."""
        keep = {t.upper() for t in tfs}
        chosen = tuple(t for t in self.tfs if t in keep)
        if not chosen:
            raise ValueError(f"None of the given TFs are regulators of {self.name}.")
        edges = frozenset(e for e in self.edges if e[0] in keep)
        return GoldStandard(self.name, self.genes, chosen, edges)


def read_edges(path: str | Path, confidence: Iterable[str] | None = None) -> pd.DataFrame:
    """A gold-standard CSV (columns ``tf``, ``target`` and optionally ``confidence``).

    ``confidence`` keeps only those levels (e.g. ``"ABC"`` for DoRothEA A-C).
    """
    table = pd.read_csv(path)
    missing = {"tf", "target"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: no column(s) {sorted(missing)}; need tf,target[,confidence].")
    if confidence is not None:
        table = table[table["confidence"].astype(str).isin(list(confidence))]
    return table


def read_tf_list(path: str | Path) -> list[str]:
    """One symbol per line (Lambert et al. 2018's list as shipped in ``shared/data/grn``)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def gold_standard(
    edges: pd.DataFrame, genes: Iterable[str], tf_list: Iterable[str], name: str = "gold"
) -> GoldStandard:
    """Restrict gold-standard ``edges`` to measured ``genes`` and regulators in ``tf_list``.

    Raises
    ------
    ValueError
        When no regulator is left (a TF list with no overlap with the data or the gold
        standard), naming the three sets' sizes so the mismatch is visible.
    """
    universe = tuple(dict.fromkeys(str(g).upper() for g in genes))
    in_universe = set(universe)
    listed = {str(t).upper() for t in tf_list}
    tf = edges["tf"].astype(str).str.upper().to_numpy()
    target = edges["target"].astype(str).str.upper().to_numpy()
    keep = (
        np.isin(tf, list(listed))
        & np.isin(tf, list(in_universe))
        & np.isin(target, list(in_universe))
        & (tf != target)
    )
    true = frozenset(zip(tf[keep], target[keep], strict=True))
    tfs = tuple(sorted({t for t, _ in true}))
    if not tfs:
        raise ValueError(
            f"No regulator left for {name}: {len(listed)} listed TFs, {len(in_universe)} measured "
            f"genes, {len(set(tf))} gold-standard TFs share no TF with a measured target. Check "
            "that the TF list, the gold standard and the data's var_names all use gene symbols "
            "of the same species."
        )
    return GoldStandard(name, universe, tfs, true)


def candidate_scores(scores: pd.DataFrame, gold: GoldStandard) -> tuple[np.ndarray, np.ndarray]:
    """(score, is_true) for every candidate edge; unscored edges get NaN.

    ``scores`` has columns ``tf``, ``target``, ``score`` (higher = more likely regulation).
    Duplicate pairs keep their highest score.
    """
    missing = {"tf", "target", "score"} - set(scores.columns)
    if missing:
        raise ValueError(f"Edge table lacks column(s) {sorted(missing)}; need tf,target,score.")
    tf_pos = {t: i for i, t in enumerate(gold.tfs)}
    gene_pos = {g: i for i, g in enumerate(gold.genes)}
    matrix = np.full((len(gold.tfs), len(gold.genes)), np.nan)
    tf = scores["tf"].astype(str).str.upper().map(tf_pos)
    target = scores["target"].astype(str).str.upper().map(gene_pos)
    value = scores["score"].to_numpy(dtype=np.float64)
    ok = tf.notna().to_numpy() & target.notna().to_numpy() & np.isfinite(value)
    rows, cols = tf.to_numpy()[ok].astype(int), target.to_numpy()[ok].astype(int)
    order = np.argsort(value[ok], kind="stable")  # the highest duplicate is written last
    matrix[rows[order], cols[order]] = value[ok][order]
    truth = np.zeros_like(matrix, dtype=bool)
    for t, g in gold.edges:
        truth[tf_pos[t], gene_pos[g]] = True
    off_diagonal = np.ones_like(truth)
    for t, i in tf_pos.items():
        off_diagonal[i, gene_pos[t]] = False
    return matrix[off_diagonal], truth[off_diagonal]


@dataclass(frozen=True)
class GRNScores:
    """BEELINE scores of one edge ranking against one gold standard."""

    epr: float
    early_precision: float
    auprc: float
    auprc_ratio: float
    auroc: float
    density: float
    n_tfs: int
    n_true: int
    n_possible: int
    n_scored: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def early_precision(score: np.ndarray, truth: np.ndarray) -> float:
    """Precision of the top-k scored edges, k = number of true edges (BEELINE).

    Edges tied with the k-th score are all kept; NaN (unscored) edges never count. No scored
    edge gives 0.
    """
    k = int(truth.sum())
    scored = np.isfinite(score)
    if k == 0 or not scored.any():
        return 0.0
    values = score[scored]
    kth = np.sort(values)[::-1][min(k, values.size) - 1]
    top = scored & (np.nan_to_num(score, nan=-np.inf) >= kth)
    return float(truth[top].mean())


def _average_precision(ranked: np.ndarray, truth: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` (ties share one threshold), in numpy."""
    order = np.argsort(-ranked, kind="stable")
    values, hits = ranked[order], truth[order]
    last_of_tie = np.r_[values[1:] != values[:-1], True]
    true_positives = np.cumsum(hits)[last_of_tie]
    predicted = (np.arange(values.size) + 1)[last_of_tie]
    precision = true_positives / predicted
    recall = true_positives / max(hits.sum(), 1)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _auroc(ranked: np.ndarray, truth: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks for ties (= ``roc_auc_score``)."""
    from scipy.stats import rankdata

    n_true = int(truth.sum())
    n_false = truth.size - n_true
    if n_true == 0 or n_false == 0:
        return float("nan")
    ranks = rankdata(ranked)
    return float((ranks[truth].sum() - n_true * (n_true + 1) / 2) / (n_true * n_false))


def score_ranking(score: np.ndarray, truth: np.ndarray, n_tfs: int) -> GRNScores:
    """EPR, AUPRC ratio and AUROC of candidate-edge ``score`` (NaN = unscored) vs ``truth``.

    Written in numpy rather than with scikit-learn's metric functions (same definitions,
    checked in the tests) because the TF bootstrap scores thousands of rankings.
    """
    truth = np.asarray(truth, dtype=bool)
    density = float(truth.mean())
    ranked = np.nan_to_num(score, nan=-np.inf)
    if np.isfinite(ranked).any():
        ranked[~np.isfinite(ranked)] = np.min(ranked[np.isfinite(ranked)]) - 1.0
    else:
        ranked = np.zeros_like(ranked)
    precision = early_precision(score, truth)
    auprc = _average_precision(ranked, truth)
    return GRNScores(
        epr=precision / density,
        early_precision=precision,
        auprc=auprc,
        auprc_ratio=auprc / density,
        auroc=_auroc(ranked, truth),
        density=density,
        n_tfs=n_tfs,
        n_true=int(truth.sum()),
        n_possible=int(truth.size),
        n_scored=int(np.isfinite(score).sum()),
    )


def grn_scores(scores: pd.DataFrame, gold: GoldStandard) -> GRNScores:
    """Score an edge table (``tf``, ``target``, ``score``) against ``gold``."""
    score, truth = candidate_scores(scores, gold)
    return score_ranking(score, truth, len(gold.tfs))


def tf_bootstrap_differences(
    scores_a: pd.DataFrame | list[pd.DataFrame],
    scores_b: pd.DataFrame | list[pd.DataFrame],
    gold: GoldStandard,
    n_boot: int = 300,
    seed: int = 0,
) -> dict[str, dict[str, float | str]]:
    """Difference ``a - b`` of each metric, with a 95% CI from resampling regulators (TFs).

    Each side is one edge table or several (seeds); a side's value is the mean of its
    tables' metric. Both sides are scored on the same resampled TFs each time (a paired
    bootstrap; a TF drawn twice counts twice). Regulators are the unit because the edges of
    one TF are not independent.

    Returns
    -------
    dict
        metric -> ``difference``, ``ci_low``, ``ci_high``, ``verdict``.
    """
    from cellfoundry.evaluation.classification import verdict

    n_tfs = len(gold.tfs)
    sides = []
    for tables in (scores_a, scores_b):
        tables = [tables] if isinstance(tables, pd.DataFrame) else list(tables)
        matrices = []
        for table in tables:
            score, truth = candidate_scores(table, gold)
            matrices.append((score.reshape(n_tfs, -1), truth.reshape(n_tfs, -1)))
        sides.append(matrices)

    def values(side: int, rows: np.ndarray) -> np.ndarray:
        each = []
        for score, truth in sides[side]:
            if not truth[rows].any():
                return np.full(len(GRN_METRICS), np.nan)
            scored = score_ranking(score[rows].ravel(), truth[rows].ravel(), rows.size)
            each.append([getattr(scored, metric) for metric in GRN_METRICS])
        return np.mean(each, axis=0)

    rng = np.random.default_rng(seed)
    everything = np.arange(n_tfs)
    observed = values(0, everything) - values(1, everything)
    draws = []
    for _ in range(n_boot):
        rows = rng.integers(0, n_tfs, n_tfs)
        draws.append(values(0, rows) - values(1, rows))
    low, high = np.nanpercentile(np.array(draws), [2.5, 97.5], axis=0)
    return {
        metric: {
            "difference": float(observed[i]),
            "ci_low": float(low[i]),
            "ci_high": float(high[i]),
            "verdict": verdict(float(low[i]), float(high[i]), lower_is_better=False),
        }
        for i, metric in enumerate(GRN_METRICS)
    }
