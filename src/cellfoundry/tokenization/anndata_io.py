"""Chunked reading of count matrices from ``.h5ad`` files or in-memory AnnData, with validation.

Why hand-written: anndata's backed mode re-opens and re-validates on every row slice and
goes through its generic indexing; for a CSR ``X`` we read ``indptr`` / ``indices`` / ``data``
row ranges straight from HDF5 with h5py, which keeps peak memory at one chunk and is several
times faster. Dense and CSC matrices fall back to anndata (CSC is read whole: a warning says so).
``obs`` is read the same way, one row range of the columns asked for at a time (:class:`H5Obs`),
so peak memory does not grow with the number of cells.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

#: Cells per chunk are chosen so a chunk holds about this many stored values.
TARGET_NNZ_PER_CHUNK = 4_000_000
#: Rows per slice when a whole obs column is scanned up front (n_counts, context values).
OBS_SLICE_ROWS = 65_536


@dataclass
class CountChunk:
    """One block of cells: ``matrix`` is (cells x genes) CSR float32 with raw values."""

    start: int
    stop: int
    matrix: sp.csr_matrix
    n_counts: np.ndarray  # float64 (cells,), totals used for normalisation
    obs: pd.DataFrame | None = None  # rows [start, stop): obs index + the columns asked for


class ObsTable:
    """An AnnData ``obs`` read by row range, so callers never hold a column of every cell."""

    columns: list[str]
    n_rows: int

    def rows(self, start: int, stop: int, columns: Sequence[str] = ()) -> pd.DataFrame:
        """Rows ``[start, stop)`` of ``columns`` (none: the index alone), indexed like obs."""
        raise NotImplementedError

    def column(self, name: str, start: int, stop: int) -> pd.Series:
        """Rows ``[start, stop)`` of one column, with the dtype the whole column has."""
        return self.rows(start, stop, [name])[name]

    def column_slices(self, name: str) -> Iterator[tuple[int, pd.Series]]:
        """``(start, values)`` over a whole column, ``OBS_SLICE_ROWS`` rows at a time."""
        for start in range(0, self.n_rows, OBS_SLICE_ROWS):
            yield start, self.column(name, start, min(start + OBS_SLICE_ROWS, self.n_rows))

    def index_at(self, row: int):
        """The obs name (index value) of one row, as the whole index holds it."""
        return self.rows(row, row + 1).index[0]


class FrameObs(ObsTable):
    """``obs`` of an in-memory AnnData: the frame is already in memory, rows are just sliced."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.columns = list(frame.columns)
        self.n_rows = len(frame)

    def rows(self, start: int, stop: int, columns: Sequence[str] = ()) -> pd.DataFrame:
        return self.frame.iloc[start:stop][list(columns)]

    def column(self, name: str, start: int, stop: int) -> pd.Series:
        return self.frame[name].iloc[start:stop]


