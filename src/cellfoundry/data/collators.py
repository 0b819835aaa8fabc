"""Collators: pad tokenized cells into batches; the masked-gene one also hides 15 % of genes.

The objective is BERT's masked-language modelling applied to rank-ordered gene tokens
(Geneformer's pretraining task): a fraction of the *gene* tokens is selected; of those, 80 %
become ``<mask>``, 10 % a random gene and 10 % stay unchanged, and the model is scored on
predicting the original gene at every selected position. ``<cls>``, context and padding
tokens are never selected: they are not genes, so predicting them teaches nothing.

Why masks are drawn per cell
----------------------------
Each cell gets its own ``torch.Generator`` seeded from ``(seed, epoch, cell index)``. A mask
therefore depends only on *which* cell is masked in *which* epoch, not on how many batches
were collated before it. That one property makes masks reproducible wherever a stateful
generator would drift: accelerate's dataloader collates one batch ahead, ``num_workers`` > 0
collates in copies of the collator, ``skip_first_batches`` skips batches without collating
them on resume, and DDP ranks see different cells. The cost is one small generator per cell
(about 20 µs), negligible next to a forward pass.

Tensor shape glossary: B batch, L tokens (after padding), C context tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
"""Label of positions that are not scored (PyTorch cross-entropy's default ``ignore_index``)."""


def derive_seed(seed: int, *keys: int) -> int:
    """Mix a base seed with integer keys into an independent 64-bit seed.

    Adding keys to a seed (``seed + epoch``) makes neighbouring runs share streams
    (seed 1 epoch 0 == seed 0 epoch 1); numpy's ``SeedSequence`` hashes the whole tuple,
    so every ``(seed, *keys)`` gets its own well-mixed stream.

    Parameters
    ----------
    seed : int
        Base seed of the run (non-negative).
    *keys : int
        Non-negative integers naming the stream, e.g. ``(epoch, cell_index)``.

    Returns
    -------
    int
        A seed in ``[0, 2**63)`` for ``torch.Generator.manual_seed``.
    """
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


@dataclass
class MaskedGeneCollator:
    """Batch tokenized cells for masked-gene modelling (a ``collate_fn`` for ``DataLoader``).

    Parameters
    ----------
    vocab_size : int
        Number of token ids; random replacements are drawn from ``[first_gene_id, vocab_size)``.
    first_gene_id : int
        Smallest gene token id; every id below it (``<pad>``, ``<mask>``, ``<cls>``,
        ``<unk>``, context tokens) is never masked.
    pad_token_id, mask_token_id : int
        Ids of ``<pad>`` and ``<mask>``.
    mlm_probability : float
        Fraction of a cell's gene tokens that is selected for prediction. The count is
        ``round(mlm_probability * genes)``, at least 1 for a cell with any gene, so every
        cell contributes to the loss and the fraction has no sampling noise.
    mask_replace_prob, random_replace_prob : float
        Of the selected tokens, the share replaced by ``<mask>`` and by a random gene; the
        rest stay unchanged (BERT's 80/10/10, so the model cannot tell masked positions
        apart from real input at fine-tuning time).
    pad_to_multiple_of : int or None
        Round the padded length up to a multiple of this (8 suits tensor cores), capped at
        ``max_length``.
    max_length : int or None
        Keep only the first ``max_length`` tokens of each cell (``<cls>`` and the highest
        ranked genes) so cells fit the model's ``max_position_embeddings``.
    seed : int
        Base seed of the masks; the same seed, epoch and cells give the same batch.

    Notes
    -----
    Features are mappings with ``input_ids`` (``<cls>`` then genes), optional
    ``context_ids`` and optional ``index`` (the cell's row in its corpus, added by
    :class:`~cellfoundry.data.datasets.TokenizedCells`). Cells without ``index`` are keyed by
    a running count of cells this collator has seen, so repeated calls still give fresh
    masks and a new collator with the same seed replays them.
    """

    vocab_size: int
    first_gene_id: int
    pad_token_id: int = 0
    mask_token_id: int = 1
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    seed: int = 0
    epoch: int = field(default=0, init=False, repr=False)
    _cells_seen: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.first_gene_id < self.vocab_size:
            raise ValueError(
                f"first_gene_id={self.first_gene_id} must lie in (0, vocab_size="
                f"{self.vocab_size}); build the collator with from_tokenizer(tokenizer)."
            )
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}.")
        replace = self.mask_replace_prob + self.random_replace_prob
        if min(self.mask_replace_prob, self.random_replace_prob) < 0 or replace > 1.0:
            raise ValueError(
                "mask_replace_prob and random_replace_prob must be >= 0 with a sum <= 1, got "
                f"{self.mask_replace_prob} and {self.random_replace_prob}."
            )
        for name in ("pad_to_multiple_of", "max_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer or None, got {value}.")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> MaskedGeneCollator:
        """Build a collator whose special ids and gene range come from ``tokenizer.vocab``.

        Parameters
        ----------
        tokenizer
            An object with ``vocab`` (``len``, ``first_gene_id``, ``pad_id``, ``mask_id``),
            e.g. ``cellfoundry.tokenization.load_tokenizer("cf-human-v1")``; a bare
            ``GeneVocab`` works too.
        **kwargs
            Other fields (``mlm_probability``, ``pad_to_multiple_of``, ``seed``, ...).
        """
        vocab = getattr(tokenizer, "vocab", tokenizer)
        return cls(
            vocab_size=len(vocab),
            first_gene_id=int(vocab.first_gene_id),
            pad_token_id=int(vocab.pad_id),
            mask_token_id=int(vocab.mask_id),
            **kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        """Draw the masks of ``epoch`` from now on (dynamic masking: new masks each epoch)."""
        self.epoch = int(epoch)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad and mask a list of cells.

        Returns
        -------
        dict of torch.Tensor
            ``input_ids`` (B, L) long with masked tokens replaced; ``attention_mask`` (B, L)
            long, 1 on real tokens; ``labels`` (B, L) long, the original gene at selected
            positions and -100 elsewhere; ``context_ids`` (B, C) long when the cells have
            them (padded with ``pad_token_id``, which the models ignore).
        """
        if not features:
            raise ValueError("Cannot collate an empty list of cells.")
        cells = [self._cell_tensor(feature) for feature in features]
        keys = self._cell_keys(features)
        masked, labels = zip(
            *(self._mask_cell(ids, key) for ids, key in zip(cells, keys, strict=True)),
            strict=True,
        )
        length = self._padded_length(max(len(ids) for ids in cells))
        batch = {
            "input_ids": _pad_stack(masked, length, self.pad_token_id),
            "attention_mask": _pad_stack([torch.ones_like(ids) for ids in cells], length, 0),
            "labels": _pad_stack(labels, length, IGNORE_INDEX),
        }
        context = context_batch(features, self.pad_token_id)
        if context is not None:
            batch["context_ids"] = context
        return batch

    # -- helpers ---------------------------------------------------------------------------
    def _cell_tensor(self, feature: Mapping[str, Any]) -> torch.Tensor:
        return cell_ids(feature, self.max_length)

    def _cell_keys(self, features: Sequence[Mapping[str, Any]]) -> list[int]:
        if all("index" in feature for feature in features):
            return [int(feature["index"]) for feature in features]
        start = self._cells_seen
        self._cells_seen += len(features)
        return list(range(start, start + len(features)))

    def _padded_length(self, longest: int) -> int:
        return padded_length(longest, self.pad_to_multiple_of, self.max_length)

    def _mask_cell(self, ids: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Select, replace and label the genes of one cell with its own generator."""
        labels = torch.full_like(ids, IGNORE_INDEX)
        gene_positions = torch.nonzero(ids >= self.first_gene_id).squeeze(1)
        n_genes = len(gene_positions)
        if n_genes == 0:
            return ids, labels
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, key))
        n_selected = max(1, round(self.mlm_probability * n_genes))
        order = torch.randperm(n_genes, generator=generator)[:n_selected]
        selected = gene_positions[order]
        labels[selected] = ids[selected]
        draw = torch.rand(n_selected, generator=generator)
        random_genes = torch.randint(
            self.first_gene_id, self.vocab_size, (n_selected,), generator=generator
        )
        masked = ids.clone()
        to_mask = draw < self.mask_replace_prob
        to_random = ~to_mask & (draw < self.mask_replace_prob + self.random_replace_prob)
        masked[selected[to_mask]] = self.mask_token_id
        masked[selected[to_random]] = random_genes[to_random]
        return masked, labels


