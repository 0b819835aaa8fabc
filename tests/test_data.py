"""cellfoundry.data: masked-gene collator, length-grouped batches, corpora and cell splits."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from cellfoundry.data import (
    IGNORE_INDEX,
    LengthGroupedBatchSampler,
    MaskedGeneCollator,
    TokenizedCells,
    load_corpus,
    split_cells,
)

VOCAB_SIZE, FIRST_GENE, CLS, MASK, PAD = 64, 8, 2, 1, 0
CONTEXT = [4, 5, 6]


def make_cells(n_cells: int, min_genes: int = 4, max_genes: int = 30, seed: int = 0) -> list[dict]:
    """Cells as the tokenizer writes them: <cls>, distinct gene ids, three context ids."""
    rng = np.random.default_rng(seed)
    cells = []
    for index in range(n_cells):
        n_genes = int(rng.integers(min_genes, max_genes + 1))
        genes = rng.choice(np.arange(FIRST_GENE, VOCAB_SIZE), n_genes, replace=False)
        cells.append(
            {
                "input_ids": [CLS, *genes.tolist()],
                "length": n_genes + 1,
                "context_ids": CONTEXT,
                "cell_id": f"cell_{index}",
            }
        )
    return cells


def collator(**kwargs) -> MaskedGeneCollator:
    return MaskedGeneCollator(vocab_size=VOCAB_SIZE, first_gene_id=FIRST_GENE, **kwargs)


def with_index(cells: list[dict]) -> list[dict]:
    return [{**cell, "index": i} for i, cell in enumerate(cells)]


def test_collator_masks_only_gene_tokens_and_labels_the_originals():
    cells = with_index(make_cells(200))
    batch = collator()(cells)
    original = collator(mlm_probability=1.0, mask_replace_prob=0.0, random_replace_prob=0.0)(cells)[
        "input_ids"
    ]  # nothing replaced: the padded original ids
    labelled = batch["labels"] != IGNORE_INDEX
    assert (original[labelled] >= FIRST_GENE).all()  # never <cls>, context or pad
    assert not labelled[:, 0].any()
    assert not labelled[batch["attention_mask"] == 0].any()
    assert torch.equal(batch["labels"][labelled], original[labelled])
    assert torch.equal(batch["input_ids"][~labelled], original[~labelled])
    assert torch.equal(batch["context_ids"], torch.tensor([CONTEXT] * len(cells)))


def test_collator_replaces_80_10_10():
    cells = with_index(make_cells(600, min_genes=30, max_genes=50))
    batch = collator()(cells)
    plain = collator(mlm_probability=1.0, mask_replace_prob=0.0, random_replace_prob=0.0)
    original = plain(cells)["input_ids"]
    labelled = batch["labels"] != IGNORE_INDEX
    shown = batch["input_ids"][labelled]
    masked = (shown == MASK).float().mean().item()
    kept = (shown == original[labelled]).float().mean().item()
    random = ((shown != MASK) & (shown != original[labelled])).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(random - 0.1) < 0.03
    assert (shown[shown != MASK] >= FIRST_GENE).all()  # random replacements are genes


def test_collator_selects_15_percent_at_least_one_per_cell():
    cells = [
        {"input_ids": [CLS, *range(FIRST_GENE, FIRST_GENE + 40)], "index": 0},
        {"input_ids": [CLS, FIRST_GENE + 3], "index": 1},
        {"input_ids": [CLS], "index": 2},
    ]
    per_cell = (collator()(cells)["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    assert per_cell == [6, 1, 0]


def test_collator_same_seed_same_masks_and_per_cell_keys():
    cells = with_index(make_cells(32))
    first, again = collator(seed=3)(cells), collator(seed=3)(cells)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["labels"], collator(seed=4)(cells)["labels"])
    next_epoch = collator(seed=3)
    next_epoch.set_epoch(1)
    assert not torch.equal(first["labels"], next_epoch(cells)["labels"])
    # A cell's mask depends on (seed, epoch, index) only, not on its batch or position.
    alone = collator(seed=3)(cells[5:6])
    length = alone["labels"].shape[1]
    assert torch.equal(alone["labels"][0], first["labels"][5, :length])


def test_collator_without_index_advances_and_replays():
    cells = make_cells(8)
    one = collator(seed=0)
    a, b = one(cells), one(cells)
    assert not torch.equal(a["labels"], b["labels"])  # fresh masks on each call
    assert torch.equal(a["labels"], collator(seed=0)(cells)["labels"])  # a new one replays


def test_collator_pads_to_multiple_truncates_and_caps():
    cells = with_index(make_cells(5, min_genes=3, max_genes=20))
    batch = collator(pad_to_multiple_of=8)(cells)
    longest = max(len(cell["input_ids"]) for cell in cells)
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8
    assert batch["attention_mask"].sum(1).tolist() == [len(c["input_ids"]) for c in cells]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()
    assert batch["input_ids"].dtype == torch.long
    capped = collator(pad_to_multiple_of=8, max_length=10)(cells)
    assert capped["input_ids"].shape[1] == 10  # never padded past the position limit
    assert capped["attention_mask"].sum(1).max() == 10


def test_collator_from_tokenizer_and_rejects_bad_settings(tiny_tokenizer):
    built = MaskedGeneCollator.from_tokenizer(tiny_tokenizer, seed=1)
    vocab = tiny_tokenizer.vocab
    assert (built.vocab_size, built.first_gene_id) == (len(vocab), vocab.first_gene_id)
    assert (built.pad_token_id, built.mask_token_id) == (vocab.pad_id, vocab.mask_id)
    with pytest.raises(ValueError, match="first_gene_id"):
        MaskedGeneCollator(vocab_size=10, first_gene_id=10)
    with pytest.raises(ValueError, match="mlm_probability"):
        collator(mlm_probability=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        collator()([{"input_ids": []}])


def test_length_grouped_sampler_is_a_seeded_partition_of_similar_lengths():
    lengths = np.random.default_rng(0).integers(10, 1000, size=500)
    sampler = LengthGroupedBatchSampler(lengths, 16, seed=7, group_batches=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 32
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    assert batches == list(LengthGroupedBatchSampler(lengths, 16, seed=7, group_batches=4))
    assert lengths[batches[0]].max() == lengths.max()  # the longest batch comes first
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    shuffled = np.random.default_rng(1).permutation(500)[: 31 * 16].reshape(31, 16)
    assert spread < 0.5 * np.mean(np.ptp(lengths[shuffled], axis=1))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert list(LengthGroupedBatchSampler(lengths, 16, seed=8, group_batches=4)) != batches


def test_length_grouped_sampler_eval_order_and_drop_last():
    lengths = np.array([5, 9, 1, 7, 3])
    ordered = list(LengthGroupedBatchSampler(lengths, 2, shuffle=False))
    assert ordered == [[1, 3], [0, 4], [2]]
    dropped = list(LengthGroupedBatchSampler(lengths, 2, drop_last=True))
    assert len(dropped) == 2 and all(len(batch) == 2 for batch in dropped)


def write_folder(path, cells, vocab_sha256="a" * 64, tokenizer_id="toy"):
    """A tokenized folder as `cellfoundry tokenize` writes it (Arrow + manifest.json)."""
    datasets.Dataset.from_list(cells).save_to_disk(str(path))
    manifest = {"tokenizer_id": tokenizer_id, "vocab_sha256": vocab_sha256}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_load_corpus_concatenates_folders_of_one_vocabulary(tmp_path):
    first = write_folder(tmp_path / "a", make_cells(10, seed=1))
    second = write_folder(tmp_path / "b", make_cells(6, seed=2))
    corpus = load_corpus([first, second])
    assert len(corpus) == 16 and corpus.source_sizes == (10, 6)
    assert corpus.vocab_sha256 == "a" * 64 and corpus.tokenizer_id == "toy"
    assert corpus.lengths.tolist() == [len(c["input_ids"]) for c in corpus.dataset]
    cells = corpus.cells([3, 12])
    rows = cells.__getitems__([1, 0])
    assert [row["index"] for row in rows] == [12, 3]
    assert rows[0]["input_ids"] == corpus.dataset[12]["input_ids"]
    assert cells.lengths.tolist() == corpus.lengths[[3, 12]].tolist()


def test_load_corpus_refuses_mixed_vocabularies_and_plain_folders(tmp_path):
    first = write_folder(tmp_path / "a", make_cells(4))
    other = write_folder(tmp_path / "b", make_cells(4), vocab_sha256="b" * 64)
    with pytest.raises(ValueError, match="different vocabularies.*re-tokenize"):
        load_corpus([first, other])
    with pytest.raises(ValueError, match="different vocabularies"):
        load_corpus(first, vocab_sha256="c" * 64)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="manifest.json missing"):
        load_corpus(tmp_path / "plain")
    with pytest.raises(ValueError, match="No tokenized folders"):
        load_corpus([])


def test_split_cells_is_saved_and_reused(tmp_path):
    corpus = load_corpus(write_folder(tmp_path / "a", make_cells(40)))
    path = tmp_path / "split.json"
    split = split_cells(corpus, eval_fraction=0.1, seed=0, path=path)
    assert len(split.eval_indices) == 4 and len(split.train_indices) == 36
    assert sorted([*split.eval_indices, *split.train_indices]) == list(range(40))
    record = json.loads(path.read_text())
    assert record["eval_indices"] == split.eval_indices.tolist()
    assert record["eval_cell_ids"] == [f"cell_{i}" for i in split.eval_indices]
    reused = split_cells(corpus, eval_fraction=0.5, seed=9, path=path)  # the file wins
    assert np.array_equal(reused.eval_indices, split.eval_indices)
    assert not np.array_equal(split_cells(corpus, 0.1, seed=1).eval_indices, split.eval_indices)
    assert len(split_cells(corpus, 0.001, seed=0).eval_indices) == 1  # at least one cell
    changed = load_corpus(write_folder(tmp_path / "b", make_cells(40, seed=5)))
    changed_ids = [{**c, "cell_id": f"other_{i}"} for i, c in enumerate(changed.dataset)]
    changed = load_corpus(write_folder(tmp_path / "c", changed_ids))
    with pytest.raises(ValueError, match="another set of cells"):
        split_cells(changed, 0.1, 0, path)


def test_tokenized_cells_reads_rows_through_a_dataloader():
    dataset = datasets.Dataset.from_list(make_cells(12))
    cells = TokenizedCells(dataset, np.arange(2, 12))
    loader = torch.utils.data.DataLoader(
        cells,
        batch_sampler=LengthGroupedBatchSampler(cells.lengths, 4, seed=0),
        collate_fn=collator(),
    )
    batches = list(loader)
    assert sum(len(batch["input_ids"]) for batch in batches) == 10
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels", "context_ids"}
    with pytest.raises(ValueError, match="Row indices"):
        TokenizedCells(dataset, [12])
