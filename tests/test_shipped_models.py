"""The checkpoints shipped in the package: offline loading, size, cards, held-out quality."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM

import cellfoundry
from cellfoundry.hub import ModelCardInfo

SHIPPED = ["cellfoundry-tiny-bert", "cellfoundry-tiny-mamba"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_offline_by_name_and_by_auto_class(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = cellfoundry.model_path(name)
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    assert size_mb <= 25.0
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    by_name = cellfoundry.load_model(name).eval()
    by_path = AutoModel.from_pretrained(folder).eval()
    assert type(by_name) is type(by_path)
    assert by_name.config.tokenizer_id == "cf-human-v1"
    ids = torch.tensor([[2, *range(100, 140)]])
    with torch.no_grad():
        left = by_name(input_ids=ids).last_hidden_state
        right = by_path(input_ids=ids).last_hidden_state
    assert torch.equal(left, right) and torch.isfinite(left).all()
    assert AutoModelForMaskedLM.from_pretrained(folder).get_output_embeddings() is not None


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_beats_the_rank_position_prior_on_held_out_cells(name):
    folder = cellfoundry.model_path(name)
    heldout = json.loads((folder / "heldout_eval.json").read_text())
    assert heldout["cells"] > 1000 and heldout["masked_genes"] > 10_000
    for k in ("top1", "top10"):
        assert heldout["difference"][k]["ci95"][0] > 0, (k, heldout["model"], heldout["prior"])
    card = ModelCardInfo.load(folder)
    assert card is not None and len(card.metrics) == 2 and card.license == "other"
    readme = (folder / "README.md").read_text()
    assert "gene frequency at the rank position" in readme and "library_name: cellfoundry" in readme
