"""Zero-shot embeddings: shapes, obsm, bit-equal reruns, padding/batch invariance, errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import save_tiny_model

from cellfoundry import demo_path
from cellfoundry.embedding import embed


@pytest.fixture(scope="module")
def demo_cells():
    return ad.read_h5ad(demo_path())[:40].copy()


@pytest.mark.parametrize("backbone", ["bert", "mamba"])
def test_embed_writes_obsm_and_is_bit_equal_on_rerun(
    tmp_path, tiny_tokenizer, demo_cells, backbone
):
    path = save_tiny_model(tmp_path, backbone, tiny_tokenizer)
    first = embed(demo_cells, path, batch_size=8, progress=False)
    assert first.shape == (40, 32) and first.dtype == np.float32
    assert np.isfinite(first).all()
    assert demo_cells.obsm["X_cellfoundry"] is first
    again = embed(demo_cells, path, batch_size=8, progress=False, key_added=None)
    assert np.array_equal(first, again)
    # different batching changes only padding, which must not change real-token outputs
    other = embed(demo_cells, path, batch_size=5, progress=False, key_added=None)
    np.testing.assert_allclose(other, first, atol=1e-5)
    # cells are distinguishable (not a constant vector)
    assert np.linalg.norm(first - first.mean(0), axis=1).min() > 0


def test_pooling_layers_and_path_input(tmp_path, tiny_tokenizer, demo_cells):
    path = save_tiny_model(tmp_path, "bert", tiny_tokenizer)
    cls = embed(demo_cells, path, progress=False, key_added=None)
    mean = embed(demo_cells, path, pooling="mean", progress=False, key_added=None)
    first_layer = embed(demo_cells, path, layer=1, progress=False, key_added=None)
    assert not np.allclose(cls, mean) and not np.allclose(cls, first_layer)
    file = tmp_path / "cells.h5ad"
    demo_cells.write_h5ad(file)
    from_file = embed(str(file), path, progress=False)
    assert np.array_equal(from_file, cls)


def test_empty_cells_get_nan_rows(tmp_path, tiny_tokenizer, demo_cells, caplog):
    cells = demo_cells[:6].copy()
    dense = cells.X.toarray()
    dense[2] = 0
    cells.X = sp.csr_matrix(dense)
    path = save_tiny_model(tmp_path, "bert", tiny_tokenizer)
    out = embed(cells, path, progress=False)
    assert np.isnan(out[2]).all() and np.isfinite(np.delete(out, 2, axis=0)).all()
    assert "1 cells had no counts" in caplog.text


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_tokenizer, human_tokenizer, demo_cells):
    path = save_tiny_model(tmp_path, "bert", tiny_tokenizer)
    with pytest.raises(ValueError, match="cf-human-v1"):
        embed(demo_cells, path, tokenizer=human_tokenizer, progress=False)


def test_embed_cli_writes_h5ad_and_umap(tmp_path, tiny_tokenizer):
    import subprocess

    model = save_tiny_model(tmp_path, "bert", tiny_tokenizer)
    out = tmp_path / "emb.h5ad"
    plot = tmp_path / "umap.png"
    result = subprocess.run(
        [
            "cellfoundry",
            "embed",
            "demo",
            str(out),
            "--model",
            model,
            "--max-length",
            "64",
            "--plot",
            str(plot),
            "--color",
            "tissue",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert ad.read_h5ad(out).obsm["X_cellfoundry"].shape == (559, 32)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [
            "cellfoundry",
            "embed",
            "demo",
            str(tmp_path / "x.h5ad"),
            "--model",
            model,
            "--plot",
            str(plot),
            "--color",
            "no_such_column",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no_such_column" in bad.stderr
    assert not (tmp_path / "x.h5ad").exists()


def test_batches_are_capped_by_padded_tokens_as_well_as_cells():
    from cellfoundry.embedding import _length_sorted_batches

    lengths = np.array([2048, 100, 2048, 1000, 50, 50])
    order = np.argsort(-lengths, kind="stable")
    batches = [b.tolist() for b in _length_sorted_batches(order, lengths, 4, 4096)]
    assert batches == [[0, 2], [3, 1, 4, 5]]  # 2 x 2048, then 4 x 1000 <= 4096
    assert [b.tolist() for b in _length_sorted_batches(order, lengths, 4, None)] == [
        [0, 2, 3, 1],
        [4, 5],
    ]
    assert [len(b) for b in _length_sorted_batches(order, lengths, 4, 100)][0] == 1
