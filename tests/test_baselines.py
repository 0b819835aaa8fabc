"""Shared baselines (cellfoundry.evaluation.baselines) on real STARmap mPFC cells.

STARmap: 3,704 cells x 158 genes, raw counts, 3 slices (``batch``), ``cell_type`` with ``NA``
(no label, dropped). With 158 genes the default ``n_hvg=2000`` keeps every gene, so the
leakage tests choose fewer HVGs.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import REPO, shared_file

from cellfoundry.evaluation import ilisi, macro_f1
from cellfoundry.tasks.splits import make_split

BENCHMARKS = REPO / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def baselines():
    from cellfoundry.evaluation import baselines

    return baselines


@pytest.fixture(scope="module")
def starmap():
    import anndata as ad

    adata = ad.read_h5ad(shared_file("spatial_starmap_mpfc_wang2018.h5ad"))
    assert adata.uns["x_kind"] == "counts"
    return adata


@pytest.fixture(scope="module")
def heldout(starmap):
    """Train on slices 0 and 1, test on slice 2 (labelled cells only)."""
    split = make_split(
        starmap.obs, "cell_type", "holdout", batch_key="batch", holdout=["slice2"],
        drop_labels=["NA"], validation_fraction=0.0,
    )  # fmt: skip
    labels = starmap.obs["cell_type"].astype(str).to_numpy()
    x = sp.csr_matrix(starmap.X)
    return x[split.train], labels[split.train], x[split.test], labels[split.test]


# -- normalisation and HVGs ---------------------------------------------------------------------
def test_log_normalize_sparse_and_dense_agree_and_keep_their_kind(baselines, starmap) -> None:
    keep = np.ones(300)
    keep[0] = 0  # a cell without counts stays zero instead of dividing by zero
    counts = (sp.diags(keep) @ sp.csr_matrix(starmap.X[:300])).tocsr()
    counts.eliminate_zeros()
    before = counts.copy()
    sparse_out = baselines.log_normalize(counts, "counts")
    dense_out = baselines.log_normalize(counts.toarray(), "counts")
    assert sp.issparse(sparse_out) and sparse_out.format == "csr" and sparse_out.dtype == np.float64
    assert isinstance(dense_out, np.ndarray) and dense_out.dtype == np.float64
    np.testing.assert_allclose(sparse_out.toarray(), dense_out, rtol=0, atol=1e-12)
    totals = np.expm1(dense_out).sum(axis=1)
    np.testing.assert_allclose(totals[1:], 1e4, rtol=1e-9)
    assert totals[0] == 0
    assert (counts != before).nnz == 0  # input untouched
    lognorm = baselines.log_normalize(sparse_out, "lognorm")
    assert lognorm is not sparse_out and (lognorm != sparse_out).nnz == 0
    with pytest.raises(ValueError, match="x_kind='normalized'"):
        baselines.log_normalize(counts, "normalized")


def test_seurat_hvg_sparse_path_picks_the_dense_genes(baselines, starmap) -> None:
    log_x = baselines.log_normalize(starmap.X, "counts")
    dense = baselines.seurat_hvg(log_x.toarray(), 60)
    np.testing.assert_array_equal(baselines.seurat_hvg(log_x, 60), dense)
    assert dense.size == 60 and np.all(np.diff(dense) > 0)
    np.testing.assert_array_equal(baselines.seurat_hvg(log_x, 500), np.arange(158))


def test_zero_shot_uses_the_shared_baselines() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "zero_shot.py"), "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "usage: zero_shot.py" in done.stdout, done.stderr
    zero_shot = load_script("zero_shot")
    assert zero_shot.pca_baseline.__module__ == "cellfoundry.evaluation.baselines"
    assert "def pca_baseline" not in (BENCHMARKS / "zero_shot.py").read_text()


def majority_macro_f1(y_train: np.ndarray, y_test: np.ndarray) -> float:
    names, counts = np.unique(y_train, return_counts=True)
    return macro_f1(y_test, np.full(y_test.size, names[counts.argmax()]))


def test_logistic_regression_beats_majority_class_on_a_held_out_slice(baselines, heldout) -> None:
    x_train, y_train, x_test, y_test = heldout
    result = baselines.logistic_regression_hvg(x_train, y_train, x_test, "counts")
    model_f1, majority_f1 = macro_f1(y_test, result.labels), majority_macro_f1(y_train, y_test)
    assert model_f1 > majority_f1 + 0.4, (model_f1, majority_f1)  # seen: 0.65 vs 0.02
    assert result.probabilities.shape == (y_test.size, 15)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-9)
    np.testing.assert_array_equal(
        result.classes[result.probabilities.argmax(axis=1)], result.labels
    )
    assert result.details["converged"] and result.details["n_hvg"] == 158


def test_knn_on_pca_beats_majority_class_on_a_held_out_slice(baselines, heldout) -> None:
    x_train, y_train, x_test, y_test = heldout
    result = baselines.knn_on_pca(x_train, y_train, x_test, "counts", n_comps=30)
    model_f1, majority_f1 = macro_f1(y_test, result.labels), majority_macro_f1(y_train, y_test)
    assert model_f1 > majority_f1 + 0.3, (model_f1, majority_f1)  # seen: 0.54 vs 0.02
    assert result.details["n_components"] == 30 and result.details["k"] == 15
    # neighbour fractions: multiples of 1/15
    np.testing.assert_allclose(result.probabilities * 15, np.round(result.probabilities * 15))


@pytest.mark.parametrize("method", ["logistic_regression_hvg", "knn_on_pca"])
def test_features_do_not_depend_on_the_test_cells(baselines, heldout, method) -> None:
    x_train, y_train, x_test, _ = heldout
    x_train, y_train = x_train[::2], y_train[::2]  # half the training cells: 3 fits stay fast
    fit = getattr(baselines, method)
    first, other = x_test[:200], x_test[200:600]
    alone = fit(x_train, y_train, first, "counts", n_hvg=40)
    together = fit(x_train, y_train, sp.vstack([first, other]).tocsr(), "counts", n_hvg=40)
    elsewhere = fit(x_train, y_train, other, "counts", n_hvg=40)
    assert alone.details["genes"] == together.details["genes"] == elsewhere.details["genes"]
    np.testing.assert_array_equal(alone.labels, together.labels[:200])
    np.testing.assert_allclose(alone.probabilities, together.probabilities[:200], atol=1e-12)
    # not vacuous: HVGs chosen on the test cells would be other genes
    on_test = baselines.seurat_hvg(baselines.log_normalize(first, "counts"), 40)
    assert set(on_test.tolist()) != set(alone.details["genes"])


def test_supervised_baselines_refuse_mismatched_inputs(baselines, heldout) -> None:
    x_train, y_train, x_test, _ = heldout
    with pytest.raises(ValueError, match="x_train has 158 genes but x_test 100"):
        baselines.logistic_regression_hvg(x_train, y_train, x_test[:, :100], "counts")
    with pytest.raises(ValueError, match="one label per training cell"):
        baselines.knn_on_pca(x_train, y_train[:10], x_test, "counts")


# -- integration baseline -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def starmap_sample(starmap):
    """1,200 labelled cells drawn over the three slices."""
    labelled = np.flatnonzero(starmap.obs["cell_type"].astype(str).to_numpy() != "NA")
    rows = np.sort(np.random.default_rng(0).choice(labelled, 1200, replace=False))
    return starmap[rows].copy()


def test_harmony_mixes_slices_more_than_pca(baselines, starmap_sample) -> None:
    pcs, _ = baselines.pca_baseline(starmap_sample, "counts", 2000, 30, seed=0)
    batches = starmap_sample.obs["batch"].astype(str).to_numpy()
    corrected = baselines.harmony_embedding(pcs, batches, seed=0)
    assert corrected.shape == pcs.shape and corrected.dtype == np.float32
    # input orientation kept: harmony moves cells, it does not reorder or transpose them
    assert np.corrcoef(corrected[:, 0], pcs[:, 0])[0, 1] > 0.8
    before, after = ilisi(pcs, batches), ilisi(corrected, batches)
    assert after > before + 0.08, (before, after)  # seen: 0.65 -> 0.81
    np.testing.assert_array_equal(baselines.harmony_embedding(pcs, batches, seed=0), corrected)


def test_harmony_refuses_bad_inputs(baselines) -> None:
    scores = np.random.default_rng(0).normal(size=(50, 5))
    with pytest.raises(ValueError, match="single batch"):
        baselines.harmony_embedding(scores, ["a"] * 50)
    with pytest.raises(ValueError, match=r"pca_scores has shape \(50, 5\) and batch_labels"):
        baselines.harmony_embedding(scores, ["a", "b"] * 10)
