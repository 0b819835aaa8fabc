"""Build a tokenizer artifact ``tokenizers/<id>/`` from count ``.h5ad`` files.

Gene medians are exact and streaming, in two passes over the corpus:

1. Per gene, count non-zero normalised values (``count / n_counts * 10,000``, float32, the
   tokenizer's own arithmetic) in bins of their float32 bit pattern (positive floats sort
   like their bits; 16 bins per power of two between 2^-20 and 2^20, the ends open).
2. The bins holding each gene's middle rank(s) are now known; only values falling in those
   bins are kept, sorted, and the exact order statistics read off.

The median is ``np.median`` of the values in float64 (mean of the two middle values when the
count is even). Memory is one chunk plus (genes x 640) int32 counts plus the values of the
median bins, independent of the number of cells beyond that last term.
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellfoundry._io import atomic_directory, atomic_write_text, sha256_file
from cellfoundry.tokenization._rank_kernels import normalised_values, remap_to_tokens
from cellfoundry.tokenization.anndata_io import CountReader
from cellfoundry.tokenization.rank_value import DEFAULT_MAX_LENGTH, RankValueTokenizer
from cellfoundry.tokenization.vocab import GeneVocab

logger = logging.getLogger(__name__)

_SHIFT = 19  # keep sign, exponent and 4 mantissa bits: 16 bins per octave
_LOW = np.float32(2.0**-20).view(np.uint32) >> _SHIFT
_HIGH = np.float32(2.0**20).view(np.uint32) >> _SHIFT
N_BINS = int(_HIGH - _LOW + 1)


def value_bins(values: np.ndarray) -> np.ndarray:
    """Monotone bin index of positive float32 values (ends open)."""
    keys = values.astype(np.float32, copy=False).view(np.uint32) >> _SHIFT
    return (np.clip(keys, _LOW, _HIGH) - _LOW).astype(np.int64)


@dataclass
class CorpusFile:
    """One corpus input with its per-column gene index into the corpus gene universe."""

    path: Path
    columns: np.ndarray  # int64 per input column: index into universe or -1
    n_cells: int = 0
    n_empty: int = 0
    genes: dict = field(default_factory=dict)


@dataclass
class GeneMedianResult:
    gene_ids: list[str]
    medians: np.ndarray  # float64 (genes,)
    n_nonzero: np.ndarray  # int64 (genes,) cells with the gene detected
    files: list[CorpusFile]


def _open_corpus(paths: Sequence[Path], species: str) -> tuple[list[CorpusFile], list[str]]:
    from cellfoundry.genes import resolve_genes

    resolved = []
    for path in paths:
        with CountReader(path) as reader:
            resolution = resolve_genes(reader.var, species=species)
            resolved.append((path, np.asarray(resolution.ensembl_ids, dtype=object), resolution))
    universe = sorted({g for _, ids, _ in resolved for g in ids if g})
    index = {gene: i for i, gene in enumerate(universe)}
    files = [
        CorpusFile(
            path=path,
            columns=np.array([index.get(g, -1) if g else -1 for g in ids], dtype=np.int64),
            genes=resolution.to_dict(),
        )
        for path, ids, resolution in resolved
    ]
    return files, universe


def _normalised_chunks(corpus_file: CorpusFile, n_genes: int, chunk_size: int | None):
    """Yield (gene index per entry, float32 normalised value) per chunk of one file."""
    with CountReader(corpus_file.path, chunk_size=chunk_size) as reader:
        corpus_file.n_cells = reader.n_obs
        corpus_file.n_empty = 0
        for chunk in reader.chunks():
            alive = chunk.n_counts > 0
            corpus_file.n_empty += int((~alive).sum())
            mapped = remap_to_tokens(chunk.matrix[alive], corpus_file.columns, n_genes)
            values = normalised_values(mapped.data, mapped.indptr, chunk.n_counts[alive])
            positive = values > 0
            yield mapped.indices[positive].astype(np.int64), values[positive]


def compute_gene_medians(
    paths: Sequence[str | Path], species: str = "auto", chunk_size: int | None = None
) -> GeneMedianResult:
    """Exact non-zero medians of normalised expression for every gene seen in the corpus."""
    files, universe = _open_corpus([Path(p) for p in paths], species)
    n_genes = len(universe)
    histogram = np.zeros((n_genes, N_BINS), dtype=np.int32)
    for corpus_file in files:
        for genes, values in _normalised_chunks(corpus_file, n_genes, chunk_size):
            np.add.at(histogram, (genes, value_bins(values)), 1)
    n_nonzero = histogram.sum(axis=1, dtype=np.int64)
    cumulative = np.cumsum(histogram, axis=1, dtype=np.int64)
    del histogram
    rank_lo, rank_hi = (n_nonzero - 1) // 2, n_nonzero // 2
    bin_lo = _bin_of_rank(cumulative, rank_lo)
    bin_hi = _bin_of_rank(cumulative, rank_hi)
    below = np.where(bin_lo > 0, cumulative[np.arange(n_genes), np.maximum(bin_lo - 1, 0)], 0)
    del cumulative
    kept_genes, kept_values = [], []
    for corpus_file in files:
        for genes, values in _normalised_chunks(corpus_file, n_genes, chunk_size):
            bins = value_bins(values)
            hit = (bins == bin_lo[genes]) | (bins == bin_hi[genes])
            kept_genes.append(genes[hit])
            kept_values.append(values[hit])
    medians = _order_statistics(
        np.concatenate(kept_genes), np.concatenate(kept_values), n_genes, rank_lo, rank_hi, below
    )
    medians[n_nonzero == 0] = np.nan
    return GeneMedianResult(universe, medians, n_nonzero, files)


def _bin_of_rank(cumulative: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Bin holding 0-based rank ``ranks[g]`` of gene g (vectorised row-wise searchsorted)."""
    return (cumulative <= np.maximum(ranks, 0)[:, None]).sum(axis=1).astype(np.int64)


