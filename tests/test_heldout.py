"""Held-out masked-gene evaluation: the rank-position prior and the side-by-side report."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from transformers.modeling_outputs import MaskedLMOutput

from cellfoundry.data import IGNORE_INDEX, MaskedGeneCollator, TokenizedCells
from cellfoundry.training.heldout import RankPositionPrior, evaluate_heldout

VOCAB, FIRST_GENE = 40, 8


def cells_from(rows: list[list[int]]) -> TokenizedCells:
    return TokenizedCells(datasets.Dataset.from_list([{"input_ids": r} for r in rows]))


def test_prior_ranks_genes_by_frequency_at_each_position_with_ties_by_id():
    cells = cells_from([[2, 10, 11, 12], [2, 10, 12], [2, 11, 13], [2, 9]])
    prior = RankPositionPrior.fit(cells, VOCAB, max_length=3, k=2)
    assert prior.top_genes.tolist() == [[2, -1], [10, 9], [11, 12]]
    # position 1 holds 10 twice; position 2 holds 11, 12, 13 once each: smallest ids first.
    labels = torch.tensor([[IGNORE_INDEX, 9, 13], [IGNORE_INDEX, 10, IGNORE_INDEX]])
    assert prior.hits(labels, top_k=(1, 2)).tolist() == [[0, 1], [1, 1]]


def test_prior_ignores_positions_beyond_its_length():
    prior = RankPositionPrior(np.array([[2], [10]]))
    labels = torch.tensor([[IGNORE_INDEX, 10, 10, 10]])
    assert prior.hits(labels, top_k=(1,)).tolist() == [[1]]


class PriorAsModel(torch.nn.Module):
    """Returns the prior's ranking as logits at the labelled positions (row-major)."""

    def __init__(self, prior: RankPositionPrior) -> None:
        super().__init__()
        self.prior = prior
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, labels, **_):
        rows, positions = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
        logits = torch.zeros(len(rows), VOCAB)
        for index, position in enumerate(positions.tolist()):
            for rank, gene in enumerate(self.prior.top_genes[position]):
                if gene >= 0:
                    logits[index, gene] = 10.0 - rank
        return MaskedLMOutput(loss=None, logits=logits)


def test_model_and_prior_are_scored_on_the_same_masked_tokens():
    rng = np.random.default_rng(0)
    rows = [[2, *rng.permutation(np.arange(FIRST_GENE, VOCAB))[:12].tolist()] for _ in range(60)]
    train, held_out = cells_from(rows[:40]), cells_from(rows[40:])
    prior = RankPositionPrior.fit(train, VOCAB, max_length=13)
    collator = MaskedGeneCollator(vocab_size=VOCAB, first_gene_id=FIRST_GENE, max_length=13)
    report = evaluate_heldout(PriorAsModel(prior), held_out, collator, prior, batch_size=7)
    assert report["cells"] == 20 and report["masked_genes"] == 20 * 2  # round(0.15 * 12)
    assert report["model"] == report["prior"]
    assert report["difference"]["top10"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    assert 0.0 < report["prior"]["top10"] < 1.0  # random cells: the prior is weak, not zero
