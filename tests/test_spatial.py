"""Spatial niche: graphs on hand-made coordinates, targets on a toy layout, the niche task end
to end on real DLPFC and STARmap cells (both backbones, with and without neighbour context),
and clear errors for missing coordinates or a single section."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
from conftest import shared_file

from cellfoundry.data.spatial import (
    coordinates,
    default_radius,
    neighbor_density,
    neighbor_graph,
    neighborhood_average,
    neighborhood_composition,
)


def layout() -> ad.AnnData:
    """Section A: a unit L of three cells and one far cell; section B: one cell on A's origin."""
    adata = ad.AnnData(np.ones((5, 3), dtype=np.float32))
    adata.obsm["spatial"] = np.array([[0, 0], [1, 0], [0, 1], [5, 5], [0, 0]], dtype=float)
    adata.obs["section"] = ["A", "A", "A", "A", "B"]
    adata.obs["cell_type"] = ["t1", "t2", "t2", "t1", "t1"]
    return adata


def test_radius_graph_stays_within_sections_and_excludes_self() -> None:
    graph = neighbor_graph(layout(), "radius", radius=1.2, section_key="section").toarray()
    expected = np.zeros((5, 5))
    expected[0, [1, 2]] = expected[1, 0] = expected[2, 0] = 1  # (1,0)-(0,1) are 1.41 apart
    np.testing.assert_array_equal(graph, expected)
    # ignoring sections, the cell of B sits on A's origin and joins it
    merged = neighbor_graph(layout(), "radius", radius=1.2).toarray()
    assert merged[4, 0] == merged[0, 4] == 1
    knn = neighbor_graph(layout(), "knn", k=1, section_key="section").toarray()
    assert knn[3].tolist() == [0, 1, 0, 0, 0] or knn[3].tolist() == [0, 0, 1, 0, 0]
    assert knn.sum(axis=1).tolist() == [1, 1, 1, 1, 0]  # B's only cell has no one else


def test_composition_density_and_average_by_hand() -> None:
    adata = layout()
    graph = neighbor_graph(adata, "radius", radius=1.2, section_key="section")
    composition = neighborhood_composition(graph, adata.obs["cell_type"])
    assert composition.types == ["t1", "t2"]
    np.testing.assert_allclose(composition.fractions[0], [0.0, 1.0])  # neighbours: 2 x t2
    np.testing.assert_allclose(composition.fractions[1], [1.0, 0.0])
    np.testing.assert_allclose(composition.fractions[3], [0.0, 0.0])  # no neighbours
    assert composition.has_neighbors.tolist() == [True, True, True, False, False]
    density = neighbor_density(graph, radius=1.2)
    np.testing.assert_allclose(density, np.array([2, 1, 1, 0, 0]) / (np.pi * 1.44))
    values = np.arange(10, dtype=float).reshape(5, 2)
    averaged = np.asarray(neighborhood_average(graph, values))
    np.testing.assert_allclose(averaged[0], values[[0, 1, 2]].mean(0))
    np.testing.assert_allclose(averaged[3], values[3])  # itself only
    assert default_radius(adata, k=1, section_key="section") > 0


