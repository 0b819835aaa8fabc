"""pretraining/: the script (smoke test via subprocess), YAML and accelerate configs, README."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PRETRAINING = REPO / "pretraining"
SCRIPT = PRETRAINING / "pretrain_mgm.py"
CONFIGS = sorted((PRETRAINING / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((PRETRAINING / "accelerate").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo_tokens(tmp_path_factory, tiny_tokenizer):
    """The shipped demo (559 cells) tokenized with cf-tiny-test."""
    import cellfoundry
    from cellfoundry.tokenization import tokenize_files

    out = tmp_path_factory.mktemp("tokens") / "demo"
    tokenize_files([cellfoundry.demo_path()], out, tiny_tokenizer)
    return out


@pytest.mark.parametrize("config", ["bert-tiny", "mamba-tiny"])
def test_pretrain_script_smoke(tmp_path, demo_tokens, config):
    """Two steps of the real tiny config (smaller batches and cells to stay quick)."""
    output_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(SCRIPT),
        "--config",
        str(PRETRAINING / "configs" / f"{config}.yaml"),
        "--data",
        str(demo_tokens),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "batch_size=8",
        "max_length=64",
        "max_eval_cells=16",
        "progress_bar=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Finished at step 2" in done.stdout

    from transformers import AutoModelForMaskedLM

    import cellfoundry.models  # noqa: F401  (registers the Auto classes)

    model = AutoModelForMaskedLM.from_pretrained(output_dir)
    assert model.config.model_type == f"cellfoundry-{config.split('-')[0]}"
    assert model.config.tokenizer_id == "cf-tiny-test"
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and math.isfinite(records[-1]["loss"])
    assert 0.0 <= records[-1]["eval_top1"] <= records[-1]["eval_top10"] <= 1.0
    assert (output_dir / "run_args.yaml").is_file() and (output_dir / "split.json").is_file()
    assert (output_dir / "checkpoints" / "step-00000002" / "trainer_state.json").is_file()


def test_pretrain_script_reports_config_errors(tmp_path, capsys):
    from cellfoundry.training.entry import pretrain_main

    config = str(PRETRAINING / "configs" / "bert-tiny.yaml")
    assert pretrain_main(["--config", config, "--data", str(tmp_path), "max_steps=2"]) == 2
    assert "manifest.json missing" in capsys.readouterr().err
    assert pretrain_main(["--config", config, "lerning_rate=1"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_configs_cover_both_backbones_in_three_sizes_and_build(tiny_tokenizer):
    from cellfoundry.training import build_masked_gene_model, load_pretraining_config

    names = {path.stem for path in CONFIGS}
    assert {
        f"{kind}-{size}" for kind in ("bert", "mamba") for size in ("tiny", "small", "base")
    } <= names
    for path in CONFIGS:
        spec, args = load_pretraining_config(path)
        assert args.max_steps > args.num_warmup_steps and args.data == []
        with torch.device("meta"):  # shapes only: no memory, no initialisation time
            model = build_masked_gene_model(spec, tiny_tokenizer)
        assert model.config.model_type == f"cellfoundry-{path.stem.split('-')[0]}"


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {load_config_from_file(str(path)).distributed_type.value for path in ACCELERATE_CONFIGS}
    assert {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"} <= kinds


def test_readme_launch_lines_point_at_real_files():
    text = (PRETRAINING / "README.md").read_text()
    for kind in ("1 CPU", "1 GPU", "DDP", "FSDP", "DeepSpeed"):
        assert kind in text
    referenced = re.findall(r"pretraining/(?:configs|accelerate)/[\w.-]+\.yaml", text)
    assert referenced
    for relative in referenced:
        assert (REPO / relative).is_file(), relative
