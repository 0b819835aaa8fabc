"""Training data from tokenized folders: a corpus, a saved train/eval split, length-grouped batches.

A *corpus* is one or several folders written by ``cellfoundry tokenize`` (Arrow shards plus
``manifest.json``) read as one ``datasets.Dataset``. Ids only mean the same genes under one
vocabulary, so every folder must record the same ``vocab_sha256``.

The train/eval split is made once per corpus and saved as a JSON file of held-out row
indices and cell ids: a rerun, a resumed run or another model trained later scores on exactly
the same held-out cells, and the file says which cells they were.

Batches group cells of similar length (the ``length`` column), so little compute goes to
padding: gene counts per cell vary several-fold within one dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cellfoundry._io import atomic_write_text
from cellfoundry.data.collators import derive_seed
from cellfoundry.tokenization import load_tokenized

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SPLIT_FORMAT = "cellfoundry-split/1"
_MODEL_COLUMNS = ("input_ids", "context_ids")


@dataclass(frozen=True)
class TokenizedCorpus:
    """Tokenized cells from one or more folders, concatenated in the order given.

    Attributes
    ----------
    dataset : datasets.Dataset
        All rows (``input_ids``, ``length``, ``context_ids``, ``cell_id``, obs columns).
    sources : tuple of str
        The folders, in row order.
    source_sizes : tuple of int
        Cells per folder.
    tokenizer_id, vocab_sha256 : str
        What every folder was tokenized with (from the manifests).
    """

    dataset: datasets.Dataset
    sources: tuple[str, ...]
    source_sizes: tuple[int, ...]
    tokenizer_id: str
    vocab_sha256: str

    def __len__(self) -> int:
        return len(self.dataset)

    @cached_property
    def lengths(self) -> np.ndarray:
        """(G,) tokens per cell including ``<cls>``, for length-grouped batching."""
        return _column_lengths(self.dataset)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the folders' cell counts and cell ids: a changed corpus changes it."""
        digest = hashlib.sha256()
        offset = 0
        for source_index, size in enumerate(self.source_sizes):
            digest.update(f"source {source_index}: {size} cells\n".encode())
            if "cell_id" in self.dataset.column_names:
                cell_ids = self.dataset.select_columns(["cell_id"])
                for start in range(offset, offset + size, 65_536):
                    ids = cell_ids[start : min(start + 65_536, offset + size)]["cell_id"]
                    digest.update(("\n".join(map(str, ids)) + "\n").encode())
            offset += size
        return digest.hexdigest()

    def cells(self, indices: Sequence[int] | np.ndarray | None = None) -> TokenizedCells:
        """The rows ``indices`` (all when ``None``) as a torch dataset for a ``DataLoader``."""
        return TokenizedCells(self.dataset, indices, lengths=self.lengths)


def load_corpus(
    paths: str | Path | Sequence[str | Path], vocab_sha256: str | None = None
) -> TokenizedCorpus:
    """Open tokenized folders as one corpus, refusing folders from different vocabularies.

    Parameters
    ----------
    paths : path or sequence of paths
        Folders written by ``cellfoundry tokenize`` / ``tokenize_files``.
    vocab_sha256 : str or None
        Expected vocabulary hash (the tokenizer's or the model's ``vocab_sha256``); ``None``
        only requires the folders to agree with each other.

    Returns
    -------
    TokenizedCorpus

    Raises
    ------
    ValueError
        When a folder is not a tokenized folder, or folders (or the expected hash) name
        different vocabularies.
    """
    folders = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not folders:
        raise ValueError("No tokenized folders given; pass at least one (data: [...]).")
    manifests = [_read_manifest(folder) for folder in folders]
    hashes = {str(f): m["vocab_sha256"] for f, m in zip(folders, manifests, strict=True)}
    expected = vocab_sha256 or manifests[0]["vocab_sha256"]
    differing = {folder: value for folder, value in hashes.items() if value != expected}
    if differing:
        raise ValueError(
            f"Tokenized folders use different vocabularies: expected vocab_sha256={expected}, "
            f"but {differing}. Token ids only mean the same genes under one vocabulary; "
            "re-tokenize every folder with the same tokenizer (cellfoundry tokenize "
            "--tokenizer ...)."
        )
    parts = [load_tokenized(folder) for folder in folders]
    for folder, part in zip(folders, parts, strict=True):
        if "input_ids" not in part.column_names:
            raise ValueError(f"{folder} has no input_ids column; re-tokenize it.")
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return TokenizedCorpus(
        dataset=dataset,
        sources=tuple(str(folder) for folder in folders),
        source_sizes=tuple(len(part) for part in parts),
        tokenizer_id=str(manifests[0].get("tokenizer_id")),
        vocab_sha256=expected,
    )


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a cellfoundry tokenized folder ({MANIFEST_FILE} missing); "
            "create it with `cellfoundry tokenize IN.h5ad OUT_DIR`."
        )
    manifest = json.loads(path.read_text())
    if "vocab_sha256" not in manifest:
        raise ValueError(f"{path} records no vocab_sha256; re-tokenize {folder}.")
    return manifest


