"""Exact streaming gene medians and reproducible tokenizer artifacts."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from conftest import REPO, shared_file

from cellfoundry._io import sha256_file
from cellfoundry.genes import resolve_genes
from cellfoundry.tokenization import RankValueTokenizer, load_tokenizer
from cellfoundry.tokenization.build import build_tokenizer, compute_gene_medians


def _naive_medians(path, genes):
    """np.median over cells of each gene's non-zero count/n_counts*1e4 (float32 -> float64)."""
    adata = ad.read_h5ad(path)
    matrix = sp.csc_matrix(adata.X, dtype=np.float32)
    totals = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    ids = resolve_genes(adata.var).ensembl_ids
    out = {}
    for gene in genes:
        columns = np.flatnonzero(ids == gene)
        counts = np.asarray(matrix[:, columns].sum(axis=1, dtype=np.float32)).ravel()
        cells = np.flatnonzero(counts > 0)
        normalised = counts[cells] / totals[cells].astype(np.float32) * np.float32(10_000)
        out[gene] = float(np.median(normalised.astype(np.float64)))
    return out


def test_streaming_medians_are_exact_on_real_cells():
    path = shared_file("corpus_celltypist_sample.h5ad")
    result = compute_gene_medians([path])
    rng = np.random.default_rng(0)
    detected = np.flatnonzero(result.n_nonzero > 0)
    picks = rng.choice(detected, 300, replace=False)
    even = [i for i in detected if result.n_nonzero[i] % 2 == 0][:50]
    genes = [result.gene_ids[i] for i in np.concatenate([picks, even])]
    expected = _naive_medians(path, genes)
    index = {g: i for i, g in enumerate(result.gene_ids)}
    got = {g: float(result.medians[index[g]]) for g in genes}
    assert got == expected


def test_medians_with_extreme_values_and_chunk_boundaries(tmp_path):
    """Values beyond the histogram's open ends, even counts, one-cell genes, tiny chunks."""
    genes = ["ENSG00000141510", "ENSG00000012048", "ENSG00000139618"]  # TP53, BRCA1, BRCA2
    X = np.array(
        [[1, 0, 5e6], [3, 2, 0], [0, 0, 0], [7, 4, 1], [1, 0, 0], [2e7, 0, 0]], dtype=np.float32
    )
    adata = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=["TP53", "BRCA1", "BRCA2"]))
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    result = compute_gene_medians([path], chunk_size=2)
    totals = X.sum(axis=1).astype(np.float32)
    for column, gene in enumerate(genes):
        cells = X[:, column] > 0
        normalised = X[cells, column] / totals[cells] * np.float32(10_000)
        expected = np.median(normalised.astype(np.float64))
        assert result.medians[result.gene_ids.index(gene)] == expected


def test_build_is_reproducible_and_matches_shipped_tiny(tmp_path):
    from cellfoundry import demo_path

    shipped = load_tokenizer("cf-tiny-test")
    built = build_tokenizer(
        [demo_path()], tmp_path / "cf-tiny-test", "cf-tiny-test", min_cells=1, max_genes=1000
    )
    for name in ("vocab.json", "gene_medians.tsv"):
        assert (tmp_path / "cf-tiny-test" / name).read_bytes() == (shipped.path / name).read_bytes()
    assert built.vocab.sha256 == shipped.vocab.sha256
    provenance = json.loads((tmp_path / "cf-tiny-test" / "provenance.json").read_text())
    for name, digest in provenance["files_sha256"].items():
        assert sha256_file(tmp_path / "cf-tiny-test" / name) == digest
    reloaded = RankValueTokenizer.from_directory(tmp_path / "cf-tiny-test")
    assert np.array_equal(reloaded.medians, built.medians, equal_nan=True)


def test_shipped_human_tokenizer_provenance():
    tokenizer = load_tokenizer("cf-human-v1")
    folder = REPO / "tokenizers" / "cf-human-v1"
    provenance = json.loads((folder / "provenance.json").read_text())
    assert {i["file"] for i in provenance["inputs"]} == {
        "pert_kang2018_ifnb_pbmc.h5ad",
        "corpus_liao2020_balf_covid.h5ad",
        "spatial_dlpfc_visium_maynard2021.h5ad",
        "corpus_celltypist_sample.h5ad",
    }
    for name, digest in provenance["files_sha256"].items():
        assert sha256_file(folder / name) == digest
    assert len(tokenizer.vocab) > 15_000
    assert tokenizer.config["vocab_sha256"] == tokenizer.vocab.sha256
