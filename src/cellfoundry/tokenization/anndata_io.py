"""Chunked reading of count matrices from ``.h5ad`` files or in-memory AnnData, with validation.

Why hand-written: anndata's backed mode re-opens and re-validates on every row slice and
goes through its generic indexing; for a CSR ``X`` we read ``indptr`` / ``indices`` / ``data``
row ranges straight from HDF5 with h5py, which keeps peak memory at one chunk and is several
times faster. Dense and CSC matrices fall back to anndata (CSC is read whole: a warning says so).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

#: Cells per chunk are chosen so a chunk holds about this many stored values.
TARGET_NNZ_PER_CHUNK = 4_000_000


@dataclass
class CountChunk:
    """One block of cells: ``matrix`` is (cells x genes) CSR float32 with raw values."""

    start: int
    stop: int
    matrix: sp.csr_matrix
    n_counts: np.ndarray  # float64 (cells,), totals used for normalisation


class CountReader:
    """Stream a count matrix in row chunks from a path (backed) or an in-memory AnnData.

    Parameters
    ----------
    source
        Path to an ``.h5ad`` file or an ``anndata.AnnData``.
    layer
        ``None`` for ``X``, a name in ``layers``, or ``"raw"`` for ``raw.X`` (with ``raw.var``).
    allow_normalized
        Accept non-integer values (normalised data) with a warning instead of an error.
    chunk_size
        Cells per chunk; ``None`` picks it from the matrix density.
    """

    def __init__(
        self,
        source: str | Path | object,
        layer: str | None = None,
        allow_normalized: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        self.layer = layer
        self.allow_normalized = allow_normalized
        self._chunk_size = chunk_size
        self._warned_normalized = False
        self._adata = None
        self._h5 = None
        if isinstance(source, (str, Path)):
            self.path: Path | None = Path(source)
            self._open_file()
        else:
            self.path = None
            self._adata = source
            self._init_from_anndata()

    # -- opening --------------------------------------------------------------------------
    def _open_file(self) -> None:
        import h5py
        from anndata.io import read_elem

        path = self.path
        if not path.exists():
            raise ValueError(f"Input file {path} does not exist; check the path.")
        try:
            self._h5 = h5py.File(path, "r")
            self.obs = read_elem(self._h5["obs"])
            matrix_key, var_key = self._matrix_keys(self._h5)
            self.var = read_elem(self._h5[var_key])
            self._x = self._h5[matrix_key]
            self.obsm_keys = list(self._h5["obsm"].keys()) if "obsm" in self._h5 else []
            uns = self._h5.get("uns")
            self.x_kind = _read_scalar(uns, "x_kind") if uns is not None else None
        except (OSError, KeyError) as error:
            self.close()
            raise ValueError(
                f"Cannot read {path} as an .h5ad file ({error}). "
                "Write it with anndata (adata.write_h5ad) and check it is not truncated."
            ) from error
        encoding = self._x.attrs.get("encoding-type", "array")
        if isinstance(encoding, bytes):
            encoding = encoding.decode()
        self._encoding = encoding
        self.n_obs, self.n_vars = len(self.obs), len(self.var)

    def _matrix_keys(self, h5) -> tuple[str, str]:
        if self.layer is None:
            return "X", "var"
        if self.layer == "raw":
            if "raw" not in h5:
                raise ValueError("layer='raw' requested but the file has no .raw; use layer=None.")
            return "raw/X", "raw/var"
        layers = list(h5["layers"].keys()) if "layers" in h5 else []
        if self.layer not in layers:
            raise ValueError(f"Layer {self.layer!r} not found; the file has layers {layers}.")
        return f"layers/{self.layer}", "var"

    def _init_from_anndata(self) -> None:
        adata = self._adata
        if self.layer is None:
            matrix, var = adata.X, adata.var
        elif self.layer == "raw":
            if adata.raw is None:
                raise ValueError("layer='raw' requested but adata.raw is None; use layer=None.")
            matrix, var = adata.raw.X, adata.raw.var
        else:
            if self.layer not in adata.layers:
                raise ValueError(
                    f"Layer {self.layer!r} not found; adata has layers {list(adata.layers)}."
                )
            matrix, var = adata.layers[self.layer], adata.var
        if matrix is None:
            raise ValueError("The AnnData has no expression matrix (X is None).")
        self._memory_matrix = matrix
        self._encoding = "memory"
        self.obs, self.var = adata.obs, var
        self.obsm_keys = list(adata.obsm.keys())
        self.x_kind = adata.uns.get("x_kind") if hasattr(adata, "uns") else None
        self.n_obs, self.n_vars = matrix.shape

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> CountReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- iteration ------------------------------------------------------------------------
    def chunk_size(self) -> int:
        """Cells per chunk: fixed if given, else sized to about ``TARGET_NNZ_PER_CHUNK`` values."""
        if self._chunk_size:
            return int(self._chunk_size)
        per_cell = self._estimate_nnz_per_cell()
        return int(np.clip(TARGET_NNZ_PER_CHUNK // max(per_cell, 1), 256, 65_536))

    def _estimate_nnz_per_cell(self) -> int:
        if self._encoding == "csr_matrix":
            probe = min(self.n_obs, 2000)
            indptr = self._x["indptr"][: probe + 1]
            return int(np.ceil((indptr[-1] - indptr[0]) / max(probe, 1)))
        return self.n_vars

    def chunks(self) -> Iterator[CountChunk]:
        """Yield validated chunks in row order."""
        step = self.chunk_size()
        totals_from_obs = self._obs_n_counts()
        for start in range(0, self.n_obs, step):
            stop = min(start + step, self.n_obs)
            matrix = self._read_rows(start, stop)
            self._validate(matrix, start)
            if totals_from_obs is None:
                n_counts = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
            else:
                n_counts = totals_from_obs[start:stop]
            yield CountChunk(start, stop, matrix, n_counts)

    def _obs_n_counts(self) -> np.ndarray | None:
        """Use ``obs['n_counts']`` when present (Geneformer's convention), else ``None``."""
        if "n_counts" not in self.obs.columns:
            return None
        values = pd.to_numeric(self.obs["n_counts"], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"obs['n_counts'] has {int(bad.sum())} missing/negative values (first: cell "
                f"{self.obs.index[first]!r}); fix or drop that column so totals are recomputed."
            )
        return values

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        if self._encoding == "csr_matrix":
            indptr = self._x["indptr"][start : stop + 1].astype(np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            data = self._x["data"][lo:hi]
            indices = self._x["indices"][lo:hi]
            matrix = sp.csr_matrix(
                (data.astype(np.float32, copy=False), indices, indptr - lo),
                shape=(stop - start, self.n_vars),
            )
            return matrix
        if self._encoding == "memory":
            block = self._memory_matrix[start:stop]
        elif self._encoding == "array":
            block = self._x[start:stop]
        else:  # csc_matrix or anything exotic: read through anndata once, warn about memory
            block = self._read_whole_matrix()[start:stop]
        if sp.issparse(block):
            return sp.csr_matrix(block, dtype=np.float32)
        return sp.csr_matrix(np.asarray(block, dtype=np.float32))

    def _read_whole_matrix(self):
        if not hasattr(self, "_whole"):
            from anndata.io import read_elem

            logger.warning(
                "X is stored as %s: it is read whole into memory. Store CSR "
                "(adata.X = adata.X.tocsr()) to stream it in chunks.",
                self._encoding,
            )
            self._whole = sp.csr_matrix(read_elem(self._x))
        return self._whole

    def _validate(self, matrix: sp.csr_matrix, offset: int) -> None:
        """Raise on NaN/inf/negative values; on non-integers unless ``allow_normalized``."""
        data = matrix.data
        if data.size == 0:
            return
        finite = np.isfinite(data)
        if not finite.all():
            cell = self._cell_of_entry(matrix, int(np.flatnonzero(~finite)[0]), offset)
            raise ValueError(
                f"The matrix has {int((~finite).sum())} NaN/inf values (first in cell {cell!r}). "
                "Tokenize raw counts: remove or impute NaN/inf before tokenizing."
            )
        negative = data < 0
        if negative.any():
            cell = self._cell_of_entry(matrix, int(np.flatnonzero(negative)[0]), offset)
            raise ValueError(
                f"The matrix has {int(negative.sum())} negative values (first in cell {cell!r}); "
                "rank-value tokens need raw counts >= 0. Use the raw counts (layer='counts' or "
                "layer='raw'), not scaled or z-scored data."
            )
        fractional = data != np.floor(data)
        if fractional.any():
            example = float(data[np.flatnonzero(fractional)[0]])
            if not self.allow_normalized:
                raise ValueError(
                    f"The matrix holds non-integer values (e.g. {example:.4g}): it looks "
                    "normalised or log-transformed, but raw counts are expected. Point at the "
                    "raw counts (layer='counts' or layer='raw'), or pass allow_normalized=True "
                    "(--allow-normalized) to tokenize these values as they are."
                )
            if not self._warned_normalized:
                logger.warning(
                    "Tokenizing non-integer values (e.g. %.4g) as given (allow_normalized=True): "
                    "ranks are computed on these values, not on raw counts.",
                    example,
                )
                self._warned_normalized = True

    def _cell_of_entry(self, matrix: sp.csr_matrix, entry: int, offset: int) -> str:
        row = int(np.searchsorted(matrix.indptr, entry, side="right") - 1)
        return str(self.obs.index[offset + row])


def _read_scalar(group, key: str) -> str | None:
    if group is None or key not in group:
        return None
    value = group[key][()]
    return value.decode() if isinstance(value, bytes) else str(value)
