"""Batch-integration fine-tuning on real STARmap slices: both backbones end to end, the
adversary's reversed gradient, the paired interval, predict's scoring and its clear errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import assert_reloads_exactly, shared_file

from cellfoundry.evaluation import integration_scores, paired_half_sample_differences
from cellfoundry.tasks import (
    AnnotationConfig,
    IntegrationConfig,
    build_task_model,
    load_task_model,
    predict,
    run_finetuning,
)
from cellfoundry.tasks.heads import FixedWhitening
from cellfoundry.training import FinetuningArgs

TYPES = ("Astro", "Endo", "eL2/3", "Oligo")


@pytest.fixture(scope="module")
def starmap_file(tmp_path_factory):
    """4 types x 3 slices x 20 STARmap cells (raw counts, mouse genes), as an .h5ad."""
    adata = ad.read_h5ad(shared_file("spatial_starmap_mpfc_wang2018.h5ad"))
    rng = np.random.default_rng(1)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    slices = adata.obs["batch"].astype(str).to_numpy()
    keep = []
    for label in TYPES:
        for name in np.unique(slices):
            rows = np.flatnonzero((labels == label) & (slices == name))
            keep.extend(rng.choice(rows, min(20, rows.size), replace=False))
    path = tmp_path_factory.mktemp("starmap") / "starmap_slices.h5ad"
    adata[np.sort(keep)].copy().write_h5ad(path)
    return path


def run_args(data, output_dir, **changes) -> FinetuningArgs:
    settings = {
        "data": str(data),
        "output_dir": str(output_dir),
        "label_key": "cell_type",
        "batch_key": "batch",
        "split_strategy": "random",
        "batch_size": 16,
        "max_steps": 2,
        "eval_every": 2,
        "log_every": 1,
        "progress_bar": False,
        "learning_rate": 1e-3,
    }
    return FinetuningArgs(**{**settings, **changes})


@pytest.mark.parametrize("backbone", ["bert", "mamba"])
def test_integration_finetune_saves_loads_and_predicts_the_scored_embedding(
    tmp_path, starmap_file, base_models, backbone
) -> None:
    config = IntegrationConfig(base_model=base_models[backbone], embedding_size=8)
    result = run_finetuning(config, run_args(starmap_file, tmp_path / "run"))
    out = result.output_dir
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert set(metrics["baselines"]) == {"PCA", "Harmony", "LDA on PCA"}
    assert set(metrics["comparison"]) == {"total", "bio", "batch"}
    for comparison in metrics["comparison"].values():
        low, high = comparison["ci95"]
        assert low <= comparison["difference"] <= high
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert 0 <= log[-1]["eval_batch_accuracy"] <= 1 and "eval_label_loss" in log[-1]

    # The saved model reproduces, through predict, the embedding that was scored.
    model = load_task_model(out)
    assert model.config.batches == ["slice0", "slice1", "slice2"]
    saved = np.load(out / "test_embedding.npz", allow_pickle=False)
    test = ad.read_h5ad(starmap_file)
    test = test[json.loads((out / "split.json").read_text())["test"]].copy()
    written = predict(test, model, progress=False, score_key="cell_type")
    np.testing.assert_array_equal(test.obsm["X_cellfoundry_integrated"], saved["embedding"])
    assert list(saved["obs_names"]) == list(test.obs_names)
    assert written["scores"]["total"] == pytest.approx(metrics["model"]["total"])
    card = (out / "README.md").read_text()
    assert "scIB total" in card


@pytest.mark.parametrize("tuning", ["lora", "full", "linear_probe"])
@pytest.mark.parametrize("backbone", ["bert", "mamba"])
def test_integration_head_trains_the_tuned_parameters_and_save_load_is_exact(
    tmp_path, base_models, backbone, tuning
) -> None:
    config = IntegrationConfig(
        base_model=base_models[backbone],
        tuning=tuning,
        labels=["a", "b", "c"],
        batches=["x", "y"],
        head_dropout=0,
    )
    model = build_task_model(config)
    batch = {"input_ids": torch.randint(8, 500, (4, 12)), "attention_mask": torch.ones(4, 12)}
    batch["input_ids"][:, 0] = 2
    targets = {"labels": torch.tensor([0, 1, 2, -1]), "batch_labels": torch.tensor([0, 1, 0, 1])}
    model.train()
    model(**batch, **targets).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert any(n.startswith("head.batch_discriminator") for n in trained)
    assert any(n.startswith("head.projection") for n in trained)
    assert any(not n.startswith("head.") for n in trained) == (tuning != "linear_probe")
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert_reloads_exactly(model, batch, tmp_path / "task", output="embeddings")


def test_confusion_moves_the_embedding_but_never_the_discriminator(base_models) -> None:
    config = IntegrationConfig(
        base_model=base_models["bert"], labels=["a", "b"], batches=["x", "y"], head_dropout=0
    )
    head = build_task_model(config).head
    embedding = torch.randn(6, config.embedding_size, requires_grad=True)
    loss = head.confusion(embedding)
    loss.backward()
    assert loss.item() >= np.log(2) - 1e-6  # bounded below: uniform over 2 batches
    assert embedding.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.batch_discriminator.parameters())


def test_fixed_whitening_whitens_the_training_vectors_and_none_only_centres() -> None:
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.normal(size=(500, 4)) @ np.diag([10.0, 1.0, 0.1, 0.01]) + 5)
    whitening = FixedWhitening(4)
    whitening.fit(data.float(), ridge=1e-9)
    covariance = torch.cov(whitening(data.float()).T.double())
    torch.testing.assert_close(covariance, torch.eye(4, dtype=torch.float64), atol=2e-3, rtol=0)
    whitening.fit(data.float(), ridge=None)
    assert torch.equal(whitening.matrix, torch.eye(4))
    torch.testing.assert_close(whitening(data.float()).mean(0), torch.zeros(4), atol=1e-4, rtol=0)


def test_half_sample_interval_is_zero_for_equal_embeddings_and_separates_clear_wins() -> None:
    rng = np.random.default_rng(0)
    n = 300
    labels = np.repeat(["t0", "t1", "t2"], n // 3)
    batches = np.tile(["b0", "b1"], n // 2)
    centres = {"t0": 0.0, "t1": 6.0, "t2": 12.0}
    mixed = np.array([[centres[t], 0.0] for t in labels]) + rng.normal(size=(n, 2))
    shifted = mixed + np.where(batches == "b0", 20.0, 0.0)[:, None]  # batch split on top
    same = paired_half_sample_differences(mixed, mixed, labels, batches, draws=10)
    assert same["total"].value == 0 and same["total"].ci95 == (0.0, 0.0)
    better = paired_half_sample_differences(mixed, shifted, labels, batches, draws=10)
    assert better["batch"].ci95[0] > 0
    assert better["a"] == integration_scores(mixed, labels, batches)
    # Halving thins neighbourhoods; the interval must still hold the full-sample difference.
    noisy = mixed + rng.normal(scale=3.0, size=mixed.shape)
    close = paired_half_sample_differences(noisy, mixed, labels, batches, draws=20)
    for name in ("total", "bio", "batch"):
        low, high = close[name].ci95
        assert low <= close[name].value <= high, name


def test_predict_names_labels_the_annotation_model_never_saw(
    tmp_path, starmap_file, base_models
) -> None:
    config = AnnotationConfig(base_model=base_models["bert"], labels=["Astro", "Endo"])
    model = build_task_model(config)
    adata = ad.read_h5ad(starmap_file)
    with pytest.raises(ValueError, match=r"not trained on: \['Oligo', 'eL2/3'\]"):
        predict(adata, model, progress=False, score_key="cell_type")
    assert "cellfoundry_prediction" not in adata.obs  # checked before anything was written
    with pytest.raises(ValueError, match="No obs column 'celltype'"):
        predict(adata, model, progress=False, score_key="celltype")
    subset = adata[adata.obs["cell_type"].isin(["Astro", "Endo"])].copy()
    scores = predict(subset, model, progress=False, score_key="cell_type")["scores"]
    assert scores["n_cells"] == subset.n_obs and 0 <= scores["macro_f1"] <= 1


def test_integration_without_batch_key_or_with_one_batch_is_a_clear_error(
    tmp_path, starmap_file, base_models
) -> None:
    config = IntegrationConfig(base_model=base_models["bert"])
    with pytest.raises(ValueError, match="Integration needs batch_key"):
        run_finetuning(config, run_args(starmap_file, tmp_path / "a", batch_key=None))
    adata = ad.read_h5ad(starmap_file)
    one = tmp_path / "one_slice.h5ad"
    adata[adata.obs["batch"] == "slice0"].copy().write_h5ad(one)
    with pytest.raises(ValueError, match="at least 2 labels and 2 batches"):
        run_finetuning(IntegrationConfig(base_model=base_models["bert"]), run_args(one, tmp_path))


def test_finetune_integration_benchmark_runs_on_a_tiny_grid(tmp_path, base_models) -> None:
    """Smoke test of benchmarks/finetune_integration.py (2 steps, one mode and seed, no scVI)."""
    import importlib.util

    from conftest import REPO

    path = REPO / "benchmarks" / "finetune_integration.py"
    spec = importlib.util.spec_from_file_location("finetune_integration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--datasets", "starmap", "--seeds", "0", "--modes", "linear_probe", "--no-scvi"]
    argv += ["--max-steps", "2", "--model", base_models["bert"]]
    report = module.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    block = report["datasets"]["starmap"]
    assert block["split"]["strategy"] == "random" and block["split"]["test"] > 0
    assert set(block["summary"]["methods"]) == {"linear_probe", "PCA", "Harmony", "LDA on PCA"}
    assert set(block["summary"]["comparisons"]) == {f"linear_probe/{m}" for m in module.AGGREGATES}
    assert (tmp_path / "finetune_integration.md").read_text().count("| linear_probe |") == 1
