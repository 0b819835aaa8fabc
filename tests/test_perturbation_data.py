"""Kang clusters shared by control and stimulated cells, and held-out-group splits."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import shared_file

from cellfoundry.data.perturbation import GroupSplit, condition_clusters, heldout_group_split


@pytest.fixture(scope="module")
def kang():
    adata = ad.read_h5ad(shared_file("pert_kang2018_ifnb_pbmc.h5ad"))
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 1500, replace=False))
    return adata[rows].copy()


def test_clusters_hold_both_conditions_and_repeat_with_the_seed(kang) -> None:
    labels = condition_clusters(kang, "perturbation", "control", n_clusters=5, seed=0)
    table = pd.crosstab(labels, kang.obs["perturbation"].to_numpy())
    assert table.shape == (5, 2)
    # every cluster holds both conditions, and neither condition fills any cluster alone
    shares = table.div(table.sum(axis=1), axis=0)["control"]
    assert shares.between(0.15, 0.85).all(), shares
    again = condition_clusters(kang, "perturbation", "control", n_clusters=5, seed=0)
    assert (labels == again).all()


def test_group_split_holds_out_one_groups_perturbed_cells(tmp_path) -> None:
    obs = pd.DataFrame(
        {
            "cluster": ["a", "a", "b", "b", "c", "c"],
            "condition": ["control", "stim", "control", "stim", "control", "stim"],
        }
    )
    split = heldout_group_split(obs, "cluster", "condition", "control", "b")
    assert split.heldout_control == [2] and split.heldout_perturbed == [3]
    assert split.train_control == [0, 4] and split.train_perturbed == [1, 5]
    split.save(tmp_path / "split.json")
    assert GroupSplit.load(tmp_path / "split.json") == split
    with pytest.raises(ValueError, match="No control cells"):
        heldout_group_split(obs, "cluster", "condition", "ctrl", "b")
    obs.loc[3, "condition"] = "control"
    with pytest.raises(ValueError, match="needs control and perturbed cells"):
        heldout_group_split(obs, "cluster", "condition", "control", "b")
