"""Shared fixtures: the real data folder and small tokenizers built from real cells."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLFOUNDRY_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Path of a real dataset in ../shared/data, skipping the test if the folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} not present (CI and developer machines have ../shared)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The shipped cf-tiny-test tokenizer (1,000 genes of the CellTypist demo sample)."""
    from cellfoundry.tokenization import load_tokenizer

    return load_tokenizer("cf-tiny-test")


@pytest.fixture(scope="session")
def human_tokenizer():
    """The shipped cf-human-v1 tokenizer."""
    from cellfoundry.tokenization import load_tokenizer

    return load_tokenizer("cf-human-v1")


def save_tiny_model(tmp_path, backbone: str, tokenizer) -> str:
    """Save a tiny masked-gene model (hidden 32, 2 layers, seed 0) for ``tokenizer``; its path."""
    import torch

    from cellfoundry.models import (
        CellBertConfig,
        CellBertForMaskedGeneModeling,
        CellMambaConfig,
        CellMambaForMaskedGeneModeling,
    )

    torch.manual_seed(0)
    common = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "hidden_dropout_prob": 0.0,
    }
    if backbone == "bert":
        config = CellBertConfig.from_tokenizer(
            tokenizer,
            num_attention_heads=4,
            intermediate_size=64,
            attention_probs_dropout_prob=0.0,
            **common,
        )
        model = CellBertForMaskedGeneModeling(config)
    else:
        config = CellMambaConfig.from_tokenizer(
            tokenizer, head_dim=16, state_size=8, chunk_size=16, **common
        )
        model = CellMambaForMaskedGeneModeling(config)
    path = tmp_path / backbone
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def base_models(tmp_path_factory, human_tokenizer):
    """Tiny random-init bert and mamba masked-gene models for cf-human-v1 (task tests)."""
    folder = tmp_path_factory.mktemp("base")
    return {name: save_tiny_model(folder, name, human_tokenizer) for name in ("bert", "mamba")}


def assert_reloads_exactly(model, batch: dict, folder: Path, output: str = "logits") -> None:
    """A task model saved to ``folder`` and loaded back gives bit-identical ``output``."""
    import torch

    from cellfoundry.tasks import load_task_model

    model.eval()
    with torch.no_grad():
        before = getattr(model(**batch), output)
    model.save_pretrained(folder)
    with torch.no_grad():
        after = getattr(load_task_model(folder)(**batch), output)
    assert torch.equal(before, after)
