"""cellfoundry: pretrained foundation models on tokenized single-cell transcriptomics.

Importing the package is cheap: submodules (and torch) load on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

__version__ = "0.1.0"

_LAZY = {
    "GeneVocab": "cellfoundry.tokenization",
    "RankValueTokenizer": "cellfoundry.tokenization",
    "load_tokenizer": "cellfoundry.tokenization",
    "tokenize_files": "cellfoundry.tokenization",
    "load_tokenized": "cellfoundry.tokenization",
    "resolve_genes": "cellfoundry.genes",
    "CellBertConfig": "cellfoundry.models",
    "CellBertModel": "cellfoundry.models",
    "CellBertForMaskedGeneModeling": "cellfoundry.models",
    "CellMambaConfig": "cellfoundry.models",
    "CellMambaModel": "cellfoundry.models",
    "CellMambaForMaskedGeneModeling": "cellfoundry.models",
    "load_model": "cellfoundry.models",
    "check_tokenizer_compatible": "cellfoundry.models",
    "add_lora": "cellfoundry.adapters",
    "embed": "cellfoundry.embedding",
    "in_silico_perturbation": "cellfoundry.in_silico",
    "TargetState": "cellfoundry.in_silico",
    "model_path": "cellfoundry.hub",
    "shipped_models": "cellfoundry.hub",
}
# Submodules that import torch: loaded on first attribute access (``cellfoundry.models``).
_LAZY_SUBMODULES = {"models", "adapters"}


def demo_path() -> Path:
    """Path of the shipped demo dataset (CellTypist sample: 559 human cells, raw counts, MIT)."""
    return Path(__file__).resolve().parent / "_data" / "demo" / "celltypist_sample.h5ad"


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"cellfoundry.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellfoundry' has no attribute {name!r}")


__all__ = ["__version__", "demo_path", *_LAZY]
