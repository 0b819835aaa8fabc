"""Bad input: a clear error naming the value and the fix, and no partial output."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry.tokenization import ContextSpec, TokenizeOptions, tokenize_files


def _write(path, X, var_names, obs=None):
    obs = obs if obs is not None else pd.DataFrame(index=[f"cell{i}" for i in range(len(X))])
    adata = ad.AnnData(sp.csr_matrix(np.asarray(X, dtype=np.float32)), obs=obs)
    adata.var_names = var_names
    adata.write_h5ad(path)
    return path


@pytest.fixture
def genes(tiny_tokenizer):
    return tiny_tokenizer.vocab.gene_ids[:3]


def _assert_fails_cleanly(tmp_path, tokenizer, path, match, options=None):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        tokenize_files([path], out, tokenizer, options)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert leftovers == []


def test_normalised_values_rejected_unless_allowed(tmp_path, tiny_tokenizer, genes, caplog):
    path = _write(tmp_path / "x.h5ad", [[0.5, 1.25, 0], [1, 0, 2]], genes)
    _assert_fails_cleanly(tmp_path, tiny_tokenizer, path, r"non-integer values \(e\.g\. 0\.5\)")
    with caplog.at_level(logging.WARNING):
        tokenize_files(
            [path], tmp_path / "ok", tiny_tokenizer, TokenizeOptions(allow_normalized=True)
        )
    assert "allow_normalized=True" in caplog.text
    assert (tmp_path / "ok" / "manifest.json").exists()


def test_negative_values(tmp_path, tiny_tokenizer, genes):
    path = _write(tmp_path / "x.h5ad", [[1, 2, 0], [1, -3, 2]], genes)
    _assert_fails_cleanly(
        tmp_path, tiny_tokenizer, path, r"1 negative values \(first in cell 'cell1'\)"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf(tmp_path, tiny_tokenizer, genes, bad):
    path = _write(tmp_path / "x.h5ad", [[1, bad, 0], [1, 1, 2]], genes)
    _assert_fails_cleanly(
        tmp_path, tiny_tokenizer, path, r"NaN/inf values \(first in cell 'cell0'\)"
    )


def test_no_gene_in_vocabulary_shows_examples(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "x.h5ad", [[1, 2]], ["GENE_FOO", "GENE_BAR"])
    _assert_fails_cleanly(tmp_path, tiny_tokenizer, path, r"GENE_FOO")


def test_genes_outside_the_tokenizer_vocabulary(tmp_path, tiny_tokenizer, human_tokenizer):
    outside = [g for g in human_tokenizer.vocab.gene_ids if g not in tiny_tokenizer.vocab][:2]
    path = _write(tmp_path / "x.h5ad", [[1, 2]], outside)
    _assert_fails_cleanly(tmp_path, tiny_tokenizer, path, r"No gene of the input is in the cf-tiny")


def test_missing_obs_column_for_context(tmp_path, tiny_tokenizer, genes):
    path = _write(tmp_path / "x.h5ad", [[1, 2, 3]], genes)
    options = TokenizeOptions(context=ContextSpec(assay_key="technology"))
    _assert_fails_cleanly(tmp_path, tiny_tokenizer, path, r"obs column 'technology'", options)


def test_missing_keep_obs_column(tmp_path, tiny_tokenizer, genes):
    path = _write(tmp_path / "x.h5ad", [[1, 2, 3]], genes)
    options = TokenizeOptions(keep_obs=("cell_type",))
    _assert_fails_cleanly(tmp_path, tiny_tokenizer, path, r"'cell_type'", options)


def test_unreadable_file(tmp_path, tiny_tokenizer):
    path = tmp_path / "broken.h5ad"
    path.write_bytes(b"this is not HDF5" * 100)
    _assert_fails_cleanly(tmp_path, tiny_tokenizer, path, r"Cannot read .*broken\.h5ad")


def test_missing_file(tmp_path, tiny_tokenizer):
    _assert_fails_cleanly(tmp_path, tiny_tokenizer, tmp_path / "nope.h5ad", r"does not exist")


def test_all_cells_empty(tmp_path, tiny_tokenizer, genes):
    path = _write(tmp_path / "x.h5ad", [[0, 0, 0], [0, 0, 0]], genes)
    _assert_fails_cleanly(tmp_path, tiny_tokenizer, path, r"every cell was empty")


def test_existing_output_is_not_overwritten(tmp_path, tiny_tokenizer, genes):
    path = _write(tmp_path / "x.h5ad", [[1, 2, 3]], genes)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        tokenize_files([path], out, tiny_tokenizer)
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_in_second_input_leaves_no_output(tmp_path, tiny_tokenizer, genes):
    good = _write(tmp_path / "good.h5ad", [[1, 2, 3]], genes)
    bad = _write(tmp_path / "bad.h5ad", [[1, -2, 3]], genes)
    with pytest.raises(ValueError, match="negative"):
        tokenize_files([good, bad], tmp_path / "out", tiny_tokenizer)
    assert not (tmp_path / "out").exists()


def test_corrupt_tokenizer_artifact(tmp_path, tiny_tokenizer):
    from cellfoundry.tokenization import RankValueTokenizer

    folder = tiny_tokenizer.save_pretrained(tmp_path / "tok")
    text = (folder / "vocab.json").read_text().replace('"<cls>"', '"<CLS>"')
    (folder / "vocab.json").write_text(text)
    with pytest.raises(ValueError, match="Special token <cls>"):
        RankValueTokenizer.from_directory(folder)
    tiny_tokenizer.save_pretrained(tmp_path / "tok2")
    (tmp_path / "tok2" / "gene_medians.tsv").write_text("garbage\n")
    with pytest.raises(ValueError, match="Corrupt"):
        RankValueTokenizer.from_directory(tmp_path / "tok2")
