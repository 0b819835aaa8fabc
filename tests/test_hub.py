"""Model cards on save, names (shipped / folder / Hub id), and Hub loading from a local cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from cellfoundry.hub import ModelCardInfo, model_path, resolve_model
from cellfoundry.models import CellMambaConfig, CellMambaForMaskedGeneModeling, load_model


def _tiny_mamba(tokenizer):
    torch.manual_seed(0)
    config = CellMambaConfig.from_tokenizer(
        tokenizer,
        hidden_size=32,
        num_hidden_layers=2,
        head_dim=16,
        state_size=8,
        chunk_size=8,
        max_position_embeddings=128,
    )
    return CellMambaForMaskedGeneModeling(config).eval()


def test_save_pretrained_writes_model_card(tmp_path, tiny_tokenizer):
    model = _tiny_mamba(tiny_tokenizer)
    model.card_info = ModelCardInfo(
        n_cells=559,
        training_data="CellTypist demo sample",
        metrics=[
            {
                "task": "MGM",
                "metric": "top-1",
                "ours": 0.1,
                "baseline": "frequency prior",
                "baseline_value": 0.05,
                "difference": "+0.05",
                "ci": "[0.04, 0.06]",
            }
        ],
    )
    model.save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "cellfoundry" and meta["license"] == "apache-2.0"
    assert meta["tokenizer_id"] == "cf-tiny-test"
    assert meta["vocab_sha256"] == tiny_tokenizer.vocab.sha256
    assert meta["context_length"] == 128 and meta["corpus_cells"] == 559
    assert "cellfoundry-mamba" in meta["tags"] and meta["species"] == ["human"]
    for section in (
        "## Intended use",
        "## How to load",
        "## Training data and compute",
        "## Metrics beside baselines",
        "## Limitations",
    ):
        assert section in body
    assert "| MGM | top-1 | 0.1 | frequency prior | 0.05 | +0.05 [0.04, 0.06] |" in body
    reloaded = load_model(str(tmp_path / "m"), masked_gene_head=True)
    assert reloaded.card_info.n_cells == 559
    reloaded.save_pretrained(tmp_path / "again")
    assert "| MGM | top-1 |" in (tmp_path / "again" / "README.md").read_text()


def test_names_resolve_or_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="No shipped model 'nope'"):
        model_path("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json missing"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="Unknown model"):
        resolve_model("not a model")
    assert resolve_model("acme/cell-model") == "acme/cell-model"


def test_hub_id_loads_offline_from_local_cache(tmp_path, tiny_tokenizer):
    """A Hub id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1."""
    model = _tiny_mamba(tiny_tokenizer)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    cache = tmp_path / "hub"
    repo = cache / "models--acme--cellfoundry-test"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(saved, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    code = (
        "import torch, cellfoundry\n"
        "m = cellfoundry.load_model('acme/cellfoundry-test', masked_gene_head=True)\n"
        f"ref = cellfoundry.load_model({str(saved)!r}, masked_gene_head=True)\n"
        "ids = torch.tensor([[2, 30, 40, 50]])\n"
        "same = torch.equal(m(ids).logits, ref(ids).logits)\n"
        "print(type(m).__name__, same)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("CellMambaForMaskedGeneModeling True")
