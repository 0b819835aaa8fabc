"""Baselines for predicting a perturbed expression profile, in the scGen setting: a group of cells
(a cell type or cluster) whose perturbed state is held out, predicted from its control cells and
from the groups seen both ways in training.

Every function returns a mean log1p-normalised profile (genes,) for the held-out group; score
it with :func:`cellfoundry.evaluation.perturbation_metrics`. Deep models of perturbation
response often fail to beat these (Ahlmann-Eltze et al., Nature Methods 2025: no model beat an
additive or a linear baseline; Kernfeld et al. 2024: the train mean is hard to beat).

- :func:`no_change`: the held-out group's control mean (predicts no response);
- :func:`train_mean`: the mean perturbed profile of the training groups (ignores the group);
- :func:`additive_shift`: control mean + the training groups' mean response (perturbed -
  control), in gene space: the additive model;
- :func:`pca_latent_arithmetic`: scGen's vector arithmetic with PCA instead of a VAE: the
  mean response in PCA space of the training cells, added to the held-out control cells'
  mean PCA coordinates, mapped back to genes;
- :func:`linear_on_pca`: a ridge regression from a group's control mean (in PCA coordinates)
  to its response (Ahlmann-Eltze's linear baseline, with groups instead of perturbations as
  the samples), fitted on the training groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _profiles(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (groups or cells, genes) matrix.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    return array


def _mean(values: Any) -> np.ndarray:
    """Row mean of a dense or scipy-sparse matrix, as a 1-D float64 array."""
    return np.asarray(values.mean(axis=0), dtype=np.float64).ravel()


def no_change(heldout_control: Any) -> np.ndarray:
    """The held-out group's control mean: predicts that nothing changes."""
    return _mean(heldout_control)


def train_mean(train_perturbed_means: Any) -> np.ndarray:
    """Mean of the training groups' perturbed means (each group weighs the same)."""
    return _profiles(train_perturbed_means, "train_perturbed_means").mean(axis=0)


def additive_shift(
    heldout_control: Any, train_control_means: Any, train_perturbed_means: Any
) -> np.ndarray:
    """Held-out control mean + the mean response of the training groups (gene space)."""
    control = _profiles(train_control_means, "train_control_means")
    perturbed = _profiles(train_perturbed_means, "train_perturbed_means")
    if control.shape != perturbed.shape:
        raise ValueError("train_control_means and train_perturbed_means must have equal shapes.")
    return _mean(heldout_control) + (perturbed - control).mean(axis=0)


def latent_arithmetic_predictor(
    train_control: Any, train_perturbed: Any, n_comps: int = 50, seed: int = 0
) -> Callable[[np.ndarray], np.ndarray]:
    """scGen-style arithmetic in a PCA space fitted on the training cells (both conditions).

    ``delta = mean PC(perturbed training cells) - mean PC(control training cells)``; the
    returned function maps the held-out control cells' mean profile ``m`` to
    ``inverse_pca(pca(m) + delta)`` (PCA is linear, so the mean of the cells' coordinates is
    the coordinates of their mean). Cells, not group means, set ``delta``: large groups weigh
    more, as in scGen.
    """
    from sklearn.decomposition import PCA

    control, perturbed = (
        np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
        for x in (train_control, train_perturbed)
    )
    train = np.vstack([control, perturbed])
    n = min(n_comps, train.shape[0] - 1, train.shape[1])
    pca = PCA(n_components=n, svd_solver="full", random_state=seed).fit(train)
    delta = pca.transform(perturbed).mean(axis=0) - pca.transform(control).mean(axis=0)

    def predict(heldout_control_mean: np.ndarray) -> np.ndarray:
        latent = pca.transform(np.asarray(heldout_control_mean, dtype=np.float64)[None])[0]
        return pca.inverse_transform((latent + delta)[None])[0]

    return predict


def pca_latent_arithmetic(
    train_control: Any, train_perturbed: Any, heldout_control: Any, n_comps: int = 50, seed: int = 0
) -> np.ndarray:
    """:func:`latent_arithmetic_predictor` applied to the held-out control cells' mean."""
    predictor = latent_arithmetic_predictor(train_control, train_perturbed, n_comps, seed)
    return predictor(_mean(heldout_control))


def linear_on_pca(
    train_control_means: Any,
    train_perturbed_means: Any,
    heldout_control_mean: Any,
    n_comps: int = 10,
    alpha: float = 1.0,
) -> np.ndarray:
    """Ridge regression, control mean (PCA of the training groups' control means) -> response.

    With few groups (Kang: ~8 clusters) the PCA keeps at most ``groups - 1`` components and
    the ridge penalty keeps the fit from interpolating; ``alpha`` is fixed, not tuned on the
    held-out group.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    control = _profiles(train_control_means, "train_control_means")
    perturbed = _profiles(train_perturbed_means, "train_perturbed_means")
    if control.shape[0] < 2:
        raise ValueError("linear_on_pca needs at least two training groups.")
    n = min(n_comps, control.shape[0] - 1)
    pca = PCA(n_components=n, svd_solver="full").fit(control)
    model = Ridge(alpha=alpha).fit(pca.transform(control), perturbed - control)
    held = np.asarray(heldout_control_mean, dtype=np.float64).ravel()
    return held + model.predict(pca.transform(held[None]))[0]
