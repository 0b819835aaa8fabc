"""Perturbation metrics on hand-computed profiles."""

from __future__ import annotations

import numpy as np
import pytest

from cellfoundry.evaluation.perturbation import (
    perturbation_metrics,
    top_de,
    top_expressed,
)

CONTROL = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
OBSERVED = np.array([5.0, 6.0, 3.0, 0.0, 1.5])  # deltas 0, +2, 0, -2, +0.5


def test_hand_computed_values_on_five_genes() -> None:
    predicted = np.array([5.0, 5.0, 3.0, 1.0, 1.0])  # deltas 0, +1, 0, -1, 0
    scores = perturbation_metrics(predicted, OBSERVED, CONTROL, n_top_expressed=3, n_de=2)
    # top-3 expressed in control: genes 0, 1, 2 -> differences 0, -1, 0
    assert scores["l2_top1000"] == pytest.approx(1.0)
    # squared errors 0, 1, 0, 1, 0.25 over 5 genes
    assert scores["mse"] == pytest.approx(2.25 / 5)
    # the 2 largest |observed delta|: genes 1 (+2) and 3 (-2); predicted +1, -1: r = 1, signs right
    assert scores["pearson_delta_de20"] == pytest.approx(1.0)
    assert scores["de_direction"] == 1.0
    true_delta, pred_delta = OBSERVED - CONTROL, predicted - CONTROL
    assert scores["pearson_delta"] == pytest.approx(np.corrcoef(true_delta, pred_delta)[0, 1])


def test_no_change_prediction_has_undefined_delta_correlation_and_full_distance() -> None:
    scores = perturbation_metrics(CONTROL, OBSERVED, CONTROL, n_top_expressed=5, n_de=2)
    assert np.isnan(scores["pearson_delta"])  # a constant (zero) change has no correlation
    assert scores["de_direction"] == 0.0  # sign(0) never matches a real change
    assert scores["l2_top1000"] == pytest.approx(np.sqrt(4 + 4 + 0.25))
    # the truth itself scores perfectly
    perfect = perturbation_metrics(OBSERVED, OBSERVED, CONTROL, n_de=2)
    assert perfect["mse"] == 0 and perfect["pearson_delta"] == pytest.approx(1.0)


def test_gene_selections_and_bad_input() -> None:
    assert top_expressed(CONTROL, 2).tolist() == [0, 1]
    assert top_de(CONTROL, OBSERVED, 3).tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="same genes"):
        perturbation_metrics(CONTROL[:4], OBSERVED, CONTROL)
    with pytest.raises(ValueError, match="NaN"):
        perturbation_metrics(np.array([np.nan, 1, 1, 1, 1]), OBSERVED, CONTROL)
