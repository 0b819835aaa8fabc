"""Supervised perturbation response on real Kang cells: a held-out cluster end to end, both
backbones, the baselines in the same run, and clear errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
from conftest import shared_file

from cellfoundry.data.perturbation import condition_clusters
from cellfoundry.evaluation.perturbation import METRICS
from cellfoundry.tasks import PerturbationConfig, load_task_model, predict, run_finetuning
from cellfoundry.training import FinetuningArgs


@pytest.fixture(scope="module")
def kang_file(tmp_path_factory):
    """600 Kang PBMCs with 4 clusters shared by control and IFN-beta cells, as an .h5ad."""
    adata = ad.read_h5ad(shared_file("pert_kang2018_ifnb_pbmc.h5ad"))
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 600, replace=False))
    adata = adata[rows].copy()
    adata.obs["cluster"] = condition_clusters(adata, "perturbation", "control", n_clusters=4)
    path = tmp_path_factory.mktemp("kang") / "kang_clusters.h5ad"
    adata.write_h5ad(path)
    return path


def run_args(data, output_dir, **changes) -> FinetuningArgs:
    settings = {
        "data": str(data),
        "output_dir": str(output_dir),
        "label_key": "perturbation",
        "batch_key": "cluster",
        "split_strategy": "holdout",
        "holdout": ["c1"],
        "drop_labels": ["IFN-beta"],
        "batch_size": 16,
        "max_steps": 2,
        "eval_every": 2,
        "log_every": 1,
        "progress_bar": False,
        "learning_rate": 1e-3,
    }
    return FinetuningArgs(**{**settings, **changes})


@pytest.mark.parametrize("backbone", ["bert", "mamba"])
def test_heldout_cluster_response_is_scored_beside_the_baselines(
    tmp_path, kang_file, base_models, backbone
) -> None:
    config = PerturbationConfig(base_model=base_models[backbone], n_genes=200)
    result = run_finetuning(config, run_args(kang_file, tmp_path / "run"))
    metrics = json.loads((result.output_dir / "test_metrics.json").read_text())
    assert metrics["heldout_group"] == "c1"
    entry = metrics["perturbations"]["IFN-beta"]
    assert set(entry["baselines"]) == {
        "no change",
        "train mean",
        "additive",
        "linear on PCA",
        "latent arithmetic (PCA)",
    }
    assert set(entry["model"]) == set(METRICS) == set(entry["comparison"])
    for comparison in entry["comparison"].values():
        low, high = comparison["ci95"]
        assert low <= high
    # the no-change baseline predicts exactly the control mean: no delta correlation
    assert np.isnan(entry["baselines"]["no change"]["pearson_delta"])

    model = load_task_model(result.output_dir)
    assert model.config.perturbations == ["IFN-beta"] and len(model.config.genes) == 200
    cells = ad.read_h5ad(kang_file)
    control = cells[cells.obs["perturbation"] == "control"].copy()
    predict(control, model, progress=False)
    assert control.obsm["cellfoundry_response_IFN-beta"].shape == (control.n_obs, 200)


def test_perturbation_without_control_cells_is_a_clear_error(tmp_path, kang_file, base_models):
    config = PerturbationConfig(base_model=base_models["bert"], control_value="ctrl", n_genes=50)
    with pytest.raises(ValueError, match="No control cells"):
        run_finetuning(config, run_args(kang_file, tmp_path / "run", drop_labels=[]))


def test_finetune_perturbation_benchmark_runs_on_a_tiny_grid(tmp_path, base_models) -> None:
    """Smoke test of benchmarks/finetune_perturbation.py (2 steps, one seed and cluster)."""
    import importlib.util

    from conftest import REPO

    adata = ad.read_h5ad(shared_file("pert_kang2018_ifnb_pbmc.h5ad"))
    rows = np.sort(np.random.default_rng(1).choice(adata.n_obs, 500, replace=False))
    small = tmp_path / "kang_small.h5ad"
    adata[rows].copy().write_h5ad(small)
    path = REPO / "benchmarks" / "finetune_perturbation.py"
    spec = importlib.util.spec_from_file_location("finetune_perturbation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--data", str(small), "--seeds", "0", "--heldout", "1", "--n-clusters", "3"]
    argv += ["--max-steps", "2", "--n-genes", "100", "--model", base_models["bert"]]
    report = module.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    assert len(report["runs"]) == 1 and set(report["mean_model_minus_best"]) == set(METRICS)
    text = (tmp_path / "finetune_perturbation.md").read_text()
    assert text.count("| latent arithmetic (PCA) |") == 1


# -- unseen genetic perturbations (Papalexi ECCITE-seq) -----------------------------------------
TARGETS = ["JAK2", "STAT2", "STAT3", "STAT1", "IRF1"]  # four are among the measured genes


@pytest.fixture(scope="module")
def papalexi_file(tmp_path_factory):
    """200 control cells and 60 cells of each of five knockouts (raw counts, 299 genes)."""
    adata = ad.read_h5ad(shared_file("pert_eccite_thp1_papalexi2021.h5ad"))
    rng = np.random.default_rng(0)
    values = adata.obs["perturbation"].astype(str).to_numpy()
    keep = [rng.choice(np.flatnonzero(values == "control"), 200, replace=False)]
    keep += [rng.choice(np.flatnonzero(values == t), 60, replace=False) for t in TARGETS]
    path = tmp_path_factory.mktemp("papalexi") / "papalexi_small.h5ad"
    adata[np.sort(np.concatenate(keep))].copy().write_h5ad(path)
    return path


def unseen_args(data, output_dir):
    return run_args(
        data,
        output_dir,
        batch_key=None,
        split_strategy="random",
        holdout=None,
        drop_labels=TARGETS,
    )


def test_unseen_perturbation_from_the_target_gene_token(tmp_path, papalexi_file, base_models):
    import torch

    config = PerturbationConfig(
        base_model=base_models["bert"],
        group_key="batch",
        perturbations=TARGETS,
        heldout_perturbations=["STAT1"],
        perturbation_source="gene_token",
        n_genes=100,
    )
    result = run_finetuning(config, unseen_args(papalexi_file, tmp_path / "run"))
    metrics = json.loads((result.output_dir / "test_metrics.json").read_text())
    assert metrics["setting"] == "unseen perturbations"
    entry = metrics["perturbations"]["STAT1"]
    assert {"no change", "train mean"} <= set(entry["baselines"])
    # STAT1 is measured, and so are three training targets: the gene-PCA baseline applies
    assert "linear (gene PCA)" in entry["baselines"]
    model = load_task_model(result.output_dir)
    from cellfoundry.models import load_model

    base = load_model(base_models["bert"]).get_input_embeddings().weight
    tokens = torch.tensor(model.config.perturbation_tokens)
    torch.testing.assert_close(model.head.token_vectors, base[tokens])
    assert model.config.heldout_perturbations == ["STAT1"]


def test_unknown_perturbation_gene_and_learned_heldout_are_clear_errors(
    tmp_path, papalexi_file, base_models
) -> None:
    with pytest.raises(ValueError, match="need perturbation_source='gene_token'"):
        PerturbationConfig(perturbations=TARGETS, heldout_perturbations=["STAT1"])
    adata = ad.read_h5ad(papalexi_file)
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).replace("IRF1", "NOTAGENE1")
    path = tmp_path / "renamed.h5ad"
    adata.write_h5ad(path)
    targets = [t if t != "IRF1" else "NOTAGENE1" for t in TARGETS]
    config = PerturbationConfig(
        base_model=base_models["bert"],
        group_key="batch",
        perturbations=targets,
        heldout_perturbations=["STAT1"],
        perturbation_source="gene_token",
        n_genes=100,
    )
    args = unseen_args(path, tmp_path / "run")
    args.drop_labels = targets
    with pytest.raises(ValueError, match=r"Unknown perturbation gene\(s\) \['NOTAGENE1'\]"):
        run_finetuning(config, args)
