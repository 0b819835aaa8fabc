"""Held-out masked-gene accuracy of a model beside the rank-position gene-frequency prior.

A rank-value cell is a ranked list, and the genes at the top ranks are much the same in every
cell (mitochondrial, ribosomal, MALAT1). So the honest floor for masked-gene prediction is
not chance but the *rank-position prior*: for a masked token at position ``p``, predict the
genes most often seen at position ``p`` in the training cells. A pretrained model is only
worth shipping if it beats that prior on cells it never saw; :func:`evaluate_heldout` scores
both on exactly the same masked positions and gives bootstrap intervals over cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from cellfoundry.data import IGNORE_INDEX, MaskedGeneCollator, TokenizedCells
from cellfoundry.training.loop import TOP_K, make_dataloader

_FIT_BATCH = 2048  # cells per Arrow read while counting; bounds memory, not results


@dataclass(frozen=True)
class RankPositionPrior:
    """The ``k`` most frequent genes at each token position of the training cells.

    Attributes
    ----------
    top_genes : numpy.ndarray
        (positions, k) int64 token ids, most frequent first (ties: smaller id first);
        -1 where fewer than ``k`` genes were ever seen at that position.
    """

    top_genes: np.ndarray

    @classmethod
    def fit(
        cls, cells: TokenizedCells, vocab_size: int, max_length: int, k: int = max(TOP_K)
    ) -> RankPositionPrior:
        """Count genes per position over ``cells`` (each truncated to ``max_length`` tokens).

        Counting goes through a sparse (position, gene) matrix, so memory is bounded by the
        distinct pairs seen, not by ``max_length * vocab_size``.
        """
        counts = sp.csr_matrix((max_length, vocab_size), dtype=np.int64)
        for start in range(0, len(cells), _FIT_BATCH):
            rows = cells.dataset[cells.indices[start : start + _FIT_BATCH].tolist()]["input_ids"]
            ids = [np.asarray(row[:max_length], dtype=np.int64) for row in rows]
            positions = np.concatenate([np.arange(len(row)) for row in ids])
            genes = np.concatenate(ids)
            ones = np.ones(len(genes), dtype=np.int64)
            counts = counts + sp.csr_matrix(
                (ones, (positions, genes)), shape=(max_length, vocab_size)
            )
        top = np.full((max_length, k), -1, dtype=np.int64)
        for position in range(max_length):
            row = counts.getrow(position)
            order = np.lexsort((row.indices, -row.data))[:k]  # count desc, then id asc
            top[position, : len(order)] = row.indices[order]
        return cls(top)

    def hits(self, labels: torch.Tensor, top_k: Sequence[int] = TOP_K) -> np.ndarray:
        """Per-cell hits of the prior: (B, len(top_k)) counts of labelled genes in its top-k.

        Parameters
        ----------
        labels : torch.Tensor
            (B, L) long, -100 where nothing is scored (the collator's labels).
        """
        labels_np = labels.cpu().numpy()
        width = min(labels_np.shape[1], len(self.top_genes))
        predictions = self.top_genes[:width]  # (L, k)
        scored = labels_np[:, :width] != IGNORE_INDEX
        out = np.zeros((labels_np.shape[0], len(top_k)), dtype=np.int64)
        for index, k in enumerate(top_k):
            hit = (predictions[None, :, :k] == labels_np[:, :width, None]).any(-1) & scored
            out[:, index] = hit.sum(axis=1)
        return out


def _model_hits(logits: torch.Tensor, labels: torch.Tensor, top_k: Sequence[int]) -> np.ndarray:
    """Per-cell hits of the model, from logits at the labelled positions (row-major)."""
    selected = labels != IGNORE_INDEX
    rows = torch.nonzero(selected)[:, 0]
    targets = labels[selected]
    ranked = logits.topk(max(top_k), dim=-1).indices
    out = np.zeros((labels.shape[0], len(top_k)), dtype=np.int64)
    for index, k in enumerate(top_k):
        hit = (ranked[:, :k] == targets.unsqueeze(1)).any(dim=1)
        out[:, index] = torch.bincount(rows[hit], minlength=labels.shape[0]).cpu().numpy()
    return out


def _bootstrap_difference(
    ours: np.ndarray, baseline: np.ndarray, scored: np.ndarray, draws: int, seed: int
) -> tuple[float, float]:
    """95% interval of (ours - baseline) accuracy, resampling cells with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(scored), size=(draws, len(scored)))
    totals = scored[picks].sum(axis=1)
    differences = (ours[picks].sum(axis=1) - baseline[picks].sum(axis=1)) / totals
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