class H5Obs(ObsTable):
    """``obs`` of an ``.h5ad`` (dataframe encoding 0.2.0 or 0.1.0), sliced from HDF5 on demand.

    Each row range is decoded as ``anndata.io.read_elem`` decodes the whole column (same
    dtypes and values): categorical (codes sliced, categories read once: they are small),
    string and numeric arrays, nullable integer/boolean/string arrays, and the older layout
    (plain datasets, categories referenced from ``__categories``). Anything else is read
    whole through anndata once, with a warning.
    """

    def __init__(self, group) -> None:
        self._group = group
        self._legacy = _attr(group.attrs, "encoding-version") == "0.1.0"
        self._index_key = _attr(group.attrs, "_index")
        order = group.attrs.get("column-order", [])
        self.columns = [_decode(c) for c in np.atleast_1d(order)]
        for key in [self._index_key, *self.columns]:
            if key not in group:
                raise KeyError(f"obs/{key} is listed but missing")
        self._categories: dict[str, object] = {}
        self._whole: dict[str, object] = {}
        self.n_rows = self._length(self._index_key)

    def rows(self, start: int, stop: int, columns: Sequence[str] = ()) -> pd.DataFrame:
        columns = list(columns)
        frame = pd.DataFrame(  # built as anndata's read_dataframe builds it: same dtypes
            {key: self._read(key, start, stop) for key in columns},
            index=self._read(self._index_key, start, stop),
            columns=columns if columns else None,
        )
        if self._index_key != "_index":
            frame.index.name = self._index_key
        return frame

    def column(self, name: str, start: int, stop: int) -> pd.Series:
        return pd.DataFrame({name: self._read(name, start, stop)})[name]

    def _length(self, key: str) -> int:
        elem = self._group[key]
        for part in ("codes", "values"):  # categorical / nullable groups
            if not hasattr(elem, "shape") and part in elem:
                elem = elem[part]
        if hasattr(elem, "shape"):
            return int(elem.shape[0])
        return len(self._read_whole(key))

    def _read(self, key: str, start: int, stop: int):
        """Rows ``[start, stop)`` of obs element ``key``, decoded as anndata would decode it."""
        import h5py

        elem = self._group[key]
        encoding = _attr(elem.attrs, "encoding-type", "")
        if isinstance(elem, h5py.Dataset):
            if self._legacy and "categories" in elem.attrs:
                categories, ordered = self._legacy_categories(key, elem)
                codes = _read_dataset(elem, start, stop)
                return pd.Categorical.from_codes(codes, categories, ordered=ordered)
            if encoding == "string-array":
                return elem.asstr()[start:stop]
            if encoding == "array":
                return elem[start:stop]
            if encoding == "" and elem.dtype.names is None:  # no metadata: anndata < 0.8
                return _read_dataset(elem, start, stop)
        elif encoding == "categorical":
            if key not in self._categories:
                from anndata.io import read_elem

                self._categories[key] = read_elem(elem["categories"])
            return pd.Categorical.from_codes(
                codes=elem["codes"][start:stop],
                categories=self._categories[key],
                ordered=bool(_attr(elem.attrs, "ordered")),
            )
        elif encoding in ("nullable-integer", "nullable-boolean"):
            array_type = pd.arrays.IntegerArray
            if encoding == "nullable-boolean":
                array_type = pd.arrays.BooleanArray
            return array_type(elem["values"][start:stop], mask=elem["mask"][start:stop])
        elif encoding == "nullable-string-array":
            values = elem["values"].asstr()[start:stop]
            array = pd.array(values.astype(object), dtype=pd.StringDtype())
            array[elem["mask"][start:stop]] = pd.NA
            return array
        return self._read_whole(key)[start:stop]

    def _legacy_categories(self, key: str, elem) -> tuple[object, bool]:
        if key not in self._categories:
            from anndata.io import read_elem

            categories = self._group[elem.attrs["categories"]]
            ordered = bool(_attr(categories.attrs, "ordered", False))
            self._categories[key] = (read_elem(categories), ordered)
        return self._categories[key]

    def _read_whole(self, key: str):
        if key not in self._whole:
            from anndata.io import read_elem

            logger.warning(
                "obs column %r has an encoding that is not read by row range: it is read whole.",
                key,
            )
            self._whole[key] = read_elem(self._group[key])
        return self._whole[key]


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
            self.obs = _open_obs(self._h5["obs"])
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
        self.n_obs, self.n_vars = self.obs.n_rows, len(self.var)

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
        self.obs: ObsTable = FrameObs(adata.obs)
        self.var = var
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
        if self._encoding == "memory" and sp.issparse(self._memory_matrix):
            # Sparse in-memory counts: the real density, not the dense worst case (which
            # made chunks of a few hundred cells, so embed() sorted by length in tiny windows).
            nnz = self._memory_matrix.nnz
            return int(np.ceil(nnz / max(self.n_obs, 1)))
        return self.n_vars

    def chunks(self, obs_columns: Sequence[str] | None = None) -> Iterator[CountChunk]:
        """Yield validated chunks in row order; with ``obs_columns``, each carries its obs rows.

        ``obs_columns`` (possibly empty: the index alone) are read for the chunk's rows only.
        """
        step = self.chunk_size()
        totals_from_obs = self._check_obs_n_counts()
        columns = None if obs_columns is None else list(dict.fromkeys(obs_columns))
        for start in range(0, self.n_obs, step):
            stop = min(start + step, self.n_obs)
            matrix = self._read_rows(start, stop)
            self._validate(matrix, start)
            if totals_from_obs:
                n_counts = _obs_totals(self.obs.column("n_counts", start, stop))
            else:
                n_counts = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
            obs = None if columns is None else self.obs.rows(start, stop, columns)
            yield CountChunk(start, stop, matrix, n_counts, obs)

    def _check_obs_n_counts(self) -> bool:
        """Whether ``obs['n_counts']`` is used (Geneformer's convention); raise if it is bad.

        Checked slice by slice before the first chunk, so a bad value fails the run up front.
        """
        if "n_counts" not in self.obs.columns:
            return False
        n_bad, first = 0, -1
        for start, series in self.obs.column_slices("n_counts"):
            values = _obs_totals(series)
            bad = ~np.isfinite(values) | (values < 0)
            if bad.any() and first < 0:
                first = start + int(np.flatnonzero(bad)[0])
            n_bad += int(bad.sum())
        if n_bad:
            raise ValueError(
                f"obs['n_counts'] has {n_bad} missing/negative values (first: cell "
                f"{self.obs.index_at(first)!r}); fix or drop that column so totals are recomputed."
            )
        return True

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
                "layer='raw'), not scaled data; for data released only as z-scores, tokenize "
                "cellfoundry.tokenization.zscores.positive_from_zscores(adata) with "
                "allow_normalized=True."
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
        return str(self.obs.index_at(offset + row))


def _obs_totals(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(np.float64)


def _open_obs(elem) -> ObsTable:
    """Lazy obs for a dataframe encoding; anything older is read whole by anndata, as before."""
    if _attr(elem.attrs, "encoding-type") == "dataframe":
        return H5Obs(elem)
    from anndata.io import read_elem

    return FrameObs(read_elem(elem))


def _read_dataset(elem, start: int, stop: int) -> np.ndarray:
    """Rows of a dataset without encoding metadata, decoded as ``anndata._io.h5ad.read_dataset``."""
    import h5py

    string_dtype = h5py.check_string_dtype(elem.dtype)
    if string_dtype is not None and string_dtype.encoding == "utf-8":
        elem = elem.asstr()
    value = elem[start:stop]
    if issubclass(value.dtype.type, np.bytes_):
        value = value.astype(str)
    return value


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attr(attrs, key: str, default=None):
    """An HDF5 attribute, with byte strings (fixed-length, from other writers) decoded."""
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _read_scalar(group, key: str) -> str | None:
    if group is None or key not in group:
        return None
    value = group[key][()]
    return value.decode() if isinstance(value, bytes) else str(value)
