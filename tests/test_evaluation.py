"""Evaluation metrics: hand-computed cases, a per-cell LISI reference, and real Visium spots."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import shared_file
from scipy.optimize import brentq
from sklearn.metrics import accuracy_score, f1_score

from cellfoundry.evaluation import (
    accuracy,
    batch_silhouette,
    graph_connectivity,
    ilisi,
    integration_scores,
    knn_accuracy,
    knn_predictions,
    label_silhouette,
    lisi_from_neighbors,
    macro_f1,
    nearest_neighbors,
    nmi_ari,
    paired_bootstrap,
    per_class_f1,
)


def blobs(centres: list[list[float]], per_blob: int, spread: float, seed: int = 0):
    """Gaussian blobs: (points, blob index of each point)."""
    rng = np.random.default_rng(seed)
    centres_arr = np.asarray(centres, dtype=float)
    which = np.repeat(np.arange(len(centres_arr)), per_blob)
    return centres_arr[which] + rng.normal(
        scale=spread, size=(len(which), centres_arr.shape[1])
    ), which


# ---------------------------------------------------------------------------- classification


def test_macro_and_per_class_f1_match_a_hand_example_and_sklearn():
    truth = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    # a: TP 1, FP 1, FN 1 -> 0.5; b: TP 2, FP 1 -> 0.8; c: never predicted -> 0.
    assert per_class_f1(truth, pred) == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.0})
    assert macro_f1(truth, pred) == pytest.approx(1.3 / 3)
    assert macro_f1(truth, pred) == pytest.approx(f1_score(truth, pred, average="macro"))
    assert accuracy(truth, pred) == pytest.approx(3 / 5)


def test_paired_bootstrap_of_identical_predictors_is_exactly_zero():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    for metric in ("macro_f1", "accuracy"):
        value, (low, high) = paired_bootstrap(truth, pred, pred, metric=metric, draws=300)
        assert (value, low, high) == (0.0, 0.0, 0.0)


def _noisy_predictor(truth: np.ndarray, correct: float, rng) -> np.ndarray:
    """Right with probability ``correct``, else a uniformly chosen wrong class of 3."""
    wrong = (truth + rng.integers(1, 3, len(truth))) % 3
    return np.where(rng.random(len(truth)) < correct, truth, wrong)


def test_paired_bootstrap_interval_contains_the_true_difference():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 3000)
    better, worse = _noisy_predictor(truth, 0.85, rng), _noisy_predictor(truth, 0.75, rng)
    value, (low, high) = paired_bootstrap(truth, better, worse, metric="accuracy", seed=3)
    assert low < 0.10 < high  # population difference of the two accuracies
    assert low > 0 and low < value < high
    # Same draws, opposite order: the interval mirrors.
    flipped = paired_bootstrap(truth, worse, better, metric="accuracy", seed=3)
    assert flipped.value == pytest.approx(-value)
    assert flipped.ci95 == pytest.approx((-high, -low))


@pytest.mark.parametrize("name", ["macro_f1", "accuracy"])
def test_paired_bootstrap_fast_path_equals_sklearn_on_every_resample(name):
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 5, 300)  # rare classes drop out of some resamples
    a, b = rng.integers(0, 6, 300), np.where(rng.random(300) < 0.6, truth, 5)

    def reference(t, p):
        if name == "accuracy":
            return accuracy_score(t, p)
        return f1_score(t, p, average="macro", zero_division=0)

    fast = paired_bootstrap(truth, a, b, metric=name, draws=150, seed=4)
    slow = paired_bootstrap(truth, a, b, metric=reference, draws=150, seed=4)
    assert fast.value == pytest.approx(slow.value, abs=1e-12)
    assert fast.ci95 == pytest.approx(slow.ci95, abs=1e-12)


def test_paired_bootstrap_rejects_mismatched_inputs_and_unknown_metrics():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([0, 1], [0, 1], [0])
    with pytest.raises(ValueError, match="Unknown metric"):
        paired_bootstrap([0, 1], [0, 1], [1, 0], metric="f2")


# ---------------------------------------------------------------------------- LISI


def test_lisi_of_equidistant_neighbours_counts_their_labels():
    labels = np.array([0, 0, 1])
    distances = np.ones((3, 2))
    indices = np.array([[1, 2], [0, 2], [0, 1]])
    # Equal distances give equal weights whatever the bandwidth: 1 / (0.5^2 + 0.5^2) = 2.
    assert lisi_from_neighbors(distances, indices, labels) == pytest.approx([2, 2, 1])
    # Three equidistant neighbours, labels (0, 0, 1): 1 / ((2/3)^2 + (1/3)^2) = 9/5.
    indices = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    lisi = lisi_from_neighbors(np.ones((4, 3)), indices, [0, 0, 0, 1])
    assert lisi == pytest.approx([9 / 5, 9 / 5, 9 / 5, 1])


def test_lisi_bandwidth_reaches_the_requested_perplexity():
    # Neighbours at distances 0 and 1 of different labels: weights q, 1 - q with entropy
    # log(1.5), so LISI = 1 / (q^2 + (1 - q)^2).
    def entropy(q):
        return -q * np.log(q) - (1 - q) * np.log(1 - q) - np.log(1.5)

    q = brentq(entropy, 0.5, 1 - 1e-12)
    distances = np.array([[0.0, 1.0]] * 3)
    indices = np.array([[1, 2], [0, 2], [0, 1]])
    lisi = lisi_from_neighbors(distances, indices, [0, 0, 1], perplexity=1.5)
    expected = 1 / (q**2 + (1 - q) ** 2)
    assert lisi == pytest.approx([expected, expected, 1], rel=1e-4)


def _harmony_lisi(distances, indices, labels, perplexity, tol=1e-5):
    """Harmony's compute_simpson_index, one cell at a time, unshifted distances."""
    out = []
    for row, neighbours in zip(distances, indices, strict=True):
        beta, low, high = 1.0, -np.inf, np.inf

        def h_beta(b, row=row):
            p = np.exp(-row * b)
            return np.log(p.sum()) + b * (row * p).sum() / p.sum(), p / p.sum()

        h, p = h_beta(beta)
        tries = 0
        while abs(h - np.log(perplexity)) > tol and tries < 50:
            if h > np.log(perplexity):
                low = beta
                beta = beta * 2 if high == np.inf else (beta + high) / 2
            else:
                high = beta
                beta = beta / 2 if low == -np.inf else (beta + low) / 2
            h, p = h_beta(beta)
            tries += 1
        sums = np.bincount(labels[neighbours], weights=p, minlength=labels.max() + 1)
        out.append(1 / (sums**2).sum())
    return np.array(out)