def test_missing_or_bad_coordinates_are_clear_errors() -> None:
    adata = layout()
    del adata.obsm["spatial"]
    with pytest.raises(ValueError, match=r"No obsm\['spatial'\] coordinates"):
        neighbor_graph(adata, "radius", radius=1.0)
    adata.obsm["spatial"] = np.full((5, 2), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        coordinates(adata)
    with pytest.raises(ValueError, match="radius > 0"):
        neighbor_graph(layout(), "radius")


# -- the niche task on real sections -----------------------------------------------------------
@pytest.fixture(scope="module")
def dlpfc_file(tmp_path_factory):
    """DLPFC spots of two sections, 120 each (seeded), of the layers both hold >= 3 times."""
    adata = ad.read_h5ad(shared_file("spatial_dlpfc_visium_maynard2021.h5ad"))
    rng = np.random.default_rng(0)
    keep = []
    for section in sorted(adata.obs["section"].unique())[:2]:
        rows = np.flatnonzero(adata.obs["section"].to_numpy() == section)
        keep.extend(rng.choice(rows, 120, replace=False))
    adata = adata[np.sort(keep)].copy()
    counts = adata.obs.groupby(["region", "section"], observed=True).size().unstack(fill_value=0)
    shared = counts.index[(counts.iloc[:, :2] >= 3).all(axis=1)]
    adata = adata[adata.obs["region"].isin(shared)].copy()
    path = tmp_path_factory.mktemp("dlpfc") / "dlpfc_small.h5ad"
    adata.write_h5ad(path)
    return path


def niche_args(data, output_dir, holdout, **changes):
    from cellfoundry.training import FinetuningArgs

    settings = {
        "data": str(data),
        "output_dir": str(output_dir),
        "label_key": "region",
        "batch_key": "section",
        "split_strategy": "holdout",
        "holdout": holdout,
        "batch_size": 16,
        "max_steps": 2,
        "eval_every": 2,
        "log_every": 1,
        "progress_bar": False,
        "learning_rate": 1e-3,
    }
    return FinetuningArgs(**{**settings, **changes})


@pytest.mark.parametrize("backbone", ["bert", "mamba"])
def test_region_head_holds_out_a_section_beside_the_baselines(
    tmp_path, dlpfc_file, base_models, backbone
) -> None:
    from cellfoundry.tasks import NicheConfig, load_task_model, predict, run_finetuning

    sections = sorted(ad.read_h5ad(dlpfc_file).obs["section"].unique())
    config = NicheConfig(base_model=base_models[backbone], target="region", label_key="region")
    result = run_finetuning(config, niche_args(dlpfc_file, tmp_path / "run", [sections[1]]))
    metrics = json.loads((result.output_dir / "test_metrics.json").read_text())
    assert set(metrics["baselines"]) == {
        "logistic regression (PCA, own)",
        "logistic regression (PCA, neighbourhood)",
        "kNN (PCA, own)",
        "majority class",
    }
    assert metrics["split"]["test"] == int(
        (ad.read_h5ad(dlpfc_file).obs["section"] == sections[1]).sum()
    )
    assert (
        metrics["comparison"]["macro_f1"]["ci95"][0] <= metrics["comparison"]["macro_f1"]["ci95"][1]
    )
    model = load_task_model(result.output_dir)
    assert model.config.radius > 0 and len(model.config.labels) >= 2
    cells = ad.read_h5ad(dlpfc_file)
    predict(cells, model, progress=False)
    assert set(cells.obs["cellfoundry_niche"].dropna()) <= set(model.config.labels)


@pytest.mark.parametrize("target", ["composition", "density"])
def test_composition_and_density_heads_with_neighbour_context(
    tmp_path, base_models, target
) -> None:
    from cellfoundry.tasks import NicheConfig, load_task_model, predict, run_finetuning

    adata = ad.read_h5ad(shared_file("spatial_starmap_mpfc_wang2018.h5ad"))
    rows = np.flatnonzero(adata.obs["batch"].isin(sorted(adata.obs["batch"].unique())[:2]))
    rows = np.sort(np.random.default_rng(0).choice(rows, 300, replace=False))
    adata = adata[rows].copy()
    counts = adata.obs.groupby(["cell_type", "batch"], observed=True).size().unstack(fill_value=0)
    common = counts.index[(counts >= 5).all(axis=1)]  # the split stratifies by type
    data = tmp_path / "starmap.h5ad"
    adata[adata.obs["cell_type"].isin(common)].copy().write_h5ad(data)
    batches = sorted(adata.obs["batch"].unique())[:2]
    config = NicheConfig(
        base_model=base_models["bert"],
        target=target,
        label_key="cell_type",
        section_key="batch",
        neighbor_context=True,
    )
    args = niche_args(data, tmp_path / "run", [batches[1]], label_key="cell_type")
    args.batch_key = "batch"
    result = run_finetuning(config, args)
    metrics = json.loads((result.output_dir / "test_metrics.json").read_text())
    assert "training mean" in metrics["baselines"] and "mse" in metrics["model"]
    if target == "composition":
        assert len(metrics["model"]["per_type_pearson"]) == len(config.labels)
        assert "mean_pearson" in metrics["comparison"]
    model = load_task_model(result.output_dir)
    assert model.head.neighbor_whitening is not None
    cells = ad.read_h5ad(data)
    del cells.obs["cell_type"]  # new cells need coordinates and sections, not labels
    written = predict(cells, model, progress=False)
    if target == "composition":
        fractions = written["composition"]
        np.testing.assert_allclose(np.nansum(fractions, axis=1)[:5], 1.0, rtol=1e-5)
    else:
        assert (written["density"][~np.isnan(written["density"])] >= 0).all()


def test_one_section_cannot_be_split_across_sections(tmp_path, dlpfc_file, base_models) -> None:
    from cellfoundry.tasks import NicheConfig, run_finetuning

    adata = ad.read_h5ad(dlpfc_file)
    one = adata.obs["section"].iloc[0]
    path = tmp_path / "one.h5ad"
    adata[adata.obs["section"] == one].copy().write_h5ad(path)
    config = NicheConfig(base_model=base_models["bert"])
    with pytest.raises(ValueError, match="holds out every batch"):
        run_finetuning(config, niche_args(path, tmp_path / "run", [one]))


def test_finetune_niche_benchmark_runs_one_setting(tmp_path, base_models) -> None:
    """Smoke test of benchmarks/finetune_niche.py (2 steps, one seed, both contexts)."""
    import importlib.util

    from conftest import REPO

    path = REPO / "benchmarks" / "finetune_niche.py"
    spec = importlib.util.spec_from_file_location("finetune_niche", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--settings", "starmap-density", "--seeds", "0", "--max-steps", "2"]
    argv += ["--model", base_models["bert"], "--work", str(tmp_path / "w"), "--out", str(tmp_path)]
    report = module.main(argv)
    runs = report["results"]["starmap-density"]["runs"]
    assert [r["context"] for r in runs] == ["own", "neighbours"]
    text = (tmp_path / "finetune_niche.md").read_text()
    assert "| ridge (PCA, neighbourhood) |" in text and "neighbour context changes" in text


def test_region_without_coordinates_trains_on_own_tokens_only(tmp_path, base_models) -> None:
    """Intestinal villus zones: dissociated cells, no obsm['spatial']. A region head from the
    cell's own tokens trains and predicts; asking for neighbour context is a clear error."""
    from cellfoundry.tasks import NicheConfig, load_task_model, predict, run_finetuning

    adata = ad.read_h5ad(shared_file("spatialzone_intestine_moor2018.h5ad"))
    assert "spatial" not in adata.obsm
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 240, replace=False))
    data = tmp_path / "intestine.h5ad"
    adata[rows].copy().write_h5ad(data)
    config = NicheConfig(base_model=base_models["bert"], target="region", section_key=None)
    args = niche_args(data, tmp_path / "run", None, split_strategy="random", batch_key=None)
    result = run_finetuning(config, args)
    metrics = json.loads((result.output_dir / "test_metrics.json").read_text())
    assert set(metrics["baselines"]) == {
        "logistic regression (PCA, own)",
        "kNN (PCA, own)",
        "majority class",
    }
    cells = ad.read_h5ad(data)
    predict(cells, load_task_model(result.output_dir), progress=False)
    assert set(cells.obs["cellfoundry_niche"].dropna()) <= set(config.labels)
    with_context = NicheConfig(
        base_model=base_models["bert"], target="region", section_key=None, neighbor_context=True
    )
    with pytest.raises(ValueError, match=r"No obsm\['spatial'\] coordinates"):
        args = niche_args(data, tmp_path / "ctx", None, split_strategy="random", batch_key=None)
        run_finetuning(with_context, args)


