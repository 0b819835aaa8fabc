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