def _column_lengths(dataset: datasets.Dataset) -> np.ndarray:
    if "length" in dataset.column_names:
        return np.asarray(dataset.with_format("numpy", columns=["length"])["length"], np.int64)
    return np.fromiter((len(ids) for ids in dataset["input_ids"]), np.int64, len(dataset))


class TokenizedCells(Dataset):
    """Rows of a tokenized dataset as model features, each tagged with its row ``index``.

    The ``index`` keys the collator's per-cell mask generator (see
    :class:`~cellfoundry.data.collators.MaskedGeneCollator`), so a cell's masks do not depend
    on batch order, workers or resumption.

    Parameters
    ----------
    dataset : datasets.Dataset
        Rows with ``input_ids`` and optionally ``context_ids``.
    indices : sequence of int or None
        Rows of ``dataset`` this view serves (a split); ``None`` for all rows.
    lengths : numpy.ndarray or None
        (rows of ``dataset``,) token counts if already known; read otherwise.
    extra_columns : sequence of str
        Further columns passed through to the collator (e.g. a task's ``labels``).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        indices: Sequence[int] | np.ndarray | None = None,
        lengths: np.ndarray | None = None,
        extra_columns: Sequence[str] = (),
    ) -> None:
        missing = [name for name in extra_columns if name not in dataset.column_names]
        if missing:
            raise ValueError(
                f"Column(s) {missing} are not in the dataset (columns: {dataset.column_names})."
            )
        columns = [name for name in _MODEL_COLUMNS if name in dataset.column_names]
        columns += list(extra_columns)
        self.dataset = dataset.select_columns(columns)
        n_rows = len(dataset)
        self.indices = np.arange(n_rows) if indices is None else np.asarray(indices, np.int64)
        if len(self.indices) and not 0 <= self.indices.min() <= self.indices.max() < n_rows:
            raise ValueError(f"Row indices must lie in [0, {n_rows}); got a value outside.")
        all_lengths = _column_lengths(dataset) if lengths is None else np.asarray(lengths)
        self.lengths = all_lengths[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        """Read a whole batch in one Arrow lookup (``DataLoader`` calls this when present)."""
        rows = [int(self.indices[p]) for p in positions]
        columns = self.dataset[rows]
        features = [{"index": row} for row in rows]
        for name, values in columns.items():
            for feature, value in zip(features, values, strict=True):
                feature[name] = value
        return features


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of cells with similar token counts, in a seeded shuffled order.

    Each epoch: shuffle all positions (seeded by ``(seed, epoch)``), cut them into
    mega-batches of ``batch_size * group_batches`` cells, sort each mega-batch by length,
    cut it into batches and shuffle the batch order. The batch holding the longest cell is
    moved first, so an out-of-memory error shows in the first step rather than hours in.
    Without ``shuffle`` (evaluation) all cells are sorted longest first. The order depends
    only on the arguments and epoch, so every DDP rank builds the same list and
    ``skip_first_batches`` skips the same batches on resume.

    Parameters
    ----------
    lengths : array-like of int
        Token count of each position of the dataset this samples from.
    batch_size : int
        Cells per batch.
    shuffle : bool
        Shuffle (training) or sort longest first (evaluation).
    seed : int
        Base seed of the order.
    drop_last : bool
        Drop the last, smaller batch.
    group_batches : int
        Batches per mega-batch: larger groups pad less but make batches less random.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        group_batches: int = 50,
    ) -> None:
        if batch_size <= 0 or group_batches <= 0:
            raise ValueError(
                f"batch_size and group_batches must be positive, got {batch_size}, {group_batches}."
            )
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.group_batches = int(group_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch, as lists of positions."""
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            return self._cut(order)[: len(self)]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        group = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += self._cut(chunk)
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in permutation]
        if batches:
            longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        size = self.batch_size
        return [order[i : i + size].tolist() for i in range(0, len(order), size)]


