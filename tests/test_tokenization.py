"""Rank-value tokenizer: exact parity with the per-cell reference, edge cases, outputs."""

from __future__ import annotations

import functools

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_file

from cellfoundry.genes import resolve_genes
from cellfoundry.tokenization import (
    ContextSpec,
    GeneVocab,
    RankValueTokenizer,
    TokenizeOptions,
    load_tokenized,
    tokenize_files,
)
from cellfoundry.tokenization._rank_kernels import rank_chunk_numba, rank_chunk_numpy
from cellfoundry.tokenization.reference import tokenize_matrix_reference


def _tokens_from_disk(folder) -> tuple[list[np.ndarray], list[str]]:
    ds = datasets.load_from_disk(str(folder))
    return [np.asarray(x, dtype=np.int32) for x in ds["input_ids"]], list(ds["cell_id"])


@functools.lru_cache(maxsize=4)
def _reference_for_file(path, tokenizer_name, max_length):
    """Per-cell reference tokens by cell id (cached: both backends compare against it)."""
    from cellfoundry.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    adata = ad.read_h5ad(path)
    matrix = sp.csr_matrix(adata.X, dtype=np.float32)
    if "n_counts" in adata.obs:
        n_counts = adata.obs["n_counts"].to_numpy(np.float64)
    else:
        n_counts = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    column_tokens = tokenizer.column_tokens(resolve_genes(adata.var).ensembl_ids)
    reference = tokenize_matrix_reference(
        matrix, n_counts, column_tokens, tokenizer.medians, max_length
    )
    return dict(zip(adata.obs_names.astype(str), reference, strict=True))


@pytest.mark.parametrize(
    ("file_name", "tokenizer_name", "max_length", "chunk_size"),
    [
        ("corpus_celltypist_sample.h5ad", "cf-human-v1", 2048, 100),
        ("spatial_starmap_mpfc_wang2018.h5ad", "cf-human-v1", 2048, 1000),
        ("spatial_dlpfc_visium_maynard2021.h5ad", "cf-human-v1", 256, None),
    ],
)
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_parity_with_reference_on_every_cell(
    tmp_path, file_name, tokenizer_name, max_length, chunk_size, backend
):
    """Streaming tokens equal the plain per-cell implementation for 100% of real cells."""
    from cellfoundry.tokenization import load_tokenizer

    path = shared_file(file_name)
    tokenizer = load_tokenizer(tokenizer_name)
    options = TokenizeOptions(max_length=max_length, chunk_size=chunk_size, backend=backend)
    tokenize_files([path], tmp_path / "out", tokenizer, options)
    tokens, cell_ids = _tokens_from_disk(tmp_path / "out")
    reference = _reference_for_file(path, tokenizer_name, max_length)
    assert len(tokens) == len(reference) > 500
    mismatched = [
        c for c, t in zip(cell_ids, tokens, strict=True) if not np.array_equal(t, reference[c])
    ]
    assert mismatched == []
    assert max(len(t) for t in tokens) <= max_length


def test_kernels_agree_on_kang_subset(human_tokenizer):
    """numba and numpy kernels (and the reference) agree on 1,500 Kang PBMCs with duplicates."""
    adata = ad.read_h5ad(shared_file("pert_kang2018_ifnb_pbmc.h5ad"))[::9]
    matrix = sp.csr_matrix(adata.X, dtype=np.float32)
    n_counts = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    resolution = resolve_genes(adata.var)
    assert resolution.n_collapsed > 0  # the file has genes that collapse onto one token
    column_tokens = human_tokenizer.column_tokens(resolution.ensembl_ids)
    medians = human_tokenizer.medians
    fast, fast_lengths = rank_chunk_numba(matrix, n_counts, column_tokens, medians, 2047)
    slow, slow_lengths = rank_chunk_numpy(matrix, n_counts, column_tokens, medians, 2047)
    assert np.array_equal(fast, slow) and np.array_equal(fast_lengths, slow_lengths)
    reference = tokenize_matrix_reference(matrix, n_counts, column_tokens, medians, 2048)
    assert np.array_equal(np.concatenate([r[1:] for r in reference]), fast)


def _toy_tokenizer(n_genes: int = 6, medians=None) -> RankValueTokenizer:
    genes = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    vocab = GeneVocab.from_genes(genes)
    values = np.full(len(vocab), np.nan)
    values[vocab.first_gene_id :] = 1.0 if medians is None else medians
    return RankValueTokenizer(vocab, values, name="toy", max_length=16)


def test_ties_are_broken_by_token_id_and_truncation():
    tokenizer = _toy_tokenizer()
    first = tokenizer.vocab.first_gene_id
    # columns in reverse token order; genes 2,3,5 tie at 2 counts, gene 1 has 5 counts
    matrix = sp.csr_matrix(np.array([[2, 0, 2, 5, 2, 1]], dtype=np.float32))
    column_tokens = np.arange(first + 5, first - 1, -1)  # column j -> token first+5-j
    for backend in ("numba", "numpy"):
        ranked = tokenizer.rank(matrix, np.array([12.0]), column_tokens, 16, backend)
        expected = [2, first + 2, first + 1, first + 3, first + 5, first + 0]
        assert ranked.cell(0).tolist() == expected
        short = tokenizer.rank(matrix, np.array([12.0]), column_tokens, 3, backend)
        assert short.cell(0).tolist() == expected[:3]


