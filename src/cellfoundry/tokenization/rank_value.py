"""RankValueTokenizer: Geneformer's rank-value encoding, vectorised over sparse chunks.

Scheme (per cell): ``value_g = (count_g / n_counts * 10,000) / median_g`` where
``n_counts`` is ``obs['n_counts']`` if present, else the cell's total over all genes in the
file, and ``median_g`` the gene's non-zero median over the corpus; genes ranked by value
descending, ties by token id ascending; ``<cls>`` first; truncated so ``input_ids`` has at
most ``max_length`` tokens (``<cls>`` included). Genes outside the vocabulary are dropped;
several input genes mapping to one token are summed (as counts) first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cellfoundry._io import atomic_write_text, sha256_file
from cellfoundry.tokenization._rank_kernels import rank_chunk
from cellfoundry.tokenization.vocab import GeneVocab

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
MEDIANS_FILE = "gene_medians.tsv"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "tokenizer_config.json"


@dataclass
class RankedChunk:
    """Tokens for a block of cells as flat arrays (what Arrow list columns are made of)."""

    flat_ids: np.ndarray  # int32 (sum of lengths,), each cell's ids with <cls> first
    lengths: np.ndarray  # int64 (cells,), tokens per cell including <cls>

    @property
    def offsets(self) -> np.ndarray:
        offsets = np.zeros(self.lengths.size + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return offsets

    def cell(self, index: int) -> np.ndarray:
        offsets = self.offsets
        return self.flat_ids[offsets[index] : offsets[index + 1]]


@dataclass
class RankValueTokenizer:
    """Rank-value gene tokenizer with a fixed vocabulary and corpus gene medians.

    Parameters
    ----------
    vocab
        The :class:`GeneVocab`.
    medians
        float64 array of length ``len(vocab)``: each gene token's corpus non-zero median
        (NaN for special and context tokens).
    name
        Tokenizer id (e.g. ``cf-human-v1``); models record it.
    max_length
        Default number of tokens per cell, ``<cls>`` included.
    """

    vocab: GeneVocab
    medians: np.ndarray
    name: str = "custom"
    max_length: int = DEFAULT_MAX_LENGTH
    config: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.medians = np.asarray(self.medians, dtype=np.float64)
        if self.medians.shape != (len(self.vocab),):
            raise ValueError(
                f"medians has shape {self.medians.shape}; expected ({len(self.vocab)},)."
            )
        genes = self.medians[self.vocab.first_gene_id :]
        if not np.all(np.isfinite(genes) & (genes > 0)):
            raise ValueError("Every gene token needs a finite, positive corpus median.")

    # -- gene mapping ---------------------------------------------------------------------
    def column_tokens(self, ensembl_ids: np.ndarray) -> np.ndarray:
        """Token id per input column (int64), -1 where the gene is unmapped or not in vocab."""
        lookup = self.vocab.token_to_id
        first_gene = self.vocab.first_gene_id
        tokens = np.fromiter(
            (lookup.get(str(g), -1) if g else -1 for g in ensembl_ids),
            dtype=np.int64,
            count=len(ensembl_ids),
        )
        tokens[tokens < first_gene] = -1  # never let a special/context token through
        return tokens

    # -- ranking --------------------------------------------------------------------------
    def rank(
        self,
        matrix: sp.csr_matrix,
        n_counts: np.ndarray,
        column_tokens: np.ndarray,
        max_length: int | None = None,
        backend: str = "auto",
    ) -> RankedChunk:
        """Tokenize a (cells x genes) CSR chunk of counts; cells may come out empty (length 1).

        ``n_counts`` are the per-cell totals used for normalisation (float64, cells > 0).
        """
        max_length = int(max_length or self.max_length)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (<cls> plus one gene), not {max_length}.")
        genes, gene_lengths = rank_chunk(
            sp.csr_matrix(matrix), n_counts, column_tokens, self.medians, max_length - 1, backend
        )
        lengths = gene_lengths + 1
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        starts = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        flat[starts] = self.vocab.cls_id
        gene_slots = np.ones(flat.size, dtype=bool)
        gene_slots[starts] = False
        flat[gene_slots] = genes
        return RankedChunk(flat, lengths)

    # -- persistence ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, extra_config: dict | None = None) -> Path:
        """Write ``vocab.json``, ``gene_medians.tsv`` and ``tokenizer_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vocab.save(directory / VOCAB_FILE)
        lines = ["token_id\tensembl_id\tmedian"]
        for token_id in range(self.vocab.first_gene_id, len(self.vocab)):
            gene = self.vocab.id_to_token(token_id)
            lines.append(f"{token_id}\t{gene}\t{float(self.medians[token_id])!r}")
        atomic_write_text(directory / MEDIANS_FILE, "\n".join(lines) + "\n")
        config = {
            **self.config,
            **(extra_config or {}),
            "tokenizer_id": self.name,
            "tokenizer_class": "RankValueTokenizer",
            "scheme": "rank_value",
            "target_sum": float(10_000),
            "max_length": self.max_length,
            "vocab_size": len(self.vocab),
            "vocab_sha256": self.vocab.sha256,
            "special_tokens": {"pad": "<pad>", "mask": "<mask>", "cls": "<cls>", "unk": "<unk>"},
        }
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_directory(cls, directory: str | Path) -> RankValueTokenizer:
        """Load a tokenizer artifact folder; errors name the missing or corrupt file."""
        directory = Path(directory)
        for required in (CONFIG_FILE, VOCAB_FILE, MEDIANS_FILE):
            if not (directory / required).is_file():
                raise ValueError(
                    f"{directory} is not a tokenizer folder: {required} is missing. "
                    "Build one with `cellfoundry build-tokenizer` or name a shipped tokenizer."
                )
        config = json.loads((directory / CONFIG_FILE).read_text())
        vocab = GeneVocab.load(directory / VOCAB_FILE)
        if config.get("vocab_sha256") not in (None, vocab.sha256):
            raise ValueError(
                f"{directory / VOCAB_FILE} does not match the sha256 recorded in "
                f"{CONFIG_FILE} ({config['vocab_sha256'][:12]}... vs {vocab.sha256[:12]}...): "
                "the artifact was modified or is corrupt. Re-install or rebuild it."
            )
        medians = _read_medians(directory / MEDIANS_FILE, vocab)
        return cls(
            vocab=vocab,
            medians=medians,
            name=config.get("tokenizer_id", directory.name),
            max_length=int(config.get("max_length", DEFAULT_MAX_LENGTH)),
            config=config,
            path=directory,
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> RankValueTokenizer:
        """Load a shipped tokenizer by id, a local folder, or a Hub repo id."""
        from cellfoundry.tokenization.registry import load_tokenizer

        return load_tokenizer(name_or_path)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of the artifact files (for provenance), when loaded from a folder."""
        if self.path is None:
            return {}
        names = (CONFIG_FILE, VOCAB_FILE, MEDIANS_FILE)
        return {name: sha256_file(self.path / name) for name in names}


def _read_medians(path: Path, vocab: GeneVocab) -> np.ndarray:
    medians = np.full(len(vocab), np.nan)
    try:
        with open(path) as handle:
            header = handle.readline().rstrip("\n").split("\t")
            if header[:3] != ["token_id", "ensembl_id", "median"]:
                raise ValueError(f"unexpected header {header}")
            for line in handle:
                token_id, gene, value = line.rstrip("\n").split("\t")[:3]
                if vocab.id_to_token(int(token_id)) != gene:
                    raise ValueError(f"token {token_id} is {gene} here but not in vocab.json")
                medians[int(token_id)] = float(value)
    except (ValueError, IndexError) as error:
        raise ValueError(
            f"Corrupt {path}: {error}. Re-install or rebuild the tokenizer."
        ) from error
    return medians