def _order_statistics(genes, values, n_genes, rank_lo, rank_hi, below) -> np.ndarray:
    order = np.lexsort((values, genes))
    genes, values = genes[order], values[order].astype(np.float64)
    starts = np.searchsorted(genes, np.arange(n_genes), side="left")
    medians = np.full(n_genes, np.nan)
    present = rank_lo >= 0
    lo = starts[present] + (rank_lo[present] - below[present])
    hi = starts[present] + (rank_hi[present] - below[present])
    medians[present] = (values[lo] + values[hi]) / 2.0
    return medians


def build_tokenizer(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer_id: str,
    min_cells: int = 10,
    max_genes: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    species: str = "auto",
    description: str = "",
    overwrite: bool = False,
    command: str | None = None,
) -> RankValueTokenizer:
    """Compute medians over ``paths`` and write a tokenizer artifact folder atomically.

    Genes detected in fewer than ``min_cells`` cells are left out (their median is noise);
    ``max_genes`` keeps only the most often detected genes (for small test vocabularies).
    """
    start = time.perf_counter()
    result = compute_gene_medians(paths, species=species)
    keep = np.flatnonzero(result.n_nonzero >= min_cells)
    if max_genes is not None:
        keep = keep[np.argsort(-result.n_nonzero[keep], kind="stable")[:max_genes]]
    if keep.size == 0:
        raise ValueError(f"No gene is detected in >= {min_cells} cells; lower min_cells.")
    genes = [result.gene_ids[i] for i in keep]
    vocab = GeneVocab.from_genes(genes)
    medians = np.full(len(vocab), np.nan)
    by_gene = dict(zip(genes, result.medians[keep], strict=True))
    for gene in genes:
        medians[vocab[gene]] = by_gene[gene]
    config = {
        "species": "human",
        "gene_id_type": "ensembl",
        "min_cells": min_cells,
        "max_genes": max_genes,
        "median": "exact non-zero median of count/n_counts*1e4 (float32), two-pass streaming",
        "n_counts": "obs['n_counts'] if present, else the cell's total over all genes in the file",
        "corpus": [
            {"file": f.path.name, "cells": f.n_cells, "empty_cells": f.n_empty}
            for f in result.files
        ],
    }
    tokenizer = RankValueTokenizer(vocab, medians, tokenizer_id, max_length, config)
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        tokenizer.save_pretrained(tmp)
        _write_provenance(tmp, tokenizer, result, keep, description, command, start)
    tokenizer.path = Path(out_dir)
    return tokenizer


def _write_provenance(folder, tokenizer, result, keep, description, command, start) -> None:
    import cellfoundry

    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    input_hashes = {f.path: sha256_file(f.path) for f in result.files}
    file_hashes = {name: sha256_file(folder / name) for name in files}
    rows = "\n".join(
        f"| {f.path.name} | {input_hashes[f.path][:16]}... | {f.n_cells} | {f.n_empty} | "
        f"{f.genes.get('n_mapped', '?')}/{f.genes.get('n_input', '?')} |"
        for f in result.files
    )
    hashes = "\n".join(f"| {name} | {digest} |" for name, digest in file_hashes.items())
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    max_genes = tokenizer.config["max_genes"]
    top = f", the {max_genes} most often detected" if max_genes else ""
    text = f"""# Tokenizer `{tokenizer.name}`

{description}

Rank-value tokenizer (Geneformer's scheme): value = count / n_counts x 10,000 (float32) /
the gene's corpus non-zero median (float64); genes ranked descending, ties by token id;
`<cls>` first; default max_length {tokenizer.max_length} tokens (`<cls>` included).

- vocabulary: {len(tokenizer.vocab)} tokens ({len(keep)} genes detected in >=
  {tokenizer.config["min_cells"]} cells{top}),
  vocab sha256 `{tokenizer.vocab.sha256}`
- medians: exact (two-pass streaming), over {int(result.n_nonzero.sum())} non-zero values
- built with cellfoundry {cellfoundry.__version__}, Python {platform.python_version()},
  numpy {np.__version__}, in {time.perf_counter() - start:.0f} s
- command: `{command}`

## Corpus

| file | sha256 | cells | empty cells | genes mapped |
|---|---|---|---|---|
{rows}

## Files

| file | sha256 |
|---|---|
{hashes}

An artifact is immutable: any change gets a new tokenizer id.
"""
    atomic_write_text(folder / "README.md", text)
    atomic_write_text(
        folder / "provenance.json",
        json.dumps(
            {
                "tokenizer_id": tokenizer.name,
                "command": command,
                "inputs": [
                    {"file": f.path.name, "sha256": input_hashes[f.path], "cells": f.n_cells}
                    for f in result.files
                ],
                "files_sha256": file_hashes,
            },
            indent=2,
        )
        + "\n",
    )