@dataclass(frozen=True)
class CellSplit:
    """Row indices of the training and held-out cells of a corpus.

    Attributes
    ----------
    train_indices, eval_indices : numpy.ndarray
        Sorted row indices into ``corpus.dataset``.
    path : pathlib.Path or None
        The split file these came from or were written to.
    """

    train_indices: np.ndarray
    eval_indices: np.ndarray
    path: Path | None = None


def split_cells(
    corpus: TokenizedCorpus,
    eval_fraction: float = 0.05,
    seed: int = 0,
    path: str | Path | None = None,
) -> CellSplit:
    """Hold out a random fraction of cells, saved to (or reused from) a JSON file.

    An existing file wins over ``eval_fraction`` and ``seed``: the held-out cells of a
    project should never change under it (a warning says when the arguments differ).

    Parameters
    ----------
    corpus : TokenizedCorpus
        The cells to split.
    eval_fraction : float
        Share of cells held out, in [0, 1); at least one cell when positive.
    seed : int
        Seed of the random choice.
    path : path or None
        Split file; created when missing. ``None`` keeps the split in memory only.

    Returns
    -------
    CellSplit

    Raises
    ------
    ValueError
        When the fraction is out of range, or the file was made for other cells.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    path = None if path is None else Path(path)
    if path is not None and path.is_file():
        return _load_split(path, corpus, eval_fraction, seed)
    n_cells = len(corpus)
    n_eval = round(eval_fraction * n_cells)
    if eval_fraction > 0 and n_cells > 1:
        n_eval = min(max(n_eval, 1), n_cells - 1)
    permutation = np.random.default_rng(seed).permutation(n_cells)
    eval_indices = np.sort(permutation[:n_eval])
    split = CellSplit(_complement(eval_indices, n_cells), eval_indices, path)
    if path is not None:
        _save_split(path, corpus, split, eval_fraction, seed)
    return split


def _complement(eval_indices: np.ndarray, n_cells: int) -> np.ndarray:
    keep = np.ones(n_cells, dtype=bool)
    keep[eval_indices] = False
    return np.flatnonzero(keep)


def _save_split(
    path: Path, corpus: TokenizedCorpus, split: CellSplit, fraction: float, seed: int
) -> None:
    eval_rows = split.eval_indices.tolist()
    eval_ids: list[str] = []
    if "cell_id" in corpus.dataset.column_names:
        cell_ids = corpus.dataset.select_columns(["cell_id"])[eval_rows]["cell_id"]
        eval_ids = [str(value) for value in cell_ids]
    record = {
        "format": SPLIT_FORMAT,
        "seed": seed,
        "eval_fraction": fraction,
        "n_cells": len(corpus),
        "cells_sha256": corpus.fingerprint,
        "vocab_sha256": corpus.vocab_sha256,
        "sources": list(corpus.sources),
        "eval_indices": eval_rows,
        "eval_cell_ids": eval_ids,
    }
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    logger.info("Saved split (%d eval / %d cells) to %s", len(eval_rows), len(corpus), path)


def _load_split(path: Path, corpus: TokenizedCorpus, fraction: float, seed: int) -> CellSplit:
    record = _read_split_file(path)
    if record["n_cells"] != len(corpus) or record["cells_sha256"] != corpus.fingerprint:
        raise ValueError(
            f"Split file {path} was made for another set of cells ({record['n_cells']} cells, "
            f"cells_sha256={record['cells_sha256'][:12]}...) than this corpus ({len(corpus)} "
            f"cells, {corpus.fingerprint[:12]}...). Point split_file at the split of this "
            "corpus, or delete the file to make a new split."
        )
    if (record.get("eval_fraction"), record.get("seed")) != (fraction, seed):
        logger.warning(
            "Reusing split %s (eval_fraction=%s, seed=%s) instead of eval_fraction=%s, seed=%s.",
            path,
            record.get("eval_fraction"),
            record.get("seed"),
            fraction,
            seed,
        )
    eval_indices = np.asarray(record["eval_indices"], dtype=np.int64)
    return CellSplit(_complement(eval_indices, len(corpus)), eval_indices, path)


def _read_split_file(path: Path) -> Mapping[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        message = f"Cannot read split file {path} ({error}); delete it to resplit."
        raise ValueError(message) from error
    if not isinstance(record, dict) or record.get("format") != SPLIT_FORMAT:
        raise ValueError(f"{path} is not a {SPLIT_FORMAT} split file; delete it to resplit.")
    return record