def test_lisi_equals_a_per_cell_port_of_harmony():
    rng = np.random.default_rng(5)
    points = rng.normal(size=(150, 5)) * rng.uniform(0.2, 3, size=(150, 1))
    labels = rng.integers(0, 4, 150)
    distances, indices = nearest_neighbors(points, 30)
    ours = lisi_from_neighbors(distances, indices, labels, perplexity=10)
    assert ours == pytest.approx(_harmony_lisi(distances, indices, labels, 10), rel=1e-9)


# ---------------------------------------------------------------------------- integration


def _two_batches(offset: float, seed: int = 0):
    """Three well-separated label blobs; batch 1 is batch 0 jittered and shifted by offset."""
    points, labels = blobs([[0, 0], [50, 0], [0, 50]], 40, spread=1.0, seed=seed)
    jitter = np.random.default_rng(seed + 1).normal(scale=0.05, size=points.shape)
    shifted = points + jitter + np.array([offset, 0.0])
    embedding = np.vstack([points, shifted])
    return embedding, np.concatenate([labels, labels]), np.repeat([0, 1], len(points))


def test_separated_labels_give_top_bio_scores():
    embedding, labels, _ = _two_batches(offset=0.0)
    assert label_silhouette(embedding, labels) > 0.95
    assert nmi_ari(embedding, labels) == pytest.approx((1.0, 1.0))
    assert knn_accuracy(embedding, labels) == 1.0
    assert (knn_predictions(embedding, labels) == labels).all()


def test_mixed_batches_score_near_one_and_separated_batches_near_zero():
    mixed = _two_batches(offset=0.0)
    apart = _two_batches(offset=20.0)  # far from its twin, still closest to its own label
    assert ilisi(mixed[0], mixed[2]) > 0.9
    assert batch_silhouette(*mixed) > 0.9
    assert ilisi(apart[0], apart[2]) < 0.05
    assert batch_silhouette(*apart) < 0.1


