"""Task fine-tuning (annotation): every backbone x tuning mode end to end on real STARmap cells,
save/load equality, what trains, LoRA gradients, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import REPO, assert_reloads_exactly, shared_file

from cellfoundry.tasks import (
    AnnotationConfig,
    build_task_model,
    load_task_model,
    predict,
    run_finetuning,
)
from cellfoundry.training import FinetuningArgs

TUNINGS = ("lora", "full", "linear_probe")


@pytest.fixture(scope="module")
def starmap_file(tmp_path_factory):
    """240 labelled STARmap cells (4 types x 60, raw counts, mouse genes), as an .h5ad."""
    adata = ad.read_h5ad(shared_file("spatial_starmap_mpfc_wang2018.h5ad"))
    rng = np.random.default_rng(0)
    keep = []
    for label in ("Astro", "Endo", "eL2/3", "Oligo"):
        rows = np.flatnonzero(adata.obs["cell_type"].astype(str).to_numpy() == label)
        keep.extend(rng.choice(rows, 60, replace=False))
    path = tmp_path_factory.mktemp("starmap") / "starmap_small.h5ad"
    adata[np.sort(keep)].copy().write_h5ad(path)
    return path


def run_args(starmap_file, output_dir, **changes) -> FinetuningArgs:
    settings = {
        "data": str(starmap_file),
        "output_dir": str(output_dir),
        "label_key": "cell_type",
        "split_strategy": "random",
        "batch_size": 16,
        "max_steps": 2,
        "eval_every": 1,
        "log_every": 1,
        "progress_bar": False,
        "learning_rate": 1e-2,
    }
    return FinetuningArgs(**{**settings, **changes})


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("backbone", ["bert", "mamba"])
def test_finetune_saves_a_model_that_loads_and_predicts_the_same(
    tmp_path, starmap_file, base_models, backbone, tuning
) -> None:
    config = AnnotationConfig(base_model=base_models[backbone], tuning=tuning)
    result = run_finetuning(config, run_args(starmap_file, tmp_path / "run"))
    out = result.output_dir
    saved = {p.name for p in out.iterdir()}
    assert {"task_config.json", "head.safetensors", "README.md", "split.json"} <= saved
    assert ("adapter_model.safetensors" in saved) == (tuning == "lora")
    assert ("backbone.safetensors" in saved) == (tuning == "full")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert set(metrics["baselines"]) == {"logistic regression (HVG)", "kNN on PCA"}
    assert metrics["split"]["test"] == metrics["n_cells"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and "eval_macro_f1" in log[-1]

    # Loading the folder and predicting gives exactly the scores measured in the run.
    model = load_task_model(out)
    assert model.config.labels == sorted(["Astro", "Endo", "Oligo", "eL2/3"])
    test = ad.read_h5ad(starmap_file)
    test = test[json.loads((out / "split.json").read_text())["test"]].copy()
    written = predict(test, model, progress=False)
    truth = test.obs["cell_type"].astype(str).to_numpy()
    from cellfoundry.evaluation import macro_f1

    guess = np.asarray(written["labels"].astype(str))
    assert macro_f1(truth, guess) == metrics["model"]["macro_f1"]
    assert test.obsm["cellfoundry_probabilities"].shape == (test.n_obs, 4)
    np.testing.assert_allclose(test.obsm["cellfoundry_probabilities"].sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("backbone", ["bert", "mamba"])
def test_only_the_tuned_parameters_train_and_save_load_is_exact(
    tmp_path, base_models, backbone, tuning
) -> None:
    config = AnnotationConfig(
        base_model=base_models[backbone], tuning=tuning, labels=["a", "b", "c"], head_dropout=0
    )
    model = build_task_model(config)
    names = trainable_names(model)
    head = {n for n in names if n.startswith("head.")}
    assert head == {n for n, _ in model.named_parameters() if n.startswith("head.")}
    if tuning == "lora":
        assert names - head and all("lora_" in n for n in names - head)
    elif tuning == "full":
        assert names == {n for n, _ in model.named_parameters()}
    else:
        assert names == head
    batch = {
        "input_ids": torch.randint(8, 500, (4, 12)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    batch["input_ids"][:, 0] = 2
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    if tuning == "lora":  # every adapter's B gets a gradient from the first backward
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert_reloads_exactly(model, batch, tmp_path / "task")


def _saved_bytes(model: torch.nn.Module, batch: dict, labels: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch, labels=labels)
    return sum(saved.values())


def test_lora_fa_trains_only_b_keeps_fewer_activations_and_saves_exactly(tmp_path) -> None:
    targets = ["query", "key", "value", "out_proj"]
    batch = {
        "input_ids": torch.randint(8, 500, (4, 64)),
        "attention_mask": torch.ones(4, 64, dtype=torch.long),
    }
    batch["input_ids"][:, 0] = 2
    labels = torch.tensor([0, 1, 2, 1])
    models = {}
    for freeze in (False, True):
        config = AnnotationConfig(
            labels=["a", "b", "c"], head_dropout=0, lora_targets=targets, lora_freeze_a=freeze
        )
        torch.manual_seed(0)
        models[freeze] = build_task_model(config).train()
    model = models[True]
    names = trainable_names(model)
    assert names and all(n.startswith("head.") or ".lora_B." in n for n in names)
    assert any(".lora_B." in n for n in names)
    # the adapted layers' inputs are no longer kept: 4 layers x (LN output + attention output)
    assert _saved_bytes(models[True], batch, labels) < _saved_bytes(models[False], batch, labels)
    before_a = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    model(**batch, labels=labels).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, before_a[n]) for n, p in model.named_parameters() if n in before_a)
    assert_reloads_exactly(model, batch, tmp_path / "task")
    with pytest.raises(ValueError, match="lora_freeze_a"):
        AnnotationConfig(labels=["a", "b"], tuning="full", lora_freeze_a=True)


def test_lora_trains_at_most_five_percent_of_the_shipped_model() -> None:
    config = AnnotationConfig(base_model="cellfoundry-tiny-bert", labels=["a", "b"])
    model = build_task_model(config)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trained / total <= 0.05


def test_finetune_is_deterministic(tmp_path, starmap_file, base_models) -> None:
    runs = []
    for name in ("a", "b"):
        config = AnnotationConfig(base_model=base_models["bert"])
        result = run_finetuning(config, run_args(starmap_file, tmp_path / name))
        log = (result.output_dir / "log.jsonl").read_text().splitlines()
        runs.append(
            [
                {k: v for k, v in json.loads(r).items() if k not in ("time", "tokens_per_s")}
                for r in log
            ]
        )
    assert runs[0] == runs[1]


def test_missing_label_column_and_single_cell_class_give_clear_errors(
    tmp_path, starmap_file, base_models
) -> None:
    config = AnnotationConfig(base_model=base_models["bert"])
    with pytest.raises(ValueError, match="no obs column 'celltype'"):
        run_finetuning(config, run_args(starmap_file, tmp_path / "a", label_key="celltype"))
    adata = ad.read_h5ad(starmap_file)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.iloc[0, adata.obs.columns.get_loc("cell_type")] = "Lonely"
    lonely = tmp_path / "lonely.h5ad"
    adata.write_h5ad(lonely)
    with pytest.raises(ValueError, match="Lonely"):
        run_finetuning(config, run_args(lonely, tmp_path / "b"))


def test_finetune_script_and_predict_cli(tmp_path, starmap_file, base_models) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "finetuning" / "finetune.py"),
        "--task",
        "annotation",
        "--config",
        str(REPO / "finetuning" / "configs" / "annotation" / "starmap-lora.yaml"),
        "--data",
        str(starmap_file),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "split_strategy=random",
        "drop_labels=[]",
        "progress_bar=false",
        f"task.base_model={base_models['bert']}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Finished at step 2" in done.stdout
    predicted = tmp_path / "predicted.h5ad"
    command = [sys.executable, "-m", "cellfoundry.cli", "predict", str(starmap_file)]
    command += [str(predicted), "--model", str(out), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = ad.read_h5ad(predicted)
    assert set(result.obs["cellfoundry_prediction"].astype(str)) <= set(
        result.uns["cellfoundry_classes"]
    )


def test_finetune_annotation_benchmark_runs_on_a_tiny_grid(tmp_path, base_models) -> None:
    """Smoke test of benchmarks/finetune_annotation.py (2 steps, one mode and seed)."""
    import importlib.util

    path = REPO / "benchmarks" / "finetune_annotation.py"
    spec = importlib.util.spec_from_file_location("finetune_annotation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--datasets", "starmap", "--seeds", "0", "--modes", "linear_probe"]
    argv += ["--max-steps", "2", "--few-shot", "--model", base_models["bert"]]
    report = module.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    block = report["datasets"]["starmap / holdout"]
    assert block["split"]["strategy"] == "holdout" and block["split"]["test"] > 0
    assert set(block["summary"]["methods"]) == {"linear_probe", *module.BASELINES}
    assert (tmp_path / "finetune_annotation.md").read_text().count("| linear_probe |") == 1

    # a second mode run later joins the first on the same split instead of replacing it
    argv[argv.index("linear_probe")] = "lora_attention"
    report = module.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    block = report["datasets"]["starmap / holdout"]
    assert [r["mode"] for r in block["runs"]] == ["lora_attention", "linear_probe"]
    assert [r["modes"] for r in block["kept_from_previous_runs"]] == [["linear_probe"]]
    shares = block["trainable"]
    assert shares["linear_probe"]["share"] < shares["lora_attention"]["share"] < 0.05
    text = (tmp_path / "finetune_annotation.md").read_text()
    assert "| lora_attention |" in text and "Modes linear_probe are from an earlier run" in text
    assert "Learning rates (adapters or encoder; the head 0.005): lora_attention 0.0002." in text

    # a kept mode's learning rate is its own run's, not the later run's
    methods = dict.fromkeys(["lora", "full", "linear_probe", "kNN on PCA"], {})
    mixed = {
        "settings": {"learning_rate": {"lora": 2e-4, "full": 1e-5, "linear_probe": 5e-3}},
        "kept_from_previous_runs": [
            {"modes": ["lora"], "settings": {"learning_rate": {"lora": 1e-4}}}
        ],
        "summary": {"methods": methods},
    }
    assert module.learning_rates(mixed) == "lora 0.0001; full 1e-05"

    # a split that changed since (here: other baseline scores) is refused, not mixed in
    block["runs"][1]["metrics"]["baselines"]["kNN on PCA"]["macro_f1"] += 0.01
    with pytest.raises(RuntimeError, match="split changed"):
        module.kept_runs(block, block["runs"][:1], block["setting"], block["settings"])


@pytest.mark.parametrize(
    "path", sorted((REPO / "finetuning" / "configs").glob("*/*.yaml")), ids=lambda p: p.stem
)
def test_every_shipped_finetuning_config_loads(path) -> None:
    from cellfoundry.tasks.entry import load_finetuning_config

    config, args = load_finetuning_config(path, path.parent.name)
    assert config.task == path.parent.name and args.output_dir and args.data
    if path.stem.startswith("starmap-lora-") and path.stem.endswith("attention"):
        assert config.lora_targets == ["query", "key", "value", "out_proj"]
    if path.stem == "starmap-lora-fa-attention":
        assert config.lora_freeze_a and args.learning_rate == 5e-6
