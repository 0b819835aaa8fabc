"""obs is read by row range: memory does not grow with cells, values equal anndata's read."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata.io import read_elem, write_elem

from cellfoundry.tokenization import (
    ContextSpec,
    TokenizeOptions,
    anndata_io,
    load_tokenized,
    tokenize_files,
)
from cellfoundry.tokenization.anndata_io import CountReader

N_CELLS = 3_000


def _obs(n: int) -> pd.DataFrame:
    """One column per on-disk encoding anndata writes for obs."""
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T", "B", None], n)),
            "cluster": pd.Categorical(rng.integers(0, 4, n)),
            "donor": np.array([f"d{i % 7}" for i in range(n)], dtype=object),
            "n_genes": rng.integers(0, 100, n),
            "score": rng.random(n).astype(np.float32),
            "doublet": rng.random(n) < 0.5,
            "batch": pd.array(np.where(rng.random(n) < 0.2, None, rng.integers(0, 3, n)), "Int64"),
            "qc": pd.array(np.where(rng.random(n) < 0.2, None, rng.random(n) < 0.5), "boolean"),
            "species": pd.Categorical(rng.choice(["human", "Homo sapiens"], n)),
        },
        index=pd.Index([f"bc{i:05d}" for i in range(n)], name="barcode"),
    )


def _write(path, genes, obs: pd.DataFrame, X=None):
    """An .h5ad whose obs keeps every encoding (write_h5ad would turn strings categorical)."""
    rng = np.random.default_rng(1)
    if X is None:
        X = sp.csr_matrix(rng.poisson(1.0, (len(obs), len(genes))).astype(np.float32))
    ad.AnnData(X=X, obs=pd.DataFrame(index=obs.index), var=pd.DataFrame(index=genes)).write_h5ad(
        path
    )
    with h5py.File(path, "r+") as f:
        del f["obs"]
        write_elem(f, "obs", obs)
    return path


def _to_legacy_obs(path, obs: pd.DataFrame) -> None:
    """Rewrite obs in anndata 0.7's layout (dataframe 0.1.0: plain datasets, __categories)."""
    text = h5py.special_dtype(vlen=str)
    with h5py.File(path, "r+") as f:
        del f["obs"]
        group = f.create_group("obs")
        group.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.1.0"})
        group.attrs["_index"] = "_index"
        group.attrs["column-order"] = np.array(list(obs.columns), dtype=object)
        group.create_dataset("_index", data=obs.index.to_numpy(object), dtype=text)
        for name, series in obs.items():
            if isinstance(series.dtype, pd.CategoricalDtype):
                categories = group.create_dataset(
                    f"__categories/{name}", data=series.cat.categories.to_numpy(object), dtype=text
                )
                group.create_dataset(name, data=series.cat.codes.to_numpy())
                group[name].attrs["categories"] = categories.ref
            elif series.dtype == object:
                group.create_dataset(name, data=series.to_numpy(), dtype=text)
            else:
                group.create_dataset(name, data=series.to_numpy())


def _reader_frame(path, step: int) -> pd.DataFrame:
    with CountReader(path) as reader:
        obs = reader.obs
        parts = [
            obs.rows(start, min(start + step, obs.n_rows), obs.columns)
            for start in range(0, obs.n_rows, step)
        ]
    return pd.concat(parts)


def test_obs_rows_equal_anndata_read(tmp_path, tiny_tokenizer):
    genes = tiny_tokenizer.vocab.gene_ids[:5]
    path = _write(tmp_path / "x.h5ad", genes, _obs(500))
    with h5py.File(path) as f:
        expected = read_elem(f["obs"])
    pd.testing.assert_frame_equal(_reader_frame(path, 77), expected)


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")  # no encoding metadata
def test_legacy_obs_rows_equal_anndata_read(tmp_path, tiny_tokenizer):
    genes = tiny_tokenizer.vocab.gene_ids[:5]
    obs = _obs(300)[["cell_type", "donor", "n_genes", "score", "species"]]
    path = _write(tmp_path / "x.h5ad", genes, obs)
    _to_legacy_obs(path, obs)
    with h5py.File(path) as f:
        expected = read_elem(f["obs"])
    pd.testing.assert_frame_equal(_reader_frame(path, 64), expected)


def test_obs_is_only_read_in_row_ranges(tmp_path, tiny_tokenizer, monkeypatch):
    """No obs dataset is read whole: peak memory is one chunk's, whatever the cell count."""
    genes = tiny_tokenizer.vocab.gene_ids[:20]
    obs = _obs(N_CELLS)
    obs["n_counts"] = np.full(N_CELLS, 50.0)
    path = _write(tmp_path / "x.h5ad", genes, obs)
    monkeypatch.setattr(anndata_io, "OBS_SLICE_ROWS", 500)
    reads: list[tuple[str, int]] = []
    original = h5py.Dataset.__getitem__

    def recording_getitem(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        reads.append((self.name, int(np.size(value))))
        return value

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording_getitem)
    keep = ("cell_type", "donor", "batch", "score")
    options = TokenizeOptions(
        keep_obs=keep, chunk_size=200, context=ContextSpec(species_key="species")
    )
    tokenize_files([path], tmp_path / "out", tiny_tokenizer, options)
    monkeypatch.undo()

    obs_reads = [(name, size) for name, size in reads if name.startswith("/obs/")]
    assert obs_reads, "obs was not read through h5py datasets"
    whole = [r for r in obs_reads if r[1] > 500 and not r[0].endswith("/categories")]
    assert whole == []
    ds = load_tokenized(tmp_path / "out")
    assert ds["cell_id"] == list(obs.index)
    assert ds["donor"] == list(obs["donor"])
    assert ds["cell_type"] == list(obs["cell_type"].astype(str))


def test_context_values_are_checked_before_any_chunk(tmp_path, tiny_tokenizer):
    """An unknown value in the last cell fails before a bad count in the first (as before)."""
    genes = tiny_tokenizer.vocab.gene_ids[:5]
    modality = np.array(["spatial"] * N_CELLS, dtype=object)
    modality[-1] = "nuclei"
    X = sp.lil_matrix(np.ones((N_CELLS, len(genes)), dtype=np.float32))
    X[0, 0] = -1
    obs = pd.DataFrame({"modality": modality}, index=[f"c{i}" for i in range(N_CELLS)])
    path = _write(tmp_path / "x.h5ad", genes, obs, X.tocsr())
    options = TokenizeOptions(chunk_size=100)
    with pytest.raises(ValueError, match="Unknown modality 'nuclei'"):
        tokenize_files([path], tmp_path / "out", tiny_tokenizer, options)
    assert not (tmp_path / "out").exists()


def test_obs_n_counts_checked_before_any_chunk(tmp_path, tiny_tokenizer):
    genes = tiny_tokenizer.vocab.gene_ids[:5]
    X = sp.lil_matrix(np.ones((N_CELLS, len(genes)), dtype=np.float32))
    X[0, 0] = -1
    n_counts = np.full(N_CELLS, 5.0)
    n_counts[[-1, -2]] = [np.nan, -1.0]
    obs = pd.DataFrame({"n_counts": n_counts}, index=[f"c{i}" for i in range(N_CELLS)])
    path = _write(tmp_path / "x.h5ad", genes, obs, X.tocsr())
    match = rf"2 missing/negative values \(first: cell 'c{N_CELLS - 2}'\)"
    with pytest.raises(ValueError, match=match):
        tokenize_files([path], tmp_path / "out", tiny_tokenizer, TokenizeOptions(chunk_size=100))