def test_median_division_changes_rank():
    """A gene with a high corpus median ranks below a rarer gene with fewer counts."""
    tokenizer = _toy_tokenizer(2, medians=np.array([100.0, 1.0]))
    first = tokenizer.vocab.first_gene_id
    matrix = sp.csr_matrix(np.array([[50, 5]], dtype=np.float32))
    ranked = tokenizer.rank(matrix, np.array([55.0]), np.array([first, first + 1]))
    assert ranked.cell(0).tolist() == [2, first + 1, first]


def _write_h5ad(path, X, var_names, obs=None, obsm=None):
    adata = ad.AnnData(
        X=sp.csr_matrix(X, dtype=np.float32),
        obs=obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
        var=pd.DataFrame(index=var_names),
    )
    for key, value in (obsm or {}).items():
        adata.obsm[key] = value
    adata.write_h5ad(path)
    return path


def test_obs_n_counts_is_used_and_empty_cells_dropped(tmp_path, tiny_tokenizer):
    genes = tiny_tokenizer.vocab.gene_ids[:4]
    X = np.array([[3, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 4]], dtype=np.float32)
    obs = pd.DataFrame({"n_counts": [100.0, 0.0, 7.0]}, index=["a", "b", "c"])
    path = _write_h5ad(tmp_path / "x.h5ad", X, genes, obs)
    reports = tokenize_files([path], tmp_path / "out", tiny_tokenizer)
    assert reports[0].n_empty_dropped == 1 and reports[0].n_cells_out == 2
    tokens, cells = _tokens_from_disk(tmp_path / "out")
    assert cells == ["a", "c"]
    column_tokens = tiny_tokenizer.column_tokens(np.array(genes, dtype=object))
    expected = tokenize_matrix_reference(
        sp.csr_matrix(X[[0, 2]]),
        np.array([100.0, 7.0]),
        column_tokens,
        tiny_tokenizer.medians,
        2048,
    )
    assert all(np.array_equal(a, b) for a, b in zip(tokens, expected, strict=True))


def test_context_tokens_from_obs_and_spatial(tmp_path, tiny_tokenizer):
    vocab = tiny_tokenizer.vocab
    genes = vocab.gene_ids[:3]
    obs = pd.DataFrame({"assay": ["10x Visium", "10x Chromium 5' v2"]}, index=["a", "b"])
    spatial = {"spatial": np.zeros((2, 2))}
    path = _write_h5ad(tmp_path / "s.h5ad", np.ones((2, 3)), genes, obs, spatial)
    tokenize_files([path], tmp_path / "out", tiny_tokenizer)
    context = load_tokenized(tmp_path / "out")["context_ids"]
    assert context[0] == [
        vocab["<species:human>"],
        vocab["<assay:10x_visium>"],
        vocab["<modality:spatial>"],
    ]
    assert context[1][1] == vocab["<assay:10x_5prime>"]
    spec = ContextSpec(species="mouse", modality="dissociated")
    tokenize_files([path], tmp_path / "o2", tiny_tokenizer, TokenizeOptions(context=spec))
    context = load_tokenized(tmp_path / "o2")["context_ids"]
    assert context[0][0] == vocab["<species:mouse>"]
    assert context[0][2] == vocab["<modality:dissociated>"]


def test_many_inputs_parallel_and_node_split_give_same_shards(tmp_path, tiny_tokenizer):
    genes = tiny_tokenizer.vocab.gene_ids[:20]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        X = rng.poisson(2.0, size=(30 + i, 20))
        paths.append(_write_h5ad(tmp_path / f"in{i}.h5ad", X, genes))
    one = tokenize_files(paths, tmp_path / "one", tiny_tokenizer, num_proc=2)
    assert [r.n_cells_out for r in one] == [30, 31, 32]
    merged = load_tokenized(tmp_path / "one")
    assert merged.num_rows == 93
    for rank in (1, 0):  # the last node to finish writes the manifest
        tokenize_files(paths, tmp_path / "split", tiny_tokenizer, num_nodes=2, node_rank=rank)
    for name in ("data-00000-of-00003.arrow", "data-00001-of-00003.arrow"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "split" / name).read_bytes()
    assert load_tokenized(tmp_path / "split")["input_ids"] == merged["input_ids"]


def test_in_memory_anndata(tmp_path, tiny_tokenizer):
    adata = ad.read_h5ad(shared_file("corpus_celltypist_sample.h5ad"))[:50].copy()
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    tokenize_files([path], tmp_path / "a", tiny_tokenizer)
    from cellfoundry.tokenization.pipeline import tokenize_to_arrow

    (tmp_path / "b").mkdir()
    report = tokenize_to_arrow(adata, tmp_path / "b" / "x.arrow", tiny_tokenizer, TokenizeOptions())
    assert report.n_cells_out == 50
    memory = datasets.Dataset.from_file(str(tmp_path / "b" / "x.arrow"))
    assert memory["input_ids"] == load_tokenized(tmp_path / "a")["input_ids"]
