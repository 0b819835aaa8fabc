"""Perturbation-response baselines on constructed data where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellfoundry.evaluation.response_baselines import (
    additive_shift,
    linear_on_pca,
    no_change,
    pca_latent_arithmetic,
    train_mean,
)

RNG = np.random.default_rng(0)
GENES = 30
RESPONSE = np.where(np.arange(GENES) < 5, 2.0, 0.0)  # the same shift for every group


def group(centre: float, n: int, shifted: bool) -> np.ndarray:
    base = np.full(GENES, centre) + np.linspace(0, 1, GENES)
    return base + (RESPONSE if shifted else 0) + RNG.normal(0, 0.05, (n, GENES))


def test_no_change_and_train_mean_are_plain_means() -> None:
    control = sp.csr_matrix(np.array([[1.0, 0.0], [3.0, 2.0]]))
    assert no_change(control).tolist() == [2.0, 1.0]
    assert train_mean(np.array([[1.0, 1.0], [3.0, 5.0]])).tolist() == [2.0, 3.0]


def test_additive_and_latent_arithmetic_recover_a_shared_response() -> None:
    centres = [0.0, 1.0, 2.0, 3.0]
    train_control = [group(c, 40, False) for c in centres]
    train_stim = [group(c, 40, True) for c in centres]
    held_control, held_stim = group(5.0, 40, False), group(5.0, 40, True)
    truth = held_stim.mean(axis=0)
    additive = additive_shift(
        held_control,
        np.array([g.mean(0) for g in train_control]),
        np.array([g.mean(0) for g in train_stim]),
    )
    np.testing.assert_allclose(additive, truth, atol=0.05)
    latent = pca_latent_arithmetic(
        np.vstack(train_control), np.vstack(train_stim), held_control, n_comps=5
    )
    np.testing.assert_allclose(latent, truth, atol=0.1)
    # the train mean misses the held-out group's own level: it is far off here
    assert np.abs(train_mean(np.array([g.mean(0) for g in train_stim])) - truth).max() > 1


def test_linear_on_pca_learns_a_response_that_depends_on_the_control_state() -> None:
    levels = np.linspace(0, 3, 8)
    control = np.array([np.full(GENES, c) + np.linspace(0, 1, GENES) for c in levels])
    perturbed = control + np.outer(levels, RESPONSE)  # response grows with the level
    held = np.full(GENES, 1.5) + np.linspace(0, 1, GENES)
    predicted = linear_on_pca(control, perturbed, held, n_comps=3, alpha=1e-6)
    np.testing.assert_allclose(predicted, held + 1.5 * RESPONSE, atol=1e-3)
    with pytest.raises(ValueError, match="two training groups"):
        linear_on_pca(control[:1], perturbed[:1], held)
    with pytest.raises(ValueError, match="NaN"):
        train_mean(np.array([[np.nan, 1.0]]))
