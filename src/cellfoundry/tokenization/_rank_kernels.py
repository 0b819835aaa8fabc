"""Rank-value kernels over one CSR chunk: map genes -> sum duplicates -> normalise -> rank.

Two implementations give identical tokens (tested):

* ``rank_chunk_numpy``: scipy/numpy only, vectorised over the whole chunk.
* ``rank_chunk_numba``: compiled gather (vocabulary filter, duplicate sums, values) and
  tie-fix passes, parallel over cells, around numpy's SIMD argsort per cell. Written by hand
  because numpy has no segmented (per-row) argsort and numba's own sort is several times
  slower than numpy's; numba is imported lazily so importing the tokenizer stays fast.

Arithmetic (the documented scheme): ``norm = float32(count) / float32(n_counts) * 10000``
in float32, ``value = float64(norm) / median[token]`` in float64; genes sorted by value
descending, ties by token id ascending (a stable sort over token-ordered entries).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

TARGET_SUM = np.float32(10_000.0)

_NUMBA_KERNELS = None
_NUMBA_FAILED = False


def remap_to_tokens(
    matrix: sp.csr_matrix, column_tokens: np.ndarray, n_tokens: int
) -> sp.csr_matrix:
    """Return (cells x n_tokens) CSR with genes outside the vocabulary dropped, duplicates summed.

    ``column_tokens`` holds, per input column, its token id or -1. The result has sorted
    indices within each row, so entries are in token-id order.
    """
    tokens = column_tokens[matrix.indices]
    keep = tokens >= 0
    row_counts = np.add.reduceat(keep, matrix.indptr[:-1]) if keep.size else None
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    if row_counts is not None:
        # reduceat gives the next row's value for empty rows; zero them explicitly
        empty = np.diff(matrix.indptr) == 0
        row_counts = np.where(empty, 0, row_counts)
        np.cumsum(row_counts, out=indptr[1:])
    remapped = sp.csr_matrix(
        (matrix.data[keep], tokens[keep].astype(np.int32), indptr),
        shape=(matrix.shape[0], n_tokens),
    )
    remapped.sum_duplicates()  # sorts indices per row and sums genes mapped to one token
    return remapped


def normalised_values(data: np.ndarray, indptr: np.ndarray, n_counts: np.ndarray) -> np.ndarray:
    """``count / n_counts * 10000`` in float32, per stored entry of a CSR matrix."""
    counts32 = n_counts.astype(np.float32)
    per_entry = np.repeat(counts32, np.diff(indptr))
    return data.astype(np.float32, copy=False) / per_entry * TARGET_SUM


def rank_chunk_numpy(
    matrix: sp.csr_matrix,
    n_counts: np.ndarray,
    column_tokens: np.ndarray,
    medians: np.ndarray,
    max_genes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank one chunk with numpy/scipy; returns (flat gene tokens int32, per-cell lengths int64).

    Entries are in token-id order after :func:`remap_to_tokens`, so a stable argsort of the
    negated values per cell breaks ties by token id.
    """
    tokens_csr = remap_to_tokens(matrix, column_tokens, len(medians))
    indptr = tokens_csr.indptr
    tokens = tokens_csr.indices
    negated = -(normalised_values(tokens_csr.data, indptr, n_counts).astype(np.float64))
    negated /= medians[tokens]
    lengths = np.minimum(np.diff(indptr), max_genes).astype(np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.int32)
    position = 0
    for row in range(matrix.shape[0]):
        lo, hi = indptr[row], indptr[row + 1]
        order = np.argsort(negated[lo:hi], kind="stable")[: lengths[row]]
        out[position : position + lengths[row]] = tokens[lo:hi][order]
        position += lengths[row]
    return out, lengths