@torch.no_grad()
def evaluate_heldout(
    model: torch.nn.Module,
    cells: TokenizedCells,
    collator: MaskedGeneCollator,
    prior: RankPositionPrior,
    batch_size: int = 32,
    top_k: Sequence[int] = TOP_K,
    bootstrap_draws: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-k masked-gene accuracy of ``model`` and of ``prior`` on the same masked tokens.

    Parameters
    ----------
    model : torch.nn.Module
        A masked-gene model (returns logits at the labelled positions).
    cells : TokenizedCells
        Held-out cells (never trained on, nor used to fit ``prior``).
    collator : MaskedGeneCollator
        Masks the cells; seeded, so reruns score the same tokens.
    prior : RankPositionPrior
        Fitted on the training cells.
    batch_size : int
        Cells per forward pass.
    top_k : sequence of int
        The ks reported.
    bootstrap_draws, seed : int
        Resamples of cells for the 95% intervals of the differences.

    Returns
    -------
    dict
        ``cells``, ``masked_genes``, ``model`` and ``prior`` (``top{k}`` accuracies), and
        ``difference`` (``top{k}``: model - prior with ``ci95``).
    """
    model.eval()
    device = next(model.parameters()).device
    loader = make_dataloader(cells, collator, batch_size, shuffle=False, seed=seed)
    scored, ours, theirs = [], [], []
    for batch in loader:
        labels = batch["labels"]
        outputs = model(**{name: tensor.to(device) for name, tensor in batch.items()})
        scored.append((labels != IGNORE_INDEX).sum(dim=1).numpy())
        ours.append(_model_hits(outputs.logits.float().cpu(), labels, top_k))
        theirs.append(prior.hits(labels, top_k))
    scored_all = np.concatenate(scored)
    ours_all, theirs_all = np.concatenate(ours), np.concatenate(theirs)
    total = int(scored_all.sum())
    report: dict[str, Any] = {
        "cells": len(cells),
        "masked_genes": total,
        "model": {},
        "prior": {},
        "difference": {},
    }
    for index, k in enumerate(top_k):
        name = f"top{k}"
        model_acc = float(ours_all[:, index].sum()) / total
        prior_acc = float(theirs_all[:, index].sum()) / total
        low, high = _bootstrap_difference(
            ours_all[:, index], theirs_all[:, index], scored_all, bootstrap_draws, seed
        )
        report["model"][name] = model_acc
        report["prior"][name] = prior_acc
        report["difference"][name] = {"value": model_acc - prior_acc, "ci95": [low, high]}
    return report


def evaluate_pretrained(
    model_path: str,
    data: Sequence[str],
    split_path: str,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Score a saved masked-gene model and the prior on the held-out cells of its run.

    Parameters
    ----------
    model_path : str
        Shipped name, folder or Hub id of a masked-gene checkpoint.
    data : sequence of str
        The tokenized folder(s) the model was pretrained on.
    split_path : str
        The run's ``split.json`` (which cells were held out); it must exist.
    batch_size, seed : int
        Cells per forward pass; seed of the masks and of the bootstrap.

    Returns
    -------
    dict
        :func:`evaluate_heldout`'s report plus ``max_length`` and ``train_cells``.
    """
    from pathlib import Path

    from cellfoundry.data import load_corpus, split_cells
    from cellfoundry.models import check_tokenizer_compatible, load_model
    from cellfoundry.tokenization import load_tokenizer

    if not Path(split_path).is_file():
        raise FileNotFoundError(
            f"No split file at {split_path}; pass the split.json that the pretraining run "
            "wrote, so the held-out cells are the ones the model never saw."
        )
    corpus = load_corpus(list(data))
    split = split_cells(corpus, path=split_path)
    model = load_model(model_path, masked_gene_head=True)
    tokenizer = load_tokenizer(model.config.tokenizer_id)
    check_tokenizer_compatible(model, tokenizer)
    max_length = int(model.config.max_position_embeddings)
    prior = RankPositionPrior.fit(
        corpus.cells(split.train_indices), len(tokenizer.vocab), max_length
    )
    collator = MaskedGeneCollator.from_tokenizer(tokenizer, max_length=max_length, seed=seed)
    report = evaluate_heldout(
        model, corpus.cells(split.eval_indices), collator, prior, batch_size, seed=seed
    )
    return {"max_length": max_length, "train_cells": len(split.train_indices), **report}
