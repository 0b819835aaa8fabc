"""Batches for training: masked-gene collation, tokenized corpora, cell splits, length grouping.

Sits between ``cellfoundry.tokenization`` (which writes the tokenized Arrow folders read
here) and ``cellfoundry.training`` (which iterates the batches built here).
"""

from cellfoundry.data.collators import (
    IGNORE_INDEX,
    CellBatchCollator,
    MaskedGeneCollator,
    derive_seed,
)
from cellfoundry.data.datasets import (
    CellSplit,
    LengthGroupedBatchSampler,
    TokenizedCells,
    TokenizedCorpus,
    load_corpus,
    split_cells,
)

__all__ = [
    "IGNORE_INDEX",
    "CellBatchCollator",
    "CellSplit",
    "LengthGroupedBatchSampler",
    "MaskedGeneCollator",
    "TokenizedCells",
    "TokenizedCorpus",
    "derive_seed",
    "load_corpus",
    "split_cells",
]