def test_graph_connectivity_is_one_for_compact_labels_and_drops_for_a_split_label():
    points, clumps = blobs([[0, 0], [100, 0], [50, 50]], 30, spread=1.0)
    labels = np.where(clumps == 2, "b", "a")
    assert graph_connectivity(points, clumps) == 1.0
    # Label a: two far clumps of 30, each its own component -> 0.5; label b: 1.
    assert graph_connectivity(points, labels) == pytest.approx(0.75)
    # Uneven clumps (30 and 20): label a -> 30/50.
    uneven = np.concatenate([np.arange(50), np.arange(60, 90)])
    assert graph_connectivity(points[uneven], labels[uneven]) == pytest.approx((0.6 + 1) / 2)


def test_integration_scores_aggregate_as_scib():
    embedding, labels, batches = _two_batches(offset=0.0)
    scores = integration_scores(embedding, labels, batches)
    report = scores.as_dict()
    assert set(report) == {
        "nmi", "ari", "label_asw", "clisi", "batch_asw", "ilisi", "graph_connectivity",
        "bio", "batch", "total",
    }  # fmt: skip
    assert report["bio"] == pytest.approx(
        np.mean([scores.nmi, scores.ari, scores.label_asw, scores.clisi])
    )
    assert report["batch"] == pytest.approx(
        np.mean([scores.batch_asw, scores.ilisi, scores.graph_connectivity])
    )
    assert report["total"] == pytest.approx(0.6 * report["bio"] + 0.4 * report["batch"])
    assert scores.clisi == pytest.approx(1.0) and scores.graph_connectivity == 1.0
    assert scores.ilisi > 0.9 and scores.total > 0.9
    # Same scores as the single-metric functions.
    assert scores.ilisi == pytest.approx(ilisi(embedding, batches))
    assert scores.graph_connectivity == graph_connectivity(embedding, labels)
    with pytest.raises(ValueError, match="two batches"):
        integration_scores(embedding, labels, np.zeros(len(labels)))


def test_evaluation_imports_without_torch():
    code = "import sys, cellfoundry.evaluation; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------- real data


def test_scores_of_real_visium_spots_are_sane():
    import anndata as ad
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    adata = ad.read_h5ad(shared_file("spatial_dlpfc_visium_maynard2021.h5ad"))
    regions = adata.obs["region"].to_numpy().astype(str)
    rng = np.random.default_rng(0)
    spots = np.sort(rng.choice(np.flatnonzero(regions != "unlabelled"), 2000, replace=False))
    counts = sp.csr_matrix(adata.X[spots], dtype=np.float32)
    normalised = sp.diags(1e4 / np.asarray(counts.sum(axis=1)).ravel()) @ counts
    normalised.data = np.log1p(normalised.data)
    embedding = PCA(50, random_state=0).fit_transform(normalised.toarray())
    labels, batches = regions[spots], adata.obs["batch"].to_numpy().astype(str)[spots]

    scores = integration_scores(embedding, labels, batches)
    shuffled = integration_scores(embedding, rng.permutation(labels), batches)
    assert all(0 <= value <= 1 for value in scores.as_dict().values())
    # Cortical layers are visible in expression, sections of one donor mostly mix.
    assert scores.nmi > 0.15 and scores.ari > 0.08 and scores.clisi > 0.7
    assert shuffled.nmi < 0.03 and shuffled.clisi < scores.clisi - 0.2
    assert scores.bio > shuffled.bio + 0.1
    assert scores.batch_asw > 0.85 and 0.5 < scores.ilisi < 0.95
    assert scores.graph_connectivity > 0.9 > shuffled.graph_connectivity
    assert 0.5 < scores.total < 0.8
    assert knn_accuracy(embedding, labels) > 0.5 > knn_accuracy(embedding, rng.permutation(labels))


def test_verdict_reads_an_interval_of_ours_minus_baseline() -> None:
    from cellfoundry.evaluation.classification import verdict

    assert verdict(0.01, 0.2) == "better" and verdict(-0.2, -0.01) == "worse"
    assert verdict(-0.1, 0.1) == "no difference"
    # for errors (MSE, L2) a negative difference is the win
    assert verdict(-0.2, -0.01, lower_is_better=True) == "better"
    assert verdict(0.01, 0.2, lower_is_better=True) == "worse"