def test_zscores_tokenize_in_the_order_of_z(human_tokenizer) -> None:
    """seqFISH z-scores: refused as they are (negative), accepted as exp(z) with the gene
    order of z inside each cell; baselines read z back."""
    from cellfoundry.evaluation.baselines import log_input
    from cellfoundry.tokenization import TokenizeOptions, tokenize_to_table
    from cellfoundry.tokenization.zscores import positive_from_zscores

    adata = ad.read_h5ad(shared_file("spatial_seqfish_visualcortex_zhu2018.h5ad"))[:50].copy()
    with pytest.raises(ValueError, match="positive_from_zscores"):
        tokenize_to_table(adata, human_tokenizer, TokenizeOptions(allow_normalized=True))
    positive = positive_from_zscores(adata)
    z = np.asarray(adata.X)
    order = np.argsort(-positive.X, axis=1, kind="stable")
    np.testing.assert_array_equal(order, np.argsort(-z, axis=1, kind="stable"))
    np.testing.assert_allclose(np.asarray(log_input(positive)[0]), z, atol=1e-5)
    options = TokenizeOptions(allow_normalized=True, max_length=64)
    table, report = tokenize_to_table(positive, human_tokenizer, options)
    assert table.num_rows == 50 and report.n_genes_in_vocab == 85  # 85 of 125 mouse genes map
    adata.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        positive_from_zscores(adata)