def _build_numba_kernels():
    """Compile the gather and tie-fix kernels (numba imported here, not at module import)."""
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def gather(indptr, indices, data, n_counts32, column_tokens, is_dup, medians, toks, neg, n):
        """Per cell: keep vocabulary genes, sum duplicates (as counts), negated values."""
        for row in numba.prange(indptr.size - 1):
            lo = indptr[row]
            end = lo
            for k in range(lo, indptr[row + 1]):
                column = indices[k]
                token = column_tokens[column]
                if token < 0:
                    continue
                merged = False
                if is_dup[column]:  # several input genes share this token: add into the first
                    for j in range(lo, end):
                        if toks[j] == token:
                            neg[j] = np.float32(neg[j]) + np.float32(data[k])
                            merged = True
                            break
                if not merged:
                    toks[end] = token
                    neg[end] = data[k]
                    end += 1
            denom = n_counts32[row]
            for j in range(lo, end):
                norm = np.float32(np.float32(neg[j]) / denom) * np.float32(10000.0)
                neg[j] = -(np.float64(norm) / medians[toks[j]])
            n[row] = end - lo

    @numba.njit(parallel=True, cache=True, nogil=True)
    def finish(indptr, toks, neg, order, n, max_genes, out_offsets, out):
        """Per cell: order runs of equal values by token id (insertion sort), truncate, write."""
        for row in numba.prange(indptr.size - 1):
            lo = indptr[row]
            count = n[row]
            j = 0
            while j < count:
                e = j + 1
                while e < count and neg[lo + order[lo + e]] == neg[lo + order[lo + j]]:
                    e += 1
                for a in range(j + 1, e):
                    x = order[lo + a]
                    b = a - 1
                    while b >= j and toks[lo + order[lo + b]] > toks[lo + x]:
                        order[lo + b + 1] = order[lo + b]
                        b -= 1
                    order[lo + b + 1] = x
                j = e
            base = out_offsets[row]
            for j in range(min(count, max_genes)):
                out[base + j] = toks[lo + order[lo + j]]

    return gather, finish


def numba_available() -> bool:
    """Whether the compiled kernels can be used (numba importable and not disabled)."""
    if os.environ.get("CELLFOUNDRY_DISABLE_NUMBA", "") not in ("", "0"):
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return not _NUMBA_FAILED


def _argsort_rows(indptr, neg, n, order, rows) -> None:
    # numpy's introsort (SIMD on x86) per cell; it releases the GIL, so threads overlap
    for row in rows:
        lo = indptr[row]
        order[lo : lo + n[row]] = np.argsort(neg[lo : lo + n[row]])


def rank_chunk_numba(
    matrix: sp.csr_matrix,
    n_counts: np.ndarray,
    column_tokens: np.ndarray,
    medians: np.ndarray,
    max_genes: int,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank one chunk with compiled kernels; same outputs as :func:`rank_chunk_numpy`."""
    from concurrent.futures import ThreadPoolExecutor

    global _NUMBA_KERNELS
    if _NUMBA_KERNELS is None:
        _NUMBA_KERNELS = _build_numba_kernels()
    gather, finish = _NUMBA_KERNELS
    n_rows = matrix.shape[0]
    indptr = matrix.indptr.astype(np.int64, copy=False)
    nnz = max(int(indptr[-1]), 1)
    column_tokens = column_tokens.astype(np.int64, copy=False)
    mapped = column_tokens[column_tokens >= 0]
    is_dup = np.zeros(column_tokens.size, dtype=np.bool_)
    if mapped.size != np.unique(mapped).size:
        _, inverse, counts = np.unique(column_tokens, return_inverse=True, return_counts=True)
        is_dup = (counts[inverse] > 1) & (column_tokens >= 0)
    toks = np.empty(nnz, dtype=np.int32)
    neg = np.empty(nnz, dtype=np.float64)
    counts_kept = np.zeros(n_rows, dtype=np.int64)
    gather(
        indptr,
        matrix.indices,
        matrix.data.astype(np.float32, copy=False),
        n_counts.astype(np.float32),
        column_tokens,
        is_dup,
        medians,
        toks,
        neg,
        counts_kept,
    )
    order = np.empty(nnz, dtype=np.int64)
    threads = threads or min(os.cpu_count() or 1, 8)
    blocks = np.array_split(np.arange(n_rows), threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda rows: _argsort_rows(indptr, neg, counts_kept, order, rows), blocks))
    lengths = np.minimum(counts_kept, max_genes)
    out_offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    out = np.empty(int(out_offsets[-1]), dtype=np.int32)
    finish(indptr, toks, neg, order, counts_kept, int(max_genes), out_offsets, out)
    return out, lengths


def rank_chunk(
    matrix: sp.csr_matrix,
    n_counts: np.ndarray,
    column_tokens: np.ndarray,
    medians: np.ndarray,
    max_genes: int,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch to the numba kernel when available (``backend='auto'``), else numpy."""
    global _NUMBA_FAILED
    if backend not in {"auto", "numba", "numpy"}:
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', not {backend!r}.")
    if backend == "numba" or (backend == "auto" and numba_available()):
        try:
            return rank_chunk_numba(matrix, n_counts, column_tokens, medians, max_genes)
        except ImportError:
            if backend == "numba":
                raise
        except Exception as error:  # compilation failure on an exotic platform
            if backend == "numba":
                raise
            _NUMBA_FAILED = True
            logger.warning("numba kernel failed (%s); using the numpy path.", error)
    return rank_chunk_numpy(matrix, n_counts, column_tokens, medians, max_genes)