def cell_ids(feature: Mapping[str, Any], max_length: int | None) -> torch.Tensor:
    """A cell's ``input_ids`` as a 1-D long tensor, cut to ``max_length`` (checked)."""
    ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(
            f"input_ids must be a non-empty 1-D sequence (<cls> then genes), got shape "
            f"{tuple(ids.shape)}; pass rows of a tokenized dataset."
        )
    return ids[:max_length] if max_length is not None else ids


def context_batch(features: Sequence[Mapping[str, Any]], pad_token_id: int) -> torch.Tensor | None:
    """(B, C) context ids padded with ``pad_token_id`` (which the models ignore); ``None``
    when no cell has any."""
    context = [feature.get("context_ids") for feature in features]
    if all(ids is None for ids in context):
        return None
    empty: list[int] = []
    rows = [torch.as_tensor(empty if i is None else i, dtype=torch.long) for i in context]
    return _pad_stack(rows, max(len(row) for row in rows), pad_token_id)


def padded_length(longest: int, multiple: int | None, max_length: int | None) -> int:
    """Round up to ``multiple`` but never past ``max_length`` (the position limit)."""
    length = longest if multiple is None else math.ceil(longest / multiple) * multiple
    return length if max_length is None else min(length, max_length)


def _pad_stack(rows: Sequence[torch.Tensor], length: int, value: int) -> torch.Tensor:
    """Stack 1-D tensors into (len(rows), length), right-padded with ``value``."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for row_index, row in enumerate(rows):
        out[row_index, : len(row)] = row
    return out


@dataclass
class CellBatchCollator:
    """Pad tokenized cells into a batch with their per-cell targets (task fine-tuning).

    Parameters
    ----------
    pad_token_id : int
        Id of ``<pad>`` (also pads context ids, which the models ignore).
    max_length : int or None
        Keep ``<cls>`` and the highest-ranked genes up to this many tokens.
    pad_to_multiple_of : int or None
        Round the padded length up to a multiple of this, capped at ``max_length``.
    target_columns : tuple of str
        Per-cell integer fields copied into the batch as (B,) long tensors (e.g. ``labels``
        for annotation, ``batch_labels`` for integration) when the cells have them.
    vector_columns : tuple of str
        Per-cell float vectors copied as (B, G) float32 tensors (``response``: the
        perturbation task's target change of expression; the niche task's ``niche_target``
        and ``neighbor_vector``) when the cells have them.
    """

    pad_token_id: int = 0
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    target_columns: tuple[str, ...] = ("labels", "batch_labels", "perturbation_ids")
    vector_columns: tuple[str, ...] = ("response", "niche_target", "neighbor_vector")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` (B, L), ``context_ids`` (B, C), targets (B,)."""
        if not features:
            raise ValueError("Cannot collate an empty list of cells.")
        cells = [cell_ids(feature, self.max_length) for feature in features]
        length = padded_length(
            max(len(ids) for ids in cells), self.pad_to_multiple_of, self.max_length
        )
        batch = {
            "input_ids": _pad_stack(cells, length, self.pad_token_id),
            "attention_mask": _pad_stack([torch.ones_like(ids) for ids in cells], length, 0),
        }
        context = context_batch(features, self.pad_token_id)
        if context is not None:
            batch["context_ids"] = context
        for name in self.target_columns:
            if all(name in feature for feature in features):
                batch[name] = torch.as_tensor([int(f[name]) for f in features], dtype=torch.long)
        for name in self.vector_columns:
            if all(name in feature for feature in features):
                vectors = np.asarray([f[name] for f in features], dtype=np.float32)
                batch[name] = torch.from_numpy(vectors)
        return batch
