"""Label splits (cellfoundry.tasks.splits) on the real STARmap mPFC obs: 3,704 cells, 3 slices,
16 cell types of which ``NA`` (526 cells) means 'no label'."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from conftest import shared_file

from cellfoundry.tasks.splits import LabelSplit, make_split

STARMAP = "spatial_starmap_mpfc_wang2018.h5ad"


@pytest.fixture(scope="module")
def obs() -> pd.DataFrame:
    import anndata as ad

    return ad.read_h5ad(shared_file(STARMAP), backed="r").obs.copy()


def labelled_rows(obs: pd.DataFrame) -> np.ndarray:
    return np.flatnonzero((obs["cell_type"].astype(str) != "NA").to_numpy())


def assert_partition(split: LabelSplit, expected_rows: np.ndarray) -> None:
    """Parts sorted, disjoint, and together exactly the expected (labelled, kept) cells."""
    parts = [split.train, split.validation, split.test]
    for rows in parts:
        assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
    union = np.concatenate(parts)
    assert union.size == np.unique(union).size  # disjoint
    np.testing.assert_array_equal(np.sort(union), expected_rows)


def test_random_split_is_stratified_and_covers_exactly_the_labelled_cells(obs) -> None:
    split = make_split(obs, "cell_type", "random", drop_labels=["NA"], seed=3)
    assert_partition(split, labelled_rows(obs))
    labels = obs["cell_type"].astype(str).to_numpy()
    assert "NA" not in set(labels[np.concatenate(list(split.parts.values()))])
    n = labelled_rows(obs).size
    assert abs(split.test.size - 0.2 * n) <= 1
    assert abs(split.validation.size - 0.1 * (n - split.test.size)) <= 1
    # stratified: every label's test share is 20% up to rounding (one cell per label)
    total = pd.Series(labels[labelled_rows(obs)]).value_counts()
    in_test = pd.Series(labels[split.test]).value_counts()
    assert ((in_test - 0.2 * total[in_test.index]).abs() <= 1).all() and len(in_test) == 15
    assert split.details["label_counts"]["test"] == in_test.sort_index().to_dict()
    assert split.details["n_dropped_label"] == 526 and split.n_obs == len(obs)


def test_holdout_test_is_exactly_the_labelled_cells_of_the_held_out_slice(obs) -> None:
    batch = obs["batch"].astype(str).to_numpy()
    labelled = labelled_rows(obs)
    split = make_split(obs, "cell_type", "holdout", batch_key="batch", holdout=["slice1"])
    # no drop_labels: "NA" is kept as a class (with a warning); the partition covers all cells
    assert_partition(split, np.arange(len(obs)))
    np.testing.assert_array_equal(split.test, np.flatnonzero(batch == "slice1"))
    split = make_split(
        obs, "cell_type", "holdout", batch_key="batch", holdout="slice1", drop_labels=["NA"]
    )
    assert_partition(split, labelled)
    np.testing.assert_array_equal(split.test, labelled[batch[labelled] == "slice1"])
    assert set(batch[np.concatenate([split.train, split.validation])]) == {"slice0", "slice2"}
    default = make_split(obs, "cell_type", "holdout", batch_key="batch", drop_labels=["NA"])
    assert default.details["holdout"] == ["slice2"]  # last batch in sorted order
    assert set(batch[default.test]) == {"slice2"}


def test_kept_na_label_is_warned_about(obs, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="cellfoundry.tasks.splits"):
        make_split(obs, "cell_type", "holdout", batch_key="batch")
    assert "drop_labels=['NA']" in caplog.text


@pytest.mark.parametrize("n_per_class", [10, 50])
def test_few_shot_keeps_n_per_class_training_cells_per_label(obs, n_per_class) -> None:
    split = make_split(
        obs, "cell_type", "few_shot", n_per_class=n_per_class, drop_labels=["NA"], seed=1
    )
    labels = obs["cell_type"].astype(str).to_numpy()
    reference = make_split(obs, "cell_type", "random", drop_labels=["NA"], seed=1)
    np.testing.assert_array_equal(split.test, reference.test)  # same test part as "random"
    pool = pd.Series(labels[np.setdiff1d(labelled_rows(obs), split.test)]).value_counts()
    train = pd.Series(labels[split.train]).value_counts()
    # exactly n_per_class per label, or every pool cell of a label that has fewer (VIP: 35)
    expected = pool.clip(upper=n_per_class)
    pd.testing.assert_series_equal(train.sort_index(), expected.sort_index(), check_names=False)
    assert (n_per_class == 10) == (train == n_per_class).all()
    validation = pd.Series(labels[split.validation]).value_counts()
    assert (validation <= n_per_class).all()
    assert ((validation + train[validation.index]) <= pool[validation.index]).all()
    assert_partition(split, np.sort(np.concatenate([split.train, split.validation, split.test])))


def test_few_shot_training_sets_are_nested_across_sizes(obs) -> None:
    small = make_split(obs, "cell_type", "few_shot", n_per_class=10, drop_labels=["NA"])
    large = make_split(obs, "cell_type", "few_shot", n_per_class=50, drop_labels=["NA"])
    assert np.isin(small.train, large.train).all()


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("random", {}),
        ("holdout", {"batch_key": "batch"}),
        ("few_shot", {"n_per_class": 10}),
    ],
)
def test_same_seed_same_split_and_other_seed_another(obs, strategy, options) -> None:
    first = make_split(obs, "cell_type", strategy, drop_labels=["NA"], seed=7, **options)
    again = make_split(obs.copy(), "cell_type", strategy, drop_labels=["NA"], seed=7, **options)
    other = make_split(obs, "cell_type", strategy, drop_labels=["NA"], seed=8, **options)
    assert first == again
    assert not np.array_equal(first.train, other.train)


def test_save_load_round_trip_and_checks(obs, tmp_path) -> None:
    split = make_split(obs, "cell_type", "holdout", batch_key="batch", drop_labels=["NA"])
    path = split.save(tmp_path / "splits" / "starmap_holdout.json")
    assert [p.name for p in path.parent.iterdir()] == ["starmap_holdout.json"]  # no temp left
    loaded = LabelSplit.load(path, n_obs=len(obs), obs_names=obs.index)
    assert loaded == split and loaded.details["holdout"] == ["slice2"]
    assert loaded.test.dtype == np.int64 and not loaded.test.flags.writeable

    with pytest.raises(ValueError, match="made for 3704 cells but the data has 100"):
        LabelSplit.load(path, n_obs=100)
    with pytest.raises(ValueError, match="other obs_names"):
        LabelSplit.load(path, obs_names=obs.index[::-1])

    raw = json.loads(path.read_text())
    raw["validation"].append(raw["test"][0])
    (tmp_path / "overlap.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="overlap.json: validation and test share 1 row"):
        LabelSplit.load(tmp_path / "overlap.json")
    raw = json.loads(path.read_text())
    raw["train"].append(5000)
    (tmp_path / "range.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="row position 5000, but the data has only 3704 rows"):
        LabelSplit.load(tmp_path / "range.json")
    (tmp_path / "other.json").write_text('{"train": []}')
    with pytest.raises(ValueError, match="not a cellfoundry split file"):
        LabelSplit.load(tmp_path / "other.json")


def test_missing_and_empty_labels_are_in_no_part(obs) -> None:
    edited = obs[["cell_type", "batch"]].copy()
    edited["cell_type"] = edited["cell_type"].astype(object)
    edited.iloc[:5, 0] = None
    edited.iloc[5:8, 0] = "  "
    split = make_split(edited, "cell_type", "random", drop_labels=["NA"])
    expected = np.setdiff1d(labelled_rows(obs), np.arange(8))
    assert_partition(split, expected)
    assert split.details["n_missing_label"] == 8
    assert split.details["n_dropped_label"] == 526 - 2  # rows 1 and 5 were "NA"


def _with_label(obs: pd.DataFrame, rows: np.ndarray, label: str) -> pd.DataFrame:
    edited = obs[["cell_type", "batch"]].copy()
    edited["cell_type"] = edited["cell_type"].astype(str)
    edited.iloc[rows, 0] = label
    return edited


def test_a_label_with_one_training_cell_is_refused(obs) -> None:
    batch = obs["batch"].astype(str).to_numpy()
    first_slice0 = np.flatnonzero(batch == "slice0")[:1]
    edited = _with_label(obs, first_slice0, "Rare")
    with pytest.raises(
        ValueError, match=r"\['Rare'\] have exactly one cell.*drop_labels=\['Rare'\]"
    ):
        make_split(
            edited,
            "cell_type",
            "holdout",
            batch_key="batch",
            holdout=["slice2"],
            validation_fraction=0.0,
            drop_labels=["NA"],
        )


def test_unseen_test_labels_raise_unless_allowed(obs, caplog) -> None:
    batch = obs["batch"].astype(str).to_numpy()
    edited = _with_label(obs, np.flatnonzero(batch == "slice2")[:4], "OnlyInSlice2")
    options = {"batch_key": "batch", "holdout": ["slice2"], "drop_labels": ["NA"]}
    with pytest.raises(ValueError, match=r"Test label\(s\) \['OnlyInSlice2'\] never occur"):
        make_split(edited, "cell_type", "holdout", **options)
    with caplog.at_level(logging.WARNING, logger="cellfoundry.tasks.splits"):
        split = make_split(edited, "cell_type", "holdout", allow_unseen_test_labels=True, **options)
    assert split.details["unseen_test_labels"] == ["OnlyInSlice2"]
    assert (
        split.details["label_counts"]["test"]["OnlyInSlice2"] == 4 and "OnlyInSlice2" in caplog.text
    )


@pytest.mark.parametrize(
    "strategy, options, message",
    [
        ("random", {"label_key": "celltype"}, r"label_key='celltype' is not an obs column"),
        (
            "holdout",
            {"batch_key": "slice"},
            r"needs batch_key naming an obs column \(got 'slice'\)",
        ),
        ("holdout", {}, r"needs batch_key"),
        (
            "holdout",
            {"batch_key": "batch", "holdout": ["slice9"]},
            r"\['slice9'\] not found in obs\['batch'\]; present values: "
            r"\['slice0', 'slice1', 'slice2'\]",
        ),
        (
            "holdout",
            {"batch_key": "batch", "holdout": ["slice0", "slice1", "slice2"]},
            "holds out every batch",
        ),
        ("few_shot", {}, r"needs n_per_class >= 1 \(got None\)"),
        ("few_shot", {"n_per_class": 0}, r"needs n_per_class >= 1 \(got 0\)"),
        ("random", {"n_per_class": 10}, "only applies to strategy='few_shot'"),
        ("random", {"test_fraction": 1.0}, r"test_fraction=1.0 is out of range"),
        ("random", {"validation_fraction": -0.1}, r"validation_fraction=-0.1 is out of range"),
        ("stratified", {}, r"strategy='stratified' is unknown"),
        ("random", {"drop_labels": None}, None),
    ],
)
def test_bad_arguments_name_the_value_and_the_fix(obs, strategy, options, message) -> None:
    options = {"label_key": "cell_type", **options}
    if message is None:  # drop every label: nothing left
        labels = obs["cell_type"].astype(str).unique().tolist()
        options["drop_labels"] = labels
        message = "No cell of obs\\['cell_type'\\] has a usable label"
    with pytest.raises(ValueError, match=message):
        make_split(obs, strategy=strategy, **options)
